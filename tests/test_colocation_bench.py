"""benchmarks/colocation.py on a CPU: one benchmark split over several calls (--merge-from)
keeps every earlier run, skips what it holds and adds the rest; --analyse-only redoes the
analysis of the merged runs without running anything, and on the recorded H200 runs gives the
recorded analysis."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
