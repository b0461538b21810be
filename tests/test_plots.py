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
    assert fig.layout.xaxis.title.text == "request id" and fig.layout.yaxis.title.text == "time since arrival (s)"


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
    assert list(fig.data[0].x) == ["split mps 40/60 · 2 req/s", "serial · 2 req/s"]  # the rate is in the label
    by = {t.name: list(t.y) for t in fig.data}
    assert by["queue"] == pytest.approx([0.2 / 3, 0.4 / 3], abs=1e-4)
    assert by["decode"] == pytest.approx([0.3, 0.6])
    total = plots.phase_breakdown_runs([make_run()], agg="sum")
    assert {t.name: t.y[0] for t in total.data}["prefill"] == pytest.approx(0.5)
    assert "total over requests" in total.layout.yaxis.title.text and "(" in total.layout.yaxis.title.text
    assert fig.layout.xaxis.title.text == "run"


def test_legend_labels_carry_rate_then_workload():
    a = make_run("serial", None, None, workload="poisson-r16.28002154932318-n160")
    b = make_run("serial", None, None, workload="poisson-r21.2-n160")
    c = make_run("serial", None, None, workload="azure-code-x12.9-n160")
    d = make_run("serial", None, None, workload="azure-code-x21.4-n160")
    names = [label for label, _ in plots._labelled([a, b, c, d])]
    assert names == ["serial · 16.3 req/s", "serial · 21.2 req/s", "serial · azure-code-x12.9-n160",
                     "serial · azure-code-x21.4-n160"]
    assert [label for label, _ in plots._labelled([b, b])] == ["serial · 21.2 req/s", "serial · 21.2 req/s #2"]


def test_timeline_steps_batch_line_and_nvml_row():
    fig = plots.timeline(make_run())
    bars = [t for t in fig.data if t.type == "bar"]
    assert [t.name for t in bars] == ["prefill", "decode"]
    pre, dec = bars
    assert list(pre.y) == ["prefill"] * 3  # every prefill step is its own bar
    assert list(pre.base) == pytest.approx([0.1, 0.3, 0.5]) and list(pre.x) == pytest.approx([0.2, 0.2, 0.1])
    assert pre.marker.line.width == 0  # no outlines
    # the five back-to-back decode steps (0.3 to 1.0 s) are one span
    assert list(dec.y) == ["decode"] and list(dec.base) == pytest.approx([0.3]) and list(dec.x) == pytest.approx([0.7])
    assert "5 decode steps" in dec.hovertext[0] and "1–2 requests per step" in dec.hovertext[0]
    assert "ids: 1" in pre.hovertext[1]
    line = [t for t in fig.data if t.name == "requests per decode step"][0]
    # batch sizes 1 1 2 2 1 from 0.3 s: corners where the size changes, 0 at the end
    assert list(line.x) == pytest.approx([0.3, 0.5, 0.9, 1.0]) and list(line.y) == [1, 2, 1, 0]
    assert line.line.shape == "hv" and line.fill == "tozeroy" and line.xaxis == "x2"
    util = [t for t in fig.data if t.name in ("SM util (%)", "memory util (%)")]
    assert [t.name for t in util] == ["SM util (%)", "memory util (%)"]
    assert list(util[0].y) == [10, 80, 50] and list(util[1].x) == [0.0, 0.5, 1.0]
    assert util[0].xaxis == "x3" and pre.xaxis == "x"  # third row
    assert fig.layout.xaxis3.title.text == "time since run start (s)"
    assert fig.layout.xaxis.matches == "x3" or fig.layout.xaxis3.matches == "x"  # one time axis
    assert fig.layout.yaxis.title.text == "worker" and fig.layout.yaxis2.title.text == "requests per step"
    assert fig.layout.yaxis3.title.text == "utilisation (%)"
    plain = plots.timeline(make_run(monitor=False))
    assert [t.name for t in plain.data] == ["prefill", "decode", "requests per decode step"]
    assert plain.layout.xaxis2.title.text == "time since run start (s)"


def test_timeline_splits_spans_at_pauses_and_stays_small():
    """A worker that pauses (here: for a prefill step on the same worker) starts a new span, and
    its batch line drops to 0 there; 2000 decode steps make a figure of a few kB, not 0.5 MB."""
    run = make_run(monitor=False)
    run.steps = [StepTrace("w", "decode", 0.0, 0.1, [0], 1), StepTrace("w", "prefill", 0.1, 0.3, [1], 6),
                 StepTrace("w", "decode", 0.3, 0.4, [0, 1], 2), StepTrace("w", "decode", 0.4, 0.5, [0, 1], 2)]
    fig = plots.timeline(run)
    dec = [t for t in fig.data if t.name == "decode"][0]
    assert list(dec.base) == pytest.approx([0.0, 0.3]) and list(dec.x) == pytest.approx([0.1, 0.2])
    line = [t for t in fig.data if t.name == "requests per decode step"][0]
    assert list(line.x) == pytest.approx([0.0, 0.1, 0.3, 0.5]) and list(line.y) == [1, 0, 2, 0]
    t = 0.0
    steps = []
    for k in range(2000):
        steps.append(StepTrace("decode", "decode", t, t + 0.007, list(range(k % 7 + 1)), k % 7 + 1))
        t += 0.0072
    run.steps = [StepTrace("prefill", "prefill", 0.0, 0.05, [0], 500)] + steps
    big = plots.timeline(run)
    assert len([t for t in big.data if t.name == "decode"][0].x) == 1
    assert len(big.to_json()) < 60_000


def test_latency_cdf_values_and_names():
    runs = [make_run(), make_run("serial", None, None, scale=2.0), make_run("serial", None, None)]
    fig = plots.latency_cdf(runs, "tpot_s")
    assert [t.name for t in fig.data] == ["split mps 40/60 · 2 req/s", "serial · 2 req/s", "serial · 2 req/s #2"]
    assert list(fig.data[0].x) == pytest.approx([0.1, 0.1, 0.2, 0.2])  # starts at (smallest, 0)
    assert list(fig.data[0].y) == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0], abs=1e-4)
    assert fig.data[0].line.shape == "hv"
    assert list(fig.data[1].x) == pytest.approx([0.2, 0.2, 0.4, 0.4])
    assert fig.layout.xaxis.title.text == "time per output token (s)"
    assert fig.layout.yaxis.title.text == "fraction of requests"
    itl = plots.latency_cdf(runs[:1], "itl")
    # gaps: 0.1 0.1 0.1 | 0.2 0.2 | 0.2
    assert list(itl.data[0].x)[1:] == pytest.approx([0.1, 0.1, 0.1, 0.2, 0.2, 0.2])
    assert list(itl.data[0].y)[1:] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0], abs=1e-4)
    assert itl.layout.yaxis.title.text == "fraction of token gaps"
    assert itl.layout.xaxis.type == "log" and fig.layout.xaxis.type is None  # gaps span 100×: log axis
    named = plots.latency_cdf({"A": runs[0]}, "e2e_s")
    assert named.data[0].name == "A" and list(named.data[0].x)[1:] == pytest.approx([0.5, 0.6, 0.7])
    with pytest.raises(SplitlabError):
        plots.latency_cdf(runs, "latency")


def test_cdf_points_thin_a_large_sample_and_keep_its_tail():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.lognormal(np.log(0.007), 0.2, 40_000), [1.13]])  # one 1.13 s stall
    x, y = plots.cdf_points(values)
    assert len(x) <= plots.CDF_POINTS + 1 and (x[0], y[0]) == (pytest.approx(values.min(), rel=1e-3), 0.0)
    assert x[-1] == 1.13 and y[-1] == 1.0  # the maximum is kept
    srt = np.sort(values)
    for q in (0.5, 0.99, 0.999):  # the drawn step line is close to the true CDF, tail included
        v = srt[int(q * len(srt))]
        drawn = max([yy for xx, yy in zip(x, y) if xx <= v], default=0.0)
        assert abs(drawn - q) < 1 / (0.75 * plots.CDF_POINTS)
    assert all(len(repr(v)) <= 8 for v in x[1:]) and all(len(repr(v)) <= 6 for v in y)  # rounded
    assert plots.cdf_points([0.3, 0.1, 0.2]) == ([0.1, 0.1, 0.2, 0.3], [0.0, 0.3333, 0.6667, 1.0])
    assert plots.cdf_points([]) == ([], [])


def test_latency_cdf_grid():
    runs = [make_run(), make_run("serial", None, None, scale=2.0)]
    fig = plots.latency_cdf_grid(runs)
    assert len(fig.data) == 2 * 4
    assert [t.name for t in fig.data if t.showlegend] == ["split mps 40/60 · 2 req/s", "serial · 2 req/s"]
    ttft_serial = [t for t in fig.data if t.name == "serial · 2 req/s" and t.xaxis == "x"][0]
    assert list(ttft_serial.x)[1:] == pytest.approx([0.6, 0.6, 0.6])
    itl_split = [t for t in fig.data if t.name.startswith("split") and t.xaxis == "x4"][0]
    assert len(itl_split.x) == 7
    assert fig.layout.xaxis4.title.text == "inter-token latency (s)" and fig.layout.xaxis4.type == "log"
    assert fig.layout.yaxis4.title.text == "fraction of token gaps"
    assert [a.text for a in fig.layout.annotations] == ["CDF of time to first token", "CDF of time per output token",
                                                        "CDF of end-to-end latency", "CDF of inter-token latency"]
    assert ttft_serial.line.color != itl_split.line.color


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
    assert list(bar.text) == ["1.00×", "1.40×", "1.10×"]
    assert fig.layout.title.text == "Speedup over serial on throughput"
    assert fig.layout.yaxis.title.text == "speedup over serial on throughput (×, run ÷ baseline)"
    assert fig.layout.xaxis.title.text == "run" and fig.layout.yaxis.type is None
    lat = plots.speedup_bars(df, "serial", "ttft_p99_s")
    assert list(lat.data[0].y) == pytest.approx([1.0, 2.0 / 0.65, 2.0], rel=1e-3)  # baseline / value
    assert lat.layout.yaxis.title.text.endswith("(×, baseline ÷ run)")
    assert "TTFT p99" in lat.layout.title.text and "ttft_p99_s" not in lat.layout.title.text
    with pytest.raises(SplitlabError):
        plots.speedup_bars(df, "chunked", "throughput_tok_s")


def test_speedup_bars_several_metrics_grouped_on_a_log_axis_when_wide():
    df = summary_table().assign(itl_p99_s=[1.13, 0.016, 0.067, 0.02])
    fig = plots.speedup_bars(df, "serial", ["throughput_tok_s", "itl_p99_s"])
    assert [t.name for t in fig.data] == ["throughput (run ÷ baseline)", "ITL p99 (baseline ÷ run)"]
    assert fig.layout.barmode == "group" and fig.layout.showlegend is True
    assert list(fig.data[1].y) == pytest.approx([1.0, 1.13 / 0.018, 1.13 / 0.067], rel=1e-3)
    assert fig.layout.yaxis.type == "log"  # 1× to 63×


def test_heatmap_grid():
    df = summary_table()
    fig = plots.heatmap(df, "rate", "prefill_share", "goodput_req_s")
    hm = fig.data[0]
    assert list(hm.x) == ["1 req/s", "2 req/s"] and list(hm.y) == ["30%", "50%"]
    z = np.array(hm.z, dtype=float)
    assert z[0, 0] == pytest.approx(1.2) and z[1, 0] == pytest.approx(1.5) and z[1, 1] == pytest.approx(2.5)
    assert np.isnan(z[0, 1])  # no run at rate 2, share 30
    assert fig.layout.xaxis.title.text == "arrival rate (req/s)"
    assert fig.layout.yaxis.title.text == "prefill SM share (%)"
    assert fig.layout.coloraxis.colorbar.title.text == "goodput (req/s)"
    assert list(fig.layout.yaxis.tickvals) == ["30%", "50%"]  # every row labelled


def test_heatmap_never_pools_experiments_and_counts_runs():
    df = pd.concat([summary_table().assign(experiment="slots64"),
                    summary_table().assign(experiment="slots128", goodput_req_s=[9.0, 9.0, 9.0, 9.0]),
                    summary_table().iloc[[1]].assign(experiment="slots64", goodput_req_s=2.5)])
    df.loc[df["experiment"] == "slots64", "rate"] = [16.28002154932318, 16.28002154932318, 16.28002154932318,
                                                     21.2, 16.28002154932318]
    fig = plots.heatmap(df, "rate", "label", "goodput_req_s")
    assert len(fig.data) == 2 and [a.text for a in fig.layout.annotations] == ["slots64", "slots128"]
    slots64, slots128 = fig.data
    assert list(slots64.x) == ["16.3 req/s", "21.2 req/s"]  # rounded, with the unit
    assert list(slots64.y) == ["serial", "split mps 30/70", "split mps 50/50"]  # the baseline has its row
    z = np.array(slots64.z, dtype=float)
    assert z[2, 0] == pytest.approx(2.0)  # the two 50/50 runs of this experiment: mean 2.0, not pooled with 9
    assert slots64.text[2][0] == "2<br>(2 runs)" and slots64.customdata[2][0] == 2
    assert np.nanmax(np.array(slots128.z, dtype=float)) == 9.0
    assert fig.layout.height >= 30 * (3 + 3) + 100


def test_metric_bars_log_axis_for_a_wide_latency():
    df = summary_table().assign(itl_p99_s=[1.13, 0.016, 0.067, 0.016])
    fig = plots.metric_bars(df, "itl_p99_s")
    assert list(fig.data[0].y) == pytest.approx([1.13, 0.016, 0.067])
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.title.text.startswith("ITL p99 (s)")
    assert list(fig.data[0].text) == ["1.13 s", "16 ms", "67 ms"]
    narrow = plots.metric_bars(summary_table(), "ttft_p99_s")
    assert list(narrow.data[0].y) == pytest.approx([2.0, 0.65, 1.0]) and narrow.layout.yaxis.type is None
    assert narrow.layout.title.text == "TTFT p99 (s)"
    assert plots.metric_bars(df, "itl_p99_s", log=False).layout.yaxis.type is None


def test_axis_titles_are_words_with_units():
    for column, title in (("goodput_req_s", "goodput (req/s)"), ("ttft_p99_s", "TTFT p99 (s)"),
                          ("rate", "arrival rate (req/s)"), ("throughput_tok_s", "throughput (output tok/s)"),
                          ("peak_memory_bytes", "peak GPU memory (bytes)")):
        assert plots.column_title(column) == title
    figs = [plots.heatmap(summary_table(), "rate", "label", "throughput_tok_s"),
            plots.metric_bars(summary_table(), "goodput_req_s"),
            plots.speedup_bars(summary_table(), "serial", "goodput_req_s")]
    for fig in figs:
        texts = [fig.layout.xaxis.title.text, fig.layout.yaxis.title.text, fig.layout.title.text]
        assert not any("_" in t for t in texts), texts


def test_figures_are_small_and_bars_have_no_outline():
    fig = plots.phase_breakdown_runs([make_run()])
    assert len(fig.to_json()) < 4000  # plotly_white alone is ~7 kB in every figure
    assert fig.layout.template.layout.plot_bgcolor == "white"
    assert not fig.layout.template.data.bar  # plotly_white outlines every bar in white


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


def test_timeline_draws_the_sm_split_when_steps_know_it():
    """Adaptive green split: each step records its partition's SMs; a row under the batch line
    draws them per worker as a step line, broken where the worker was idle."""
    run = make_run(monitor=False)
    run.env = {"gpu_name": "NVIDIA H200", "sm_count": 132}
    sms = {("prefill", 0.1): 100, ("prefill", 0.3): 100, ("prefill", 0.5): 68,
           ("decode", 0.3): 32, ("decode", 0.4): 32, ("decode", 0.5): 64, ("decode", 0.7): 64, ("decode", 0.9): 132}
    for s in run.steps:
        s.sms = sms[(s.worker, round(s.start_s, 3))]
    run.steps.append(StepTrace("decode", "decode", 1.5, 1.6, [2], 1, sms=16))  # after a 0.5 s pause
    fig = plots.timeline(run)
    assert [t.name for t in fig.data] == ["prefill", "decode", "requests per decode step", "decode SMs", "prefill SMs"]
    dec, pre = fig.data[3], fig.data[4]
    # decode: 32 from 0.3, 64 from 0.5, 132 from 0.9 until 1.0; idle until 1.5 (a break); 16 until 1.6
    assert list(dec.x) == pytest.approx([0.3, 0.5, 0.9, 1.0, 1.0, 1.5, 1.6])
    assert list(dec.y) == [32, 64, 132, 132, None, 16, 16]
    # prefill: back to back from 0.1 to 0.6, 100 SMs then 68
    assert list(pre.x) == pytest.approx([0.1, 0.5, 0.6]) and list(pre.y) == [100, 68, 68]
    assert dec.line.shape == "hv" and dec.xaxis == "x3" and dec.line.color == plots.PHASE_COLORS["decode"]
    assert fig.layout.yaxis3.title.text == "SMs (of 132)"
    assert fig.layout.yaxis3.range[0] == 0 and fig.layout.yaxis3.range[1] >= 132
    assert fig.layout.xaxis3.title.text == "time since run start (s)"
    assert plots.step_sms(run)[-1] == 16 and plots.total_sms(run) == 132


def test_timeline_sm_row_of_a_static_green_split_and_none_without_sms():
    """A static green split records its partition once, in its config: the row draws it flat.
    MPS shares (no SM count per step) get no SM row."""
    from splitlab.config import RunConfig

    run = make_run(backend="green", shares=None, monitor=False)
    run.config = RunConfig(mode="split", backend="green", prefill_sms=72, decode_sms=60,
                           green={"total_sms": 132, "prefill_sms": 72, "decode_sms": 60})
    fig = plots.timeline(run)
    rows = {t.name: t for t in fig.data}
    assert set(rows["decode SMs"].y) == {60} and set(rows["prefill SMs"].y) == {72}
    assert fig.layout.yaxis3.title.text == "SMs (of 132)"  # from the green record
    assert "decode SMs" not in [t.name for t in plots.timeline(make_run(monitor=False)).data]
    assert plots.step_sms(make_run()) == [None] * 8


def test_rate_curves_one_line_per_label_log_when_wide():
    df = pd.DataFrame([{"label": "serial", "rate": r, "itl_p99_s": v, "goodput_req_s": g}
                       for r, v, g in ((2.0, 0.9, 1.0), (1.0, 0.5, 0.9))]
                      + [{"label": "split", "rate": r, "itl_p99_s": 0.01, "goodput_req_s": r} for r in (1.0, 2.0)])
    fig = plots.rate_curves(df, "itl_p99_s", colors={"split": "#000000"}, dash=("serial",))
    assert [t.name for t in fig.data] == ["serial", "split"]
    assert list(fig.data[0].x) == [1.0, 2.0] and list(fig.data[0].y) == [0.5, 0.9]  # sorted by rate
    assert fig.data[0].line.dash == "dash" and fig.data[1].line.color == "#000000"
    assert list(fig.data[0].text) == ["500 ms", "900 ms"]
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.title.text == "ITL p99 (s), log scale"  # 90x
    assert fig.layout.xaxis.title.text == "arrival rate (req/s)"
    lin = plots.rate_curves(df, "goodput_req_s")
    assert lin.layout.yaxis.type is None and lin.layout.yaxis.title.text == "goodput (req/s)"
    with pytest.raises(SplitlabError):
        plots.rate_curves(df, "ttft_p99_s")


def test_attainment_rate_curve_colours_marks_and_names_modes_without_one():
    from splitlab.measure.slo import attainment_vs_rate
    from splitlab.config import SLO

    def run(rate, gap):
        traces = [RequestTrace(i, i * 0.1, 4, 3, 0.0, 0.05 + i * 0.1, [0.05 + i * 0.1 + k * gap for k in range(3)],
                               [1, 2, 3], "w") for i in range(4)]
        return Run(mode="serial", model="tiny", workload=f"poisson-r{rate}-n4", config={"rate": rate}, env={},
                   traces=traces)

    table = attainment_vs_rate({"fast": [run(r, 0.01) for r in (1, 2)], "slow": [run(r, 0.2) for r in (1, 2)]},
                               SLO(ttft_s=1, tpot_s=None, itl_s=0.05))
    fig = plots.attainment_rate_curve(table)
    line = {t.name: t for t in fig.data}
    mark = line["fast: max rate at 90% ≥ 2 req/s (highest rate measured)"]
    assert mark.marker.color == line["fast"].line.color and mark.legendgroup == "fast"
    assert [a.text for a in fig.layout.annotations] == ["no mark: below 90% at every rate measured: slow"]


# ---- KV capacity: usage over time, page sizes ---------------------------------------------------------

def kv_run(mode, engine, steps, workers=None):
    from splitlab.config import RunConfig

    traces = [RequestTrace(0, 0.0, 5, 2, 0.0, 0.1, [0.1, 0.2], [1, 2], "w")]
    config = RunConfig(mode=mode, engine=engine, workers=workers or {})
    return Run(mode=mode, model="tiny", workload="burst", config=config, env={}, traces=traces, steps=steps)


def test_kv_usage_draws_the_pool_in_use_per_run_and_worker_with_positions_on_hover():
    from splitlab.config import EngineConfig

    slots = kv_run("serial", EngineConfig(max_seq_len=128, num_slots=4, max_batch=4), [
        StepTrace("serial", "prefill", 0.0, 0.1, [0], 5, kv_used=1, kv_total=4),
        StepTrace("serial", "prefill", 0.1, 0.2, [1], 5, kv_used=2, kv_total=4),
        StepTrace("serial", "decode", 0.2, 0.3, [0, 1], 2, kv_used=2, kv_total=4),  # unchanged: no corner
        StepTrace("serial", "decode", 0.3, 0.4, [1], 1, kv_used=0, kv_total=4)])
    split = kv_run("split", EngineConfig(max_seq_len=128, kv_block_size=16, num_pages=40, max_batch=4), [
        StepTrace("prefill", "prefill", 0.0, 0.1, [0], 5, kv_used=10, kv_total=40),
        StepTrace("decode", "decode", 0.1, 0.2, [0], 1),  # the decode side sees no pool: no line
        StepTrace("prefill", "prefill", 0.2, 0.3, [1], 5, kv_used=30, kv_total=40)],
        workers={"prefill": {"kv_block_size": 16, "max_seq_len": 128}, "decode": {"kv_block_size": 16}})
    fig = plots.kv_usage({"slots": slots, "pages": split})
    assert [t.name for t in fig.data] == ["slots", "pages"]
    a, b = fig.data
    assert list(a.x) == [0.1, 0.2, 0.4] and list(a.y) == [25.0, 50.0, 0.0]  # held from each step's end
    assert [list(c) for c in a.customdata] == [[1, 4, 128], [2, 4, 256], [0, 4, 0]]  # a slot holds 128 positions
    assert "slots of 128" in a.hovertemplate and "positions held" in a.hovertemplate
    assert list(b.y) == [25.0, 75.0] and [c[2] for c in b.customdata] == [160, 480] and "pages of 16" in b.hovertemplate
    assert fig.layout.xaxis.title.text == "time since run start (s)"
    assert "(%" in fig.layout.yaxis.title.text and tuple(fig.layout.yaxis.range) == (0, 105)
    assert [t.name for t in plots.kv_usage(slots).data] == [plots.legend_label(slots)]  # one Run alone
    split.config = type(split.config)(mode="split", engine=split.config.engine, workers={  # two workers that see it
        "prefill": {"kv_block_size": 16}, "decode": {"kv_block_size": 16}})
    split.steps[1].kv_used, split.steps[1].kv_total = 20, 40
    assert [t.name for t in plots.kv_usage({"p": split}).data] == ["p — decode", "p — prefill"]


def test_kv_usage_refuses_runs_that_recorded_none():
    with pytest.raises(SplitlabError, match="KV usage"):
        plots.kv_usage([make_run()])  # steps without kv_used, as in run files from before the field


def page_rows():
    row = lambda wl, ps, ms, peak, step="serial": {"step": step, "workload_key": wl, "page_size": ps,  # noqa: E731
                                                    "decode_step_p50_ms": ms, "peak_decode_batch": peak}
    return [row("burst", None, 7.0, 64), row("burst", 16, 9.0, 250), row("burst", 32, 8.5, 240),
            row("burst", 64, 8.0, 220), row("poisson", 16, 6.0, 80), row("poisson", 64, 5.5, 78),
            row("poisson-r40", 16, 7.5, 120), row("burst", 32, 99.0, 1, step="chunked")]


def test_page_size_figure_draws_step_time_and_concurrency_against_page_size():
    fig = plots.page_size_figure({"runs": page_rows()})  # the result file's dict, as written
    by = {(t.name, t.xaxis): t for t in fig.data}
    assert [t.name for t in fig.data] == ["burst", "burst", "slot pool · burst", "poisson", "poisson"]
    assert list(by[("burst", "x")].x) == [16, 32, 64] and list(by[("burst", "x")].y) == [9.0, 8.5, 8.0]
    assert list(by[("burst", "x2")].y) == [250, 240, 220]  # the chunked row is another step's
    assert list(by[("slot pool · burst", "x2")].y) == [64, 64] and by[("slot pool · burst", "x2")].line.dash == "dash"
    assert list(by[("poisson", "x2")].x) == [16, 64]  # poisson-r40 ran at one page size only: no line
    assert fig.layout.xaxis.title.text == "KV page size (positions per page)" == fig.layout.xaxis2.title.text
    assert fig.layout.yaxis.title.text == "decode step time (ms)"
    assert fig.layout.yaxis2.title.text == "concurrent sequences (peak decode batch)"
    assert list(fig.layout.xaxis.tickvals) == [16, 32, 64] and fig.layout.xaxis.type == "log"
    chunked = plots.page_size_figure(pd.DataFrame(page_rows()), step="chunked")
    assert [list(t.y) for t in chunked.data] == [[99.0], [1]]


def test_page_size_figure_refuses_rows_without_pages_or_columns():
    with pytest.raises(SplitlabError, match="no paged-pool rows"):
        plots.page_size_figure([r for r in page_rows() if r["page_size"] is None])
    with pytest.raises(SplitlabError, match="peak_decode_batch"):
        plots.page_size_figure([{"page_size": 16, "workload_key": "a", "decode_step_p50_ms": 1.0}])


def test_corun_fractions_stacks_the_two_jobs_and_its_menu_sets_them_side_by_side():
    import pandas as pd

    from splitlab.errors import SplitlabError

    table = pd.DataFrame({"compute (fraction of solo)": [0.5, 0.9], "memory (fraction of solo)": [0.5, 0.3]},
                         index=["processes", "mps"])
    fig = plots.corun_fractions(table, title="co-run")
    assert [t.name for t in fig.data][:3] == ["matmul (compute-bound)", "copy (memory-bound)", "the two together"]
    assert fig.data[3].name.startswith("1.0 = no gain")  # the dotted line's legend entry
    assert list(fig.data[0].x) == ["processes", "mps"] and list(fig.data[1].y) == [0.5, 0.3]
    assert list(fig.data[2].y) == [1.0, 1.2] and fig.data[2].visible is False
    assert fig.layout.barmode == "stack" and fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    shown = [b.args[0]["visible"] for b in fig.layout.updatemenus[0].buttons]
    assert shown == [[True, True, False, True], [False, False, True, True]]  # the menu switches the bars
    with pytest.raises(SplitlabError, match="co-run table"):
        plots.corun_fractions(table[["compute (fraction of solo)"]])
