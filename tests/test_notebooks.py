"""The notebooks: committed clean, in sync with their readable sources, and executed by papermill.

Each notebook ``notebooks/NN_name.ipynb`` is paired with ``notebooks/NN_name.py`` (jupytext
percent format, paired by ``notebooks/jupytext.toml``). To change a notebook, edit the .py, then
run ``jupytext --sync notebooks/NN_name.py`` and commit both.

Fast checks (every run): each notebook is committed WITHOUT outputs (every code cell has
``outputs == []`` and ``execution_count`` None), holds the cells jupytext reads from its .py,
starts with the Colab install cell, the versions cell and a cell tagged ``parameters``, checks
its own claims with ``assert``, and defines no function or class (logic lives in the package).

Execution (marked ``slow``; still part of ``make test``): every ``notebooks/*.ipynb`` runs top
to bottom under plain ``papermill IN OUT`` (a subprocess of this Python, kernel ``python3``,
nothing patched) at the parameters committed in it, and a second time under
``jupyter nbconvert --to notebook --execute``. A cell may take at most ``TIMEOUT_S`` seconds and
the whole notebook as long (plus a minute for the kernel). Each run gets its own empty TMPDIR,
which must be empty again afterwards (torch's per-user compile cache folder aside), and its
executed copy must hold plotly figures and no ipywidgets output (nothing that needs a live
kernel to draw). A failure names the notebook, the failing cell (index, execution count, first
source line) and its exception. The executed copies are written to a temporary folder and, when
``SPLITLAB_EXECUTED_DIR`` is set, also copied there (for the real-browser check, ``make
browser-check``).

Measured on 2 CPU cores shared with other jobs (this file with SPLITLAB_BROWSER=1): about 10
minutes for papermill (00 35 s, 01 53 s, 02 7 s, 03 117 s, 04 104 s, 05 156 s, 06 35 s), about
as long again for nbconvert, and the browser check 58 s.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

# seconds: the limit of one cell (papermill's --execution-timeout) and of the whole notebook
# (pytest-timeout, + 60 s for kernel start and shutdown). Every notebook runs at the parameters
# committed in it; these limits leave room for a slow or shared machine.
TIMEOUT_S: dict[str, int] = {
    "00_quickstart": 300,
    "01_prefill_vs_decode": 420,
    "02_mps_and_sharing": 240,
    "03_colocation": 900,
    "04_speedups": 900,
    "05_reproducing_splitwiser": 900,
    "06_serve_and_bench": 300,
}
PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
COLAB_GUARD = 'if "google.colab" in sys.modules:'
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _read(path: Path):
    import nbformat

    return nbformat.read(path, as_version=4)


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _params_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected exactly one cell tagged 'parameters', found {len(cells)}"
    return cells[0]


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _cells(nb):
    return [(c.cell_type, c.source, dict(c.metadata)) for c in nb.cells]


def _ids(paths):
    return [p.stem for p in paths]


# ---- fast checks -----------------------------------------------------------------------------------

def test_there_are_notebooks_and_each_has_a_timeout():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"
    stems = {p.stem for p in NOTEBOOKS}
    assert stems == set(TIMEOUT_S), f"TIMEOUT_S must list every notebook: {sorted(stems ^ set(TIMEOUT_S))}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_committed_without_outputs(path):
    nb = _read(path)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.get("outputs") != [] or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} carry outputs or an execution count; notebooks are "
                       "committed clean: run `jupytext --sync` on its .py (that writes no outputs) or clear them")
    assert "widgets" not in nb.metadata, f"{path.name}: saved widget state in the metadata"


def test_every_notebook_has_its_paired_source():
    """Each NN_name.ipynb has NN_name.py beside it, and notebooks/jupytext.toml pairs them."""
    sources = {p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.py")}
    assert sources == {p.stem for p in NOTEBOOKS}, f"unpaired: {sorted(sources ^ {p.stem for p in NOTEBOOKS})}"
    config = (NOTEBOOK_DIR / "jupytext.toml").read_text()
    assert re.search(r'^formats\s*=\s*"ipynb,py:percent"', config, re.M), "jupytext.toml must pair ipynb with py:percent"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_equals_its_source(path):
    """The .ipynb holds exactly the cells jupytext reads from the .py (type, source, tags)."""
    import jupytext  # the notebooks extra installs it
    source = path.with_suffix(".py")
    assert source.is_file(), f"{path.name} has no paired source {source.name}"
    text = jupytext.read(source)
    nb = _read(path)
    want, have = _cells(text), _cells(nb)
    differ = [i for i, (a, b) in enumerate(zip(want, have)) if a != b]
    assert len(want) == len(have) and not differ, (
        f"{path.name} is out of sync with {source.name} ({len(have)} vs {len(want)} cells; first differing cell: "
        f"{differ[:1] or 'the count'}): edit the .py, then run `jupytext --sync notebooks/{source.name}`")
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernelspec must be python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_structure(path):
    nb = _read(path)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), "the notebook opens with its title"
    assert "What you will learn" in first.source, "the first cell says what the reader will learn"
    code = _code_cells(nb)
    assert COLAB_GUARD in code[0].source, "the first code cell installs splitlab on Colab only"
    assert "ENV = start()" in code[1].source and "from splitlab.present.notebook import start" in code[1].source, \
        "the second code cell sets the notebook up and prints the versions and the device (present.notebook.start)"
    assert code[2] is _params_cell(nb), "the third code cell is the one tagged 'parameters'"
    text = "\n".join(c.source for c in nb.cells)
    assert "## What was shown" in text and "## Things to try" in text, "the notebook ends with a summary and things to try"
    assert any(re.search(r"^\s*assert ", c.source, re.M) for c in code), "the notebook checks its claims with assert"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_no_function_defined_in_a_notebook(path):
    """Logic the library should own stays in the library."""
    for i, cell in enumerate(_code_cells(_read(path))):
        source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("!", "%")))
        for node in ast.walk(ast.parse(source)):
            assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)), \
                f"{path.name}, code cell {i}: defines a {type(node).__name__} (line {getattr(node, 'lineno', '?')})"


# ---- execution -------------------------------------------------------------------------------------

def _failure(executed: Path) -> str:
    """The first cell papermill or nbconvert left failed (its error) or running, in the executed copy."""
    try:
        nb = _read(executed)
    except Exception:  # noqa: BLE001 - the copy may be missing or half-written
        return "(no executed copy to inspect)"
    for i, cell in enumerate(nb.cells):
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        status = cell.metadata.get("papermill", {}).get("status")
        if errors or status in ("failed", "running"):
            first = next((line for line in cell.source.splitlines() if line.strip()), "")
            text = ""
            if errors:
                tail = [ANSI.sub("", line) for line in errors[0].get("traceback", [])][-6:]
                text = f"\n  {errors[0].get('ename')}: {ANSI.sub('', errors[0].get('evalue', ''))}\n" + "\n".join(tail)
            return f"cell {i} [exec {cell.get('execution_count')}] {status or 'error'}: {first!r}{text}"
    return "(no failed or running cell recorded)"


def _execute(command: list[str], executed: Path, name: str, tmp: Path, limit_s: int, tool: str) -> str | None:
    """Run one notebook execution command with its own empty TMPDIR; None, or what went wrong."""
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=NOTEBOOK_DIR, env=env, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return f"{name}: still running after {limit_s} s\n  at {_failure(executed)}"
    print(f"{name}: {time.perf_counter() - t0:.1f} s under {tool}")
    if proc.returncode != 0:
        return (f"{name}: exit {proc.returncode}\n  at {_failure(executed)}\n  stderr: "
                f"{ANSI.sub('', proc.stderr)[-1500:]}\n  executed copy: {executed}")
    # torch makes its per-user compile cache folder (torchinductor_<user>) in TMPDIR when it is
    # imported: one shared cache for every later process, not one per run
    left = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_"))
    if left:
        return f"{name}: the notebook left {left} in its temporary folder (TMPDIR): it must clean up"
    return None


def _check_outputs(executed: Path) -> None:
    """Every figure is kernel-free plotly JSON; no widget needs a live kernel to draw."""
    nb = _read(executed)
    outputs = [o for c in _code_cells(nb) for o in c.get("outputs", [])]
    widget = [o for o in outputs if WIDGET_MIME in o.get("data", {})]
    assert not widget and "widgets" not in nb.metadata, \
        f"{executed.name}: {len(widget)} ipywidgets output(s): they draw only beside a live kernel"
    missing = [line for o in outputs if o.get("output_type") == "stream"
               for line in _text(o.get("text", "")).splitlines() if line.startswith("No recorded GPU result yet")]
    assert any(PLOTLY_MIME in o.get("data", {}) for o in outputs), \
        f"{executed.name}: drew no plotly figure" + "".join(f"\n  the notebook said: {line}" for line in missing)


def _params(path: Path):
    marks = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT_S[path.stem] + 60)]
    return pytest.param(path, marks=marks, id=path.stem)


@pytest.mark.parametrize("path", [_params(p) for p in NOTEBOOKS])
def test_notebook_runs_under_plain_papermill(path, tmp_path):
    """`papermill IN OUT` as a user types it, at the notebook's committed parameters, kernel
    python3 of this Python; nothing patched. The notebook's temporary folder ends empty."""
    out = tmp_path / path.name
    command = [sys.executable, "-m", "papermill", str(path), str(out), "--kernel", "python3",
               "--execution-timeout", str(TIMEOUT_S[path.stem]), "--no-progress-bar"]
    try:
        failure = _execute(command, out, path.name, tmp_path / "tmp", TIMEOUT_S[path.stem] + 30, "papermill")
    finally:
        target = os.environ.get("SPLITLAB_EXECUTED_DIR")
        if target and out.is_file():
            Path(target).mkdir(parents=True, exist_ok=True)
            shutil.copy2(out, Path(target) / path.name)
    if failure:
        pytest.fail(failure, pytrace=False)
    _check_outputs(out)


@pytest.mark.parametrize("path", [_params(p) for p in NOTEBOOKS])
def test_notebook_runs_under_nbconvert(path, tmp_path):
    """`jupyter nbconvert --to notebook --execute`, the other common executor (same nbclient), at
    the committed parameters; every notebook draws at least one explorer (a menu or a slider)."""
    out = tmp_path / path.name
    jupyter = Path(sys.executable).with_name("jupyter")
    command = ([str(jupyter)] if jupyter.is_file() else [sys.executable, "-m", "jupyter"]) + [
        "nbconvert", "--to", "notebook", "--execute", f"--ExecutePreprocessor.timeout={TIMEOUT_S[path.stem]}",
        "--ExecutePreprocessor.kernel_name=python3", "--output-dir", str(tmp_path), str(path)]
    failure = _execute(command, out, path.name, tmp_path / "tmp", TIMEOUT_S[path.stem] + 30, "nbconvert")
    if failure:
        pytest.fail(failure, pytrace=False)
    _check_outputs(out)
    menus = [o["data"][PLOTLY_MIME]["layout"] for c in _code_cells(_read(out)) for o in c.get("outputs", [])
             if PLOTLY_MIME in o.get("data", {})]
    assert any(layout.get("updatemenus") or layout.get("sliders") for layout in menus), \
        f"{path.name}: no explorer (a figure with a dropdown or a slider) was drawn"


@pytest.mark.slow
@pytest.mark.browser
def test_executed_notebooks_render_in_jupyterlab(tmp_path):
    """The real-browser check over the copies ``test_notebook_runs_under_plain_papermill`` wrote (it runs after them:
    pytest keeps file order). ``make test`` sets SPLITLAB_BROWSER=1 and SPLITLAB_EXECUTED_DIR
    and installs Chromium first (tools/install_browser.sh); without them this test is skipped."""
    if os.environ.get("SPLITLAB_BROWSER") != "1":
        pytest.skip("real-browser check: `make test` runs it (SPLITLAB_BROWSER=1 and SPLITLAB_EXECUTED_DIR)")
    executed = os.environ.get("SPLITLAB_EXECUTED_DIR")
    assert executed, "SPLITLAB_EXECUTED_DIR must name the folder test_notebook_runs_under_plain_papermill copies executed notebooks to"
    tool = Path(__file__).resolve().parents[1] / "tools" / "browser_check.py"
    out = tmp_path / "browser-check"
    proc = subprocess.run(
        [sys.executable, str(tool), executed, "--out", str(out), "--expect", str(NOTEBOOK_DIR)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"browser check failed (exit {proc.returncode}); screenshots in {out}\n" \
                                 f"{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    report = json.loads((out / "report.json").read_text())
    assert len(report["notebooks"]) == len(NOTEBOOKS), report
