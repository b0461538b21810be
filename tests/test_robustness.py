"""A worker that raises or dies stops the run with a WorkerError naming it, within seconds,
and nothing is left behind: no process, no /dev/shm entry, no multiprocessing temp folder.

Children are killed from outside with ``os.kill(pid, SIGKILL)`` mid-run (their pids come
from the session); errors are injected with ``Fault`` s handed to the session (``faults=``).
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
from splitlab.modes.common import Fault
from splitlab.modes.replicas import ReplicaSession
from splitlab.modes.split import SplitSession
from splitlab.modes.split.run import _run_split
from splitlab.system.procs import Done, ProcessGroup, WorkerSpec, read_proc_file, remove_cuda_ipc_files
from splitlab.config import EngineConfig, SplitConfig
from splitlab.errors import ConfigError, WorkerError

from _colocation import alive, assert_clean, descendants, expected_tokens, ragged_workload, snapshot

CONFIG = EngineConfig(max_seq_len=96, num_slots=3, max_batch=3, token_budget=64)


def long_workload(seconds: float = 6.0):
    """Arrivals spread over ``seconds``: a run is surely under way a second in."""
    return splitlab.from_prompts([[5 + i % 200] * (8 + i % 20) for i in range(40)], 12,
                                 arrivals_s=[seconds * i / 40 for i in range(40)], name="long")


def _comm(pid: int) -> str:
    return read_proc_file(pid, "comm").decode().strip()


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


def test_an_injected_error_in_the_decode_process_names_it(tiny):
    before = snapshot()
    faults = (Fault("decode", "raise", 3),)
    with SplitSession(tiny, CONFIG, backend="processes", faults=faults) as session:
        with pytest.raises(WorkerError, match=r"worker decode failed: RuntimeError: injected failure in worker decode"):
            session.run(ragged_workload(), progress=False)
    assert session.children["decode"]["exitcode"] not in (None, 0)  # 1, or 143 if stopped while exiting
    assert_clean(before, session.children)
    with pytest.raises(WorkerError):  # a one-off run: the same error, and the same clean state
        _run_split(ragged_workload(), tiny, CONFIG, SplitConfig(backend="processes"), progress=False, faults=faults)
    assert_clean(before)


def test_an_injected_error_in_a_thread_names_it(tiny):
    with pytest.raises(WorkerError, match=r"worker prefill failed: RuntimeError: injected failure in worker prefill"):
        _run_split(ragged_workload(), tiny, CONFIG, SplitConfig(backend="streams"), progress=False,
                   faults=(Fault("prefill", "raise", 2),))
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


def test_a_replica_that_hangs_stops_the_run_after_stall_timeout(tiny):
    """A replica alive but silent (an injected hang after its first step) cannot make the run
    wait for ever: ``stall_timeout_s`` after the last arrival the run fails, naming the stall."""
    before = snapshot()
    wl = ragged_workload()
    with ReplicaSession(tiny, CONFIG, num_replicas=2, stall_timeout_s=2.0,
                        faults=(Fault("replica-1", "hang", 1),)) as session:
        start = time.monotonic()
        with pytest.raises(WorkerError, match=r"replicas x2 run stalled: no worker reported progress for 2 s"):
            session.run(wl, progress=False)
        assert time.monotonic() - start < wl.requests[-1].arrival_s + 2.0 + 5.0
    assert_clean(before, session.children)


def test_a_script_without_the_main_guard_is_told_to_add_it(tmp_path):
    """A spawned worker re-imports the main script; without ``if __name__ == "__main__":`` it
    would start the run again. The run raises a ModeError saying to add the guard instead of
    "worker died (exit code 1)", for split processes and replicas alike."""
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent("""
        import splitlab
        from splitlab.config import EngineConfig
        model = splitlab.load_model("tiny", device="cpu", dtype="float32")
        wl = splitlab.from_prompts([[5, 6, 7]], 2)
        config = EngineConfig(max_seq_len=64, num_slots=2, max_batch=2, chunk_size=8, warmup=False)
        for mode, kw in (("split", {"backend": "processes"}), ("replicas", {"num_replicas": 2})):
            try:
                splitlab.run(wl, model, mode=mode, config=config, progress=False, **kw)
            except splitlab.ModeError as exc:
                print(mode, "ModeError:", exc, flush=True)
    """))
    before = snapshot()
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["split", "replicas"], out.stdout + out.stderr
    assert all('could not start' in line and 'if __name__ == "__main__":' in line for line in lines)
    assert_clean(before)


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


def test_faults_are_checked_and_fire_after_their_step():
    from splitlab.modes.common import fault_for

    faults = (Fault("prefill", "raise", 1), Fault("decode", "raise", 2))
    assert fault_for(faults, "replica-0") is None
    hook = fault_for(faults, "decode")
    hook(1)
    with pytest.raises(RuntimeError, match="injected failure in worker decode after step 2"):
        hook(2)
    for bad in (dict(worker="", action="raise", after_steps=1), dict(worker="decode", action="explode", after_steps=2),
                dict(worker="decode", action="raise", after_steps=0), dict(worker="decode", action="raise",
                                                                           after_steps="3")):
        with pytest.raises(ConfigError, match="Fault"):
            Fault(**bad)
    with pytest.raises(ConfigError, match="faults must be a tuple"):
        SplitSession(splitlab.load_model("tiny", device="cpu", dtype="float32"), CONFIG, faults="decode:raise:3")


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
            group.wait_for(Done, 60.0, "finish")
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
