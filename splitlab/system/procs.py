"""Run worker functions in spawned processes and watch them; read the process table.

The parent never hangs on a dead child: it polls the shared event queue with a short
timeout and checks every child's exit code between polls, so a worker that raises or is
killed turns into a ``WorkerError`` naming it within about a second. Whatever happens
(error, Ctrl-C, SIGTERM), ``close()`` terminates and joins every child it started, removes
what a killed child could not remove itself (its ``/tmp/pymp-*`` folder) and the CUDA
IPC event files an exited child leaves (``/dev/shm/cuda.shm.*``, named by its pid), and
drops the group's queues so their POSIX semaphores (``/dev/shm/sem.mp-*``) are unlinked.

A child runs ``target(channel, *args)``. Through its ``Channel`` it sends events to the
parent (``channel.send(event)``, any picklable object; the group's own are ``Started``,
``Failed`` and ``Done``) and receives commands (``channel.recv()``), so one set of children
can serve several runs (``splitlab.modes.session`` is that protocol). Every child, before
its target runs:

- has ``WorkerSpec.env`` in its environment from its first instruction (the variables are
  set in the parent around ``Process.start()``, so the spawned interpreter inherits them;
  ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` is read when CUDA creates its context);
- is named ``splitlab-<name>`` in the process table (``/proc/<pid>/comm``, 15 characters);
- dies with its parent (``PR_SET_PDEATHSIG``: a parent killed with SIGKILL leaves no
  orphan; the signal follows the parent *thread* that started the group, so start a
  group from a thread that outlives it, e.g. the main thread);
- exits through Python on SIGTERM (``close()`` and a dead parent send it), so its own
  finalizers remove its semaphores and temp folder; SIGKILL follows if it does not;
- ignores SIGINT: Ctrl-C is the parent's to handle (it stops the children itself);
- uses a thread lock for tqdm instead of a multiprocessing one (a /dev/shm semaphore
  that a killed child could not remove);
- reports ``Started`` with its pid and temp folder, then ``Failed`` (with the traceback)
  if its target raises, or ``Done`` when it returns.

A spawned child re-imports the parent's ``__main__`` script; a script that starts workers
at its top level, outside ``if __name__ == "__main__":``, would start them again in every
child. Such a child exits at once with ``EXIT_UNGUARDED_MAIN`` and the parent raises a
``ModeError`` that says to add the guard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import queue
import shutil
import signal
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

from splitlab.errors import ModeError, WorkerError
from splitlab.system.env import patched_environ

POLL_S = 0.2
PROCESS_PREFIX = "splitlab-"
# exit status of a child that found itself re-running an unguarded __main__ (EX_CONFIG)
EXIT_UNGUARDED_MAIN = 78
UNGUARDED_MAIN_HINT = (
    "a spawned worker re-ran this script's top-level code: put the code that starts splitlab runs under "
    "`if __name__ == \"__main__\":` (worker processes are spawned, and a spawned process imports the "
    "main script again)"
)
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """One child: its name, the function it runs, its arguments and extra environment.

    ``env`` is in the child's environment before its interpreter starts, i.e. before CUDA
    initialises there (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE is read at context creation).
    A value of ``None`` removes that variable from the child's environment.
    """

    name: str
    target: Callable[..., None]
    args: tuple = ()
    env: dict[str, str | None] = dataclasses.field(default_factory=dict)


# ---- the group's own events (child -> parent) -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Started:
    """The child runs: its pid and the multiprocessing temp folder it made."""

    pid: int
    tmpdir: str | None


@dataclasses.dataclass(frozen=True)
class Failed:
    """The child's target raised: the exception and its traceback, as text."""

    error: str


@dataclasses.dataclass(frozen=True)
class Done:
    """The child's target returned; the child is exiting."""


class ParentGone(SystemExit):
    """Raised in a child whose parent process is gone: nothing is left to report to."""


class Channel:
    """What a child uses to talk to the parent: events out, commands in."""

    def __init__(self, name: str, events, commands, parent_pid: int | None = None) -> None:
        self.name = name
        self._events = events
        self._commands = commands
        self._parent_pid = parent_pid

    def send(self, event: Any) -> None:
        self._events.put((self.name, event))

    def parent_alive(self) -> bool:
        return self._parent_pid is None or os.getppid() == self._parent_pid

    def check_parent(self) -> None:
        if not self.parent_alive():
            raise ParentGone(f"worker {self.name}: the parent process is gone")

    def recv(self, timeout: float | None = None) -> Any:
        """The next command from the parent; ``None`` after ``timeout`` seconds (``None``:
        wait for ever, checking every ``POLL_S`` that the parent is still alive)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
            try:
                return self._commands.get(timeout=wait)
            except queue.Empty:
                self.check_parent()
                if deadline is not None and time.monotonic() >= deadline:
                    return None


# ---- the child side -------------------------------------------------------------------------------

def refuse_unguarded_main() -> None:
    """In a child that is still importing the parent's ``__main__`` (a script without the
    ``if __name__ == "__main__":`` guard, re-run by spawn), exit with ``EXIT_UNGUARDED_MAIN``
    before anything is started; the parent turns that exit into a ``ModeError``. A no-op in
    every other process. Call it before starting workers or daemons."""
    import multiprocessing

    # the flag multiprocessing itself checks before refusing to start a process from a
    # bootstrapping child (multiprocessing.spawn._check_not_importing_main)
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        sys.stderr.write(f"splitlab: {UNGUARDED_MAIN_HINT}\n")
        sys.stderr.flush()
        raise SystemExit(EXIT_UNGUARDED_MAIN)


def _prctl(option: int, value: Any) -> None:
    """Linux prctl(2), best effort (no-op where libc or the call is unavailable)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, value, 0, 0, 0)
    except Exception:
        pass


class _Terminated(SystemExit):
    """SIGTERM from the parent (``close()``): exit through Python, so finalizers run."""


def _prepare_child(name: str, env, events, parent_pid: int | None) -> None:
    """Environment, signals, tqdm's lock, process name and death signal of a new child."""
    for key, value in (env or {}).items():  # already inherited at spawn; kept for direct calls
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_sigterm(signum, frame):
        # The parent is closing the group and reads no more events: do not wait at exit for
        # them to be flushed; then leave through Python, so this process's own semaphores
        # and temp folder are removed by their finalizers.
        events.cancel_join_thread()
        raise _Terminated(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:  # tqdm would make a multiprocessing lock (a /dev/shm semaphore) that a killed child
        import threading  # cannot remove; children draw no bars, a thread lock is enough

        from tqdm import tqdm as _tqdm

        _tqdm.set_lock(threading.RLock())
    except Exception:
        pass
    _prctl(_PR_SET_NAME, (PROCESS_PREFIX + name)[:15].encode())
    if parent_pid is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))  # on_sigterm: it exits through Python
        if os.getppid() != parent_pid:  # the parent died before the line above took effect
            os._exit(1)


def _child_main(name: str, target, args, env, events, commands, parent_pid=None) -> None:
    _prepare_child(name, env, events, parent_pid)
    channel = Channel(name, events, commands, parent_pid)
    try:
        from multiprocessing import util

        tmpdir = util.get_temp_dir()  # where this child's resource sharer puts its socket
    except Exception:
        tmpdir = None
    channel.send(Started(os.getpid(), tmpdir))
    try:
        target(channel, *args)
    except (ParentGone, _Terminated):
        raise
    except BaseException as exc:  # report everything, KeyboardInterrupt included
        channel.send(Failed(f"{exc.__class__.__name__}: {exc}\n{traceback.format_exc()}"))
        _exiting()
        raise SystemExit(1)
    channel.send(Done())
    _exiting()


def _exiting() -> None:
    """From here the child only exits: a SIGTERM now (the parent closing while this process
    is still in its exit handlers) ends it at once; the parent removes its temp folder."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(128 + signum))


# ---- the parent side ------------------------------------------------------------------------------

class ProcessGroup:
    """Spawned workers sharing one event queue; a context manager that always cleans up.

    Children are started in ``specs`` order and stopped in reverse order, so a worker that
    owns shared memory (listed first) outlives the workers that map it.
    """

    def __init__(self, specs: Sequence[WorkerSpec] = (), start_method: str = "spawn") -> None:
        import torch.multiprocessing as mp

        self._ctx = mp.get_context(start_method)
        self.events = self._ctx.Queue()
        self.specs: list[WorkerSpec] = []
        self._commands: dict[str, Any] = {}
        self._extra_queues: list[Any] = []
        self.procs: dict[str, Any] = {}
        self.finished: set[str] = set()
        self.started: dict[str, Started] = {}
        self.exitcodes: dict[str, int | None] = {}
        self._failed: set[str] = set()
        self._closed = False
        for spec in specs:
            self.add(spec)

    # ---- set-up ------------------------------------------------------------------------------
    def add(self, spec: WorkerSpec) -> None:
        """One more child, before ``__enter__`` (e.g. once the queues it takes exist)."""
        if self.procs:
            raise RuntimeError("add workers before the group starts")
        if spec.name in self._commands:
            raise ValueError(f"worker names must be unique, got {spec.name!r} twice")
        self.specs.append(spec)
        self._commands[spec.name] = self._ctx.Queue()

    def queue(self):
        """A queue for the children to talk to each other (pass it in a spec's args before
        ``__enter__``); it supports CUDA tensors (CUDA IPC) and CPU tensors (shared memory)."""
        q = self._ctx.Queue()
        self._extra_queues.append(q)
        return q

    def __enter__(self) -> "ProcessGroup":
        refuse_unguarded_main()
        try:
            parent = os.getpid()
            for spec in self.specs:
                proc = self._ctx.Process(
                    target=_child_main,
                    args=(spec.name, spec.target, spec.args, spec.env, self.events, self._commands[spec.name],
                          parent),
                    name=PROCESS_PREFIX + spec.name,
                    daemon=True,
                )
                with patched_environ(spec.env):
                    proc.start()
                self.procs[spec.name] = proc
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.procs.items()}

    @property
    def children(self) -> dict[str, dict[str, Any]]:
        """Each child: pid, temp folder and (once it ended) exit code; still valid after close()."""
        return {name: {"pid": info.pid, "tmpdir": info.tmpdir, "exitcode": self.exitcodes.get(name)}
                for name, info in self.started.items()}

    # ---- talking to the children ----------------------------------------------------------------
    def send(self, name: str, message: Any) -> None:
        """A command for one child (read there with ``channel.recv()``)."""
        self._commands[name].put(message)

    def next_event(self, timeout: float = POLL_S) -> tuple[str, Any] | None:
        """The next event ``(worker, event)``, or None after ``timeout`` seconds.

        Raises ``WorkerError`` when a worker failed or died without finishing. ``Started``
        events are absorbed here; ``Done`` marks the worker finished and is returned like
        any other event.
        """
        while True:
            got = self._get(timeout)
            if got is None:
                self._check_alive()
                return None
            if self._absorb(*got):
                return got

    def ask_to_finish(self, names: Sequence[str], message: Any, timeout_s: float = 60.0) -> None:
        """Send ``message`` (the protocol's close command) to ``names`` in that order and wait
        (at most ``timeout_s``) until each is done, so they release what they share before
        ``close()`` terminates the rest."""
        for name in names:
            self.send(name, message)
        deadline = time.monotonic() + timeout_s
        while not set(names) <= self.finished and time.monotonic() < deadline:
            self.next_event(timeout=0.2)

    def wait_for(self, kind: type, timeout_s: float, what: str, names: Sequence[str] | None = None
                 ) -> dict[str, Any]:
        """Block until each of ``names`` (default: all) sent an event of type ``kind``; return
        those events by name. Any other event in between is a protocol error."""
        want = set(self.procs if names is None else names)
        got: dict[str, Any] = {}
        deadline = time.monotonic() + timeout_s
        while want - set(got):
            event = self.next_event()
            if event is None:
                if time.monotonic() > deadline:
                    raise WorkerError(f"workers {sorted(want - set(got))} did not {what} within {timeout_s:.0f} s; "
                                      "stopped them")
                continue
            name, payload = event
            if not isinstance(payload, kind) or name not in want:
                raise WorkerError(f"worker {name} sent {payload!r} while the parent waited for {kind.__name__}")
            got[name] = payload
        return got

    # ---- watching ------------------------------------------------------------------------------
    def _get(self, timeout: float):
        """One event or None; never raises inside an ``except`` block, so an error raised
        after it does not carry a ``queue.Empty`` whose traceback holds the queue."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def _absorb(self, name: str, event: Any) -> bool:
        """Book-keeping of the group's own events; True when ``event`` is for the caller."""
        if isinstance(event, Started):
            self.started[name] = event
            return False
        if isinstance(event, Failed):
            self._failed.add(name)
            raise WorkerError(f"worker {name} failed: {event.error}")
        if isinstance(event, Done):
            self.finished.add(name)
        return True

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if name in self.finished or proc.is_alive():
                continue
            while (got := self._get(0.05)) is not None:  # a last look: an error queued just before exit
                self._absorb(*got)
            if name not in self.finished:
                code = proc.exitcode
                del proc  # nothing in a traceback should keep a Process (and its queues) alive
                if code == EXIT_UNGUARDED_MAIN:
                    raise ModeError(f"worker {name} could not start: {UNGUARDED_MAIN_HINT}")
                raise WorkerError(
                    f"worker {name} died without finishing (exit code {code}"
                    f"{', killed by signal ' + _signal_name(-code) if (code or 0) < 0 else ''}); "
                    "the run was stopped and its other workers terminated"
                )

    # ---- cleaning up ---------------------------------------------------------------------------
    def close(self, grace_s: float = 3.0, exit_wait_s: float = 5.0) -> None:
        """Terminate and join every child (reverse start order); kill the ones that ignore
        SIGTERM; then remove what killed children left and release the group's queues."""
        if self._closed:
            return
        self._closed = True
        try:
            # children that said done (or failed) are exiting on their own: let them finish
            ending = [p for n, p in self.procs.items() if n in self.finished or n in self._failed]
            deadline = time.monotonic() + exit_wait_s
            for proc in ending:
                proc.join(max(0.0, deadline - time.monotonic()))
            for name in reversed(list(self.procs)):
                proc = self.procs[name]
                if proc.is_alive():
                    proc.terminate()
                    proc.join(min(grace_s, 1.0))  # the owner of shared memory goes last
            deadline = time.monotonic() + grace_s
            for proc in self.procs.values():
                proc.join(max(0.0, deadline - time.monotonic()))
                if proc.is_alive():
                    proc.kill()
                    proc.join(2.0)
        finally:
            self._release()

    def _release(self) -> None:
        for name, proc in self.procs.items():
            self.exitcodes[name] = proc.exitcode
            started = self.started.get(name)
            if proc.exitcode != 0 and started is not None and started.tmpdir:
                _remove_pymp_dir(started.tmpdir)  # a killed child cannot remove its own
            if proc.pid is not None and not proc.is_alive():
                remove_cuda_ipc_files(proc.pid)
            # A Process keeps its arguments (our queues) for life, and a traceback may keep
            # the Process: drop them, so the queues' semaphores can go.
            if not proc.is_alive():
                proc._args, proc._kwargs = (), {}
        for q in self._commands.values():  # let a feeder thread blocked on a full pipe finish
            _drain(q)
        queues = [self.events, *self._commands.values(), *self._extra_queues]
        for q in queues:
            with contextlib.suppress(Exception):
                q.cancel_join_thread()
                q.close()
        # Drop every reference to the queues, locks and processes: their semaphores are
        # unlinked from /dev/shm when they are collected, even if this object lives on (in a
        # traceback, say).
        self.procs = {}
        self.specs = []  # their args hold queues too
        self._commands = {}
        self._extra_queues = []
        self.events = None
        gc.collect()


def _drain(q) -> None:
    """Read what is left in a queue the parent wrote to (its reader is dead), so that the
    parent's feeder thread is never stuck on a full pipe."""
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        try:
            q.get(timeout=0.02)
        except queue.Empty:
            if not getattr(q, "_buffer", None):  # the feeder's private buffer: nothing left to send
                return
        except Exception:
            return


def remove_cuda_ipc_files(pid: int, shm_dir: str = "/dev/shm") -> list[str]:
    """Remove the CUDA driver's IPC event files of the exited process ``pid``.

    Sharing a CUDA tensor with another process (``torch.multiprocessing``) exports an IPC
    event, which the driver backs with ``/dev/shm/cuda.shm.<device>.<pid in hex>.<n>``; an
    exporter that exits without destroying its events (torch never does) leaves them behind.
    Only files of that one pid are touched, so call this after the process has exited."""
    removed = []
    tag = f"{pid:x}"
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        parts = name.split(".")
        if len(parts) == 5 and parts[:2] == ["cuda", "shm"] and parts[3] == tag:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(shm_dir, name))
                removed.append(name)
    return removed


def _remove_pymp_dir(path: str) -> None:
    """Remove a dead child's multiprocessing temp folder (``<tmp>/pymp-*``), nothing else."""
    real = os.path.realpath(path)
    base = os.path.basename(real)
    if base.startswith("pymp-") and os.path.dirname(real) == os.path.realpath(tempfile.gettempdir()):
        shutil.rmtree(real, ignore_errors=True)


def _signal_name(num: int) -> str:
    try:
        return f"{num} ({signal.Signals(num).name})"
    except ValueError:
        return str(num)


# ---- the process table (Linux /proc): the one reader ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ProcInfo:
    """One process as ``/proc/<pid>/stat`` and ``cmdline`` show it. ``start_ticks``: its
    start time after boot in clock ticks; with the pid, it names one process (no reuse)."""

    pid: int
    ppid: int
    state: str
    start_ticks: int
    cmdline: tuple[str, ...]

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


def read_proc_file(pid: int, name: str) -> bytes | None:
    """The bytes of ``/proc/<pid>/<name>`` (``environ``, ``status``, ``maps``...), or None
    when the process is gone or the file is not readable (another user's process)."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return None


def proc_info(pid: int) -> ProcInfo | None:
    """The process ``pid`` now, or None when it is gone."""
    raw = read_proc_file(pid, "stat")
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace")
    rest = text[text.rfind(")") + 2:].split()  # the command name may hold spaces or ')'
    try:
        state, ppid, start = rest[0], int(rest[1]), int(rest[19])
    except (IndexError, ValueError):
        return None
    cmd = read_proc_file(pid, "cmdline") or b""
    return ProcInfo(pid, ppid, state, start, tuple(p.decode("utf-8", "replace") for p in cmd.split(b"\0") if p))


def proc_table() -> dict[int, ProcInfo]:
    """Every visible process by pid (zombies included: check ``alive``)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {}
    out: dict[int, ProcInfo] = {}
    for entry in entries:
        if entry.isdigit() and (info := proc_info(int(entry))) is not None:
            out[info.pid] = info
    return out


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie does not)."""
    info = proc_info(pid)
    return info is not None and info.alive


def descendants(root: int | None = None) -> set[int]:
    """Live (not zombie) descendants of ``root`` (default: this process), multiprocessing's
    resource tracker left out (it lives as long as its parent, by design)."""
    root = os.getpid() if root is None else root
    table = proc_table()
    kids: dict[int, list[int]] = {}
    for info in table.values():
        kids.setdefault(info.ppid, []).append(info.pid)
    out: set[int] = set()
    todo = [root]
    while todo:
        for child in kids.get(todo.pop(), []):
            info = table[child]
            if not info.alive or any("resource_tracker" in part for part in info.cmdline):
                continue
            out.add(child)
            todo.append(child)
    return out


def shm_mapped_elsewhere() -> set[str]:
    """Names of /dev/shm entries mapped by a process that is neither this one nor one of its
    descendants: other programs' live objects, not something this process left behind."""
    mine = descendants() | {os.getpid()}
    out: set[str] = set()
    for pid in proc_table():
        if pid in mine:
            continue
        maps = read_proc_file(pid, "maps")
        for line in (maps or b"").decode("utf-8", "replace").splitlines():
            i = line.find("/dev/shm/")
            if i >= 0:
                out.add(line[i + len("/dev/shm/"):].split()[0])
    return out
