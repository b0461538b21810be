"""The real-browser check (tools/browser_check.py) proves both its paths on tiny notebooks.

Three notebooks are written here and executed with papermill:

- ``clean``: a markdown title, a ``parameters`` cell, a warning on stderr and three plotly
  figures, one with a dropdown that switches traces: the check must pass it, with 3 of 3 plots
  drawn, the dropdown switching views when clicked, and a screenshot;
- ``broken``: raises ``ValueError``: the check must report the error output;
- ``noplot``: plotly HTML whose plotly.js is not there: the check must report a missing plot;
- ``deadmenu``: a dropdown whose buttons change nothing: the check must report it.

Runs only when asked (it needs Debian's chromium and the ``playwright`` Python package, from
``tools/install_browser.sh``): ``SPLITLAB_BROWSER=1 pytest tests/test_browser.py`` or
``pytest -m browser``; ``make browser-check`` does both. When asked, a missing browser is a
failure, not a skip.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOL = REPO_ROOT / "tools" / "browser_check.py"

pytestmark = pytest.mark.browser


def _asked(config) -> bool:
    """SPLITLAB_BROWSER=1, or a -m expression that selects `browser` (not `-m "not browser"`)."""
    markexpr = config.option.markexpr or ""
    return os.environ.get("SPLITLAB_BROWSER") == "1" or bool(
        re.search(r"(?<!not )\bbrowser\b", markexpr)
    )


@pytest.fixture(scope="module", autouse=True)
def _only_when_asked(request):  # module scope: runs before the module-scoped `executed`
    if not _asked(request.config):
        pytest.skip("real-browser check: run with SPLITLAB_BROWSER=1 (or -m browser; make browser-check)")


def _chromium() -> str:
    for cand in (os.environ.get("CHROMIUM"), "/usr/bin/chromium"):
        if cand and Path(cand).is_file():
            return cand
    pytest.fail("Debian's chromium is not installed: run `bash tools/install_browser.sh`")


# a figure with two bar traces and a dropdown: (method, args of choice one, args of choice two)
MENU = (
    "import plotly.graph_objects as go\n"
    "fig = go.Figure([go.Bar(x=['a', 'b'], y=[1, 2], name='one'),\n"
    "                 go.Bar(x=['a', 'b'], y=[2, 1], name='two', visible=False)])\n"
    "fig.update_layout(title='menu', updatemenus=[dict(buttons=[\n"
    "    dict(label='one', method='%s', args=%s), dict(label='two', method='%s', args=%s)])])\n"
    "fig"
)


def _notebook(cells):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = cells
    return nb


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """{'pass': folder with the clean notebook, 'fail': folder with all four}, executed."""
    nbformat = pytest.importorskip("nbformat")
    papermill = pytest.importorskip("papermill")
    v4 = nbformat.v4
    params = v4.new_code_cell("N = 5", metadata={"tags": ["parameters"]})
    sources = {
        "clean": _notebook([
            v4.new_markdown_cell("# Clean\nTwo figures and a warning on stderr."),
            params,
            v4.new_code_cell(
                "import sys\nimport plotly.express as px\n"
                "print('a warning on stderr is not an error', file=sys.stderr)\n"
                "fig = px.line(x=list(range(N)), y=[i * i for i in range(N)], title='squares')\n"
                "fig.show()"
            ),
            v4.new_code_cell(
                "import plotly.graph_objects as go\n"
                "go.Figure(go.Bar(x=['prefill', 'decode'], y=[3, 1]), layout_title_text='bars')"
            ),
            v4.new_code_cell(MENU % ("update", "[{'visible': [True, False]}]", "update", "[{'visible': [False, True]}]")),
        ]),
        "deadmenu": _notebook([
            v4.new_markdown_cell("# A dropdown that switches nothing"),
            v4.new_code_cell(MENU % ("skip", "[]", "skip", "[]")),
        ]),
        "broken": _notebook([
            v4.new_markdown_cell("# Broken"),
            params,
            v4.new_code_cell("x = N\nx"),
            v4.new_code_cell("raise ValueError('boom: the claim does not hold')"),
            v4.new_code_cell("print('never runs')"),
        ]),
        "noplot": _notebook([
            v4.new_markdown_cell("# A figure whose plotly.js is missing"),
            v4.new_code_cell(
                "import plotly.express as px\nfrom IPython.display import HTML\n"
                "fig = px.scatter(x=[1, 2, 3], y=[3, 1, 2])\n"
                "HTML(fig.to_html(include_plotlyjs=False, full_html=False))"
            ),
        ]),
    }
    base = tmp_path_factory.mktemp("browser")
    src, ok_dir, all_dir = base / "src", base / "pass", base / "fail"
    for d in (src, ok_dir, all_dir):
        d.mkdir()
    for name, nb in sources.items():
        nbformat.write(nb, src / f"{name}.ipynb")
        out = all_dir / f"{name}.ipynb"
        try:
            papermill.execute_notebook(
                str(src / f"{name}.ipynb"), str(out), kernel_name="python3",
                cwd=str(base), progress_bar=False,
            )
        except papermill.PapermillExecutionError:
            assert name == "broken", f"{name} should have executed cleanly"
        else:
            assert name != "broken", "the broken notebook should have raised"
    (ok_dir / "clean.ipynb").write_bytes((all_dir / "clean.ipynb").read_bytes())
    return {"pass": ok_dir, "fail": all_dir, "base": base}


def _run(folder: Path, out: Path) -> tuple[int, dict, str]:
    _chromium()
    try:
        import playwright  # noqa: F401
    except ImportError:
        pytest.fail("the playwright Python package is missing: run `bash tools/install_browser.sh`")
    proc = subprocess.Popen(
        [sys.executable, str(TOOL), str(folder), "--out", str(out), "--plot-timeout", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        text, _ = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the tool still stops JupyterLab and Chromium
        text, _ = proc.communicate(timeout=60)
        pytest.fail(f"browser_check.py took over 420 s:\n{text}")
    report_path = out / "report.json"
    assert report_path.is_file(), f"no report.json (exit {proc.returncode}):\n{text}"
    return proc.returncode, json.loads(report_path.read_text()), text


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def _no_leftovers(report: dict) -> None:
    assert report["leftover_processes_killed"] == {}, report["leftover_processes_killed"]
    from splitlab.system.procs import proc_table

    work = report["workdir"]
    for info in proc_table().values():
        cmd = " ".join(info.cmdline)
        assert work not in cmd, f"process {info.pid} outlived the check: {cmd[:200]}"


def test_pass_path_clean_notebook_with_plots(executed, tmp_path):
    rc, report, text = _run(executed["pass"], tmp_path / "shots")
    assert rc == 0, text
    assert report["ok"] is True
    (nb,) = report["notebooks"]
    assert nb["name"] == "clean.ipynb"
    assert nb["errors"] == [], text
    assert nb["cells"] == nb["cells_rendered"] == 5
    assert nb["plots_expected"] == 3 and nb["plots_rendered"] == 3, text
    assert nb["controls_expected"] == 1 and nb["controls_working"] == 1, text
    width, height = _png_size(Path(nb["screenshot"]))
    assert width == 1280 and height > 900, (width, height)  # grown to the whole notebook
    assert Path(nb["screenshot"]).stat().st_size > 20_000
    _no_leftovers(report)


def test_fail_path_error_and_missing_plot(executed, tmp_path):
    rc, report, text = _run(executed["fail"], tmp_path / "shots")
    assert rc == 1, text
    assert report["ok"] is False and report["infra_error"] == ""
    by_name = {nb["name"]: nb for nb in report["notebooks"]}
    assert set(by_name) == {"clean.ipynb", "broken.ipynb", "noplot.ipynb", "deadmenu.ipynb"}

    assert by_name["clean.ipynb"]["ok"], text

    broken = by_name["broken.ipynb"]
    assert not broken["ok"]
    # seen in the page (the rendered traceback), not only in the .ipynb
    assert any(e.startswith("error output:") and "ValueError" in e for e in broken["errors"]), text
    assert any("in the .ipynb" in e for e in broken["errors"]), text

    noplot = by_name["noplot.ipynb"]
    assert not noplot["ok"]
    assert noplot["plots_expected"] == 1 and noplot["plots_rendered"] == 0
    assert any(e.startswith("plot missing") for e in noplot["errors"]), text

    dead = by_name["deadmenu.ipynb"]
    assert not dead["ok"] and dead["controls_expected"] == 1 and dead["controls_working"] == 0, text
    assert any("did not switch views" in e for e in dead["errors"]), text

    for nb in report["notebooks"]:
        assert Path(nb["screenshot"]).is_file(), nb
    assert "FAIL broken.ipynb" in text and "FAIL noplot.ipynb" in text and "PASS clean.ipynb" in text
    _no_leftovers(report)
