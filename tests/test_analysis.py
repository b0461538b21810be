"""splitlab.measure.analysis reproduces what the recorded GPU results stored, from their runs;
and its pieces behave on small synthetic runs."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

import splitlab
from splitlab.config import SLO
from splitlab.errors import ConfigError
from splitlab.measure import analysis as an
from splitlab.measure.metrics import RequestTrace, Run, StepTrace

RESULTS = Path(__file__).resolve().parents[1] / "results"
COLOCATION = RESULTS / "colocation_h200.json"


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(COLOCATION.read_text())


def run_name(row) -> str:
    return f"{row['step']}--{row['workload_key']}"


def test_rows_rebuilt_from_the_recorded_runs_match_the_recorded_rows(recorded):
    slo = SLO.from_dict(recorded["slo"])
    folder = RESULTS / "colocation_h200"
    rows = [r for r in recorded["runs"] if r["workload_key"] not in ("check",)]
    assert len(rows) >= 30
    for want in rows:
        got = an.run_row(splitlab.load_run(folder / f"{run_name(want)}.json.gz"), slo)
        assert set(got) <= set(want), (run_name(want), sorted(set(got) - set(want)))
        assert _same(json.loads(json.dumps(got)), {k: want[k] for k in got}, run_name(want))


def test_the_recorded_analysis_is_reproduced_from_the_recorded_rows_and_runs(recorded):
    names = [run_name(r) for r in recorded["runs"]]
    stalls = an.stalls_of_saved_runs(RESULTS / "colocation_h200", names)
    got = json.loads(json.dumps(an.colocation_analysis(recorded["runs"], stalls)))
    want = recorded["analysis"]
    assert set(got) == set(want)
    assert _same(got, want)
    # the numbers the README quotes
    assert want["sm_share_sweep"]["chosen"] == {"prefill_share": 60, "decode_share": 40}
    assert got["targets"]["poisson-mid"]["chunked_step_stalls"]["steps"] == 7
    assert got["targets"]["azure-b"]["goodput_vs_serial"] == pytest.approx(2.08, abs=0.005)


def _same(a, b, path="analysis") -> bool:
    """Equal structure, equal strings, numbers equal to 1e-12 (relative)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, sorted(set(a) ^ set(b)))
        return all(_same(a[k], b[k], f"{path}.{k}") for k in a)
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        return all(_same(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    if isinstance(a, float) and isinstance(b, (int, float)):
        assert a == pytest.approx(b, rel=1e-12, nan_ok=True), path
        return True
    assert a == b, path
    return True


def test_the_older_slots128_analysis_is_reproduced_without_stall_counts():
    data = json.loads((RESULTS / "colocation_h200_slots128.json").read_text())
    got = json.loads(json.dumps(an.colocation_analysis(data["runs"], stalls=None)))
    assert _same(got, data["analysis"])


def test_the_recorded_gpu_paths_and_paper_comparison(recorded):
    paths = an.gpu_paths(recorded["runs"], recorded["checks"]["fp32_exactness"], recorded["checks"]["green_probe"])
    assert paths == recorded["checks"]["gpu_paths"]
    paper = an.paper_comparison(recorded["runs"])
    assert _same(json.loads(json.dumps(paper)), recorded["analysis"]["paper_comparison"])


@pytest.mark.parametrize("name", ["engine_floor_h200.json"])  # the older recorded file predates the median columns
def test_the_recorded_engine_floor_summary_is_reproduced(name):
    data = json.loads((RESULTS / name).read_text())
    result = copy.deepcopy(data)
    ceil = an.recompute_floors(result)
    assert _same(ceil, data["ceilings"])
    assert _same(result["decode"], data["decode"]) and _same(result["prefill"], data["prefill"])
    got = an.floor_summary(result)
    want = data["summary"]
    assert len(set(got) & set(want)) >= 20
    for key in set(got) & set(want):
        assert _same(json.loads(json.dumps(got[key])), want[key], key)
    # the workload engine's batch bounds the rate: decode rows beyond its max_batch do not count
    engine_batch = data["plan"].get("engine", {}).get("max_batch", math.inf)
    decode = [r for r in data["decode"] if r["batch"] <= engine_batch]
    rate = an.saturation_rate(decode, data["prefill"], sum(data["plan"]["workload"]["prompt"]) / 2,
                              sum(data["plan"]["workload"]["out"]) / 2)
    assert rate == pytest.approx(data["workload"]["rate_rps"], rel=1e-9)


# ---- synthetic runs -------------------------------------------------------------------------------

def synthetic_run(step_times: list[tuple[str, str, float, float, int]]) -> Run:
    traces = [RequestTrace(0, 0.0, 4, 2, 0.0, 0.1, [0.1, 0.2], [5, 6])]
    steps = [StepTrace(w, k, a, b, [0] * n, n) for w, k, a, b, n in step_times]
    return Run("split", "tiny", "w", {}, {}, traces, steps, wall_s=1.0)


def test_step_stalls_count_steps_far_over_their_kinds_median():
    steps = [("decode", "decode", i * 0.01, i * 0.01 + 0.01, 1) for i in range(9)]
    steps += [("decode", "decode", 0.2, 0.3, 1)]  # 10x the median: a stall
    steps += [("prefill", "prefill", 0.0, 0.05, 8), ("prefill", "prefill", 0.1, 0.15, 8)]
    out = an.step_stalls(synthetic_run(steps))
    assert out["steps"] == 1 and out["stall_s"] == pytest.approx(0.1)
    assert an.step_stalls(synthetic_run(steps), factor=20.0)["steps"] == 0


def test_step_breakdown_against_microbenchmarks():
    steps = [("engine", "decode", 0.0, 0.01, 2), ("engine", "decode", 0.02, 0.03, 4),
             ("engine", "prefill", 0.1, 0.3, 100)]
    micro = {"decode": [{"batch": 1, "step_ms": 5.0}, {"batch": 8, "step_ms": 12.0}],
             "prefill": {"ms": 100.0, "tokens": 100}}
    out = an.step_breakdown(synthetic_run(steps), micro)
    assert out["decode"]["steps"] == 2 and out["decode"]["mean_tokens"] == 3
    assert out["decode"]["vs_microbench"] == pytest.approx(20.0 / (6.0 + 8.0))  # interpolated at 2 and 4
    assert out["prefill"]["vs_microbench"] == pytest.approx(200.0 / 100.0)
    assert out["busy_s"] == pytest.approx(0.22) and out["host_gap_s"] == pytest.approx(0.78)
    assert "mixed" not in out


def test_token_match_and_calibration():
    assert an.token_match({0: [1, 2, 3], 1: [4]}, {0: [1, 2, 9], 1: [4]}) == {
        "token_match_rate": 0.75, "sequences_exact": 0.5, "exact": False}
    assert an.token_match({0: [1]}, {0: [1]})["exact"]
    assert an.calibrated_rates(10.0, [1.3, 0.6, 1.0]) == pytest.approx([6.0, 10.0, 13.0])
    assert an.rate_labels([3.0, 1.0]) == {"poisson-low": 1.0, "poisson-mid": 3.0}
    assert list(an.rate_labels([1, 2, 3, 4])) == ["poisson-low", "poisson-mid", "poisson-high"]
    with pytest.raises(ConfigError):
        an.calibrated_rates(0.0, [1.0])
    with pytest.raises(ConfigError):
        an.rate_labels([])
    rows = [{"step": "serial", "workload_key": "poisson-mid"}, {"step": "serial", "workload_key": "check"}]
    assert [r["workload_key"] for r in an.relabel(rows, {"poisson-mid": "poisson-low"})] == ["poisson-low", "check"]


def row(step, key, goodput, itl99=0.01, mode="split", **extra):
    base = {"step": step, "workload_key": key, "mode": mode, "goodput_req_s": goodput, "throughput_tok_s": goodput * 100,
            "e2e_mean_s": 1.0 / goodput, "itl_p99_s": itl99, "tpot_p99_s": itl99, "wall_s": 10.0,
            "prefill_share": None, "decode_share": None, "peak_memory_bytes": None}
    return {**base, **extra}


def test_the_share_sweep_breaks_near_ties_by_the_tail():
    rows = [row("split-mps-p50-d50", "poisson-mid", 10.0, 0.020, prefill_share=50, decode_share=50),
            row("split-mps-p60-d40", "poisson-mid", 9.8, 0.015, prefill_share=60, decode_share=40),
            row("split-mps-p70-d30", "poisson-mid", 8.0, 0.010, prefill_share=70, decode_share=30),
            row("serial", "poisson-mid", 9.0, 0.06, mode="serial")]
    sweep = an.sm_share_sweep(rows)
    assert sweep["chosen"] == {"prefill_share": 60, "decode_share": 40}  # within 5% of the best, lower p99 ITL
    assert sweep["highest_goodput"] == "split-mps-p50-d50"
    assert [p["decode_share"] for p in sweep["points"]] == [30, 40, 50]
    assert an.sm_share_sweep(rows, tie=0.0)["chosen"]["prefill_share"] == 50
    t = an.colocation_targets(rows)["poisson-mid"]
    assert t["best_split"] == "split-mps-p50-d50" and t["goodput_vs_serial"] == pytest.approx(10 / 9)
    assert an.sm_share_sweep([row("serial", "poisson-mid", 1.0, mode="serial")]) is None


def test_a_chunked_baseline_that_lost_its_time_to_stalls_is_flagged():
    rows = [row("serial", "poisson-mid", 9.0, mode="serial"), row("chunked", "poisson-mid", 1.0, mode="chunked"),
            row("split-streams", "poisson-mid", 8.0)]
    stalls = {"chunked--poisson-mid": {"steps": 3, "stall_s": 4.0}, "serial--poisson-mid": {"steps": 0, "stall_s": 0}}
    t = an.split_vs_baselines(rows, "poisson-mid", stalls)
    assert t["goodput_vs_chunked"] == pytest.approx(8.0) and "not a fair baseline" in t["goodput_vs_chunked_caveat"]
    assert t["best_split_step_stalls"] is None  # no saved run: not counted
    calm = an.split_vs_baselines(rows, "poisson-mid", {"chunked--poisson-mid": {"steps": 1, "stall_s": 0.5}})
    assert "goodput_vs_chunked_caveat" not in calm
    assert an.split_vs_baselines(rows, "azure-a") is None
