"""MPS control on CPU, against a fake ``nvidia-cuda-mps-control`` put first on PATH.

The fake behaves like the real one where splitlab depends on it: ``-d`` daemonises (double
fork, setsid) and returns at once, the daemon listens on ``$CUDA_MPS_PIPE_DIRECTORY/control``,
spawns a fake ``nvidia-cuda-mps-server`` child, logs to ``$CUDA_MPS_LOG_DIRECTORY/control.log``,
and a plain invocation forwards stdin commands to it. ``FAKE_MPS_MODE`` makes it refuse to
start (``refuse``) or never answer (``mute``). Every test checks that no fake process is
left running and that splitlab's folders are gone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable

import pytest

from splitlab.system import mps as mpsmod
from splitlab.errors import ConfigError, MPSError
from splitlab.system.mps import MPSDaemon, find_mps_processes, mps_status
from splitlab.system.procs import proc_table, read_proc_file

REPO = Path(__file__).resolve().parents[1]
JOBS = ("compute", "memory")

FAKE = r'''#!{python}
import os, signal, socket, sys, time

PIPE = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
LOG = os.environ.get("CUDA_MPS_LOG_DIRECTORY", "/var/log/nvidia-mps")
MODE = os.environ.get("FAKE_MPS_MODE", "ok")
SOCK = os.path.join(PIPE, "control")
LIFETIME = float(os.environ.get("FAKE_MPS_LIFETIME", "60"))  # safety net for leaks
HERE = os.path.dirname(os.path.abspath(sys.argv[0]))


def log(msg):
    try:
        with open(os.path.join(LOG, "control.log"), "a") as f:
            f.write(msg + "\n")
    except OSError:
        pass


def server():
    parent = os.getppid()
    end = time.monotonic() + LIFETIME
    while os.getppid() == parent and time.monotonic() < end:
        time.sleep(0.05)


def daemon():
    if MODE == "refuse":
        log("[ERROR] fake: the GPU refused the MPS server (compute mode Prohibited)")
        sys.stderr.write("fake: cannot start, see control.log\n")
        sys.exit(3)
    if os.path.exists(SOCK):
        sys.stderr.write("An instance of this daemon is already running\n")
        sys.exit(1)
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(SOCK)
    srv.listen(8)
    srv.settimeout(0.2)
    child = os.fork()
    if child == 0:
        os.execv(sys.executable, [sys.executable, os.path.join(HERE, "nvidia-cuda-mps-server")])
    log("[INFO] fake daemon %d started, server %d" % (os.getpid(), child))
    default_pct = "100.0"
    end = time.monotonic() + LIFETIME
    quitting = False
    while not quitting and time.monotonic() < end:
        if MODE == "mute":  # never accept: clients connect and then wait forever
            time.sleep(0.1)
            continue
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            continue
        conn.settimeout(5)
        data = b""
        try:
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        out = []
        for line in data.decode().splitlines():
            words = line.split()
            if not words:
                continue
            cmd, args = words[0], words[1:]
            if cmd == "get_server_list":
                out.append(str(child))
            elif cmd == "get_client_list":
                out.append("4242\n4243" if args == [str(child)] else "Server %s not found" % args)
            elif cmd == "set_default_active_thread_percentage":
                default_pct = "%.1f" % float(args[0])
                out.append(default_pct)
            elif cmd == "get_default_active_thread_percentage":
                out.append(default_pct)
            elif cmd == "set_active_thread_percentage":
                out.append("%.1f" % float(args[1]) if args[0] == str(child) else "Server not found")
            elif cmd == "quit":
                quitting = True
            else:
                out.append("Unknown command %s" % cmd)
        try:
            conn.sendall(("\n".join(out) + "\n").encode() if out else b"")
        except OSError:
            pass
        conn.close()
    log("[INFO] fake daemon exiting")
    os.kill(child, signal.SIGTERM)
    os.waitpid(child, 0)
    try:
        os.unlink(SOCK)
    except OSError:
        pass


def client():
    data = sys.stdin.read()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(SOCK)
    except OSError:
        sys.stderr.write("Cannot find MPS control daemon process\n")
        sys.exit(1)
    s.sendall(data.encode())
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        reply += chunk
    sys.stdout.write(reply.decode())


if os.path.basename(sys.argv[0]) == "nvidia-cuda-mps-server":
    server()
elif "-d" in sys.argv[1:]:
    daemon()
else:
    client()
'''


def _fake_pids(bin_dir: Path) -> list[int]:
    """Live (non-zombie) processes running a script from the fake's folder."""
    return [info.pid for info in proc_table().values()
            if info.alive and any(str(bin_dir) in part for part in info.cmdline)]


@pytest.fixture
def _one_mps_session_at_a_time():
    """splitlab refuses to start next to ANY running MPS daemon, fakes included, so two test
    sessions in this tree (or a parallel worker) would see each other's fakes: serialise them
    with a lock on this file (always present, nothing left behind)."""
    import fcntl

    fd = os.open(__file__, os.O_RDONLY)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail("another test session held the fake-MPS lock for 300 s")
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # releases the lock


@pytest.fixture
def fake_mps(tmp_path, monkeypatch, _one_mps_session_at_a_time):
    """Put the fake MPS binaries first on PATH; afterwards, assert none of them runs."""
    others = [p for p in find_mps_processes() if p.role in ("daemon", "server")]
    if others:  # splitlab rightly refuses to start next to them
        pytest.skip(f"MPS processes already run on this machine: {[p.pid for p in others]}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = FAKE.replace("{python}", sys.executable)
    for name in ("nvidia-cuda-mps-control", "nvidia-cuda-mps-server"):
        path = bin_dir / name
        path.write_text(script)
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MPS_MODE", "ok")
    monkeypatch.setenv("FAKE_MPS_LIFETIME", "60")
    # tests must not depend on the machine's GPU: no compute mode to read
    monkeypatch.setattr(mpsmod, "gpu_compute_modes", lambda: ([], None))
    yield bin_dir
    leftover = _fake_pids(bin_dir)
    for pid in leftover:  # do not leak, even when the test failed
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert leftover == [], f"fake MPS processes left running: {leftover}"


def _start_foreign(bin_dir: Path, tmp_path: Path) -> dict[str, str]:
    """A daemon splitlab did not start (as another tool or user would), own pipe dir."""
    pipe, log = tmp_path / "fp", tmp_path / "fl"
    pipe.mkdir()
    log.mkdir()
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(log)}
    subprocess.run([str(bin_dir / "nvidia-cuda-mps-control"), "-d"], env=env, check=True,
                   timeout=10)
    deadline = time.monotonic() + 10
    while not (pipe / "control").exists():
        assert time.monotonic() < deadline, "foreign fake daemon did not come up"
        time.sleep(0.02)
    return env


def _quit_foreign(bin_dir: Path, env: dict[str, str]) -> None:
    subprocess.run([str(bin_dir / "nvidia-cuda-mps-control")], input="quit\n", text=True,
                   env=env, timeout=10, check=True)
    deadline = time.monotonic() + 10
    while _fake_pids(bin_dir):
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- start, query, stop


def test_start_answer_stop(fake_mps):
    with MPSDaemon(timeout=10) as mps:
        assert mps.running
        root, pipe, log = mps.root, mps.pipe_dir, mps.log_dir
        assert root.name.startswith("splitlab-mps-")
        for d in (root, pipe, log):
            assert _mode(d) == 0o700, oct(_mode(d))
            assert d.stat().st_uid == os.getuid()
        assert str(pipe) != mpsmod.DEFAULT_PIPE_DIR
        servers = mps.servers()
        assert len(servers) == 1
        assert mps.clients(servers[0]) == [4242, 4243]
        with pytest.raises(MPSError, match="unexpected answer"):
            mps.clients(1)
        assert mps.set_default_active_thread_percentage(30) == "30.0"
        assert mps.command("get_default_active_thread_percentage") == "30.0"
        assert mps.set_active_thread_percentage(servers[0], 55.5) == "55.5"
        with pytest.raises(ConfigError):
            mps.set_default_active_thread_percentage(0)
        with pytest.raises(ConfigError):
            mps.client_env(150)
        env = mps.client_env(active_thread_percentage=30)
        assert env == {
            "CUDA_MPS_PIPE_DIRECTORY": str(pipe),
            "CUDA_MPS_LOG_DIRECTORY": str(log),
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30",
        }
        assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in mps.client_env()
        # the daemon and its server are recorded as ours
        ours = [p for p in find_mps_processes() if p.pipe_dir == str(pipe)]
        assert {p.role for p in ours} == {"daemon", "server"}
        assert len(_fake_pids(fake_mps)) == 2
        # a client in a child process sees the variables; the parent's env is untouched
        before = dict(os.environ)
        with mps.applied_client_env(50):
            assert os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
            out = subprocess.run([sys.executable, "-c",
                                  "import os;print(os.environ['CUDA_MPS_PIPE_DIRECTORY'])"],
                                 capture_output=True, text=True, check=True)
            assert out.stdout.strip() == str(pipe)
        assert dict(os.environ) == before
    assert not mps.running
    assert not root.exists()
    assert _fake_pids(fake_mps) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with pytest.raises(MPSError, match="not running"):
        mps.servers()
    mps.stop()  # idempotent


def test_cleanup_on_exception(fake_mps):
    with pytest.raises(RuntimeError, match="boom"):
        with MPSDaemon(timeout=10) as mps:
            root = mps.root
            raise RuntimeError("boom")
    assert not root.exists()
    assert _fake_pids(fake_mps) == []


def test_cleanup_on_keyboard_interrupt(fake_mps):
    with pytest.raises(KeyboardInterrupt):
        with MPSDaemon(timeout=10) as mps:
            root = mps.root
            mps.servers()
            raise KeyboardInterrupt
    assert not root.exists()
    assert _fake_pids(fake_mps) == []


SIGTERM_CHILD = textwrap.dedent(
    """
    import sys, time
    from splitlab.system.mps import MPSDaemon
    import splitlab.system.mps as m
    m.gpu_compute_modes = lambda: ([], None)
    mps = MPSDaemon(timeout=10).start()
    print(mps.root, flush=True)
    time.sleep(60)
    """
)


def _sigterm_child(code: str, check_root: Callable[[Path], None]) -> tuple[int, Path]:
    """Run ``code`` in a child that prints its daemon's root; once printed, ``check_root(root)``,
    then SIGTERM the child. Returns its exit code and the root (the child killed if it lingers)."""
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        root = Path(child.stdout.readline().strip())
        check_root(root)
        child.send_signal(signal.SIGTERM)
        rc = child.wait(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return rc, root


def test_sigterm_stops_daemon(fake_mps):
    def check_root(root: Path) -> None:
        assert root.name.startswith("splitlab-mps-") and root.exists()
        assert len(_fake_pids(fake_mps)) == 2

    rc, root = _sigterm_child(SIGTERM_CHILD, check_root)
    assert rc == -signal.SIGTERM  # the default action still happens, after the cleanup
    assert not root.exists()
    assert _fake_pids(fake_mps) == []


def test_atexit_fallback(fake_mps):
    code = textwrap.dedent(
        """
        from splitlab.system.mps import MPSDaemon
        import splitlab.system.mps as m
        m.gpu_compute_modes = lambda: ([], None)
        mps = MPSDaemon(timeout=10).start()
        print(mps.root, flush=True)
        """  # exits without stop()
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert not Path(out.stdout.strip()).exists()
    assert _fake_pids(fake_mps) == []


# --------------------------------------------------------------------------- refusals


def test_missing_binary(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MPSError, match="not found on PATH.*driver utilities"):
        MPSDaemon().start()


def test_refusing_daemon(fake_mps, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_MODE", "refuse")
    mps = MPSDaemon(base_dir=tmp_path, timeout=5)
    with pytest.raises(MPSError) as info:
        mps.start()
    message = str(info.value)
    assert "exit status 3" in message
    assert "compute mode Prohibited" in message  # the control.log excerpt
    assert "cannot start" in message  # what the binary printed
    assert list(tmp_path.glob("splitlab-mps-*")) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_refusing_compute_mode(fake_mps, monkeypatch, tmp_path):
    monkeypatch.setattr(mpsmod, "gpu_compute_modes",
                        lambda: ([{"index": 0, "mode": "Prohibited"}], "nvml"))
    with pytest.raises(MPSError, match="compute mode GPU 0: Prohibited.*never changes"):
        MPSDaemon(base_dir=tmp_path).start()
    assert list(tmp_path.glob("splitlab-mps-*")) == []


def test_mute_daemon_times_out_and_is_killed(fake_mps, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_MODE", "mute")
    t0 = time.monotonic()
    with pytest.raises(MPSError, match="did not answer within 1 s"):
        MPSDaemon(base_dir=tmp_path, timeout=1).start()
    assert time.monotonic() - t0 < 15
    assert list(tmp_path.glob("splitlab-mps-*")) == []
    # the fixture asserts that the mute daemon and its server were terminated


def test_foreign_daemon_is_refused_and_never_stopped(fake_mps, tmp_path):
    env = _start_foreign(fake_mps, tmp_path)
    try:
        foreign = set(_fake_pids(fake_mps))
        assert len(foreign) == 2
        with pytest.raises(MPSError, match="already running.*never attaches") as info:
            MPSDaemon(base_dir=tmp_path).start()
        assert env["CUDA_MPS_PIPE_DIRECTORY"] in str(info.value)
        assert set(_fake_pids(fake_mps)) == foreign  # untouched
        status = mps_status()
        assert status["running_for_user"] is True
        assert {p["pid"] for p in status["running"]} == foreign
    finally:
        _quit_foreign(fake_mps, env)


def test_stop_leaves_a_later_foreign_daemon_alone(fake_mps, tmp_path):
    mps = MPSDaemon(timeout=10).start()
    try:
        ours = set(_fake_pids(fake_mps))
        env = _start_foreign(fake_mps, tmp_path)
        foreign = set(_fake_pids(fake_mps)) - ours
        assert len(foreign) == 2
    finally:
        mps.stop()
    try:
        assert set(_fake_pids(fake_mps)) == foreign
    finally:
        _quit_foreign(fake_mps, env)


def test_status_without_gpu(fake_mps):
    status = mps_status()
    json.dumps(status)
    assert status["binary"] == str(fake_mps / "nvidia-cuda-mps-control")
    assert status["available"] is False
    assert "no NVIDIA GPU" in status["reason"]
    assert status["running"] == []  # the fixture skips where MPS processes already run


def test_status_without_binary(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    status = mps_status()
    assert status["binary"] is None and status["available"] is False
    assert "not found" in status["reason"]


def test_roles_from_command_lines():
    assert mpsmod._mps_role(["/usr/bin/nvidia-cuda-mps-control", "-d"]) == "daemon"
    assert mpsmod._mps_role(["nvidia-cuda-mps-control"]) == "client"
    assert mpsmod._mps_role(["nvidia-cuda-mps-server"]) == "server"
    assert mpsmod._mps_role(["/usr/bin/python3", "/x/nvidia-cuda-mps-control", "-f"]) == "daemon"
    assert mpsmod._mps_role(["python", "script.py", "nvidia-cuda-mps-control"]) is None


# --------------------------------------------------------------------------- benchmark


def _load_corun():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mps_corun", REPO / "benchmarks" / "mps_corun.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_corun_fractions_and_skips(tmp_path, monkeypatch, capsys):
    """The parent's bookkeeping with canned worker results: fractions, sums, skip reasons."""
    corun = _load_corun()
    rates = {"solo": (10.0, 4.0), "job": None, "streams": (6.0, 1.0)}
    pair_rates = {"compute": 5.0, "memory": 2.0}

    def fake_group(workers, cfg):
        def rec(rate):
            return {"rate": rate, "iters": 1, "elapsed_s": cfg["duration"]}

        kinds = [w["worker"] for w in workers]
        if kinds == ["solo"] or kinds == ["streams"]:
            c, m = rates[kinds[0]]
            return [{"results": {"compute": rec(c), "memory": rec(m)}}]
        return [{"results": {w["job"]: rec(pair_rates[w["job"]])}} for w in workers]

    monkeypatch.setattr(corun, "run_group", fake_group)
    out = tmp_path / "r.json"
    assert corun.main(["--dry-run", "--out", str(out)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    data = json.loads(out.read_text())
    cases = {c["name"]: c for c in data["cases"]}
    assert cases["processes"]["compute"]["fraction"] == 0.5
    assert cases["processes"]["memory"]["fraction"] == 0.5
    assert cases["processes"]["sum"] == last["cases"]["processes"] == 1.0
    assert cases["streams"]["sum"] == pytest.approx(0.6 + 0.25)
    for name in ("green", "mps", "mps-30/70", "mps-50/50", "mps-70/30"):
        assert cases[name]["skipped"] and cases[name]["sum"] is None
        assert last["skipped"][name] == cases[name]["skipped"]
    assert cases["mps-30/70"]["shares"] == [30, 70]
    assert data["solo"]["compute"]["rate"] == 10.0
    assert {"command", "date", "gpu_name", "environment", "config"} <= set(data)
    assert last["errors"] == {}


def test_corun_benchmark_dry_run_with_fake_mps(fake_mps, tmp_path):
    """The whole orchestration for real on CPU: worker processes, common start, threads; and
    the MPS cases under a (fake) private daemon that is started and stopped, each worker
    process getting the pipe dir and its own active thread percentage."""
    out = tmp_path / "corun.json"
    scratch = Path(tempfile.mkdtemp(prefix="sl-"))  # short: socket paths must fit 108 bytes
    try:
        done = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "mps_corun.py"), "--dry-run",
             "--mps-on-cpu", "--shares", "30/70", "--duration", "0.2", "--out", str(out)],
            capture_output=True, text=True, timeout=120, cwd=REPO,
            env={**os.environ, "TMPDIR": str(scratch)},
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert list(scratch.iterdir()) == []  # no folder left behind
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    last = json.loads(done.stdout.strip().splitlines()[-1])
    data = json.loads(out.read_text())
    assert last["out"] == str(out) and data["config"]["device"] == "cpu"
    cases = {c["name"]: c for c in data["cases"]}
    assert set(cases) == {"processes", "streams", "green", "mps", "mps-30/70"}
    assert cases["green"]["skipped"] == "dry run on CPU: no green contexts"
    for name in ("processes", "streams", "mps", "mps-30/70"):
        case = cases[name]
        assert case["skipped"] is None and case["error"] is None
        for job in JOBS:
            assert case[job]["rate"] > 0 and case[job]["iters"] > 0
            assert case[job]["elapsed_s"] >= 0.2
            assert case[job]["fraction"] == pytest.approx(  # stored to 4 decimals
                case[job]["rate"] / data["solo"][job]["rate"], rel=1e-3, abs=1e-4)
        assert case["sum"] == pytest.approx(case["compute"]["fraction"]
                                            + case["memory"]["fraction"], abs=1e-3)
        assert last["cases"][name] == pytest.approx(case["sum"], abs=1e-3)
    for name in ("processes", "streams"):  # no MPS variable reaches a case without MPS
        assert cases[name]["client_env"] == {"compute": {}, "memory": {}}
    for name in ("mps", "mps-30/70"):
        pipes = {cases[name]["client_env"][job]["CUDA_MPS_PIPE_DIRECTORY"] for job in JOBS}
        assert len(pipes) == 1
        pipe = Path(pipes.pop())
        assert pipe.name == "pipe" and pipe.parent.name.startswith("splitlab-mps-")
        assert pipe.is_relative_to(scratch)  # made under the run's temp dir, and removed
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in cases["mps"]["client_env"]["compute"]
    shares = cases["mps-30/70"]["client_env"]
    assert shares["compute"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    assert shares["memory"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "70"
    # the fixture asserts that the fake daemon and server are gone


def test_sigterm_chains_to_previous_handler(fake_mps):
    code = textwrap.dedent(
        """
        import signal, sys, time
        def previous(signum, frame):
            raise SystemExit(7)
        signal.signal(signal.SIGTERM, previous)
        from splitlab.system.mps import MPSDaemon
        import splitlab.system.mps as m
        m.gpu_compute_modes = lambda: ([], None)
        with MPSDaemon(timeout=10) as mps:
            print(mps.root, flush=True)
            time.sleep(60)
        """
    )
    def check_root(root: Path) -> None:
        assert root.exists()

    rc, root = _sigterm_child(code, check_root)
    assert rc == 7  # the program's own handler still ran, after the daemon was stopped
    assert not root.exists()
    assert _fake_pids(fake_mps) == []


def test_caller_mps_variables_do_not_reach_the_daemon(fake_mps, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "10")
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/nonexistent/someone-elses")
    with MPSDaemon(timeout=10) as mps:
        daemon = [p for p in find_mps_processes() if p.role == "daemon"]
        assert [p.pipe_dir for p in daemon] == [str(mps.pipe_dir)]
        environ = read_proc_file(daemon[0].pid, "environ").split(b"\0")
        assert b"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=10" not in environ


def test_compute_mode_from_nvidia_smi(monkeypatch, tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf '0, Default\\n1, Prohibited\\n'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "pynvml", None)  # force the nvidia-smi path
    modes, source = mpsmod.gpu_compute_modes()
    assert source == "nvidia-smi"
    assert modes == [{"index": 0, "mode": "Default"}, {"index": 1, "mode": "Prohibited"}]
    status = mps_status()
    assert status["gpu_compute_modes"] == modes
    assert "not found" in status["reason"]  # no MPS binary on this PATH


def test_benchmark_does_not_import_plotly():
    bench = str(REPO / "benchmarks" / "mps_corun.py")
    code = (
        "import sys, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('b', {bench!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "import splitlab.system.mps, splitlab.system.green, splitlab.system.env\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('plotly', 'ipywidgets')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
