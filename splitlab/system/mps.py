"""NVIDIA MPS control: a private MPS daemon that splitlab starts, queries and stops.

``MPSDaemon`` starts ``nvidia-cuda-mps-control -d`` with a pipe folder and a log folder that
splitlab creates for this run only (mode 0700, under ``$XDG_RUNTIME_DIR`` or the temp dir), so
no other local user can submit work through it. Clients reach it with the variables from
``client_env()``, which must be in a process's environment before CUDA initialises there::

    with MPSDaemon() as mps:
        env = {**os.environ, **mps.client_env(active_thread_percentage=30)}
        subprocess.run([sys.executable, "worker.py"], env=env, check=True)

Rules this module keeps:

- It never attaches to, queries or stops a daemon it did not start (another user's, or the
  default one under ``/tmp/nvidia-mps``): if one is running, ``start()`` refuses and says so.
- It never changes the GPU's compute mode; it only reads it (NVML, else ``nvidia-smi``).
- Nothing hangs: every call to the control binary has a timeout. Nothing is left running:
  ``stop()`` sends ``quit``, waits, then terminates only the processes it started; it also
  runs on exceptions, KeyboardInterrupt, SIGTERM (a handler is installed while the daemon is
  up) and at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from splitlab.system.env import MPS_CONTROL, patched_environ
from splitlab.system.procs import proc_info, proc_table, read_proc_file
from splitlab.errors import ConfigError, MPSError

#: Where an MPS daemon started without ``CUDA_MPS_PIPE_DIRECTORY`` listens (shared, not ours).
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"
MPS_SERVER = "nvidia-cuda-mps-server"
#: Compute modes as NVML numbers them.
COMPUTE_MODES = {0: "Default", 1: "Exclusive_Thread", 2: "Prohibited", 3: "Exclusive_Process"}
#: Compute modes in which MPS clients cannot run.
REFUSING_COMPUTE_MODES = ("Prohibited", "Exclusive_Thread")
# A Unix socket path must fit in 108 bytes; MPS puts sockets (``control``, ...) in the pipe dir.
_MAX_PIPE_DIR_CHARS = 90
_MPS_NAMES = (MPS_CONTROL, MPS_SERVER)


# --------------------------------------------------------------------------- process table


@dataclass(frozen=True)
class MPSProcess:
    """One running MPS process seen in /proc.

    ``role`` is ``"daemon"`` (``nvidia-cuda-mps-control -d``/``-f``), ``"server"``
    (``nvidia-cuda-mps-server``) or ``"client"`` (a short-lived ``nvidia-cuda-mps-control``
    reading commands). ``pipe_dir`` is the ``CUDA_MPS_PIPE_DIRECTORY`` the process started
    with (``DEFAULT_PIPE_DIR`` when unset), or ``None`` when its environment is not readable
    (another user's process).
    """

    pid: int
    ppid: int
    uid: int | None
    role: str
    pipe_dir: str | None
    start_ticks: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mps_role(cmdline: list[str]) -> str | None:
    """Which MPS program a command line runs, looking at argv[0] and, for a script run by
    an interpreter, argv[1]."""
    for i, arg in enumerate(cmdline[:2]):
        name = os.path.basename(arg)
        if name == MPS_SERVER:
            return "server"
        if name == MPS_CONTROL:
            args = cmdline[i + 1 :]
            return "daemon" if ("-d" in args or "-f" in args) else "client"
    return None


def find_mps_processes() -> list[MPSProcess]:
    """Every live MPS process this user can see (zombies are left out). Read-only."""
    out: list[MPSProcess] = []
    for info in proc_table().values():
        role = _mps_role(list(info.cmdline))
        if role is None or not info.alive:
            continue
        uid = None
        status = read_proc_file(info.pid, "status")
        if status:
            for line in status.decode("utf-8", "replace").splitlines():
                if line.startswith("Uid:"):
                    uid = int(line.split()[1])
                    break
        env = read_proc_file(info.pid, "environ")
        pipe_dir: str | None
        if env is None:
            pipe_dir = None
        else:
            pipe_dir = DEFAULT_PIPE_DIR
            for item in env.split(b"\0"):
                if item.startswith(b"CUDA_MPS_PIPE_DIRECTORY="):
                    pipe_dir = item.split(b"=", 1)[1].decode("utf-8", "replace")
        out.append(MPSProcess(info.pid, info.ppid, uid, role, pipe_dir, info.start_ticks))
    return out


def _alive(proc: MPSProcess) -> bool:
    """True while that very process (same pid AND start time: no pid reuse) still runs."""
    info = proc_info(proc.pid)
    return info is not None and info.alive and info.start_ticks == proc.start_ticks


def _user_name(uid: int | None) -> str:
    if uid is None:
        return "another user"
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return f"uid {uid}"


# --------------------------------------------------------------------------- GPU compute mode


def gpu_compute_modes() -> tuple[list[dict[str, Any]], str | None]:
    """Each GPU's compute mode, read-only: ``([{"index": 0, "mode": "Default"}, ...], source)``
    with source ``"nvml"`` or ``"nvidia-smi"``; ``([], None)`` where there is no GPU/driver."""
    try:
        import pynvml  # nvidia-ml-py; imported lazily (absent on some machines)
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
        except Exception:  # NVMLError_LibraryNotFound on machines without a driver
            pass
        else:
            try:
                modes = []
                for i in range(pynvml.nvmlDeviceGetCount()):
                    handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                    mode = pynvml.nvmlDeviceGetComputeMode(handle)
                    modes.append({"index": i, "mode": COMPUTE_MODES.get(int(mode), str(mode))})
                return modes, "nvml"
            except Exception:
                pass
            finally:
                with contextlib.suppress(Exception):
                    pynvml.nvmlShutdown()
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], None
    try:
        done = subprocess.run(
            [smi, "--query-gpu=index,compute_mode", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return [], None
    if done.returncode != 0:
        return [], None
    modes = []
    for line in done.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            modes.append({"index": int(parts[0]), "mode": parts[1]})
    return modes, ("nvidia-smi" if modes else None)


def _refusing(modes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in modes if m["mode"].replace(" ", "_") in REFUSING_COMPUTE_MODES]


# --------------------------------------------------------------------------- status


def mps_status() -> dict[str, Any]:
    """What ``splitlab env`` reports about MPS on this machine. Read-only, quick, JSON-able.

    Keys: ``binary`` (path or None), ``gpu_compute_modes`` and ``compute_mode_source``,
    ``running`` (MPS daemons/servers visible, any user), ``running_for_user`` (one of this
    user's is up), ``default_pipe_dir_control`` (a control socket exists under
    /tmp/nvidia-mps, maybe stale), ``available`` and ``reason`` (why not, or None).
    """
    binary = shutil.which(MPS_CONTROL)
    modes, source = gpu_compute_modes()
    running = [p for p in find_mps_processes() if p.role in ("daemon", "server")]
    control_socket = os.path.join(DEFAULT_PIPE_DIR, "control")
    reason: str | None = None
    if binary is None:
        reason = f"{MPS_CONTROL} not found on PATH (it ships with the NVIDIA driver utilities)"
    elif not modes:
        reason = "no NVIDIA GPU or driver found (nvidia-ml-py / nvidia-smi)"
    elif len(_refusing(modes)) == len(modes):
        reason = "every GPU is in compute mode " + ", ".join(m["mode"] for m in modes)
    elif running:
        reason = "an MPS daemon is already running (splitlab will not share or stop it)"
    return {
        "binary": binary,
        "gpu_compute_modes": modes,
        "compute_mode_source": source,
        "running": [p.to_dict() for p in running],
        "running_for_user": any(p.uid == os.getuid() for p in running),
        "default_pipe_dir_control": os.path.exists(control_socket),
        "available": reason is None,
        "reason": reason,
    }


# --------------------------------------------------------------------------- the daemon


def _check_percentage(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100:
        raise ConfigError(
            f"active thread percentage must be a number in (0, 100], got {value!r}"
        )
    return float(value)


def _format_percentage(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _private_dir(path: str | None) -> bool:
    """True if path is a directory owned by this user that no one else can enter."""
    if not path:
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == os.getuid()
        and (st.st_mode & 0o077) == 0
        and os.access(path, os.W_OK | os.X_OK)
    )


class MPSDaemon:
    """A private NVIDIA MPS control daemon, as a context manager.

    ``start()`` refuses (MPSError, with what to do) when the binary is missing, every GPU is
    in a compute mode that refuses MPS, another MPS daemon is already running (any pipe dir,
    any user: splitlab never attaches to or stops it), the daemon exits with an error, or it
    does not answer within ``timeout`` seconds. ``stop()`` stops only what ``start()`` started.

    ``base_dir``: where the private folder is made (default ``$XDG_RUNTIME_DIR`` when it is a
    private folder of this user, else the temp dir). ``timeout``: seconds allowed for each
    step (start answering, each query, stop).
    """

    def __init__(
        self,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        timeout: float = 15.0,
        binary: str = MPS_CONTROL,
    ) -> None:
        if timeout <= 0:
            raise ConfigError(f"timeout must be positive, got {timeout!r}")
        self.timeout = float(timeout)
        self._binary_name = binary
        self._base_dir = None if base_dir is None else os.fspath(base_dir)
        self.binary: str | None = None
        self.root: Path | None = None
        self.pipe_dir: Path | None = None
        self.log_dir: Path | None = None
        self._lock = threading.RLock()
        self._owner_pid: int | None = None
        self._launched = False
        self._running = False
        self._own: dict[tuple[int, int], MPSProcess] = {}
        self._prev_sigterm: Any = None
        self._sigterm_installed = False
        self._atexit_registered = False

    # ----------------------------------------------------------------- state

    @property
    def running(self) -> bool:
        return self._running

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"MPSDaemon({state}, pipe_dir={str(self.pipe_dir) if self.pipe_dir else None})"

    def _env(self) -> dict[str, str]:
        """Environment for the control binary: ours, without MPS variables inherited from the
        caller (a CUDA_MPS_ACTIVE_THREAD_PERCENTAGE there would become the daemon's default)."""
        assert self.pipe_dir is not None and self.log_dir is not None
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("CUDA_MPS_")},
            "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir),
            "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir),
        }

    # ----------------------------------------------------------------- start

    def start(self) -> "MPSDaemon":
        """Start the daemon and wait until it answers. Returns self."""
        with self._lock:
            if self._running or self._launched:
                raise MPSError("this MPSDaemon is already started; use a new one per run")
            binary = shutil.which(self._binary_name)
            if binary is None:
                raise MPSError(
                    f"{self._binary_name} was not found on PATH. It ships with the NVIDIA "
                    "driver utilities (e.g. the nvidia-utils / nvidia-compute-utils package "
                    "matching your driver); CPU-only machines have no MPS: use a backend "
                    "without MPS (split backend 'processes' or 'streams')."
                )
            self.binary = binary
            self._refuse_foreign()
            self._refuse_compute_mode()
            self._owner_pid = os.getpid()
            try:
                self._make_dirs()
                self._install_handlers()
                self._launch()
                self._wait_answering()
                self._remember_own()
                self._running = True
            except BaseException:
                # a refusal, a timeout, Ctrl-C or SIGTERM while starting: undo everything
                with contextlib.suppress(Exception):
                    self._shutdown(strict=False)
                raise
        return self

    def _refuse_foreign(self) -> None:
        foreign = [p for p in find_mps_processes() if p.role in ("daemon", "server")]
        if not foreign:
            return
        lines = []
        for p in foreign:
            where = p.pipe_dir if p.pipe_dir is not None else "unreadable (another user)"
            lines.append(f"pid {p.pid} ({p.role}, user {_user_name(p.uid)}, pipe dir {where})")
        mine = [p for p in foreign if p.uid == os.getuid() and p.pipe_dir is not None]
        hint = ""
        if mine:
            hint = (
                " If it is yours and idle, stop it with "
                f"`echo quit | CUDA_MPS_PIPE_DIRECTORY={mine[0].pipe_dir} {MPS_CONTROL}`."
            )
        raise MPSError(
            "an MPS daemon is already running on this machine: " + "; ".join(lines) + ". "
            "splitlab never attaches to or stops a daemon it did not start, and a second "
            "daemon cannot share the GPU with it. Wait for it to finish, ask its owner to stop "
            "it, or run without MPS (split backend 'processes' or 'streams')." + hint
        )

    def _refuse_compute_mode(self) -> None:
        modes, source = gpu_compute_modes()
        bad = _refusing(modes)
        if modes and len(bad) == len(modes):
            listed = ", ".join(f"GPU {m['index']}: {m['mode']}" for m in bad)
            raise MPSError(
                f"the GPU refuses MPS clients: compute mode {listed} (read via {source}). "
                "MPS needs compute mode Default or Exclusive_Process. splitlab never changes "
                "the compute mode; an administrator can (nvidia-smi -c DEFAULT), or run "
                "without MPS."
            )

    def _make_dirs(self) -> None:
        base = self._base_dir
        if base is None:
            xdg = os.environ.get("XDG_RUNTIME_DIR")
            candidates = [xdg] if _private_dir(xdg) else []
            candidates += [tempfile.gettempdir(), "/tmp"]
            # the first whose "<base>/splitlab-mps-XXXXXXXX/pipe" fits a socket path
            fitting = [c for c in candidates if c and len(c) + 27 <= _MAX_PIPE_DIR_CHARS]
            base = fitting[0] if fitting else candidates[0]
        try:
            root = Path(tempfile.mkdtemp(prefix="splitlab-mps-", dir=base))
        except OSError as exc:
            raise MPSError(f"cannot create the MPS folder under {base}: {exc}") from exc
        self.root = root
        os.chmod(root, 0o700)
        self.pipe_dir = root / "pipe"
        self.log_dir = root / "log"
        for d in (self.pipe_dir, self.log_dir):
            d.mkdir(mode=0o700)
            os.chmod(d, 0o700)  # mkdir's mode is masked by umask; be explicit
        if len(str(self.pipe_dir)) > _MAX_PIPE_DIR_CHARS:
            raise MPSError(
                f"the MPS pipe folder path {self.pipe_dir} is too long for a Unix socket "
                f"(>{_MAX_PIPE_DIR_CHARS} characters); pass a shorter base_dir"
            )

    def _launch(self) -> None:
        assert self.binary is not None and self.log_dir is not None
        self._launched = True
        out_path = self.log_dir / "splitlab-start.out"
        with open(out_path, "wb") as out:
            try:
                # output goes to a file, not a pipe: a daemon that keeps our pipe open
                # would make us wait for it forever
                done = subprocess.run(
                    [self.binary, "-d"], env=self._env(), stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, timeout=self.timeout,
                    start_new_session=True,
                )
            except subprocess.TimeoutExpired as exc:
                raise MPSError(
                    f"`{MPS_CONTROL} -d` did not return within {self.timeout:g} s"
                    + self._log_hint()
                ) from exc
            except OSError as exc:
                raise MPSError(f"cannot run {self.binary}: {exc}") from exc
        if done.returncode != 0:
            said = out_path.read_text(errors="replace").strip()
            raise MPSError(
                f"`{MPS_CONTROL} -d` failed (exit status {done.returncode})"
                + (f": {said}" if said else "")
                + self._log_hint()
                + ". Check the GPU's compute mode (nvidia-smi -q | grep -i 'compute mode'; "
                "it must be Default or Exclusive_Process) and that you may use the GPU."
            )

    def _wait_answering(self) -> None:
        deadline = time.monotonic() + self.timeout
        last = ""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                done = self._run_control("get_server_list", timeout=min(remaining, 5.0))
            except subprocess.TimeoutExpired:
                last = "the query timed out"
            else:
                if done.returncode == 0:
                    return
                last = (done.stderr or done.stdout).strip()
            time.sleep(0.05)
        raise MPSError(
            f"the MPS daemon did not answer within {self.timeout:g} s"
            + (f" (last answer: {last})" if last else "")
            + self._log_hint()
        )

    def _remember_own(self) -> None:
        """Record the processes that belong to this daemon (its pipe dir, or descendants)."""
        procs = find_mps_processes()
        own_pids = {pid for pid, _ in self._own}
        pipe = str(self.pipe_dir)
        changed = True
        while changed:
            changed = False
            for p in procs:
                key = (p.pid, p.start_ticks)
                if key in self._own or p.role == "client":
                    continue
                if p.pipe_dir == pipe or p.ppid in own_pids:
                    self._own[key] = p
                    own_pids.add(p.pid)
                    changed = True

    # ----------------------------------------------------------------- queries

    def _run_control(self, command: str, timeout: float) -> subprocess.CompletedProcess[str]:
        assert self.binary is not None
        return subprocess.run(
            [self.binary], input=command + "\n", env=self._env(), capture_output=True,
            text=True, timeout=timeout, start_new_session=True,
        )

    def command(self, command: str) -> str:
        """Send one command to this daemon; return its answer (stripped)."""
        with self._lock:
            if not self._running:
                raise MPSError("the MPS daemon is not running; use `with MPSDaemon() as mps:`")
            try:
                done = self._run_control(command, timeout=self.timeout)
            except subprocess.TimeoutExpired as exc:
                raise MPSError(
                    f"the MPS daemon did not answer {command!r} within {self.timeout:g} s"
                    + self._log_hint()
                ) from exc
            self._remember_own()  # servers start on demand: keep track of them
        if done.returncode != 0:
            raise MPSError(
                f"the MPS daemon refused {command!r} (exit status {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()}" + self._log_hint()
            )
        return done.stdout.strip()

    @staticmethod
    def _pids(answer: str, what: str) -> list[int]:
        pids = []
        for line in answer.splitlines():
            line = line.strip()
            if not line:
                continue
            if not line.isdigit():
                raise MPSError(f"unexpected answer to {what}: {answer!r}")
            pids.append(int(line))
        return pids

    def servers(self) -> list[int]:
        """PIDs of this daemon's MPS servers (a server starts when the first client connects)."""
        return self._pids(self.command("get_server_list"), "get_server_list")

    def clients(self, server_pid: int) -> list[int]:
        """PIDs of the client processes connected to one server."""
        return self._pids(
            self.command(f"get_client_list {int(server_pid)}"), "get_client_list"
        )

    def set_default_active_thread_percentage(self, percentage: float) -> str:
        """Default SM share for servers started from now on; returns the daemon's answer."""
        value = _check_percentage(percentage)
        return self.command(f"set_default_active_thread_percentage {_format_percentage(value)}")

    def set_active_thread_percentage(self, server_pid: int, percentage: float) -> str:
        """SM share for clients that connect to that server from now on."""
        value = _check_percentage(percentage)
        return self.command(
            f"set_active_thread_percentage {int(server_pid)} {_format_percentage(value)}"
        )

    def client_env(self, active_thread_percentage: float | None = None) -> dict[str, str]:
        """Variables a client process needs, to merge into its environment BEFORE CUDA
        initialises there (pass to ``subprocess`` as ``env={**os.environ, **these}``, or use
        ``applied_client_env`` around a multiprocessing 'spawn' start)."""
        if not self._running:
            raise MPSError("start the MPS daemon before asking for its client environment")
        env = {
            "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir),
            "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir),
        }
        if active_thread_percentage is not None:
            value = _check_percentage(active_thread_percentage)
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = _format_percentage(value)
        return env

    @contextlib.contextmanager
    def applied_client_env(
        self, active_thread_percentage: float | None = None
    ) -> Iterator[dict[str, str]]:
        """Put ``client_env(...)`` into ``os.environ`` for the block, then restore it.

        For ``multiprocessing`` with the 'spawn' start method, whose children copy the
        parent's environment at ``Process.start()``: start the child inside the block. The
        parent itself must not initialise CUDA inside it. Not thread-safe (os.environ)."""
        env = self.client_env(active_thread_percentage)
        # no percentage asked for: remove one inherited from the parent's environment
        with patched_environ({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": None, **env}):
            yield env

    def log_excerpt(self, lines: int = 20) -> str:
        """The last lines of the daemon's control.log and server.log ('' if none)."""
        if self.log_dir is None:
            return ""
        parts = []
        for name in ("control.log", "server.log"):
            path = self.log_dir / name
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            tail = "\n".join(text.strip().splitlines()[-lines:])
            if tail:
                parts.append(f"--- {name} ---\n{tail}")
        return "\n".join(parts)

    def _log_hint(self) -> str:
        excerpt = self.log_excerpt()
        return f"\nMPS log:\n{excerpt}" if excerpt else ""

    # ----------------------------------------------------------------- stop

    def stop(self) -> None:
        """Stop the daemon this object started (``quit``, wait, then terminate its processes
        only), and remove its folders. Idempotent; does nothing in a forked child."""
        if self._owner_pid is not None and os.getpid() != self._owner_pid:
            return  # a forked child inherited this object: the daemon is the parent's
        self._shutdown(strict=True)

    def _shutdown(self, strict: bool) -> None:
        with self._lock:
            left: list[MPSProcess] = []
            try:
                if self._launched:
                    left = self._stop_processes()
            finally:
                self._launched = False
                self._running = False
                self._remove_dirs()
                self._uninstall_handlers()
            if left and strict:
                raise MPSError(
                    "MPS processes started by splitlab could not be stopped: "
                    + ", ".join(f"pid {p.pid} ({p.role})" for p in left)
                )

    def _stop_processes(self) -> list[MPSProcess]:
        self._remember_own()
        if self.binary is not None and self.pipe_dir is not None and self.pipe_dir.exists():
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                self._run_control("quit", timeout=min(self.timeout, 10.0))
        deadline = time.monotonic() + self.timeout
        while True:
            self._remember_own()  # a server may have appeared between two scans
            alive = [p for p in self._own.values() if _alive(p)]
            if not alive or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        # escalate: only processes recorded as ours (same pid and start time)
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            if not alive:
                break
            for p in alive:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p.pid, sig)
            end = time.monotonic() + grace
            while alive and time.monotonic() < end:
                time.sleep(0.05)
                alive = [p for p in alive if _alive(p)]
        self._own = {k: p for k, p in self._own.items() if _alive(p)}
        return alive

    def _remove_dirs(self) -> None:
        if self.root is not None and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
            if self.root.exists():
                warnings.warn(f"could not remove the MPS folder {self.root}", stacklevel=3)

    # ----------------------------------------------------------------- signals, exit

    def _install_handlers(self) -> None:
        if not self._atexit_registered:
            atexit.register(self._atexit_stop)
            self._atexit_registered = True
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; atexit still runs
        previous = signal.getsignal(signal.SIGTERM)
        if previous == signal.SIG_IGN:
            return  # this process ignores SIGTERM: it will not die of one
        self._prev_sigterm = previous
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._sigterm_installed = True

    def _uninstall_handlers(self) -> None:
        if self._sigterm_installed and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                signal.signal(signal.SIGTERM, self._prev_sigterm)
            self._sigterm_installed = False
        if self._atexit_registered:
            atexit.unregister(self._atexit_stop)
            self._atexit_registered = False

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        previous = self._prev_sigterm
        if self._owner_pid == os.getpid():
            with contextlib.suppress(Exception):
                self._shutdown(strict=False)
        # then behave as the process would have without us
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_IGN:
            return
        else:  # SIG_DFL (or None: set from C): die of the signal, as before
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def _atexit_stop(self) -> None:
        self._atexit_registered = False  # running now: nothing to unregister
        if self._owner_pid == os.getpid():
            with contextlib.suppress(Exception):
                self._shutdown(strict=False)

    # ----------------------------------------------------------------- context manager

    def __enter__(self) -> "MPSDaemon":
        if not self._running:
            self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.stop()
            return
        try:
            self.stop()
        except Exception as stop_error:  # never hide the exception that ended the block
            warnings.warn(f"stopping the MPS daemon also failed: {stop_error}", stacklevel=2)
