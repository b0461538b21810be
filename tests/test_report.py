"""write_report: one self-contained HTML (plotly inline once, no CDN) with the main figures."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("plotly")

import splitlab as sl
from splitlab.present import report
from splitlab.errors import SplitlabError
from splitlab.measure.metrics import RequestTrace, Run, StepTrace
from splitlab.measure.profile import Ceilings
from splitlab.present.report import write_report
from splitlab.present.results import save_profile, save_runs


def make_run(mode, rate, share=None, tpot=0.1, n=2, workload=None):
    traces = [RequestTrace(i, a, 4, 3, a + 0.05, a + 0.2, [a + 0.2, a + 0.2 + tpot, a + 0.2 + 2 * tpot], [1, 2, 3], "w")
              for i, a in enumerate(0.5 * k for k in range(n))]
    cfg = {"rate": rate, **({"backend": "mps", "prefill_share": share, "decode_share": 100 - share} if share else {})}
    steps = [StepTrace("prefill" if mode == "split" else "w", "prefill", 0.05, 0.2, [0], 4),
             StepTrace("decode" if mode == "split" else "w", "decode", 0.2, 0.3, [0], 1)]
    return Run(mode=mode, model="tiny", workload=workload or f"poisson-r{rate}-n{n}", config=cfg,
               env={"gpu_name": "NVIDIA H200"}, traces=traces, steps=steps)


def without_plotly_js(html):
    """The report less the inline plotly.js bundle."""
    start = html.index("* plotly.js v")
    return html[:start] + html[html.index("</script>", start):]


def figures_in(html):
    """(titles of every figure, number of plotly divs) from the report's embedded JSON."""
    titles = [json.loads(f'"{t}"') for t in re.findall(r'"title":\{"text":"((?:[^"\\]|\\.)*)"', html)]
    return titles, html.count('class="plotly-graph-div"')


@pytest.fixture
def folder(tmp_path):
    runs = [make_run("serial", 1), make_run("split", 1, 30), make_run("split", 1, 50, tpot=0.05),
            make_run("serial", 2), make_run("split", 2, 50, tpot=0.05)]
    save_runs(runs, tmp_path / "res")
    ceil = Ceilings(device="cuda:0", device_name="NVIDIA H200", dtype="bfloat16", matmul_flops_s=663e12,
                    copy_bytes_s=4.2e12, matmul_n=8192, copy_buffer_bytes=1 << 30, repeats=7)
    table = pd.DataFrame([{"model": "dummy:llama-3.1-8b", "backend": "hf", "phase": "decode", "batch": 8,
                           "tokens": 512, "time_s": 0.09, "tokens_per_s": 88.9, "flops": 1.3e11, "bytes": 1.6e10,
                           "achieved_flops_s": 1.4e12, "achieved_bytes_s": 1.8e11, "intensity": 8.1,
                           "bound": "memory", "roof_time_s": 0.0038, "frac_of_roof": 0.042}])
    save_profile(table, ceil, tmp_path / "res" / "profile_h200.json", command="python benchmarks/profile_sweep.py")
    return tmp_path / "res"


def test_report_is_self_contained_with_the_main_figures(folder, tmp_path):
    out = write_report(folder, tmp_path / "out" / "report.html")
    assert out == tmp_path / "out" / "report.html"
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert html.count("* plotly.js v") == 1  # the library inline, once
    assert not re.search(r"<script[^>]+src=", html)  # nothing fetched: opens offline
    rest = without_plotly_js(html)
    assert not re.search(r"(src|href)=[\"']https?://", rest) and "<link" not in rest
    assert len(html) > 3_000_000  # plotly.js itself is megabytes
    titles, divs = figures_in(html)
    # per workload (2): a CDF grid, speedups, phase breakdown; two timelines, per-request breakdown, heatmap, roofline
    assert divs == 2 * 3 + 3 + 1 + 1
    for want in ("Latency distributions — poisson-r1-n2", "Latency distributions — poisson-r2-n2",
                 "Speedup over serial — poisson-r1-n2", "Phase time per run (mean per request) — poisson-r1-n2",
                 "Timeline — split mps 50/50 · 1 req/s (poisson-r1-n2)",
                 "Timeline — serial · 1 req/s (poisson-r1-n2)",
                 "Goodput (req/s) at SLO TTFT ≤ 1 s, TPOT ≤ 50 ms: run × arrival rate",
                 "Roofline — NVIDIA H200"):
        assert want in titles, (want, titles)
    assert "<th>run</th>" in html and "split mps 50/50" in html  # summary table, human headers
    assert "<th>goodput (req/s)</th>" in html and "goodput_req_s" not in rest.split("<script")[0]
    assert "python benchmarks/profile_sweep.py" in html  # the profile's provenance
    assert "<th>measured / datasheet</th>" in html and "663 TFLOP/s" in html
    assert "Check runs" not in html  # none here


def test_report_keeps_checks_out_of_figures_and_experiments_apart(tmp_path):
    def runs(tpot):
        return [make_run("serial", 1, n=16), make_run("split", 1, 50, tpot=tpot, n=16), make_run("serial", 2, n=16),
                make_run("split", 2, 50, tpot=tpot, n=16), make_run("split", 1, 50, workload="check"),
                make_run("serial", 1, n=8, workload="poisson-r1-n16-first8")]

    save_runs(runs(0.05), tmp_path / "res" / "slots64")
    save_runs(runs(0.01), tmp_path / "res" / "slots128")
    html = write_report(tmp_path / "res", tmp_path / "r.html").read_text()
    head = html[:html.index("<h2>Workload")]
    assert "<h2>Check runs</h2>" in head and head.count("<td>check</td>") == 2  # one per experiment, listed
    assert "Latency distributions — check" not in html
    titles, _ = figures_in(html)
    assert not any("check" in t for t in titles)
    # the same run label and rate in two experiments: the legend tells them apart
    names = {json.loads(f'"{n}"') for n in re.findall(r'"name":"((?:[^"\\]|\\.)*)"', html)}
    assert {"split mps 50/50 · 1 req/s (slots64)", "split mps 50/50 · 1 req/s (slots128)"} <= names
    assert "Speedup over serial — poisson-r1-n16, slots64" in titles  # one baseline per experiment
    assert "Speedup over serial — poisson-r1-n16, slots128" in titles
    heat = html[html.index("Goodput over arrival rate, per experiment"):]
    assert heat.count('"type":"heatmap"') == 2  # one per experiment, never averaged together
    assert '"x":["1 req\\u002fs","2 req\\u002fs"]' in heat  # rates as ticks with their unit
    # a run of another workload at a rate of the sweep is named, not pooled into the serial cell
    assert "Not drawn (another workload at the same rate): serial (poisson-r1-n16-first8), serial" in heat
    assert "(2 runs)" not in heat


def test_is_check():
    table = pd.DataFrame({"workload": ["check", "poisson-r1-n160", "poisson-r1-n6", "poisson-r1-n6", "check-2"],
                          "num_requests": [6, 160, 6, 6, 6], "experiment": ["a", "a", "a", "b", "b"]})
    # named check; a 6-request run beside a 160-request one; but not in a folder of small runs only
    assert list(report.is_check(table)) == [True, False, True, False, True]


def test_report_size_of_the_recorded_results(tmp_path):
    """The recorded H200 results (56 runs, 40k token gaps each at most) made a 55 MB report: every
    figure now keeps a few hundred points, so all but plotly.js itself stays under 1 MB."""
    results = Path(__file__).resolve().parents[1] / "results"
    if not (results / "colocation_h200" / "index.json").is_file():
        pytest.skip("the recorded results are not in this checkout")
    html = write_report(results, tmp_path / "recorded.html").read_text()
    assert html.count("* plotly.js v") == 1
    rest = without_plotly_js(html)
    assert len(rest.encode()) < 1_000_000, len(rest.encode())
    assert len(html.encode()) < 6_000_000
    assert "<h2>Check runs</h2>" in html and "Latency distributions — check" not in html
    titles, _ = figures_in(html)
    assert "Latency distributions — poisson-r21.2-n160" in titles
    assert not re.search(r"\d\.\d{7,}", rest.split("<h2>Workload")[0])  # the tables print no raw floats


def test_png_export_unavailable_is_a_message_not_an_error(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "png_export_available", lambda: (False, "no Chrome/Chromium found"))
    out = write_report(folder, tmp_path / "r.html", png=True)
    assert "PNG export skipped: no Chrome/Chromium found" in capsys.readouterr().err
    assert "PNG export skipped" in out.read_text()
    assert not (tmp_path / "r_png").exists()


def test_profile_only_folder_and_empty_folder(tmp_path):
    ceil = Ceilings(device="cpu", device_name="cpu", dtype="float32", matmul_flops_s=1e11, copy_bytes_s=1e10,
                    matmul_n=64, copy_buffer_bytes=1024, repeats=1)
    save_profile([], ceil, tmp_path / "p" / "profile_cpu.json")
    html = write_report(tmp_path / "p", tmp_path / "p.html").read_text()
    assert "Roofline — cpu" in figures_in(html)[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SplitlabError, match="nothing to report"):
        write_report(tmp_path / "empty", tmp_path / "e.html")
    with pytest.raises(SplitlabError):
        write_report(tmp_path / "missing", tmp_path / "e.html")


def test_report_of_a_real_tiny_run(tmp_path):
    model = sl.load_model("tiny")
    wl = sl.poisson(4, rate=50.0, prompt_len=8, output_len=4, model=model)
    run = sl.run(wl, model, mode="hf-generate", batch_size=2, progress=False)
    save_runs([run], tmp_path / "real")
    html = write_report(tmp_path / "real", tmp_path / "real.html").read_text()
    titles, _ = figures_in(html)
    workload = run.workload
    assert f"Timeline — hf-generate · 50 req/s ({workload})" in titles
    assert f"Latency distributions — {workload}" in titles
    assert "CDF of time per output token" in html  # a subplot title of the grid
    index = json.loads((tmp_path / "real" / "index.json").read_text())
    assert index["runs"][0]["mode"] == "hf-generate" and index["runs"][0]["rate"] == 50.0
