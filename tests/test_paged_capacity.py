"""benchmarks/paged_capacity.py on a CPU (--smoke: the tiny model, tiny pools), end to end in two
calls: the first stops at its budget, the second (--merge-from) finishes the grid; the result
file holds the provenance, one row per cell with the capacity fields, the analysis, and every
run saved with its KV usage per step, which the plots draw."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import splitlab
from splitlab.present import plots

REPO = Path(__file__).resolve().parents[1]
BENCH = [sys.executable, str(REPO / "benchmarks" / "paged_capacity.py"), "--smoke", "--no-progress"]
TRACE = REPO.parent / "shared" / "data" / "azure-llm-2023" / "AzureLLMInferenceTrace_code.csv"
ROW_KEYS = {"cell", "step", "pool", "page_size", "workload_key", "kind", "rate", "requests", "file", "peak_decode_batch",
            "capacity_sequences", "max_batch", "decode_step_p50_ms", "decode_step_at_peak_ms", "kv_peak_pct",
            "kv_pool_bytes", "goodput_req_s", "slo_attainment", "ttft_p99_s", "tpot_p99_s", "preemptions"}


def bench(*args: str) -> dict:
    done = subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # the last line is the JSON summary


@pytest.mark.skipif(not TRACE.is_file(), reason=f"the Azure code trace is not at {TRACE}")
def test_the_smoke_grid_in_two_budgeted_calls_gives_every_field(tmp_path):
    first, second, runs = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "runs"
    bench("--budget-s", "20", "--out", str(first), "--runs-dir", str(runs))
    a = json.loads(first.read_text())
    assert a["runs"] and a["left"] and a["stopped_by_budget"]  # the budget stopped it part-way
    summary = bench("--merge-from", str(first), "--out", str(second), "--runs-dir", str(runs))
    b = json.loads(second.read_text())
    assert b["runs"][: len(a["runs"])] == a["runs"] and not b["left"] and not b["failed"]  # resumed, not redone
    assert len(b["commands"]) == 2 and "--merge-from" in b["commands"][1]
    assert b["benchmark"] == "paged_capacity" and b["date"] and b["environment"]["versions"]["torch"]
    names = [r["cell"] for r in b["runs"]]
    assert len(set(names)) == len(names)
    for r in b["runs"]:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["completed"] == r["requests"] and (runs / r["file"]).is_file()

    pools = b["pools"]  # equal KV memory: 5 slot rows (4 + scratch) of 256 = 80 pages of 16 = 40 of 32
    assert pools["slots"]["num_slots"] == 4 and pools["paged16"]["num_pages"] == 79 and pools["paged32"]["num_pages"] == 39
    assert b["analysis"]["equal_memory"]["equal"] and len(set(b["analysis"]["equal_memory"]["kv_pool_bytes"].values())) == 1
    cap = b["analysis"]["capacity"]
    assert cap["slots"]["peak_decode_batch"] <= 4 == cap["slots"]["capacity_sequences"]  # a slot pool holds 4
    assert cap["paged16"]["peak_decode_batch"] > 4  # the same bytes in pages hold more of the trace's sequences
    assert b["analysis"]["capacity_ratio"] == cap["paged16"]["peak_decode_batch"] / cap["slots"]["peak_decode_batch"]
    assert summary["capacity_ratio"] == b["analysis"]["capacity_ratio"] and summary["equal_memory"] is True
    for kind in ("poisson", "azure"):
        assert {"slots", "paged16", "paged_over_slots"} <= set(b["analysis"]["burst_capacity"][kind])
    steps = {(r["step"], r["pool"]) for r in b["runs"]}
    assert {("serial", "slots"), ("chunked", "slots"), ("serial", "paged16"), ("chunked", "paged16"),
            ("serial", "paged32"), ("split-streams", "slots")} <= steps
    refused = [s for s in b["skipped"] if s["cell"].startswith("split-streams--paged16")]
    assert ("split-streams", "paged16") in steps or (refused and "refuses" in refused[0]["why"])

    burst = splitlab.load_run(runs / "serial--paged16--azure-burst.json.gz")
    assert all(s.kv_total == 79 and 0 <= s.kv_used <= 79 for s in burst.steps)  # the pool after every step
    fig = plots.kv_usage({r: splitlab.load_run(runs / f"serial--{r}--azure-burst.json.gz") for r in ("slots", "paged16")})
    assert [t.name for t in fig.data] == ["slots", "paged16"] and max(fig.data[1].y) > 50
    sizes = plots.page_size_figure(b)
    assert {t.name for t in sizes.data} >= {"azure-burst", "slot pool · azure-burst"}


def test_a_ratio_of_max_rates_says_when_it_is_only_a_bound():
    from splitlab.measure.paged import ratio

    exact = ratio({"status": "interpolated", "value": 30.0}, {"status": "interpolated", "value": 15.0})
    assert exact == {"ratio": 2.0, "bound": "exact"}
    # paged met the target at its highest rate: the true ratio is at least this
    assert ratio({"status": "at_least", "value": 40.0}, {"status": "interpolated", "value": 20.0}) == \
        {"ratio": 2.0, "bound": "lower"}
    # the slots missed even their lowest rate: also a lower bound
    assert ratio({"status": "interpolated", "value": 12.0}, {"status": "below_lowest", "value": 4.0})["bound"] == "lower"
    # paged missed its lowest rate: at most this
    assert ratio({"status": "below_lowest", "value": 4.0}, {"status": "interpolated", "value": 8.0}) == \
        {"ratio": 0.5, "bound": "upper"}
    # both missed everywhere (or both met everywhere): undecided
    assert ratio({"status": "below_lowest", "value": 4.0}, {"status": "below_lowest", "value": 4.0}) == \
        {"ratio": None, "bound": None}
    assert ratio({}, {"status": "interpolated", "value": 8.0}) == {"ratio": None, "bound": None}
