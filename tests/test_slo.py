"""SLOs that bound every token gap: judging on hand-built timestamps, SLO curves, their plots,
the CLI's --goodput, and the recorded H200 runs re-scored."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from splitlab import SLO, load_run
from splitlab.cli import main
from splitlab.errors import ConfigError
from splitlab.measure import slo as S
from splitlab.measure.metrics import RequestTrace, Run, goodput, summaries_table

RECORDED = Path(__file__).resolve().parents[1] / "results" / "colocation_h200"


def gap_run() -> Run:
    """Four requests (seconds); wall time 3.3 (the last token):

    id arrival tokens                       TTFT  TPOT    largest gap  E2E
    0  0.0     0.10 0.11 0.12 0.20 0.21     0.1   0.0275  0.08         0.21
    1  0.0     0.50                         0.5   -       -            0.5
    2  0.2     1.70 1.71 1.72               1.5   0.01    0.01         1.52
    3  0.3     0.40 0.50 0.60 3.30          0.1   0.9667  2.7          3.0
    """
    traces = [
        RequestTrace(0, 0.0, 4, 5, None, None, [0.10, 0.11, 0.12, 0.20, 0.21], [1] * 5),
        RequestTrace(1, 0.0, 4, 1, None, None, [0.50], [1]),
        RequestTrace(2, 0.2, 4, 3, None, None, [1.70, 1.71, 1.72], [1] * 3),
        RequestTrace(3, 0.3, 4, 4, None, None, [0.40, 0.50, 0.60, 3.30], [1] * 4),
    ]
    return Run("serial", "tiny", "hand-gaps", {}, {}, traces)


def rate_run(rate: float, good: int, n: int = 10, gap: float = 0.02, wall_s: float = 10.0) -> Run:
    """``n`` requests whose gaps are all ``gap``; the first ``good`` have TTFT 0.1 s, the rest 5 s."""
    traces = []
    for i in range(n):
        first = i * 0.01 + (0.1 if i < good else 5.0)
        traces.append(RequestTrace(i, i * 0.01, 4, 4, None, None, [first + k * gap for k in range(4)], [1] * 4))
    return Run("split", "tiny", f"poisson-r{rate:g}-n{n}", {"backend": "mps"}, {}, traces, wall_s=wall_s)


# ---- the SLO itself -------------------------------------------------------------------------

def test_default_slo_scores_as_before():
    slo = SLO()
    assert (slo.ttft_s, slo.tpot_s, slo.itl_s, slo.e2e_s, slo.itl_quantile) == (1.0, 0.05, None, None, 1.0)
    assert SLO(1.0, 0.25).tpot_s == 0.25  # positional order kept
    assert slo.describe() == "TTFT ≤ 1 s, TPOT ≤ 50 ms"


@pytest.mark.parametrize("kwargs, match", [
    (dict(ttft_s=math.nan), "SLO.ttft_s"), (dict(tpot_s=math.inf), "SLO.tpot_s"), (dict(itl_s=0), "SLO.itl_s"),
    (dict(e2e_s=-1.0), "SLO.e2e_s"), (dict(ttft_s=True), "SLO.ttft_s"), (dict(itl_s="0.03"), "SLO.itl_s"),
    (dict(itl_s=0.03, itl_quantile=0), "itl_quantile"), (dict(itl_s=0.03, itl_quantile=1.5), "itl_quantile"),
    (dict(itl_s=0.03, itl_quantile=math.nan), "itl_quantile"), (dict(itl_s=0.03, itl_quantile=True), "itl_quantile"),
    (dict(itl_quantile=0.99), "give itl_s too"), (dict(ttft_s=None, tpot_s=None), "at least one bound"),
])
def test_bad_bounds_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SLO(**kwargs)


def test_serialisation_round_trips_and_old_dicts_load():
    slo = SLO(ttft_s=2, tpot_s=None, itl_s=0.03, itl_quantile=0.99, e2e_s=5)
    back = SLO.from_dict(json.loads(json.dumps(slo.to_dict())))
    assert back == slo and back.ttft_s == 2.0
    old = SLO.from_dict({"ttft_s": 0.45, "tpot_s": 0.25})
    assert old == SLO(ttft_s=0.45, tpot_s=0.25) and old.itl_s is None and old.e2e_s is None
    with pytest.raises(ConfigError, match="unknown key"):
        SLO.from_dict({"ttft_s": 1, "itl_p99_s": 0.03})


def test_describe_and_scaled():
    assert SLO(ttft_s=1, tpot_s=None, itl_s=0.03).describe() == "TTFT ≤ 1 s, every gap ≤ 30 ms"
    assert SLO(ttft_s=None, tpot_s=None, itl_s=0.03, itl_quantile=0.99, e2e_s=2.5).describe() == \
        "p99 gap ≤ 30 ms, E2E ≤ 2.5 s"
    doubled = SLO(ttft_s=1, tpot_s=None, itl_s=0.03, itl_quantile=0.99).scaled(2)
    assert (doubled.ttft_s, doubled.tpot_s, doubled.itl_s, doubled.itl_quantile) == (2.0, None, 0.06, 0.99)
    with pytest.raises(ConfigError, match="scale"):
        SLO().scaled(0)


def test_from_vllm_parses_milliseconds_and_only_named_bounds_apply():
    slo = SLO.from_vllm("ttft:1000 tpot:50 itl:30 e2el:5000")
    assert (slo.ttft_s, slo.tpot_s, slo.itl_s, slo.e2e_s) == (1.0, 0.05, 0.03, 5.0)
    assert SLO.from_vllm(["ttft:2000", "itl:30"]) == SLO.from_vllm("ttft:2000,itl:30") == \
        SLO(ttft_s=2.0, tpot_s=None, itl_s=0.03)
    assert SLO.from_vllm("itl:30", itl_quantile=0.99).itl_quantile == 0.99


@pytest.mark.parametrize("spec, match", [
    ("", "empty"), ("ttft", "NAME:MILLISECONDS"), ("foo:10", "NAME:MILLISECONDS"), ("ttft:abc", "milliseconds"),
    ("ttft:0", "milliseconds"), ("ttft:nan", "milliseconds"), ("ttft:1 ttft:2", "twice"), (5, "a string"),
])
def test_from_vllm_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        SLO.from_vllm(spec)


# ---- judging requests -------------------------------------------------------------------------

def test_long_gap_fails_itl_but_passes_tpot():
    run = gap_run()
    by_tpot = run.summary(SLO(ttft_s=1, tpot_s=0.05))
    assert by_tpot["slo_met"] == 2  # ids 0 and 1: id 0's mean gap is 27.5 ms
    by_gap = run.summary(SLO(ttft_s=1, tpot_s=0.05, itl_s=0.05))
    assert by_gap["slo_met"] == 1  # id 0's 80 ms gap now fails it; one-token id 1 still counts
    assert by_gap["slo_attainment_tpot"] == 0.75 and by_gap["slo_attainment_itl"] == 0.5
    assert by_gap["goodput_req_s"] == pytest.approx(1 / 3.3)


def test_attainment_per_bound_shows_which_bound_failed():
    s = gap_run().summary(SLO(ttft_s=1, tpot_s=0.05, itl_s=0.05, e2e_s=2))
    assert s["slo_attainment_ttft"] == 0.75  # id 2 (1.5 s)
    assert s["slo_attainment_tpot"] == 0.75  # id 3
    assert s["slo_attainment_itl"] == 0.5   # ids 0 and 3
    assert s["slo_attainment_e2e"] == 0.75  # id 3 (3 s)
    assert s["slo_met"] == 1 and s["slo_attainment"] == 0.25
    assert s["slo"] == "TTFT ≤ 1 s, TPOT ≤ 50 ms, every gap ≤ 50 ms, E2E ≤ 2 s"
    unbounded = gap_run().summary(SLO(ttft_s=1, tpot_s=None))
    assert math.isnan(unbounded["slo_attainment_tpot"]) and unbounded["slo_tpot_s"] is None
    assert unbounded["slo_met"] == 3  # only id 2's TTFT fails


def test_one_token_request_is_judged_on_ttft_and_e2e_only():
    run = gap_run()
    run.traces = [run.traces[1]]  # TTFT 0.5, E2E 0.5, no gaps
    assert run.summary(SLO(ttft_s=1, tpot_s=0.001, itl_s=0.001))["slo_met"] == 1
    assert run.summary(SLO(ttft_s=0.4, tpot_s=None, itl_s=0.001))["slo_met"] == 0
    assert run.summary(SLO(ttft_s=1, tpot_s=None, e2e_s=0.4))["slo_met"] == 0


def test_quantile_of_a_request_s_gaps():
    # 100 gaps of 10 ms and one of 100 ms: the largest gap fails 20 ms, the p99 (linear) does not
    times = list(np.cumsum([0.1] + [0.01] * 50 + [0.1] + [0.01] * 50))
    run = Run("serial", "tiny", "hand", {}, {}, [RequestTrace(0, 0.0, 4, 102, None, None, times, [1] * 102)])
    assert run.summary(SLO(ttft_s=1, tpot_s=None, itl_s=0.02))["slo_met"] == 0
    assert run.summary(SLO(ttft_s=1, tpot_s=None, itl_s=0.02, itl_quantile=0.99))["slo_met"] == 1
    assert run.summary(SLO(ttft_s=1, tpot_s=None, itl_s=0.02, itl_quantile=0.995))["slo_met"] == 0


def test_goodput_on_a_table_alone_uses_its_gap_columns():
    table = gap_run().requests
    assert goodput(table, 3.3, SLO(ttft_s=1, tpot_s=None, itl_s=0.05))["slo_met"] == 1
    with pytest.raises(ConfigError, match="needs its gaps"):
        goodput(table, 3.3, SLO(ttft_s=1, tpot_s=None, itl_s=0.05, itl_quantile=0.9))


def test_recorded_slo_with_gap_bound_survives_save_and_load(tmp_path):
    run = gap_run()
    run.config = dataclasses.replace(run.config, slo=SLO(ttft_s=1, tpot_s=None, itl_s=0.05))
    back = load_run(run.save(tmp_path / "run.json.gz"))
    assert back.summary()["slo_met"] == 1 and back.summary()["slo_itl_s"] == 0.05
    table = summaries_table([run, back], SLO(ttft_s=2, tpot_s=None))
    assert list(table["slo_met"]) == [4, 4]


# ---- curves ---------------------------------------------------------------------------------------

def test_attainment_against_slo_scale():
    table = S.attainment_vs_scale({"hand": gap_run()}, SLO(ttft_s=1, tpot_s=None, itl_s=0.05),
                                  scales=(0.25, 1, 2, 40, 100))
    assert list(table["scale"]) == [0.25, 1, 2, 40, 100]
    # 2x: TTFT <= 2 s, gaps <= 100 ms lets ids 0 and 2 in; id 3's 2.7 s gap needs 100x
    assert list(table["slo_attainment"]) == [0.0, 0.25, 0.75, 0.75, 1.0]
    assert table["slo"].iloc[1] == "TTFT ≤ 1 s, every gap ≤ 50 ms"


def test_max_rate_interpolates_the_first_crossing():
    runs = [rate_run(r, good) for r, good in ((1, 10), (2, 10), (3, 8), (4, 5))]
    limit = S.max_rate(runs, SLO(ttft_s=1, tpot_s=None, itl_s=0.05))
    assert limit.status == "interpolated" and limit.rate == pytest.approx(2.5)
    assert str(limit) == "2.5 req/s"
    assert S.interpolate_max_rate([1, 2, 3], [1.0, 0.8, 1.0]).rate == pytest.approx(1.5)  # conservative
    assert S.interpolate_max_rate([1, 1, 2], [1.0, 0.8, 0.5]).rate == pytest.approx(1.0)  # repeats averaged: 0.9


def test_max_rate_edges_say_why():
    slo = SLO(ttft_s=1, tpot_s=None)
    high = S.max_rate([rate_run(1, 10), rate_run(2, 9)], slo)
    assert high.status == "at_least" and high.at_least and high.rate == 2.0
    assert str(high) == "≥ 2 req/s (highest rate measured)"
    low = S.max_rate([rate_run(1, 8), rate_run(2, 10)], slo)
    assert low.status == "below_lowest" and math.isnan(low.rate) and "lowest rate measured" in low.reason
    with pytest.raises(ConfigError, match="target"):
        S.interpolate_max_rate([1, 2], [1, 1], target=0)


def test_rates_from_the_record_or_from_pairs():
    assert S.arrival_rate(rate_run(21.2, 1)) == 21.2
    nameless = gap_run()
    assert S.arrival_rate(nameless) is None
    with pytest.raises(ConfigError, match=r"\(rate, run\) pairs"):
        S.attainment_vs_rate([nameless], SLO())
    table = S.attainment_vs_rate([(2.0, nameless), (1.0, gap_run())], SLO(ttft_s=1, tpot_s=None), label="hand")
    assert list(table["rate"]) == [1.0, 2.0] and set(table["label"]) == {"hand"}
    nameless.config = dataclasses.replace(nameless.config, rate=3.5)
    assert S.arrival_rate(nameless) == 3.5


def _grid_groups():
    return {
        "split": [rate_run(1, 10, gap=0.02), rate_run(2, 5, gap=0.02)],
        "a": [rate_run(1, 10, gap=0.04), rate_run(2, 10, gap=0.2)],
        "b": [rate_run(1, 10, gap=0.2), rate_run(2.01, 10, gap=0.04)],  # within 1% of rate 2
    }


def test_goodput_ratio_grid_takes_the_best_peer_per_cell():
    grid = S.goodput_ratio_grid(_grid_groups(), "split", SLO(ttft_s=1, tpot_s=None), gap_bounds_s=(0.01, 0.03, 0.05))
    cell = {(r, g): row for r, g, row in zip(grid["rate"], grid["itl_s"], grid.to_dict("records"))}
    assert len(grid) == 6
    assert math.isnan(cell[(1.0, 0.01)]["ratio"])  # nobody meets 10 ms
    assert math.isinf(cell[(1.0, 0.03)]["ratio"]) and cell[(1.0, 0.03)]["split_goodput_req_s"] == 1.0
    assert cell[(1.0, 0.05)]["ratio"] == 1.0 and cell[(1.0, 0.05)]["best_peer"] == "a"
    assert cell[(2.0, 0.05)]["ratio"] == 0.5 and cell[(2.0, 0.05)]["best_peer"] == "b"
    assert cell[(2.0, 0.05)]["peer_goodput_req_s"] == 1.0
    with pytest.raises(ConfigError, match="peers"):
        S.goodput_ratio_grid(_grid_groups(), "split", SLO(), (0.03,), peers=["c"])


# ---- plots --------------------------------------------------------------------------------------

def test_plot_attainment_against_scale():
    plots = pytest.importorskip("splitlab.present.plots")
    table = S.attainment_vs_scale({"hand": gap_run()}, SLO(ttft_s=1, tpot_s=None, itl_s=0.05), scales=(0.25, 1, 2))
    fig = plots.slo_scale_curve(table)
    assert [t.name for t in fig.data] == ["hand", "90% attainment"]
    assert list(fig.data[0].y) == [0.0, 25.0, 75.0]
    assert fig.layout.xaxis.title.text == "SLO scale (× every bound)"
    assert fig.layout.yaxis.title.text == "SLO attainment (% of requests)"
    assert "1× = TTFT ≤ 1 s, every gap ≤ 50 ms" in fig.layout.title.text


def test_plot_attainment_against_rate_marks_the_max_rate():
    plots = pytest.importorskip("splitlab.present.plots")
    groups = {"A": [rate_run(r, g) for r, g in ((1, 10), (2, 10), (3, 8))],
              "B": [rate_run(r, 10) for r in (1, 2, 3)], "C": [rate_run(r, 5) for r in (1, 2)]}
    fig = plots.attainment_rate_curve(S.attainment_vs_rate(groups, SLO(ttft_s=1, tpot_s=None)))
    names = [t.name for t in fig.data]
    assert names[:4] == ["A", "B", "C", "90% attainment"]
    marks = {t.name: t for t in fig.data[4:]}
    a = marks["A: max rate at 90% 2.5 req/s"]
    assert list(a.x) == [pytest.approx(2.5)] and list(a.y) == [90.0]
    assert list(marks["B: max rate at 90% ≥ 3 req/s (highest rate measured)"].x) == [3.0]
    assert list(marks["C: below 90% at every rate measured"].x) == []
    assert fig.layout.xaxis.title.text == "arrival rate (req/s)"
    assert fig.layout.yaxis.title.text == "SLO attainment (% of requests)"


def test_plot_goodput_ratio_map():
    plots = pytest.importorskip("splitlab.present.plots")
    grid = S.goodput_ratio_grid(_grid_groups(), "split", SLO(ttft_s=1, tpot_s=None), gap_bounds_s=(0.03, 0.05))
    fig = plots.goodput_ratio_map(grid, split="split")
    (heat,) = fig.data
    assert heat.type == "heatmap"
    assert list(heat.x) == ["1", "2"] and list(heat.y) == ["30 ms", "50 ms"]
    assert heat.text[0][0] == "∞ (peers 0)" and heat.text[1][1] == "0.5×<br>vs b"
    assert heat.z[1][0] == pytest.approx(0.0) and heat.z[1][1] == pytest.approx(math.log10(0.5))
    assert heat.z[0][0] == pytest.approx(heat.zmax)  # infinite ratio drawn at the top colour
    assert heat.colorbar.title.text == "goodput split / best peer" and "1×" in heat.colorbar.ticktext
    assert fig.layout.xaxis.title.text == "arrival rate (req/s)"
    assert fig.layout.yaxis.title.text == "bound on every inter-token gap (ms)"


# ---- the command line ------------------------------------------------------------------------------

def _last_json(text):
    return json.loads([line for line in text.strip().splitlines() if line.strip()][-1])


def test_cli_goodput_builds_the_slo(capsys):
    assert main(["run", "--model", "tiny", "--workload", "fixed", "--num-requests", "2", "--prompt-len", "6",
                 "--output-len", "3", "--no-progress", "--goodput", "ttft:60000", "itl:60000"]) == 0
    summary = _last_json(capsys.readouterr().out)
    assert summary["slo_ttft_s"] == 60.0 and summary["slo_itl_s"] == 60.0 and summary["slo_tpot_s"] is None
    assert summary["slo"] == "TTFT ≤ 60 s, every gap ≤ 60 s" and summary["slo_met"] == 2


@pytest.mark.parametrize("args, match", [
    (["--goodput", "ttft:1000", "--slo-ttft", "2"], "not both"),
    (["--goodput", "ttft:fast"], "milliseconds"),
    (["--goodput", "p99:30"], "NAME:MILLISECONDS"),
])
def test_cli_goodput_errors(capsys, args, match):
    assert main(["run", "--model", "tiny", "--workload", "fixed", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("splitlab: error:") and match in err


# ---- the recorded H200 runs ---------------------------------------------------------------------------

def test_recorded_poisson_runs_rescored_with_a_gap_bound():
    """Poisson at 21.2 req/s, 160 requests: TTFT <= 2 s and every gap <= 30 ms. Goodput is
    met / wall time (time 0 to the last token of the run)."""
    table = S.rescore(RECORDED / "*poisson-mid*", SLO(ttft_s=2, tpot_s=None, itl_s=0.03)).set_index("label")
    assert len(table) == 13 and table["num_requests"].eq(160).all()
    mps = table.loc["split-mps-p60-d40--poisson-mid"]
    assert mps["slo_met"] == 160 and mps["goodput_req_s"] == pytest.approx(14.54, abs=0.005)
    assert mps["goodput_req_s"] == pytest.approx(160 / mps["wall_s"])
    assert table.loc["split-green--poisson-mid", "goodput_req_s"] == pytest.approx(14.48, abs=0.005)
    serial = table.loc["serial--poisson-mid"]
    assert serial["slo_met"] == 1 and serial["goodput_req_s"] == pytest.approx(0.094, abs=0.001)
    # serial meets the TTFT bound with every request but a prefill stall puts a long gap in all but one
    assert serial["slo_attainment_ttft"] == 1.0 and serial["slo_attainment_itl"] == pytest.approx(1 / 160)
    replicas = table[table.index.str.startswith("replicas")]
    assert len(replicas) == 4 and (replicas["goodput_req_s"] == 0).all()
    # the default TPOT bound (a mean gap) cannot see those stalls: serial passes it
    assert load_run(RECORDED / "serial--poisson-mid.json.gz").summary(SLO())["slo_attainment_tpot"] == 1.0
