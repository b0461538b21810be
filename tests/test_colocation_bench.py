"""benchmarks/colocation.py on a CPU: one benchmark split over several calls (--merge-from)
keeps every earlier run, skips what it holds and adds the rest; --analyse-only redoes the
analysis of the merged runs without running anything, and on the recorded H200 runs gives the
recorded analysis. Then its mechanics in splitlab.measure.colocation, as pure functions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from splitlab.measure import colocation as co
from splitlab.workload import Request, Workload

REPO = Path(__file__).resolve().parents[1]
BENCH = [sys.executable, str(REPO / "benchmarks" / "colocation.py"), "--quick", "--device", "cpu", "--no-progress",
         "--check-model", "none", "--budget-s", "240"]


def bench(*args: str) -> dict:
    done = subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # the last line is the JSON summary


def pairs(data: dict) -> list[tuple[str, str]]:
    return [(r["step"], r["workload_key"]) for r in data["runs"]]


def test_a_benchmark_resumed_across_calls_and_reanalysed(tmp_path):
    first, second, third = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    bench("--modes", "serial", "--out", str(first))
    a = json.loads(first.read_text())
    assert ("serial", "poisson-mid") in pairs(a) and all(s == "serial" for s, _ in pairs(a))

    summary = bench("--modes", "serial,chunked,split-streams", "--merge-from", str(first), "--out", str(second))
    b = json.loads(second.read_text())
    assert b["runs"][: len(a["runs"])] == a["runs"]  # the earlier runs, untouched
    assert len(set(pairs(b))) == len(pairs(b))  # nothing ran twice
    new = pairs(b)[len(a["runs"]):]
    assert new and {s for s, _ in new} == {"chunked", "split-streams"}  # serial was skipped
    assert b["workloads"] == a["workloads"]  # the same requests: rates came from the merged file
    assert len(b["commands"]) == 2 and "--merge-from" in b["commands"][1]
    assert summary["targets"]["poisson-mid"]["best_split"] == "split-streams"

    bench("--merge-from", str(second), "--analyse-only", "--out", str(third), "--runs-dir", str(tmp_path / "b"))
    c = json.loads(third.read_text())
    assert c["runs"] == b["runs"] and c["analysis"]["targets"] == b["analysis"]["targets"]
    assert c["commands"] == b["commands"] and "--analyse-only" in c["analysed_on"]["command"]


def test_reanalysing_the_recorded_h200_runs_gives_the_recorded_analysis(tmp_path):
    recorded = REPO / "results" / "colocation_h200.json"
    out = tmp_path / "again.json"
    bench("--merge-from", str(recorded), "--analyse-only", "--out", str(out),
          "--runs-dir", str(REPO / "results" / "colocation_h200"))
    again, before = json.loads(out.read_text()), json.loads(recorded.read_text())
    assert json.dumps(again["analysis"], sort_keys=True) == json.dumps(before["analysis"], sort_keys=True)
    assert again["runs"] == before["runs"] and again["commands"] == before["commands"]
    assert again["date"] == before["date"] and again["environment"] == before["environment"]  # the runs' machine


def spaced(n: int, gap_s: float) -> Workload:
    return Workload(f"w{n}", tuple(Request(i, (5,), 1, gap_s * i) for i in range(n)))


SPECS = [("serial", "engine", (("mode", "serial"),), ["check", "poisson-mid"], False, False),
         ("split-mps-p50-d50", "split", (("backend", "mps"),), ["check", "poisson-mid", "azure-a"], True, True),
         ("split-streams", "split", (("backend", "streams"),), ["check", "poisson-mid"], False, False),
         ("serial", "engine", (("mode", "serial"),), ["check", "poisson-high"], False, False)]


def test_step_cells_skip_what_is_done_unbuilt_or_unwanted():
    workloads = {"check": spaced(3, 0.1), "poisson-mid": spaced(4, 1.0), "poisson-high": spaced(4, 0.5)}
    cells = co.step_cells(SPECS, workloads, done=set())
    assert [c.name for c in cells] == ["serial--check", "serial--poisson-mid", "split-mps-p50-d50--check",
                                       "split-mps-p50-d50--poisson-mid", "split-streams--check",
                                       "split-streams--poisson-mid", "serial--poisson-high"]  # no azure-a: unbuilt
    mps = cells[3]
    assert (mps.group, mps.step, mps.workload, mps.kind, mps.sweep, mps.gpu_only) == \
        ("split-mps-p50-d50", "split-mps-p50-d50", "poisson-mid", "split", True, True)
    assert mps.cost_s == 3.0 + 5.0 and mps.setup_s == 30.0 and cells[0].cost_s == 2.0 and cells[0].setup_s == 15.0
    # serial's check and its comparison ran: its second entry adds poisson-high alone
    later = co.step_cells(SPECS, workloads, done={"serial--check", "serial--poisson-mid", "split-streams--poisson-mid"})
    assert [c.name for c in later if c.step != "split-mps-p50-d50"] == ["serial--poisson-high"]
    assert [c.name for c in co.step_cells(SPECS, workloads, set(), modes=["split-m"])] == \
        ["split-mps-p50-d50--check", "split-mps-p50-d50--poisson-mid"]
    assert co.wanted("serial", None) and co.wanted("split-mps-p60-d40", ["split-mps"]) and \
        not co.wanted("serial", ["chunked"])


class Tokens:
    def __init__(self, ids):
        self.ids = ids

    def output_ids(self):
        return self.ids


def test_token_check_keeps_the_first_run_as_the_reference():
    checks = {}
    check = co.TokenCheck(checks)
    assert check(Tokens({0: [1, 2], 1: [3]})) == {"reference": True}
    assert checks["check_reference"] == {0: [1, 2], 1: [3]}
    assert check(Tokens({0: [1, 2], 1: [3]}))["exact"] is True
    resumed = co.TokenCheck({"check_reference": {"0": [1, 2], "1": [3]}})  # as read back from JSON
    judged = resumed(Tokens({0: [1, 2], 1: [4]}))
    assert judged["exact"] is False and judged["sequences_exact"] == 0.5


def test_checks_ok_summary_and_the_logged_line():
    clean = {"leftovers": {"new_processes": []}, "gpu_paths": {"green_sm_split_disjoint": None}}
    assert co.checks_ok(clean) and co.checks_ok({**clean, "gpu_tests": {"passed": True}})
    assert not co.checks_ok({**clean, "gpu_tests": {"passed": False}})
    assert not co.checks_ok({**clean, "leftovers": {"new_processes": [123]}})
    assert not co.checks_ok({**clean, "gpu_paths": {"mps_workers_are_clients": False}})
    data = {"checks_ok": True, "checks": {"gpu_tests": {"passed": True}},
            "analysis": {"sm_share_sweep": {"chosen": [60, 40]}, "targets": {"thresholds": {}, "poisson-mid": {"g": 1}}}}
    assert co.summary(data, "o.json", "o") == {"out": "o.json", "runs_dir": "o", "checks_ok": True,
                                               "gpu_tests_passed": True, "chosen_shares": [60, 40],
                                               "targets": {"poisson-mid": {"g": 1}}}
    assert co.summary({}, "o.json", "o")["chosen_shares"] is None
    row = {"completed": 9, "num_requests": 10, "throughput_tok_s": 1234.4, "ttft_p99_s": 0.5, "tpot_p99_s": 0.0123,
           "goodput_req_s": 2.5}
    assert co.describe("serial--poisson-mid", row) == ("serial--poisson-mid: 9/10 done, 1234 tok/s, TTFT p99 0.500 s, "
                                                       "TPOT p99 12.3 ms, goodput 2.50 req/s")
    slowed = co.describe("x", {**row, "decode_interference": {"slowdown_batch_matched": 1.5}})
    assert slowed.endswith(", decode slowdown 1.50x")
    assert co.cell_key({"step": "serial", "workload_key": "check"}) == "serial--check"


def test_run_record_of_a_real_run(tiny):
    import splitlab
    from splitlab.config import SLO, EngineConfig

    wl = spaced(3, 0.0)
    run = splitlab.run(wl, tiny, mode="serial", config=EngineConfig(max_seq_len=32, num_slots=4, max_batch=4))
    row = co.run_record(run, SLO(ttft_s=1.0, tpot_s=0.05), "serial", "poisson-mid", wl.name, {"kind": "poisson"})
    assert list(row)[:4] == ["step", "workload_key", "workload", "kind"] and row["sweep"] is False
    assert row["workload"] == "w3" and row["num_requests"] == 3 and row["completed"] == 3
    assert row["ttft_p99_s"] == pytest.approx(run.summary(SLO(ttft_s=1.0, tpot_s=0.05))["ttft_p99_s"])
