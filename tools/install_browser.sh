#!/usr/bin/env bash
# Install what tools/browser_check.py needs; idempotent (installs only what is missing).
#
#   bash tools/install_browser.sh [VENV]        (VENV defaults to .venv)
#
# - Debian's Chromium (/usr/bin/chromium) through apt-get, with fonts so text renders;
#   set WITH_CHROMEDRIVER=1 to add chromium-driver too (not needed: Playwright drives
#   Chromium over its DevTools pipe, without chromedriver).
# - The Python package `playwright` into VENV: the driver only. Its browser download
#   (`playwright install`) is never run: the check launches /usr/bin/chromium.
set -euo pipefail

VENV="${1:-.venv}"
PY="$VENV/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"

pkgs=()
command -v chromium >/dev/null 2>&1 || pkgs+=(chromium fonts-liberation fonts-dejavu-core)
if [ "${WITH_CHROMEDRIVER:-0}" = 1 ] && ! command -v chromedriver >/dev/null 2>&1; then
  pkgs+=(chromium-driver)
fi
if [ "${#pkgs[@]}" -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
      echo "install_browser.sh: need root (or sudo) to apt-get install ${pkgs[*]}" >&2; exit 1
    fi
  fi
  echo "install_browser.sh: apt-get install ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${pkgs[@]}"
fi
chromium --version 2>/dev/null | grep -v 'unexpected operator' || { echo "install_browser.sh: chromium does not run" >&2; exit 1; }

if ! "$PY" -c 'import playwright.sync_api' >/dev/null 2>&1; then
  echo "install_browser.sh: pip install playwright into $VENV"
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$PY" -m pip install -q 'playwright>=1.40'
fi
"$PY" -c 'import importlib.metadata as m; print("playwright", m.version("playwright"))'
