"""write_report: one self-contained HTML (plotly inline once, no CDN) with the main figures."""

import json
import re

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


def make_run(mode, rate, share=None, tpot=0.1):
    traces = [RequestTrace(i, a, 4, 3, a + 0.05, a + 0.2, [a + 0.2, a + 0.2 + tpot, a + 0.2 + 2 * tpot], [1, 2, 3], "w")
              for i, a in enumerate((0.0, 0.5))]
    cfg = {"rate": rate, **({"backend": "mps", "prefill_share": share, "decode_share": 100 - share} if share else {})}
    steps = [StepTrace("prefill" if mode == "split" else "w", "prefill", 0.05, 0.2, [0], 4),
             StepTrace("decode" if mode == "split" else "w", "decode", 0.2, 0.3, [0], 1)]
    return Run(mode=mode, model="tiny", workload="poisson-r1-n2" if rate == 1 else "poisson-r2-n2", config=cfg,
               env={"gpu_name": "NVIDIA H200"}, traces=traces, steps=steps)


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
    start = html.index("* plotly.js v")
    rest = html[:start] + html[html.index("</script>", start):]  # everything but the inline library
    assert not re.search(r"(src|href)=[\"']https?://", rest) and "<link" not in rest
    assert len(html) > 3_000_000  # plotly.js itself is megabytes
    titles, divs = figures_in(html)
    # per workload (2): a CDF grid + speedups; breakdown, timeline, per-request breakdown, heatmap, roofline
    assert divs >= 2 + 5
    for want in ("Latency distributions — poisson-r1-n2", "Latency distributions — poisson-r2-n2",
                 "Speedup over serial on throughput_tok_s — poisson-r1-n2", "Phase time per run (mean per request)",
                 "Timeline — split mps 30/70", "goodput (req/s) over rate × prefill_share",
                 "Roofline — NVIDIA H200"):
        assert want in titles, want
    assert "<th>label</th>" in html and "split mps 50/50" in html  # summary table
    assert "python benchmarks/profile_sweep.py" in html  # the profile's provenance
    assert "measured_over_datasheet" in html


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
    assert "Timeline — hf-generate" in titles and "Latency distributions" in titles
    assert "CDF of time per output token" in html  # a subplot title of the grid
    index = json.loads((tmp_path / "real" / "index.json").read_text())
    assert index["runs"][0]["mode"] == "hf-generate" and index["runs"][0]["rate"] == 50.0
