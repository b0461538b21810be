"""The rate-sweep analysis on the recorded H200 runs: max rates, the fair peer, the ratio."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import splitlab
from splitlab.config import SLO
from splitlab.measure.analysis import where_split_pays

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "results" / "adaptive_h200"
SLOS = {"relaxed": SLO(ttft_s=1.0, tpot_s=0.05), "smooth": SLO(ttft_s=1.0, tpot_s=None, itl_s=0.030)}


@pytest.fixture(scope="module")
def poisson():
    steps = ("serial", "chunked-512", "chunked-2048", "split-green-table")
    names = [f"{s}--poisson-r{r}" for s in steps for r in (8, 12, 16, 20, 24)]
    return where_split_pays({n: splitlab.load_run(RUNS / f"{n}.json.gz") for n in names}, SLOS,
                            splits=("split-green-table",))


def test_the_recorded_analysis_is_what_the_runs_give(poisson):
    recorded = json.loads((ROOT / "results" / "adaptive_h200.json").read_text())["analysis"]
    for name, row in poisson["runs"].items():
        for key in ("goodput_smooth_req_s", "goodput_relaxed_req_s", "ttft_p50_s", "itl_p99_s"):
            assert row[key] == pytest.approx(recorded["runs"][name][key])
    got, want = poisson["max_rate"]["poisson/smooth"]["serial"], recorded["max_rate"]["poisson/smooth"]["serial"]
    assert (got["status"], got["text"]) == (want["status"], want["text"])  # the file holds NaN as null


def test_under_every_gap_30_ms_the_peers_fail_and_the_split_holds(poisson):
    smooth = poisson["max_rate"]["poisson/smooth"]
    for peer in ("serial", "chunked-512", "chunked-2048"):  # below 90% even at 8 req/s
        assert smooth[peer]["status"] == "below_lowest" and math.isnan(smooth[peer]["rate"])
    assert smooth["split-green-table"]["status"] == "at_least" and smooth["split-green-table"]["rate"] == 24
    vs = poisson["vs_best_peer"]["poisson/smooth"]
    # the peer sustains less than the lowest rate measured: 24 / 8 is a lower bound
    assert vs["split-green-table"] == {"ratio": 3.0, "ratio_is_lower_bound": True, "rate": 24.0, "status": "at_least"}


def test_the_fair_peer_is_chunked_at_its_best_budget(poisson):
    relaxed = poisson["max_rate"]["poisson/relaxed"]
    assert relaxed["chunked-512"]["status"] == "interpolated" and relaxed["chunked-2048"]["status"] == "at_least"
    assert poisson["vs_best_peer"]["poisson/relaxed"]["best_chunked"] == "chunked-2048"
    # every peer met the target at every rate measured: no ratio can be given
    assert math.isnan(poisson["vs_best_peer"]["poisson/relaxed"]["split-green-table"]["ratio"])
