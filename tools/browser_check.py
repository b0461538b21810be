#!/usr/bin/env python3
"""Open executed notebooks in JupyterLab in headless Chromium, screenshot them, check them.

Usage::

    python tools/browser_check.py EXECUTED_DIR_OR_NOTEBOOKS... [--out DIR] [--expect notebooks]

For every ``*.ipynb`` given (or found in a given folder) this script

1. copies the notebooks into a fresh temporary root and signs them with ``jupyter trust``
   (so JavaScript in HTML outputs, e.g. plotly's, is allowed to run);
2. starts ``jupyter lab`` on 127.0.0.1 with a random free port and a random token, no browser,
   root allowed, with every Jupyter config/data/runtime/settings/workspace folder pointed into
   the temporary root (nothing of the user's Jupyter set-up is read or written; the news feed,
   update check and autosave are off; cells are not virtualised so every output renders);
3. drives Debian's Chromium (``/usr/bin/chromium``; only the Python package ``playwright`` is
   used to drive it, no browser is ever downloaded) headless, opens each notebook at
   ``/lab/workspaces/<fresh>/tree/<name>.ipynb?token=...``, waits until all cells are in the DOM
   and the plots have drawn, scrolls through the notebook, and takes a full-height PNG
   screenshot per notebook into ``--out``;
4. checks the page, and fails the notebook when

   * an output shows an error: JupyterLab 4 renders an ``error`` output (and a ``stderr``
     stream) as ``.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]``;
     one whose text holds ``Traceback`` counts as an error (plain warnings on stderr do not);
     papermill's red "An Exception was encountered" banner counts too;
   * the ``.ipynb`` itself holds an ``error`` output, or papermill marked it failed;
   * fewer plotly figures drew (``.js-plotly-plot`` holding a non-empty ``svg.main-svg``) than
     the notebook has plotly outputs (``application/vnd.plotly.v1+json``, or ``text/html``
     that calls plotly);
   * JupyterLab shows "No renderer could be found" for an output, or the notebook was never
     executed (code cells but no execution count);
   * a figure with a dropdown or a slider (``layout.updatemenus`` / ``layout.sliders``) does not
     switch views when its control is clicked (its choice and its visible traces must change:
     plotly.js does that alone, the page has no kernel behind these figures);

5. always stops Chromium and the Jupyter server (kernels included), then looks for any process
   it started that is still alive (by process tree and by the temporary root in the command
   line), kills those by pid and reports them.

Writes ``report.json`` next to the screenshots; prints one line per notebook and the time each
step took. Exit status: 0 all notebooks pass, 1 a notebook failed a check, 2 the check itself
could not run (no Chromium, server did not start, ...).

Needs: ``jupyterlab`` (and the plotly lab extension, which the ``plotly`` package ships) in
this Python, ``pip install playwright`` (the Python package only; never ``playwright
install``), and Debian's ``chromium`` (``tools/install_browser.sh``). Independent of splitlab.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--disable-crash-reporter",
    "--disable-breakpad",
]

PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

# JupyterLab user settings written into the temporary settings folder.
LAB_SETTINGS = {
    # render every cell (the default "contentVisibility" and "full"/"defer" modes may leave
    # off-screen outputs unrendered or plotly figures laid out at size 0)
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {
        "windowingMode": "none",
        "autoStartDefaultKernel": False,
    },
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/extensionmanager-extension/plugin.jupyterlab-settings": {"enabled": False},
}


# ---------------------------------------------------------------------------------------------
# What the .ipynb says
# ---------------------------------------------------------------------------------------------


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value or "")


def _is_plotly_html(html: str) -> bool:
    """A figure drawn by HTML (``fig.show(renderer="notebook")``, ``fig.to_html()``): it holds
    the figure's ``<div class="plotly-graph-div">``. The renderer's one-off output that only
    loads plotly.js (megabytes of script, "newPlot" included) holds no such div: not a plot."""
    return 'class="plotly-graph-div"' in html


@dataclass
class NotebookFacts:
    """Counted from the notebook JSON."""

    cells: int = 0
    code_cells: int = 0
    executed_code_cells: int = 0
    never_ran: list[int] = field(default_factory=list)  # non-empty code cells, no execution count
    plots_expected: int = 0
    controls_expected: int = 0  # plotly figures with a dropdown (updatemenus) or a slider
    widget_outputs: int = 0
    json_errors: list[str] = field(default_factory=list)
    papermill_failed: bool = False


def notebook_facts(path: Path) -> NotebookFacts:
    nb = json.loads(path.read_text(encoding="utf-8"))
    facts = NotebookFacts()
    facts.papermill_failed = bool(nb.get("metadata", {}).get("papermill", {}).get("exception"))
    for index, cell in enumerate(nb.get("cells", [])):
        facts.cells += 1
        if cell.get("cell_type") != "code":
            continue
        facts.code_cells += 1
        if cell.get("execution_count") is not None:
            facts.executed_code_cells += 1
        elif _text(cell.get("source", "")).strip():
            facts.never_ran.append(index)
        for out in cell.get("outputs", []):
            kind = out.get("output_type")
            if kind == "error":
                facts.json_errors.append(
                    f"cell {index}: {out.get('ename', '?')}: {out.get('evalue', '')}"[:300]
                )
                continue
            data = out.get("data") or {}
            if PLOTLY_MIME in data or _is_plotly_html(_text(data.get("text/html", ""))):
                facts.plots_expected += 1
                layout = (data.get(PLOTLY_MIME) or {}).get("layout") or {}
                if layout.get("updatemenus") or layout.get("sliders"):
                    facts.controls_expected += 1
            elif WIDGET_MIME in data:
                facts.widget_outputs += 1
    return facts


# ---------------------------------------------------------------------------------------------
# Processes: our tree, the leftovers check
# ---------------------------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) for every process we can read (splitlab's /proc reader)."""
    from splitlab.system.procs import proc_table

    return {info.pid: (info.ppid, " ".join(info.cmdline)) for info in proc_table().values()}


def our_processes(marker: str) -> dict[int, str]:
    """Descendants of this process, plus any process whose command line holds ``marker``
    (our temporary root: kernels started by the server live in their own sessions)."""
    table = _proc_table()
    me = os.getpid()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, str] = {}
    stack = list(children.get(me, []))
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found[pid] = table[pid][1]
        stack.extend(children.get(pid, []))
    for pid, (_, cmd) in table.items():
        if pid != me and marker in cmd:
            found[pid] = cmd
    return found


def _alive(pid: int) -> bool:
    from splitlab.system.procs import alive

    return alive(pid)


def _reap_children() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_pids(pids: list[int], grace: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            if _alive(pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            _reap_children()
            time.sleep(0.1)
        if not any(_alive(p) for p in pids):
            return


# ---------------------------------------------------------------------------------------------
# The Jupyter server
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class JupyterLab:
    def __init__(self, work: Path, root: Path, log_path: Path):
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}"
        self.root = root
        self.log_path = log_path
        self.env = dict(os.environ)
        for var, sub in {
            "JUPYTER_CONFIG_DIR": "jupyter/config",
            "JUPYTER_DATA_DIR": "jupyter/data",
            "JUPYTER_RUNTIME_DIR": "jupyter/runtime",
            "JUPYTERLAB_SETTINGS_DIR": "jupyter/lab-settings",
            "JUPYTERLAB_WORKSPACES_DIR": "jupyter/lab-workspaces",
            "IPYTHONDIR": "ipython",
        }.items():
            (work / sub).mkdir(parents=True, exist_ok=True)
            self.env[var] = str(work / sub)
        self.env.pop("JUPYTER_PATH", None)
        self.env.pop("JUPYTER_TOKEN", None)
        self.env["JUPYTER_PLATFORM_DIRS"] = "1"
        settings = Path(self.env["JUPYTERLAB_SETTINGS_DIR"])
        for rel, value in LAB_SETTINGS.items():
            (settings / rel).parent.mkdir(parents=True, exist_ok=True)
            (settings / rel).write_text(json.dumps(value))
        self.proc: subprocess.Popen | None = None
        self._log = None

    def trust(self, notebooks: list[Path]) -> None:
        subprocess.run(
            [sys.executable, "-m", "jupyter", "trust", *map(str, notebooks)],
            env=self.env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            timeout=120,
        )

    def start(self, timeout: float) -> None:
        cmd = [
            sys.executable, "-m", "jupyterlab",
            "--no-browser", "--allow-root",
            "--ip=127.0.0.1", f"--port={self.port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            "--ServerApp.terminals_enabled=False",
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cmd, env=self.env, cwd=self.root, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.api("status"), timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"jupyter lab did not answer within {timeout:.0f} s\n{self.log_tail()}")

    def api(self, path: str) -> str:
        return f"{self.base}/api/{path}?token={self.token}"

    def delete_sessions(self) -> None:
        """Shut the kernels JupyterLab started for the notebooks opened so far."""
        try:
            with urllib.request.urlopen(self.api("sessions"), timeout=5) as resp:
                sessions = json.load(resp)
            for sess in sessions:
                req = urllib.request.Request(
                    f"{self.base}/api/sessions/{sess['id']}?token={self.token}", method="DELETE"
                )
                urllib.request.urlopen(req, timeout=10).close()
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            pass

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:  # graceful: the server shuts its kernels down
                req = urllib.request.Request(self.api("shutdown"), method="POST")
                urllib.request.urlopen(req, timeout=5).close()
            except (urllib.error.URLError, OSError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(self.proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        self.proc.wait(timeout=5)
                        break
                    except subprocess.TimeoutExpired:
                        continue
        if self._log:
            self._log.close()


# ---------------------------------------------------------------------------------------------
# The browser
# ---------------------------------------------------------------------------------------------

# Evaluated in the page: find the open notebook panel and its scroll container.
JS_PANEL = """
() => {
  const panels = [...document.querySelectorAll('.jp-NotebookPanel')]
      .filter(p => !p.classList.contains('lm-mod-hidden') && p.offsetParent !== null);
  return panels.length ? panels[panels.length - 1] : null;
}
"""

JS_STATE = """
() => {
  const panel = (%s)();
  if (!panel) return null;
  const nb = panel.querySelector('.jp-Notebook');
  const plots = [...panel.querySelectorAll('.js-plotly-plot')].filter(div => {
    if (div.parentElement && div.parentElement.closest('.js-plotly-plot')) return false;
    const svg = div.querySelector('svg.main-svg');
    if (!svg) return false;
    const r = svg.getBoundingClientRect();
    return r.width > 0 && r.height > 0;
  });
  const outputs = [...panel.querySelectorAll('.jp-OutputArea-output')];
  const errors = [];
  for (const o of outputs) {
    const mime = o.getAttribute('data-mime-type') || '';
    const text = o.innerText || '';
    if ((mime === 'application/vnd.jupyter.stderr' || mime === 'application/vnd.jupyter.error')
        && /Traceback/.test(text)) {
      const lines = text.trim().split('\\n').filter(l => l.trim());
      errors.push('error output: ' + (lines.length ? lines[lines.length - 1] : '').slice(0, 300));
    } else if (/No renderer could be found for output/.test(text)) {
      errors.push('no renderer: ' + text.trim().slice(0, 300));
    }
  }
  for (const md of panel.querySelectorAll('.jp-RenderedHTMLCommon')) {
    if (/An Exception was encountered at/.test(md.innerText || ''))
      errors.push('papermill banner: ' + md.innerText.trim().slice(0, 200));
  }
  const scroller = panel.querySelector('.jp-WindowedPanel-outer') || nb;
  // height of the notebook's content (cells only: JupyterLab pads below the last cell)
  const cells = panel.querySelectorAll('.jp-Notebook .jp-Cell');
  let contentHeight = 0;
  if (scroller && cells.length) {
    const last = cells[cells.length - 1].getBoundingClientRect();
    contentHeight = last.bottom - scroller.getBoundingClientRect().top + scroller.scrollTop;
  }
  return {
    cells: panel.querySelectorAll('.jp-Notebook .jp-Cell').length,
    outputs: outputs.length,
    plots: plots.length,
    plotDivs: panel.querySelectorAll('.js-plotly-plot').length,
    errors: errors,
    dialogs: [...document.querySelectorAll('.jp-Dialog')].map(d => (d.innerText || '').trim().slice(0, 200)),
    contentHeight: Math.ceil(contentHeight),
    scrollHeight: scroller ? scroller.scrollHeight : 0,
    clientHeight: scroller ? scroller.clientHeight : 0,
  };
}
""" % JS_PANEL

JS_SCROLL = """
async (step) => {
  const panel = (%s)();
  if (!panel) return 0;
  const scroller = panel.querySelector('.jp-WindowedPanel-outer') || panel.querySelector('.jp-Notebook');
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  let n = 0;
  for (let y = 0; y < scroller.scrollHeight; y += Math.max(200, scroller.clientHeight * step)) {
    scroller.scrollTop = y; n++; await sleep(60);
  }
  scroller.scrollTop = scroller.scrollHeight; await sleep(60);
  scroller.scrollTop = 0; await sleep(60);
  return n;
}
""" % JS_PANEL

JS_TIDY = """
() => {
  const app = window.jupyterapp;
  if (app && app.shell) {
    try { app.shell.collapseLeft(); } catch (e) {}
    try { app.shell.collapseRight(); } catch (e) {}
  }
  // the "get notified about Jupyter news" toast and any other notifications
  for (const b of document.querySelectorAll('.Toastify__close-button')) b.click();
}
"""


@dataclass
class NotebookResult:
    name: str
    ok: bool = False
    cells: int = 0
    cells_rendered: int = 0
    code_cells: int = 0
    executed_code_cells: int = 0
    never_ran: list[int] = field(default_factory=list)  # non-empty code cells, no execution count
    plots_expected: int = 0
    plots_rendered: int = 0
    controls_expected: int = 0
    controls_working: int = 0  # a click on the control changed which traces show, no kernel involved
    widget_outputs: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    screenshot: str = ""
    screenshot_truncated: bool = False
    seconds: float = 0.0
    phases_s: dict = field(default_factory=dict)


JS_CONTROLS = """
() => {
  const panel = (%s)();
  return [...(panel ? panel.querySelectorAll('.js-plotly-plot') : [])].map((gd, i) => {
    const lay = gd.layout || {};
    const kind = (lay.updatemenus || []).length ? 'dropdown' : ((lay.sliders || []).length ? 'slider' : null);
    const items = kind === 'dropdown' ? lay.updatemenus[0].buttons : (kind === 'slider' ? lay.sliders[0].steps : []);
    const active = kind === 'dropdown' ? lay.updatemenus[0].active : (kind === 'slider' ? lay.sliders[0].active : null);
    return {index: i, kind: kind, count: (items || []).length, active: active || 0,
            visible: JSON.stringify((gd.data || []).map(t => t.visible))};
  });
}
""" % JS_PANEL


def exercise_controls(page, args) -> tuple[int, list[str]]:
    """Click every figure's dropdown (its last other choice) or slider (the rail's far end) as a
    reader would, then check that the figure now shows other traces: plotly.js alone does it."""
    working, problems = 0, []
    plots = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .js-plotly-plot")
    for before in page.evaluate(JS_CONTROLS):
        if not before["kind"] or before["count"] < 2:
            working += bool(before["kind"])  # one choice: nothing to switch to
            continue
        plot = plots.nth(before["index"])
        try:
            plot.scroll_into_view_if_needed(timeout=args.timeout * 1000)
            if before["kind"] == "dropdown":
                plot.locator(".updatemenu-header").first.click(timeout=10000)
                target = before["count"] - 1 if before["active"] != before["count"] - 1 else 0
                plot.locator(".updatemenu-dropdown-button").nth(target).click(timeout=10000)
            else:
                rail = plot.locator(".slider-rail-touch-rect").first
                box = rail.bounding_box(timeout=10000)
                x = box["x"] + (box["width"] - 2 if before["active"] != before["count"] - 1 else 2)
                page.mouse.click(x, box["y"] + box["height"] / 2)
            page.wait_for_timeout(600)
        except Exception as exc:  # noqa: BLE001 - a control that cannot be clicked is a failure
            problems.append(f"figure {before['index']}: could not use its {before['kind']}: {str(exc)[:200]}")
            continue
        after = page.evaluate(JS_CONTROLS)[before["index"]]
        if after["active"] != before["active"] and after["visible"] != before["visible"]:
            working += 1
        else:
            problems.append(f"figure {before['index']}: its {before['kind']} was clicked but the figure did not "
                            f"switch views (choice {before['active']} -> {after['active']})")
    return working, problems


def check_notebook(ctx, lab: JupyterLab, nb: Path, index: int, out_dir: Path, args) -> NotebookResult:
    t0 = time.monotonic()
    facts = notebook_facts(nb)
    res = NotebookResult(
        name=nb.name, cells=facts.cells, code_cells=facts.code_cells,
        executed_code_cells=facts.executed_code_cells, plots_expected=facts.plots_expected,
        controls_expected=facts.controls_expected, widget_outputs=facts.widget_outputs,
    )
    res.errors += [f"error output in the .ipynb: {e}" for e in facts.json_errors]
    if facts.papermill_failed and not facts.json_errors:
        res.errors.append("papermill marked the notebook as failed (metadata.papermill.exception)")
    if facts.code_cells and not facts.executed_code_cells:
        res.errors.append("no code cell was executed: is this an executed copy?")
    elif facts.never_ran:
        msg = f"{len(facts.never_ran)} code cell(s) never ran: cells {facts.never_ran[:10]}"
        if facts.json_errors or facts.papermill_failed:
            res.warnings.append(msg + " (after the error)")
        else:
            res.errors.append(msg + " (did the execution stop early?)")
    if facts.widget_outputs:
        res.warnings.append(
            f"{facts.widget_outputs} widget output(s): not drawn without a live kernel, not checked"
        )

    page = ctx.new_page()
    console: list[str] = []
    page.on("pageerror", lambda exc: console.append(f"page error: {exc}"[:300]))
    page.on("console", lambda msg: console.append(f"console {msg.type}: {msg.text}"[:300])
            if msg.type == "error" else None)
    height = args.height
    phase_t = [time.monotonic()]

    def phase(name: str) -> None:
        now = time.monotonic()
        res.phases_s[name] = round(now - phase_t[0], 2)
        phase_t[0] = now

    page.set_viewport_size({"width": args.width, "height": height})
    try:
        # a fresh workspace per notebook, so JupyterLab restores nothing from an earlier page
        url = f"{lab.base}/lab/workspaces/check{index}/tree/{nb.name}?token={lab.token}"
        page.goto(url, wait_until="domcontentloaded", timeout=args.timeout * 1000)
        # JupyterLab up and the notebook panel open (slow part: loading JupyterLab itself)
        page.wait_for_function(
            f"() => {{ const s = ({JS_STATE})(); return s !== null; }}",
            timeout=args.timeout * 1000, polling=200,
        )
        phase("open JupyterLab")
        # all cells in the DOM (a notebook whose rendering throws never gets there)
        page.wait_for_function(
            f"() => {{ const s = ({JS_STATE})(); return s && s.cells >= {max(facts.cells, 1)}; }}",
            timeout=args.render_timeout * 1000, polling=200,
        )
        phase("cells")
        page.evaluate(JS_TIDY)
        # plots draw asynchronously: wait for all expected ones (or give up after plot_timeout)
        if facts.plots_expected:
            try:
                page.wait_for_function(
                    f"() => {{ const s = ({JS_STATE})(); return s && s.plots >= {facts.plots_expected}; }}",
                    timeout=args.plot_timeout * 1000, polling=250,
                )
            except Exception:  # noqa: BLE001 - counted below
                pass
        phase("plots")
        page.evaluate(JS_SCROLL, 0.8)
        # settle: wait until the number of rendered outputs stops changing
        last, stable_since = None, time.monotonic()
        settle_deadline = time.monotonic() + 10
        while time.monotonic() < settle_deadline:
            state = page.evaluate(JS_STATE)
            key = (state["outputs"], state["plots"])
            if key != last:
                last, stable_since = key, time.monotonic()
            elif time.monotonic() - stable_since > 0.6:
                break
            page.wait_for_timeout(150)
        page.evaluate(JS_TIDY)
        phase("scroll+settle")

        # full-height screenshot: the notebook scrolls inside the page, so grow the viewport
        state = page.evaluate(JS_STATE)
        extra = max(0, state["contentHeight"] + 40 - state["clientHeight"])
        if extra:
            want = height + extra
            res.screenshot_truncated = want > args.max_height
            page.set_viewport_size({"width": args.width, "height": min(want, args.max_height)})
            page.wait_for_timeout(400)  # let JupyterLab and plotly lay out again
            page.evaluate(JS_SCROLL, 0.8)
        shot = out_dir / f"{nb.stem}.png"
        page.screenshot(path=str(shot), full_page=True, timeout=args.timeout * 1000)
        res.screenshot = str(shot)
        phase("screenshot")

        state = page.evaluate(JS_STATE)
        res.cells_rendered = state["cells"]
        res.plots_rendered = state["plots"]
        res.errors += state["errors"]
        if state["dialogs"]:
            res.warnings += [f"dialog open: {d}" for d in state["dialogs"]]
        if res.plots_rendered < res.plots_expected:
            res.errors.append(
                f"plot missing: {res.plots_expected} plotly output(s) in the notebook, "
                f"{res.plots_rendered} drawn ({state['plotDivs']} plot div(s) in the page)"
            )
        if res.cells_rendered < res.cells:
            res.errors.append(f"only {res.cells_rendered} of {res.cells} cells rendered")
        if facts.controls_expected:
            res.controls_working, problems = exercise_controls(page, args)
            res.errors += problems
            if res.controls_working < facts.controls_expected:
                res.errors.append(f"controls: {facts.controls_expected} figure(s) with a dropdown or slider, "
                                  f"{res.controls_working} switched views when clicked")
            phase("controls")
    except Exception as exc:  # noqa: BLE001 - a notebook that will not render is a failure
        try:
            res.cells_rendered = (page.evaluate(JS_STATE) or {}).get("cells", 0)
        except Exception:  # noqa: BLE001
            pass
        res.errors.append(f"could not render in JupyterLab: {type(exc).__name__}: {str(exc)[:400]}")
        try:
            shot = out_dir / f"{nb.stem}.png"
            page.screenshot(path=str(shot), timeout=10000)
            res.screenshot = str(shot)
        except Exception:  # noqa: BLE001
            pass
    finally:
        page.close()
        lab.delete_sessions()
    res.warnings += console[:10]
    res.ok = not res.errors
    res.seconds = round(time.monotonic() - t0, 2)
    return res


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def collect(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found += sorted(q for q in p.glob("*.ipynb") if not q.name.startswith("."))
        elif p.suffix == ".ipynb" and p.is_file():
            found.append(p)
        else:
            raise ValueError(f"not a notebook or folder: {raw}")
    names = [p.name for p in found]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"two notebooks share a name: {sorted(dupes)}")
    return found


def find_chromium(explicit: str | None) -> str:
    for cand in (explicit, os.environ.get("CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    raise FileNotFoundError(
        "Chromium not found: install Debian's package with `bash tools/install_browser.sh` "
        "(apt-get install chromium), or pass --chromium PATH"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="folders of executed notebooks, or .ipynb files")
    ap.add_argument("--out", default="out/browser-check", help="screenshots + report.json go here")
    ap.add_argument("--expect", metavar="DIR",
                    help="fail when a notebook of DIR (e.g. notebooks/) has no executed copy")
    ap.add_argument("--chromium", help="browser binary (default: $CHROMIUM, then chromium on PATH)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--max-height", type=int, default=16000, help="cap on the screenshot height")
    ap.add_argument("--timeout", type=float, default=90, help="seconds to open one notebook")
    ap.add_argument("--render-timeout", type=float, default=30,
                    help="seconds, once the notebook is open, for all its cells to render")
    ap.add_argument("--plot-timeout", type=float, default=30,
                    help="seconds to wait for the expected plots to draw")
    ap.add_argument("--server-timeout", type=float, default=90)
    ap.add_argument("--keep-workdir", action="store_true", help="keep the temporary root (debug)")
    args = ap.parse_args(argv)

    timings: dict[str, float] = {}
    t_all = time.monotonic()
    try:
        notebooks = collect(args.paths)
    except ValueError as exc:
        print(f"browser_check: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in list(out_dir.glob("*.png")) + [out_dir / "report.json"]:
        old.unlink(missing_ok=True)

    missing: list[str] = []
    if args.expect:
        have = {p.name for p in notebooks}
        missing = sorted(p.name for p in Path(args.expect).glob("*.ipynb") if p.name not in have)
    if not notebooks:
        print(f"browser_check: no notebooks in {args.paths}", file=sys.stderr)
        return 2

    try:
        chromium = find_chromium(args.chromium)
        from playwright.sync_api import sync_playwright
    except (FileNotFoundError, ImportError) as exc:
        hint = " (pip install playwright: the Python package only)" if isinstance(exc, ImportError) else ""
        print(f"browser_check: {exc}{hint}", file=sys.stderr)
        return 2

    # SIGTERM (a CI timeout) must still run the clean-up below
    def _on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old_term = signal.signal(signal.SIGTERM, _on_term)

    work = Path(tempfile.mkdtemp(prefix="splitlab-browser-check-"))
    marker = str(work)
    preexisting = set(our_processes(marker))  # children we did not start here: never touched
    root = work / "root"
    root.mkdir()
    results: list[NotebookResult] = []
    lab = pw = browser = None
    infra_error = ""
    leftovers: dict[int, str] = {}
    try:
        t = time.monotonic()
        copies = []
        for nb in notebooks:
            shutil.copy2(nb, root / nb.name)
            copies.append(root / nb.name)
        lab = JupyterLab(work, root, out_dir / "jupyter-server.log")
        lab.trust(copies)
        timings["copy+trust"] = time.monotonic() - t

        t = time.monotonic()
        lab.start(args.server_timeout)
        timings["server start"] = time.monotonic() - t

        t = time.monotonic()
        os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
        pw = sync_playwright().start()
        browser = pw.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
            chromium_sandbox=False, timeout=60000,
            # Chromium's own files (temporary, config, cache, crash database) go under our root
            env={**os.environ, "TMPDIR": str(work), "XDG_CONFIG_HOME": str(work / "xdg-config"),
                 "XDG_CACHE_HOME": str(work / "xdg-cache")},
        )
        ctx = browser.new_context(
            viewport={"width": args.width, "height": args.height}, device_scale_factor=1,
        )
        timings["browser start"] = time.monotonic() - t

        for i, nb in enumerate(copies):
            res = check_notebook(ctx, lab, nb, i, out_dir, args)
            results.append(res)
            timings[f"notebook {nb.name}"] = res.seconds
        ctx.close()
    except KeyboardInterrupt as exc:
        infra_error = f"interrupted ({exc})"
    except Exception as exc:  # noqa: BLE001
        infra_error = f"{type(exc).__name__}: {exc}"
    finally:
        t = time.monotonic()
        # leftover check: everything we started, snapshotted while it is still up
        started = our_processes(marker)
        for closer in (
            (lambda: browser.close()) if browser else None,
            (lambda: pw.stop()) if pw else None,
            (lambda: lab.stop()) if lab else None,
        ):
            if closer:
                try:
                    closer()
                except Exception as exc:  # noqa: BLE001
                    print(f"browser_check: clean-up: {type(exc).__name__}: {exc}", file=sys.stderr)
        # give what we closed a few seconds to exit by itself; whatever is left is a leftover
        grace_end = time.monotonic() + 8
        while True:
            _reap_children()
            still = {pid: cmd for pid, cmd in {**started, **our_processes(marker)}.items()
                     if pid not in preexisting and _alive(pid)}
            if not still or time.monotonic() > grace_end:
                break
            time.sleep(0.2)
        if still:
            leftovers = still
            kill_pids(list(still))
        timings["shutdown"] = time.monotonic() - t
        if not args.keep_workdir:
            shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGTERM, old_term)
    timings["total"] = time.monotonic() - t_all

    # ---- report
    report = {
        "ok": bool(results) and all(r.ok for r in results) and not missing and not infra_error
        and len(results) == len(notebooks),
        "chromium": chromium,
        "workdir": marker,
        "infra_error": infra_error,
        "missing_executed_copies": missing,
        "leftover_processes_killed": {str(k): v[:200] for k, v in leftovers.items()},
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "notebooks": [asdict(r) for r in results],
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))

    for r in results:
        status = "PASS" if r.ok else "FAIL"
        print(
            f"{status} {r.name}: cells {r.cells_rendered}/{r.cells}, errors {len(r.errors)}, "
            f"plots {r.plots_rendered}/{r.plots_expected} (rendered/expected), "
            + (f"controls {r.controls_working}/{r.controls_expected} (switched/expected), " if r.controls_expected else "")
            + f"{r.seconds:.1f} s, screenshot {r.screenshot or '-'}"
            + (" (height capped)" if r.screenshot_truncated else "")
        )
        if r.phases_s:
            print("    time: " + ", ".join(f"{k} {v:.1f} s" for k, v in r.phases_s.items()))
        for e in r.errors:
            print(f"    error: {e}")
        for w in r.warnings:
            print(f"    note: {w}")
    for name in missing:
        print(f"FAIL {name}: no executed copy among {args.paths}")
    if leftovers:
        print(f"browser_check: {len(leftovers)} process(es) outlived the clean-up and were killed:")
        for pid, cmd in leftovers.items():
            print(f"    {pid}: {cmd[:160]}")
    print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    print(f"report: {out_dir / 'report.json'}")
    if infra_error:
        print(f"browser_check: could not run: {infra_error}", file=sys.stderr)
        if lab:
            print(lab.log_tail(), file=sys.stderr)
        return 2
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
