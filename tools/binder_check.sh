#!/usr/bin/env bash
# What Binder (repo2docker) does with binder/, as far as this machine can: no conda channel is
# reachable here, so conda's `pytorch-cpu` is replaced by the pip CPU wheel of torch. Then the
# pip part of binder/environment.yml, binder/postBuild exactly as written, and every notebook
# through plain papermill at its committed parameters (tests/test_notebooks.py, its timeouts) in
# that environment.
#
#   bash tools/binder_check.sh [VENV_DIR]      (make binder-check)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-/tmp/splitlab-binder-check}
spec="$root/binder/environment.yml"
python=$(grep -oE 'python=[0-9.]+' "$spec" | cut -d= -f2)
command -v "python$python" >/dev/null || { echo "binder_check: needs python$python (binder/environment.yml)" >&2; exit 1; }
"python$python" -m venv --clear "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "${TORCH:-torch==2.13.0}"  # conda-forge pytorch-cpu, here: the pip CPU wheel (as make test)
# the `- pip:` list of environment.yml: the indented items after that line
pkgs=$(awk '/- pip:/{p=1; next} p && /^ +- /{sub(/^ +- /, ""); print}' "$spec")
[ -n "$pkgs" ] || { echo "binder_check: no pip list found in $spec" >&2; exit 1; }
# shellcheck disable=SC2086
python -m pip install -q $pkgs
(cd "$root" && bash binder/postBuild)
python -m pip install -q pytest                     # to drive the notebooks; not part of the image
cd "$root"
python -m pytest -q tests/test_notebooks.py -k "not render_in_jupyterlab" -p no:cacheprovider
echo "binder_check: binder/postBuild and every notebook ran in $venv"
