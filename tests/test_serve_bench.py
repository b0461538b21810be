"""benchmarks/serve_bench.py on a CPU (the tiny model, a few requests): ``splitlab serve`` as a
real process under ``splitlab bench`` against the same requests run in-process. The result file
pairs the two runs by their request digest, judges the HTTP-overhead target on them and keeps
both saved runs; nothing is left running. (The figures of a CPU run say nothing about the H200.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import splitlab

REPO = Path(__file__).resolve().parents[1]


def test_the_serve_benchmark_pairs_http_and_in_process_runs(tmp_path):
    out, runs = tmp_path / "serve.json", tmp_path / "runs"
    argv = [sys.executable, str(REPO / "benchmarks" / "serve_bench.py"), "--model", "tiny", "--device", "cpu",
            "--dtype", "float32", "--requests", "6", "--rates", "4", "--prompt-len", "16:32", "--output-len", "8:16",
            "--steps", "chunked-2048", "--out", str(out), "--runs-dir", str(runs)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert not data["failed"] and not data["left"], data["failed"]
    rows = {r["side"]: r for r in data["runs"]}
    assert set(rows) == {"http", "in_process"}
    assert rows["http"]["workload_shape"] == rows["in_process"]["workload_shape"]  # the same requests
    assert rows["http"]["vllm_fields"]["completed"] == 6 and rows["http"]["summary"]["completed"] == 6
    pair = data["analysis"]["pairs"]["chunked-2048@4"]
    assert pair["ttft_p50_s"]["http"] > 0 and pair["ttft_p50_s"]["in_process"] > 0
    assert isinstance(data["analysis"]["met"], bool) and data["analysis"]["different_requests"] == []
    where = pair["ttft_mean_where"]  # the server's own histograms over the HTTP replay
    assert rows["http"]["server_view"]["histograms"]["ttft"]["count"] == 6
    assert where["client_ttft_mean_s"] == rows["http"]["ttft_mean_s"] > where["server_ttft_mean_s"] > 0
    assert where["in_process_ttft_mean_s"] == rows["in_process"]["ttft_mean_s"] > 0
    assert where["server_parse_mean_s"] > 0 and where["server_first_delivery_mean_s"] >= 0
    for row in rows.values():
        run = splitlab.load_run(runs / row["file"])
        assert len(run.traces) == 6 and all(t.finished for t in run.traces)
    assert not any(data["leftovers"].values()), data["leftovers"]  # no process, /dev/shm entry or MPS daemon
