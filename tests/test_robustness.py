"""A worker that raises or dies stops the run with a WorkerError naming it, within seconds,
and nothing is left behind: no process, no /dev/shm entry, no multiprocessing temp folder.

Children are killed from outside with ``os.kill(pid, SIGKILL)`` mid-run (their pids come
from the session); errors are injected with the documented test hook ``SPLITLAB_FAULT``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import splitlab
from splitlab.modes.replicas import ReplicaSession
from splitlab.modes.split import SplitSession
from splitlab.modes.split import run_split
from splitlab.modes.common import fault_hook
from splitlab.system.procs import ProcessGroup, WorkerSpec, remove_cuda_ipc_files
from splitlab.config import EngineConfig
from splitlab.errors import ConfigError, WorkerError

from _colocation import alive, assert_clean, descendants, expected_tokens, ragged_workload, snapshot

CONFIG = EngineConfig(max_seq_len=96, num_slots=3, max_batch=3, token_budget=64)


def long_workload(seconds: float = 6.0):
    """Arrivals spread over ``seconds``: a run is surely under way a second in."""
    return splitlab.from_prompts([[5 + i % 200] * (8 + i % 20) for i in range(40)], 12,
                                 arrivals_s=[seconds * i / 40 for i in range(40)], name="long")


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def _kill_later(pid: int, after_s: float) -> list[float]:
    when: list[float] = []

    def fire() -> None:
        when.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)

    threading.Timer(after_s, fire).start()
    return when


@pytest.mark.parametrize("victim", ["decode", "prefill"])
def test_a_split_worker_killed_mid_run(tiny, victim):
    before = snapshot()
    wl = ragged_workload()
    session = SplitSession(tiny, CONFIG, backend="processes")
    try:
        first = session.run(wl, progress=False)  # a healthy run first: the session serves several
        assert first.output_ids() == expected_tokens(tiny, wl)
        pids = session.pids
        assert set(pids) == {"prefill", "decode"} and descendants() >= set(pids.values())
        assert all(_comm(pid) == f"splitlab-{name}"[:15] for name, pid in pids.items())
        killed_at = _kill_later(pids[victim], 1.0)
        with pytest.raises(WorkerError, match=rf"worker {victim} died .*killed by signal 9") as info:
            session.run(long_workload(), progress=False)
        raised_at = time.monotonic()
        assert killed_at and raised_at - killed_at[0] < 5.0, "the failure took too long to surface"
        assert "other workers terminated" in str(info.value)
    finally:
        session.close()
    children = session.children
    assert children[victim]["exitcode"] == -signal.SIGKILL and children[victim]["tmpdir"]
    assert_clean(before, children)


def test_an_injected_error_in_the_decode_process_names_it(tiny, monkeypatch):
    before = snapshot()
    monkeypatch.setenv("SPLITLAB_FAULT", "decode:raise:3")
    with SplitSession(tiny, CONFIG, backend="processes") as session:
        with pytest.raises(WorkerError, match=r"worker decode failed: RuntimeError: SPLITLAB_FAULT: injected failure"):
            session.run(ragged_workload(), progress=False)
    assert session.children["decode"]["exitcode"] not in (None, 0)  # 1, or 143 if stopped while exiting
    assert_clean(before, session.children)
    with pytest.raises(WorkerError):  # through run(): the same error, and the same clean state
        run_split(ragged_workload(), tiny, CONFIG, backend="processes", progress=False)
    assert_clean(before)


def test_an_injected_error_in_a_thread_names_it(tiny, monkeypatch):
    monkeypatch.setenv("SPLITLAB_FAULT", "prefill:raise:2")
    with pytest.raises(WorkerError, match=r"worker prefill failed: RuntimeError: SPLITLAB_FAULT"):
        run_split(ragged_workload(), tiny, CONFIG, backend="streams", progress=False)
    deadline = time.monotonic() + 5
    while any(t.name.startswith("splitlab-") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("splitlab-")]


def test_ctrl_c_in_the_parent_stops_the_children(tiny):
    before = snapshot()
    session = SplitSession(tiny, CONFIG, backend="processes")
    try:
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            session.run(long_workload(), progress=False)
        assert time.monotonic() - start < 5.0
    finally:
        session.close()
    assert_clean(before, session.children)


def test_a_replica_killed_mid_run(tiny):
    before = snapshot()
    with ReplicaSession(tiny, num_replicas=2, engine="serial", config=CONFIG) as session:
        pids = session.pids
        killed_at = _kill_later(pids["replica-1"], 1.0)
        with pytest.raises(WorkerError, match=r"worker replica-1 died .*killed by signal 9"):
            session.run(long_workload(), progress=False)
        assert time.monotonic() - killed_at[0] < 5.0
    assert session.children["replica-1"]["exitcode"] == -signal.SIGKILL
    assert_clean(before, session.children)


def test_children_die_with_a_killed_parent(tmp_path):
    """A parent killed with SIGKILL (no cleanup code runs) takes its children with it."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import json, sys, time
        from splitlab.modes.split import SplitSession
        from splitlab.config import EngineConfig
        from splitlab.models import load_model
        if __name__ == "__main__":
            model = load_model("tiny", device="cpu", dtype="float32")
            config = EngineConfig(max_seq_len=64, num_slots=2, max_batch=2)
            session = SplitSession(model, config, backend="processes")
            print(json.dumps(session.children), flush=True)
            time.sleep(120)
    """))
    before = snapshot()
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        children = json.loads(proc.stdout.readline())
        assert set(children) == {"prefill", "decode"}
        assert descendants(proc.pid) >= {c["pid"] for c in children.values()}
        assert all(alive(c["pid"]) and os.path.isdir(c["tmpdir"]) for c in children.values())
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert_clean(before, children, timeout_s=10.0)


def test_the_fault_hook_is_parsed_strictly():
    assert fault_hook("decode", "") is None
    assert fault_hook("decode", "prefill:raise:3") is None
    hook = fault_hook("decode", "prefill:raise:1, decode:raise:2")
    hook(1)
    with pytest.raises(RuntimeError, match="injected failure in worker decode after step 2"):
        hook(2)
    for bad in ("decode:raise", "decode:explode:2", "decode:raise:x"):
        with pytest.raises(ConfigError, match="SPLITLAB_FAULT"):
            fault_hook("decode", bad)


def _leave_cuda_ipc_file(channel) -> None:
    """What an exporter of CUDA IPC events leaves when it exits: a file named by its pid."""
    with open(f"/dev/shm/cuda.shm.0.{os.getpid():x}.1", "w"):
        pass


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm (Linux)")
def test_the_cuda_ipc_files_of_exited_children_are_removed(tmp_path):
    """The driver's ``cuda.shm.<dev>.<pid hex>.<n>`` files of a child are gone once its group
    closes; files of another pid (one that may still be alive) or of another form stay."""
    group = ProcessGroup([WorkerSpec("exporter", _leave_cuda_ipc_file)])
    left = None
    try:
        with group:
            pid = group.pids["exporter"]
            left = f"/dev/shm/cuda.shm.0.{pid:x}.1"
            list(group.events_until_done(timeout_s=60))
            assert os.path.exists(left)  # the child really made it
        assert not os.path.exists(left)
    finally:
        if left and os.path.exists(left):
            os.unlink(left)
    keep = [tmp_path / f"cuda.shm.0.{os.getpid():x}.1", tmp_path / "cuda.shm.0.1a.1.extra",
            tmp_path / "cuda.shm.1.1a.7"]
    for path in keep:
        path.touch()
    assert remove_cuda_ipc_files(0x1a, str(tmp_path)) == ["cuda.shm.1.1a.7"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep[:2])
