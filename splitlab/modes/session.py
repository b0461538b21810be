"""The one life cycle of the process-backed modes (``split`` on ``processes`` / ``mps``, and
``replicas``): spawned workers that load and warm up once, then serve.

Parent side, ``ProcessSession``: start the private MPS daemon when asked (each worker gets its
client environment, with its own SM percentage or none), start the ``ProcessGroup``, wait
until every worker is ``Ready`` and check that the model it loaded is the caller's.
``close()`` asks the workers to finish in the order given (so the owner of shared memory goes
last), then stops what is left and the daemon.

What runs between start and close is one of two protocols:

- the online engines' (``splitlab.modes.online_parent`` / ``online_child``): one ``Go`` with
  the engine's t0, then requests as they come. The split on ``processes`` / ``mps`` has only
  this one: an offline split run is a replay through its online engine
  (``splitlab.modes.split.processes``).
- per run, for the offline ``replicas``: ``Arm`` every worker with its requests, wait until
  each is ``Armed``, send ``Go`` with one t0, and watch ``Progress`` until every worker sent
  ``RunDone``; a run with no progress for ``stall_timeout_s`` after its last arrival is
  stopped. A failed run closes the session. Child side, ``serve_runs``: the same protocol
  from the worker's end, around a function that serves one run.

Every message is a frozen dataclass: the session's and the per-run protocol's here, the
online ones in ``splitlab.modes.online_child``, the group's own (``Started`` / ``Failed`` /
``Done``) in ``splitlab.system.procs``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

from splitlab.errors import WorkerError
from splitlab.measure.metrics import RequestTrace, StepTrace
from splitlab.system.procs import ProcessGroup, WorkerSpec, refuse_unguarded_main
from splitlab.workload import Request

# ---- child -> parent -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ready:
    """A worker is loaded and warmed up. ``facts``: what it runs with (its runner's settings,
    ``splitlab.modes.common.worker_facts``, and what its set-up measured); ``model_facts``
    and ``fingerprint``: the model it loaded itself (the owner of the weights only)."""

    facts: dict[str, Any]
    model_facts: dict[str, Any] | None = None
    fingerprint: list[float] | None = None


@dataclasses.dataclass(frozen=True)
class Armed:
    run_id: int


@dataclasses.dataclass(frozen=True)
class Progress:
    """Tokens produced since the worker's last Progress (the bar and the stall check)."""

    tokens: int


@dataclasses.dataclass(frozen=True)
class RunDone:
    """A worker finished its part of a run: its requests' traces, its steps, its peak memory,
    its scheduler's ``counters()`` (preemptions, prefix-cache hits; empty when it has none)."""

    run_id: int
    traces: tuple[RequestTrace, ...]
    steps: tuple[StepTrace, ...]
    peak_bytes: int | None
    counters: dict[str, Any] = dataclasses.field(default_factory=dict)


# ---- parent -> child -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Arm:
    """Get ready for run ``run_id``: ``requests`` are this worker's (empty for a worker that
    only takes handoffs)."""

    run_id: int
    requests: tuple[Request, ...] = ()


@dataclasses.dataclass(frozen=True)
class Go:
    """Start run ``run_id``; every worker measures from ``t0`` (``time.perf_counter()``)."""

    run_id: int
    t0: float


@dataclasses.dataclass(frozen=True)
class Close:
    """Serve no more runs: release what is shared and return."""


# ---- the parent side -----------------------------------------------------------------------------

Build = Callable[[ProcessGroup], Sequence[tuple[str, Callable[..., None], tuple]]]


class ProcessSession:
    """Spawned workers (and, with ``mps``, their MPS daemon), up between runs.

    ``build(group)``: the workers as ``(name, target, args)``, made once the group exists so
    their arguments can hold its queues (``group.queue()``). ``mps_shares``: None for no MPS,
    else each worker's SM percentage (None: no limit). ``owner``: the worker that loads the
    model itself, checked against ``model`` (``how``: what to do when it differs).
    ``close_order``: who is asked to finish first. ``label``: names the mode in messages.
    """

    def __init__(self, model, build: Build, *, label: str, owner: str, how: str, close_order: Sequence[str],
                 ready_timeout_s: float, stall_timeout_s: float,
                 mps_shares: Mapping[str, float | None] | None = None):
        from splitlab.modes.common import check_same_model, mps_clients, no_mps_env

        refuse_unguarded_main()  # before the daemon: an unguarded script's child starts nothing
        self.label = label
        self.close_order = list(close_order)
        self.ready_timeout_s = ready_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.runs = 0
        self.mps: dict[str, Any] | None = None
        self.group: ProcessGroup | None = None
        self._record: ProcessGroup | None = None
        self._closed = False
        self._stack = contextlib.ExitStack()
        try:
            daemon = None
            if mps_shares is not None:
                from splitlab.system.mps import MPSDaemon

                daemon = self._stack.enter_context(MPSDaemon())
            group = ProcessGroup()
            for name, target, args in build(group):
                env = no_mps_env()  # no MPS unless asked: a CUDA_MPS_* variable of the caller must not leak in
                if daemon is not None:
                    env.update(daemon.client_env(mps_shares.get(name)))
                group.add(WorkerSpec(name, target, args, env))
            self.group = self._stack.enter_context(group)
            self._record = group  # kept after close: who ran, where, how it ended
            self.ready: dict[str, Ready] = group.wait_for(Ready, self.ready_timeout_s,
                                                          "load the model, share it and warm up")
            check_same_model(model, self.ready[owner], owner, how)
            if daemon is not None:
                shares = {f"{n}_share": v for n, v in mps_shares.items() if v is not None}
                self.mps = mps_clients(daemon, group.pids, **(shares or {"active_thread_percentage": None}))
        except BaseException:
            self._stack.close()
            raise

    @property
    def pids(self) -> dict[str, int]:
        return self.group.pids if self.group is not None else {}

    @property
    def children(self) -> dict[str, dict[str, Any]]:
        """Each worker process: ``{"pid", "tmpdir", "exitcode"}``, kept after ``close()``."""
        return self._record.children if self._record is not None else {}

    def run(self, requests: Mapping[str, tuple[Request, ...]], total_tokens: int, last_arrival_s: float,
            progress: bool = True) -> dict[str, RunDone]:
        """One run: ``requests`` per worker (every worker is armed); each worker's RunDone."""
        from tqdm.auto import tqdm

        if self._closed or self.group is None:
            raise WorkerError(f"this {self.label} session is closed (a run failed or close() was called); "
                              "start a new one")
        group = self.group
        self.runs += 1
        run_id = self.runs
        bar = None
        try:
            for name, share in requests.items():
                group.send(name, Arm(run_id, tuple(share)))
            group.wait_for(Armed, self.ready_timeout_s, "get ready for the run")
            t0 = time.perf_counter()
            for name in requests:
                group.send(name, Go(run_id, t0))
            bar = tqdm(total=total_tokens, unit="tok", desc=self.label, disable=not progress, leave=False)
            return self._watch(run_id, t0, last_arrival_s, bar)
        except BaseException:
            self.close(graceful=False)
            raise
        finally:
            if bar is not None:
                bar.close()

    def _watch(self, run_id: int, t0: float, last_arrival_s: float, bar) -> dict[str, RunDone]:
        done: dict[str, RunDone] = {}
        last_event = time.perf_counter()
        while len(done) < len(self.group.procs):
            event = self.group.next_event(timeout=0.2)
            now = time.perf_counter()
            if event is None:
                if now - t0 > last_arrival_s and now - last_event > self.stall_timeout_s:
                    raise WorkerError(
                        f"{self.label} run stalled: no worker reported progress for {self.stall_timeout_s:.0f} s "
                        f"after the last arrival ({bar.n} tokens produced); stopped the workers")
                continue
            last_event = now
            name, payload = event
            if isinstance(payload, Progress):
                bar.update(payload.tokens)
            elif isinstance(payload, RunDone) and payload.run_id == run_id:
                done[name] = payload
            else:
                raise WorkerError(f"worker {name} sent {payload!r} during run {run_id}")
        return done

    def close(self, graceful: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if graceful and self.group is not None:
                self.group.ask_to_finish(self.close_order, Close())
        except WorkerError as exc:
            warnings.warn(f"a {self.label} worker failed while closing: {exc}", stacklevel=2)
        finally:
            self._stack.close()  # terminates what is left, then stops the MPS daemon
            self.group = None


class OnSession:
    """``pids`` and ``children`` of the ``ProcessSession`` (``self.session``) a mode's workers
    run in; empty while there is none (an online engine's is made as it starts)."""

    session: ProcessSession | None

    @property
    def pids(self) -> dict[str, int]:
        return self.session.pids if self.session is not None else {}

    @property
    def children(self) -> dict[str, dict[str, Any]]:
        """Each worker process: ``{"pid", "tmpdir", "exitcode"}``, kept after ``close()``."""
        return self.session.children if self.session is not None else {}


# ---- the child side ------------------------------------------------------------------------------

ServeOne = Callable[[Arm, float, Callable[[int], None]],
                    tuple[Sequence[RequestTrace], Sequence[StepTrace], Mapping[str, Any]]]


def clock_from(t0: float) -> Callable[[], float]:
    """Seconds since ``t0`` (a ``time.perf_counter()`` value): the clock of a run."""
    return lambda: time.perf_counter() - t0


def get_checking_parent(q, channel, timeout_s: float, missing: str):
    """The next item of ``q``, blocking at most ``timeout_s`` seconds and checking the parent
    (``channel.check_parent``) every 0.2 s; past the deadline a ``TimeoutError``:
    ``"{missing} within N s"``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return q.get(timeout=0.2)
        except queue.Empty:
            channel.check_parent()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{missing} within {timeout_s:.0f} s") from None


def serve_runs(channel, device, serve: ServeOne, flush_s: float,
               prepare: Callable[[Arm], None] | None = None) -> None:
    """A worker's side of the session, until ``Close``: per ``Arm``, ``prepare(arm)`` (off the
    clock), ``Armed``, wait for ``Go``, then ``serve(arm, t0, report)`` -> (traces, steps,
    scheduler counters), then ``RunDone``. ``t0``: the run's shared start (``time.perf_counter()``);
    ``report(tokens)``: progress, sent to the parent at most every ``flush_s`` seconds."""
    from splitlab.modes.common import peak_bytes, reset_peak

    while True:
        cmd = channel.recv()
        if isinstance(cmd, Close):
            return
        if not isinstance(cmd, Arm):
            raise RuntimeError(f"worker {channel.name}: unexpected command {cmd!r}")
        if prepare is not None:
            prepare(cmd)
        reset_peak(device)
        channel.send(Armed(cmd.run_id))
        go = channel.recv()
        if not (isinstance(go, Go) and go.run_id == cmd.run_id):
            raise RuntimeError(f"worker {channel.name}: expected Go for run {cmd.run_id}, got {go!r}")
        outbox = _ProgressOutbox(channel, flush_s)
        traces, steps, counters = serve(cmd, go.t0, outbox.add)
        outbox.flush()
        channel.send(RunDone(cmd.run_id, tuple(traces), tuple(steps), peak_bytes(device), dict(counters)))


class _ProgressOutbox:
    """Sums a worker's new tokens and sends them as one ``Progress`` at most every ``flush_s``."""

    def __init__(self, channel, flush_s: float):
        self._channel = channel
        self.flush_s = flush_s
        self.tokens = 0
        self._last = time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        if time.perf_counter() - self._last >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        if self.tokens:
            self._channel.send(Progress(self.tokens))
            self.tokens = 0
        self._last = time.perf_counter()
