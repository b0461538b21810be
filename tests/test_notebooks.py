"""The notebooks: committed clean, in sync with their readable sources, and executed by papermill.

Each notebook ``notebooks/NN_name.ipynb`` is paired with ``notebooks/NN_name.py`` (jupytext
percent format, paired by ``notebooks/jupytext.toml``). To change a notebook, edit the .py, then
run ``jupytext --sync notebooks/NN_name.py`` and commit both.

Fast checks (every run): each notebook is committed WITHOUT outputs (every code cell has
``outputs == []`` and ``execution_count`` None), holds the cells jupytext reads from its .py,
starts with the Colab install cell, the versions cell and a cell tagged ``parameters``, checks
its own claims with ``assert``, and defines no function or class (logic lives in the package).

Execution (marked ``slow``; still part of ``make test``): every ``notebooks/*.ipynb`` runs top
to bottom with papermill on CPU, kernel ``python3``, with the small parameters of ``PARAMS``
(``SMOKE=True``); a cell may take at most ``TIMEOUT_S`` seconds and the whole notebook as long
(pytest-timeout, plus a minute for the kernel). A failure names the notebook, the failing cell
(execution count, index, first source line) and the exception. The executed copy is written
to a temporary folder and, when ``SPLITLAB_EXECUTED_DIR`` is set, also copied there (for the
real-browser check, ``make browser-check``).

Measured on 2 CPU cores (this file, fast checks included): about 2 minutes on a quiet machine
(00 9 s, 01 9 s, 02 5 s, 03 30 s, 04 18 s, 05 49 s), about 5 minutes while other jobs shared
the cores.
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

# papermill parameters per notebook (names must exist in the notebook's `parameters` cell)
PARAMS: dict[str, dict] = {
    "00_quickstart": dict(SMOKE=True),
    "01_prefill_vs_decode": dict(SMOKE=True),
    "02_mps_and_sharing": dict(SMOKE=True),
    "03_colocation": dict(SMOKE=True),
    "04_speedups": dict(SMOKE=True),
    "05_reproducing_splitwiser": dict(SMOKE=True),
}
# seconds: the limit of one cell (papermill) and of the whole notebook (pytest-timeout, + 60 s
# for kernel start and shutdown). A CPU run of the suite takes a few minutes; these limits
# leave room for a slow or shared machine.
TIMEOUT_S: dict[str, int] = {
    "00_quickstart": 180,
    "01_prefill_vs_decode": 300,
    "02_mps_and_sharing": 120,
    "03_colocation": 420,
    "04_speedups": 480,
    "05_reproducing_splitwiser": 480,
}
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


def _cells(nb):
    return [(c.cell_type, c.source, dict(c.metadata)) for c in nb.cells]


def _ids(paths):
    return [p.stem for p in paths]


# ---- fast checks -----------------------------------------------------------------------------------

def test_there_are_notebooks_and_each_has_parameters_and_a_timeout():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"
    stems = {p.stem for p in NOTEBOOKS}
    assert stems == set(PARAMS), f"PARAMS must list every notebook: {sorted(stems ^ set(PARAMS))}"
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
    assert "sl.environment()" in code[1].source and "torch.__version__" in code[1].source, \
        "the second code cell prints the versions and the device"
    assert code[2] is _params_cell(nb), "the third code cell is the one tagged 'parameters'"
    assert "SMOKE" in code[2].source
    text = "\n".join(c.source for c in nb.cells)
    assert "## What was shown" in text and "## Things to try" in text, "the notebook ends with a summary and things to try"
    assert any(re.search(r"^\s*assert ", c.source, re.M) for c in code), "the notebook checks its claims with assert"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_no_function_defined_in_a_notebook(path):
    """Logic the library should own stays in the library (DESIGN.md)."""
    for i, cell in enumerate(_code_cells(_read(path))):
        source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("!", "%")))
        for node in ast.walk(ast.parse(source)):
            assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)), \
                f"{path.name}, code cell {i}: defines a {type(node).__name__} (line {getattr(node, 'lineno', '?')})"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_test_parameters_exist_in_the_notebook(path):
    names = {t.id for node in ast.walk(ast.parse(_params_cell(_read(path)).source))
             if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
    unknown = set(PARAMS[path.stem]) - names
    assert not unknown, f"{path.name}: PARAMS sets {sorted(unknown)}, which its parameters cell does not define"


# ---- execution -------------------------------------------------------------------------------------

def _failing_cell(executed: Path) -> str:
    """The first cell papermill marked failed or left running in the executed copy."""
    try:
        nb = _read(executed)
    except Exception:  # noqa: BLE001 - the copy may be missing or half-written
        return "(no executed copy to inspect)"
    for i, cell in enumerate(nb.cells):
        status = cell.metadata.get("papermill", {}).get("status")
        if status in ("failed", "running"):
            first = next((line for line in cell.source.splitlines() if line.strip()), "")
            return f"cell {i} [{cell.get('execution_count')}] {status}: {first!r}"
    return "(no failed or running cell recorded)"


def _params(path: Path):
    marks = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT_S.get(path.stem, 300) + 60)]
    return pytest.param(path, marks=marks, id=path.stem)


@pytest.fixture
def no_output_widget_sync(monkeypatch):
    """Work around nbclient's headless ``Output`` widget mimic hanging a cell (jupyter/nbclient#312).

    For every output the kernel routes into an ``ipywidgets.Output`` (the explorers of
    ``splitlab.present.widgets`` draw into one), nbclient's ``OutputWidget`` sends the new widget state
    back to the kernel on the shell channel while the cell's own execute reply is awaited on
    that channel; now and then the reply is never seen and the cell hangs until the timeout
    (every time when the figure carries plotly's "notebook" HTML). That state echo is useless
    headless: the outputs are still recorded in the executed notebook's widget state.
    """
    from nbclient.output_widget import OutputWidget

    monkeypatch.setattr(OutputWidget, "sync_state", lambda self: None)


@pytest.mark.parametrize("path", [_params(p) for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, no_output_widget_sync):
    papermill = pytest.importorskip("papermill")
    from papermill.exceptions import PapermillExecutionError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = tmp_path / path.name
    t0 = time.perf_counter()
    failure = None
    try:
        papermill.execute_notebook(
            str(path), str(out), parameters=PARAMS[path.stem], kernel_name="python3", cwd=str(NOTEBOOK_DIR),
            execution_timeout=TIMEOUT_S[path.stem], progress_bar=False, log_output=False,
        )
    except PapermillExecutionError as exc:
        first = next((line for line in (exc.source or "").splitlines() if line.strip()), "")
        tail = [ANSI.sub("", line) for line in (exc.traceback or [])][-6:]
        failure = (f"{path.name}: cell {exc.cell_index} [exec {exc.exec_count}] failed: {exc.ename}: "
                   f"{ANSI.sub('', str(exc.evalue))}\n  first line of the cell: {first!r}\n"
                   + "\n".join(tail) + f"\n  executed copy: {out}")
    except Exception as exc:  # noqa: BLE001 - e.g. a cell timeout or a dead kernel
        failure = f"{path.name}: {type(exc).__name__}: {exc}\n  at {_failing_cell(out)}\n  executed copy: {out}"
    finally:
        target = os.environ.get("SPLITLAB_EXECUTED_DIR")
        if target and out.is_file():
            Path(target).mkdir(parents=True, exist_ok=True)
            shutil.copy2(out, Path(target) / path.name)
    elapsed = time.perf_counter() - t0
    print(f"{path.name}: {elapsed:.1f} s")
    if failure:
        pytest.fail(failure, pytrace=False)


@pytest.mark.slow
@pytest.mark.browser
def test_executed_notebooks_render_in_jupyterlab(tmp_path):
    """The real-browser check over the copies ``test_notebook_runs`` wrote (it runs after them:
    pytest keeps file order). ``make test`` sets SPLITLAB_BROWSER=1 and SPLITLAB_EXECUTED_DIR
    and installs Chromium first (tools/install_browser.sh); without them this test is skipped."""
    if os.environ.get("SPLITLAB_BROWSER") != "1":
        pytest.skip("real-browser check: `make test` runs it (SPLITLAB_BROWSER=1 and SPLITLAB_EXECUTED_DIR)")
    executed = os.environ.get("SPLITLAB_EXECUTED_DIR")
    assert executed, "SPLITLAB_EXECUTED_DIR must name the folder test_notebook_runs copies executed notebooks to"
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
