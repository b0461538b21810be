"""Figures from hand-built runs and tables: trace names, counts, axis titles and values."""

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("plotly")

from splitlab.present import plots
from splitlab.errors import SplitlabError
from splitlab.measure.metrics import RequestTrace, Run, StepTrace
from splitlab.measure.profile import DATASHEET, Ceilings


def make_run(mode="split", backend="mps", shares=(40, 60), monitor=True, scale=1.0, workload="poisson-r2-n3"):
    """Three requests with known phases (seconds):
    id  arrival  prefill     tokens                queue prefill handoff decode  ttft tpot e2e
    0   0.0      0.1-0.3     0.3 0.4 0.5 0.6       0.1   0.2     0       0.3     0.3  0.1  0.6
    1   0.2      0.3-0.5     0.5 0.7 0.9           0.1   0.2     0       0.4     0.3  0.2  0.7
    2   0.5      0.5-0.6     0.8 1.0               0.0   0.1     0.2     0.2     0.3  0.2  0.5
    ``scale`` multiplies every time.
    """
    s = scale
    traces = [
        RequestTrace(0, 0.0, 5, 4, 0.1 * s, 0.3 * s, [0.3 * s, 0.4 * s, 0.5 * s, 0.6 * s], [1, 2, 3, 4], "prefill"),
        RequestTrace(1, 0.2 * s, 6, 3, 0.3 * s, 0.5 * s, [0.5 * s, 0.7 * s, 0.9 * s], [5, 6, 7], "prefill"),
        RequestTrace(2, 0.5 * s, 7, 2, 0.5 * s, 0.6 * s, [0.8 * s, 1.0 * s], [8, 9], "prefill"),
    ]
    steps = [
        StepTrace("prefill", "prefill", 0.1 * s, 0.3 * s, [0], 5),
        StepTrace("prefill", "prefill", 0.3 * s, 0.5 * s, [1], 6),
        StepTrace("prefill", "prefill", 0.5 * s, 0.6 * s, [2], 7),
        StepTrace("decode", "decode", 0.3 * s, 0.4 * s, [0], 1),
        StepTrace("decode", "decode", 0.4 * s, 0.5 * s, [0], 1),
        StepTrace("decode", "decode", 0.5 * s, 0.7 * s, [0, 1], 2),
        StepTrace("decode", "decode", 0.7 * s, 0.9 * s, [1, 2], 2),
        StepTrace("decode", "decode", 0.9 * s, 1.0 * s, [2], 1),
    ]
    samples = [{"t_s": t, "sm_util_pct": u, "mem_util_pct": m, "mem_used_bytes": 1e9, "power_w": 300.0,
                "sm_clock_mhz": 1980, "mem_clock_mhz": 2619}
               for t, u, m in ((0.0, 10, 5), (0.5, 80, 60), (1.0, 50, 40))] if monitor else []
    config = {"backend": backend} if backend else {}
    if shares:
        config.update(prefill_share=shares[0], decode_share=shares[1])
    return Run(mode=mode, model="tiny", workload=workload, config=config, env={"gpu_name": "NVIDIA H200"},
               traces=traces, steps=steps, monitor=samples)


def test_phase_breakdown_values():
    fig = plots.phase_breakdown(make_run())
    names = [t.name for t in fig.data]
    assert names == ["queue", "prefill", "prefill end → first token", "decode"]
    by = {t.name: np.array(t.y) for t in fig.data}
    assert list(fig.data[0].x) == ["0", "1", "2"]
    assert by["queue"] == pytest.approx([0.1, 0.1, 0.0])
    assert by["prefill"] == pytest.approx([0.2, 0.2, 0.1])
    assert by["prefill end → first token"] == pytest.approx([0.0, 0.0, 0.2])
    assert by["decode"] == pytest.approx([0.3, 0.4, 0.2])
    assert sum(by.values()) == pytest.approx([0.6, 0.7, 0.5])  # = E2E of each request
    assert fig.layout.barmode == "stack"
    assert fig.layout.xaxis.title.text == "request id" and fig.layout.yaxis.title.text == "seconds since arrival"


def test_phase_breakdown_without_recorded_prefill_times():
    run = make_run()
    for t in run.traces:
        t.prefill_start_s = t.prefill_end_s = None
    fig = plots.phase_breakdown(run)
    by = {t.name: list(t.y) for t in fig.data}
    assert by["first token (queue + prefill, not recorded apart)"] == pytest.approx([0.3, 0.3, 0.3])
    assert by["queue"] == [0, 0, 0] and "prefill end → first token" not in by


def test_phase_breakdown_runs_means_and_labels():
    fig = plots.phase_breakdown_runs([make_run(), make_run("serial", None, None, scale=2.0)])
    assert list(fig.data[0].x) == ["split mps 40/60", "serial"]
    by = {t.name: list(t.y) for t in fig.data}
    assert by["queue"] == pytest.approx([0.2 / 3, 0.4 / 3])
    assert by["decode"] == pytest.approx([0.3, 0.6])
    total = plots.phase_breakdown_runs([make_run()], agg="sum")
    assert {t.name: t.y[0] for t in total.data}["prefill"] == pytest.approx(0.5)
    assert "total over requests" in total.layout.yaxis.title.text


def test_timeline_gantt_and_nvml_row():
    fig = plots.timeline(make_run())
    bars = [t for t in fig.data if t.type == "bar"]
    assert [t.name for t in bars] == ["prefill", "decode"]
    pre, dec = bars
    assert list(pre.y) == ["prefill"] * 3 and list(dec.y) == ["decode"] * 5
    assert list(pre.base) == pytest.approx([0.1, 0.3, 0.5]) and list(pre.x) == pytest.approx([0.2, 0.2, 0.1])
    assert list(dec.base) == pytest.approx([0.3, 0.4, 0.5, 0.7, 0.9])
    assert [list(c) for c in dec.customdata] == [[0], [0], [0, 1], [1, 2], [2]]
    assert "ids: 1, 2" in dec.hovertext[3]
    lines = [t for t in fig.data if t.type == "scatter"]
    assert [t.name for t in lines] == ["SM util (%)", "memory util (%)"]
    assert list(lines[0].y) == [10, 80, 50] and list(lines[1].x) == [0.0, 0.5, 1.0]
    assert lines[0].xaxis == "x2" and pre.xaxis == "x"  # second row
    assert fig.layout.xaxis2.title.text == "time since run start (s)"
    assert fig.layout.xaxis.matches == "x2" or fig.layout.xaxis2.matches == "x"  # shared time axis
    assert fig.layout.yaxis.title.text == "worker" and fig.layout.yaxis2.title.text == "utilisation (%)"
    plain = plots.timeline(make_run(monitor=False))
    assert [t.name for t in plain.data] == ["prefill", "decode"]
    assert plain.layout.xaxis.title.text == "time since run start (s)"


def test_latency_cdf_values_and_names():
    runs = [make_run(), make_run("serial", None, None, scale=2.0), make_run("serial", None, None)]
    fig = plots.latency_cdf(runs, "tpot_s")
    assert [t.name for t in fig.data] == ["split mps 40/60", "serial", "serial #2"]
    assert list(fig.data[0].x) == pytest.approx([0.1, 0.1, 0.2, 0.2])  # starts at (smallest, 0)
    assert list(fig.data[0].y) == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert fig.data[0].line.shape == "hv"
    assert list(fig.data[1].x) == pytest.approx([0.2, 0.2, 0.4, 0.4])
    assert fig.layout.xaxis.title.text == "time per output token (s)"
    assert fig.layout.yaxis.title.text == "fraction of requests"
    itl = plots.latency_cdf(runs[:1], "itl")
    # gaps: 0.1 0.1 0.1 | 0.2 0.2 | 0.2
    assert list(itl.data[0].x)[1:] == pytest.approx([0.1, 0.1, 0.1, 0.2, 0.2, 0.2])
    assert list(itl.data[0].y)[1:] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    assert itl.layout.yaxis.title.text == "fraction of token gaps"
    named = plots.latency_cdf({"A": runs[0]}, "e2e_s")
    assert named.data[0].name == "A" and list(named.data[0].x)[1:] == pytest.approx([0.5, 0.6, 0.7])
    with pytest.raises(SplitlabError):
        plots.latency_cdf(runs, "latency")


def test_latency_cdf_grid():
    runs = [make_run(), make_run("serial", None, None, scale=2.0)]
    fig = plots.latency_cdf_grid(runs)
    assert len(fig.data) == 2 * 4
    assert [t.name for t in fig.data if t.showlegend] == ["split mps 40/60", "serial"]
    ttft_serial = [t for t in fig.data if t.name == "serial" and t.xaxis == "x"][0]
    assert list(ttft_serial.x)[1:] == pytest.approx([0.6, 0.6, 0.6])
    itl_split = [t for t in fig.data if t.name == "split mps 40/60" and t.xaxis == "x4"][0]
    assert len(itl_split.x) == 7
    assert fig.layout.xaxis4.title.text == "inter-token latency (s)"
    assert fig.layout.yaxis4.title.text == "fraction of token gaps"
    assert [a.text for a in fig.layout.annotations] == ["CDF of time to first token", "CDF of time per output token",
                                                        "CDF of end-to-end latency", "CDF of inter-token latency"]


def summary_table():
    return pd.DataFrame([
        {"mode": "serial", "label": "serial", "rate": 1.0, "prefill_share": None, "throughput_tok_s": 100.0,
         "ttft_p99_s": 2.0, "goodput_req_s": 1.0},
        {"mode": "split", "label": "split mps 50/50", "rate": 1.0, "prefill_share": 50.0,
         "throughput_tok_s": 130.0, "ttft_p99_s": 0.5, "goodput_req_s": 1.5},
        {"mode": "split", "label": "split mps 30/70", "rate": 1.0, "prefill_share": 30.0,
         "throughput_tok_s": 110.0, "ttft_p99_s": 1.0, "goodput_req_s": 1.2},
        {"mode": "split", "label": "split mps 50/50", "rate": 2.0, "prefill_share": 50.0,
         "throughput_tok_s": 150.0, "ttft_p99_s": 0.8, "goodput_req_s": 2.5},
    ])


def test_speedup_bars_higher_and_lower_is_better():
    df = summary_table()
    fig = plots.speedup_bars(df, "serial", "throughput_tok_s")
    bar = fig.data[0]
    assert list(bar.x) == ["serial", "split mps 50/50", "split mps 30/70"]
    assert list(bar.y) == pytest.approx([1.0, 1.4, 1.1])  # 50/50 averages 130 and 150
    assert list(bar.text) == ["1.00x", "1.40x", "1.10x"]
    assert "speedup over serial" in fig.layout.yaxis.title.text and fig.layout.xaxis.title.text == "run"
    lat = plots.speedup_bars(df, "serial", "ttft_p99_s")
    assert list(lat.data[0].y) == pytest.approx([1.0, 2.0 / 0.65, 2.0])  # baseline / value
    with pytest.raises(SplitlabError):
        plots.speedup_bars(df, "chunked", "throughput_tok_s")


def test_heatmap_grid():
    df = summary_table()
    fig = plots.heatmap(df, "rate", "prefill_share", "goodput_req_s")
    hm = fig.data[0]
    assert list(hm.x) == ["1", "2"] and list(hm.y) == ["30", "50"]
    z = np.array(hm.z, dtype=float)
    assert z[0, 0] == pytest.approx(1.2) and z[1, 0] == pytest.approx(1.5) and z[1, 1] == pytest.approx(2.5)
    assert np.isnan(z[0, 1])  # no run at rate 2, share 30
    assert fig.layout.xaxis.title.text == "arrival rate (req/s)"
    assert fig.layout.yaxis.title.text == "prefill SM share (%)"
    assert hm.colorbar.title.text == "goodput (req/s)"


def test_metric_bars():
    fig = plots.metric_bars(summary_table(), "ttft_p99_s")
    assert list(fig.data[0].y) == pytest.approx([2.0, 0.65, 1.0])


def test_roofline_roofs_and_points():
    ceil = Ceilings(device="cuda:0", device_name="NVIDIA H200", dtype="bfloat16", matmul_flops_s=600e12,
                    copy_bytes_s=4e12, matmul_n=8192, copy_buffer_bytes=1 << 30, repeats=7)
    df = pd.DataFrame([
        {"model": "m", "backend": "hf", "phase": "prefill", "batch": 4, "tokens": 512, "time_s": 0.1,
         "tokens_per_s": 20480.0, "achieved_flops_s": 500e12, "achieved_bytes_s": 1e12, "intensity": 2000.0,
         "bound": "compute", "frac_of_roof": 0.83},
        {"model": "m", "backend": "hf", "phase": "decode", "batch": 8, "tokens": 2048, "time_s": 0.005,
         "tokens_per_s": 1600.0, "achieved_flops_s": 20e12, "achieved_bytes_s": 3e12, "intensity": 6.0,
         "bound": "memory", "frac_of_roof": 0.75},
        {"model": "m", "backend": "hf", "phase": "decode", "batch": 1, "tokens": 512, "time_s": 0.004,
         "tokens_per_s": 250.0, "achieved_flops_s": 4e12, "achieved_bytes_s": 3.5e12, "intensity": 1.2,
         "bound": "memory", "frac_of_roof": 0.8},
    ])
    fig = plots.roofline(df, ceil, DATASHEET["H200"])
    names = [t.name for t in fig.data]
    assert names[0] == "memory roof (4 TB/s measured)"
    assert names[1] == "compute roof (600 TFLOP/s measured; ridge 150 FLOP/B)"
    assert names[2].startswith("datasheet roof (H200") and names[3:] == ["prefill L=512", "decode C=512",
                                                                         "decode C=2048"]
    mem, comp = fig.data[0], fig.data[1]
    assert mem.x[1] == pytest.approx(150) and mem.y[1] == pytest.approx(600e12)  # ridge
    assert mem.y[0] == pytest.approx(4e12 * mem.x[0])
    assert list(comp.y) == pytest.approx([600e12, 600e12])
    long_ctx = fig.data[5]
    assert list(long_ctx.x) == [6.0] and list(long_ctx.y) == [20e12]
    assert "decode B=8 C=2048" in long_ctx.hovertext[0] and "75% of the roof" in long_ctx.hovertext[0]
    assert fig.data[3].marker.size[0] > fig.data[4].marker.size[0]  # sized by batch: B=4 > B=1
    assert fig.data[4].marker.color != fig.data[5].marker.color  # context lengths in two shades
    assert fig.data[3].mode == "markers" and plots.roofline(df, ceil, labels=True).data[2].text == ("B=4",)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert fig.layout.xaxis.title.text == "arithmetic intensity (FLOP/byte)"
    assert fig.layout.yaxis.title.text == "achieved FLOP/s"
    two = pd.concat([df, df.assign(model="n")])
    two_fig = plots.roofline(two, ceil)
    assert [t.name for t in two_fig.data][2:] == ["prefill L=512 · m", "prefill L=512 · n", "decode C=512 · m",
                                                  "decode C=512 · n", "decode C=2048 · m", "decode C=2048 · n"]
    assert two_fig.data[2].marker.symbol != two_fig.data[3].marker.symbol
