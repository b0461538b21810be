"""Co-running workers (splitlab.system.corun: start together, skip, fail, time out, clean up)
and the jobs they measure (splitlab.measure.corun), on CPU."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from splitlab.errors import WorkerError
from splitlab.measure import corun as mc
from splitlab.system import corun as sc

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import json, os, sys, time
    from splitlab.system.corun import ready_and_wait, skip, write_result
    ctrl, name, how = sys.argv[1], sys.argv[2], sys.argv[3]
    if how == "skip":
        sys.exit(skip(ctrl, name, "no such device here"))
    start = ready_and_wait(ctrl, name, 30.0)
    while time.monotonic() < start:
        time.sleep(0.001)
    if how == "fail":
        print("worker broke after the start", flush=True)
        sys.exit(4)
    write_result(ctrl, name, {"start": start, "began": time.monotonic(), "env": {
        k: v for k, v in os.environ.items() if k.startswith(("CUDA_MPS_", "CORUN_TEST"))}})
""")


@pytest.fixture
def scratch(monkeypatch):
    """A private TMPDIR: whatever a co-run leaves there, the test sees."""
    path = Path(tempfile.mkdtemp(prefix="sl-corun-"))
    monkeypatch.setenv("TMPDIR", str(path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    yield path
    shutil.rmtree(path, ignore_errors=True)


def launch(tmp_path: Path, how: str, **env: str) -> sc.Launch:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return sc.Launch(lambda ctrl, name: [sys.executable, str(script), str(ctrl), name, how], env=env, label=how)


def test_clean_env_drops_mps_client_variables(monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/someone/elses")
    monkeypatch.setenv("CORUN_TEST_KEEP", "1")
    env = sc.clean_env({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30"})
    assert "CUDA_MPS_PIPE_DIRECTORY" not in env and env["CORUN_TEST_KEEP"] == "1"
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"


def test_workers_start_together_with_their_own_environment(tmp_path, scratch, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/someone/elses")
    out = sc.run_together([launch(tmp_path, "ok", CORUN_TEST="a"), launch(tmp_path, "ok", CORUN_TEST="b")],
                          ready_timeout_s=60, finish_timeout_s=60, cwd=REPO)
    assert [o["env"] for o in out] == [{"CORUN_TEST": "a"}, {"CORUN_TEST": "b"}]  # in order, no stray MPS variable
    assert out[0]["start"] == out[1]["start"] and all(o["began"] >= o["start"] for o in out)
    assert list(scratch.iterdir()) == []  # the control folder is gone


def test_a_skipping_worker_says_why(tmp_path, scratch):
    with pytest.raises(sc.CoRunSkipped, match="no such device here"):
        sc.run_together([launch(tmp_path, "ok"), launch(tmp_path, "skip")], 60, 60, cwd=REPO)
    assert list(scratch.iterdir()) == []


def test_a_worker_that_dies_or_fails_names_itself_and_quotes_its_log(tmp_path, scratch):
    died = sc.Launch(lambda ctrl, name: [sys.executable, "-c", "print('boom'); raise SystemExit(5)"], label="early")
    with pytest.raises(WorkerError, match=r"(?s)worker w0 \(early\) exited with status 5 before it was ready.*boom"):
        sc.run_together([died], 60, 60)
    with pytest.raises(WorkerError, match=r"(?s)worker w1 failed with status 4.*broke after the start"):
        sc.run_together([launch(tmp_path, "ok"), launch(tmp_path, "fail")], 60, 60, cwd=REPO)
    assert list(scratch.iterdir()) == []


def test_a_worker_never_ready_times_out_and_is_stopped(tmp_path, scratch):
    pid_file = tmp_path / "pid"
    code = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)"
    stuck = sc.Launch(lambda ctrl, name: [sys.executable, "-c", code, str(pid_file)], label="stuck")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="not ready within 1.5 s"):
        sc.run_together([stuck], ready_timeout_s=1.5, finish_timeout_s=60)
    assert time.monotonic() - t0 < 20
    with pytest.raises(ProcessLookupError):  # stopped and reaped
        os.kill(int(pid_file.read_text()), 0)
    assert list(scratch.iterdir()) == []


# ---- the jobs ---------------------------------------------------------------------------------------

CFG = {"device": "cpu", "matmul_n": 16, "dtype": "float32", "copy_bytes": 4096, "duration": 0.05,
       "batch": {"compute": 3, "memory": 2}, "warmup": 1}


def test_jobs_do_their_work_and_count_it():
    import torch

    step, work = mc.make_job("compute", CFG)
    assert step().shape == (16, 16) and work == 2.0 * 16**3
    for op in ("copy", "kernel"):
        step, work = mc.make_job("memory", {**CFG, "memory_op": op})
        assert torch.equal(step(), torch.ones(4096, dtype=torch.uint8)) and work == 2.0 * 4096


def test_timed_loop_waits_for_the_start_and_runs_whole_batches():
    calls = []
    start = time.monotonic() + 0.05
    rec = mc.timed_loop(lambda: calls.append(time.monotonic()), lambda: None, batch=4, duration=0.02, start_at=start)
    assert min(calls) >= start and rec["start_skew_s"] >= 0
    assert rec["iters"] == len(calls) and rec["iters"] % 4 == 0 and rec["elapsed_s"] >= 0.02


@pytest.mark.parametrize("sequential", [False, True])
def test_run_jobs_warms_up_before_ready_and_rates_each_job(sequential):
    asked = []
    out = mc.run_jobs([("compute", None), ("memory", None)], CFG, lambda: asked.append(1) or time.monotonic(),
                      sequential=sequential)
    assert asked == [1] and set(out) == {"compute", "memory"}
    for job in mc.JOBS:
        assert out[job]["unit"] == mc.UNITS[job] and out[job]["elapsed_s"] >= CFG["duration"]
        assert out[job]["rate"] == pytest.approx(out[job]["iters"] * (2.0 * 16**3 if job == "compute" else 8192)
                                                 / out[job]["elapsed_s"] / 1e12)


def test_run_jobs_reports_a_job_that_broke():
    with pytest.raises(RuntimeError, match="memory: KeyError"):
        mc.run_jobs([("compute", None), ("memory", None)], {**CFG, "batch": {"compute": 2}}, time.monotonic)


def test_case_record_fractions_of_the_solo_rates():
    solo = mc.solo_rates({"compute": {"rate": 10.00000012, "iters": 8}, "memory": {"rate": 4.0, "iters": 6}})
    assert solo == {"compute": {"rate": 10.0, "unit": "TFLOP/s", "iters": 8},
                    "memory": {"rate": 4.0, "unit": "TB/s", "iters": 6}}

    def rec(rate):
        return {"rate": rate, "iters": 5, "elapsed_s": 0.123456}

    outputs = [{"results": {"compute": rec(5.0)}, "mps_env": {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30"}},
               {"results": {"memory": rec(1.0)}, "green": {"sms": [40, 92]}}]
    r = mc.case_record(outputs, solo)
    assert list(r) == ["green", "client_env", "compute", "memory", "sum"]
    assert r["green"] == {"sms": [40, 92]}
    assert r["client_env"] == {"compute": {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30"}, "memory": {}}
    assert r["compute"] == {"rate": 5.0, "unit": "TFLOP/s", "fraction": 0.5, "iters": 5, "elapsed_s": 0.1235}
    assert r["memory"]["fraction"] == 0.25 and r["sum"] == 0.75
    assert "green" not in mc.case_record(outputs[:1] + [{"results": {"memory": rec(1.0)}}], solo)
