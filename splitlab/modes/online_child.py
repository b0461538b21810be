"""The child side of the process-backed online engines (``split`` on ``processes`` / ``mps``,
and ``replicas``): the messages between parent and children, and ``ChildLoop``, the
requests one child holds.

A child that takes requests (the split's prefill child, each replica) gets ``Submit`` and
``Cancel`` from the parent; the split's decode child gets its requests as handoffs. Either
way each request becomes an ``OnlineSeq`` (``splitlab.engine.online``) stepped by an
``OnlineWorker``, so sampling, ``ignore_eos``, ``min_tokens`` and ``stop_ids`` behave
exactly as in the in-process engine. After each loop turn a child sends ONE ``Tokens``
message: every request's new tokens of that turn (``RequestDelta``, each carrying the index
of its first token, so the parent can order deltas of one request that two children sent),
the turn's ``StepTrace`` s, the child's ``WorkerState`` (what ``stats()`` shows), and the
ids of requests whose KV is back in the pool (``released``; what ``cancel(wait=True)`` waits
for). Nothing else is sent per token.

The split's children also answer ``Measure`` on their channel with ``Measured`` (peak device
memory since the last one, scheduler counters, KV held): what an offline run, a replay
through the engine, records per run (``splitlab.modes.split.processes.ProcessSplit``).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import time
import itertools
import queue
from typing import Any, Callable, Iterable

import torch

from splitlab.engine.handles import OnlineSeq
from splitlab.engine.online import MAX_FAILED_STEPS, OnlineWorker
from splitlab.engine.sampling import SamplingParams, request_generator
from splitlab.engine.scheduler import Scheduler
from splitlab.errors import SplitlabError, WorkerError
from splitlab.measure.metrics import RequestTrace, StepTrace
from splitlab.modes.common import peak_bytes, reset_peak
from splitlab.modes.session import Close, Go
from splitlab.workload import Request

# ---- parent -> child ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Submit:
    """One request, checked by the parent; admitted once the child's clock reaches ``arrival_s``."""

    request: Request
    arrival_s: float
    params: SamplingParams
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Cancel:
    """End request ``request_id`` (its last delta says ``abort``) and free its KV."""

    request_id: int


@dataclasses.dataclass(frozen=True)
class Measure:
    """Answer ``Measured`` now, then start a new peak (sent on a child's channel; the split's
    children answer it: an offline run is what happened between two of them)."""

    token: int


# ---- child -> parent ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RequestDelta:
    """New tokens of one request (engine clock times), or its end. ``start``: index of the
    first of ``token_ids`` in the request's output. ``prefill_s``: (start, end) of its
    prefill, on its first delta."""

    request_id: int
    start: int
    token_ids: tuple[int, ...]
    times_s: tuple[float, ...]
    finish_reason: str | None = None
    error: str | None = None
    prefill_s: tuple[float | None, float | None] | None = None


@dataclasses.dataclass(frozen=True)
class WorkerState:
    """What a child holds now. ``kv_in_use`` / ``kv_total``: slots or pages of the pool whose
    allocator it owns (None: it owns none). ``seen``: Submits received so far."""

    waiting: int = 0
    prefilling: int = 0
    running: int = 0
    kv_in_use: int | None = None
    kv_total: int | None = None
    seen: int = 0


@dataclasses.dataclass(frozen=True)
class Tokens:
    """One loop turn of child ``worker`` (see the module docstring)."""

    worker: str
    deltas: tuple[RequestDelta, ...]
    steps: tuple[StepTrace, ...]
    state: WorkerState
    released: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Measured:
    """Child ``worker``'s answer to ``Measure`` ``token``: its peak device memory since the last
    ``Measure`` (None off CUDA), its scheduler's ``counters()`` (preemptions, prefix-cache
    stats; cumulative) and the slots or pages its allocator holds now (None: it owns none)."""

    worker: str
    token: int
    peak_bytes: int | None
    counters: dict[str, Any]
    kv_in_use: int | None


#: a child with nothing to do looks at its channel (and the clock) at least this often
IDLE_S = 0.2


# ---- helpers ------------------------------------------------------------------------------------

def take(q, timeout: float) -> list[Any]:
    """Everything on ``q`` now, waiting up to ``timeout`` seconds for the first item (0: look)."""
    out: list[Any] = []
    try:
        out.append(q.get(timeout=timeout) if timeout > 0 else q.get_nowait())
        while True:
            out.append(q.get_nowait())
    except queue.Empty:
        pass
    return out


def rng_state(generator: torch.Generator | None) -> bytes | None:
    """A request's sampling generator as bytes (a handoff carries it to the decode child, which
    continues the same random stream)."""
    return None if generator is None else generator.get_state().numpy().tobytes()


def rng_from(state: bytes | None, device: torch.device) -> torch.Generator | None:
    if state is None:
        return None
    generator = torch.Generator(device=device)
    generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return generator


def batch_seqs(worker: OnlineWorker) -> list[OnlineSeq]:
    batch = worker.last_batch
    return [] if batch is None else list(batch.decode) + [c.seq for c in batch.chunks]


# ---- a child's start and its channel ------------------------------------------------------------

class StartClock:
    """A child's clock, built before ``Ready`` and started by the parent's ``Go``."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def wait_go(channel, clock: StartClock) -> bool:
    """Block until the parent's ``Go`` (True, the clock set) or ``Close`` (False)."""
    cmd = channel.recv()
    if isinstance(cmd, Close):
        return False
    if not isinstance(cmd, Go):
        raise RuntimeError(f"worker {channel.name}: expected Go, got {cmd!r}")
    clock.t0 = cmd.t0
    return True


def closing(channel, loop: "ChildLoop | None" = None) -> bool:
    """A look at the channel: True on ``Close``. With ``loop``, a ``Measure`` is answered
    (the split's children); without, it is as unexpected as any other command."""
    while True:
        cmd = channel.recv(timeout=0)
        if cmd is None or isinstance(cmd, Close):
            return cmd is not None
        if not (loop is not None and isinstance(cmd, Measure)):
            raise RuntimeError(f"worker {channel.name}: unexpected command {cmd!r}")
        loop.measure(channel.send, cmd.token)


def online_worker(name: str, runner, scheduler: Scheduler, clock) -> OnlineWorker:
    worker = OnlineWorker(name, runner, scheduler, clock)
    worker.steps = collections.deque(maxlen=8)  # each step goes to the parent; keep only the last few
    return worker


# ---- the requests of one child ------------------------------------------------------------------

class ChildLoop:
    """The requests one child holds (future arrivals and its scheduler's queues) and what it
    owes the parent. ``release(rid)``: the request's KV is free (default: reported in the
    next ``Tokens``; the decode child sends it with the freed slots instead). ``fault``:
    called with the count of steps run after each one (fault injection, tests); what it
    raises ends the child, as a crash of the worker would."""

    def __init__(self, worker: OnlineWorker, eos_ids: Iterable[int], device: torch.device,
                 release: Callable[[int], None] | None = None, fault: Callable[[int], None] | None = None):
        self.worker, self.scheduler = worker, worker.scheduler
        self.clock = worker.clock
        self.eos_ids = frozenset(eos_ids)
        self.device = device
        self.held: dict[int, OnlineSeq] = {}
        self.pending: list[tuple[float, int, OnlineSeq]] = []  # future arrivals, a heap
        self.deltas: list[RequestDelta] = []
        self.released: list[int] = []
        self.steps: list[StepTrace] = []
        self.seen = 0
        self.failed_steps = 0
        self.release = release or self.released.append
        self.fault = fault
        self.steps_done = 0
        self._order = itertools.count()
        self._last_state: WorkerState | None = None

    # ---- requests in and out ------------------------------------------------------------------
    def submit(self, msg: Submit) -> None:
        self.seen += 1
        r = msg.request
        trace = RequestTrace(id=r.id, arrival_s=msg.arrival_s, prompt_len=r.prompt_len,
                             max_new_tokens=r.max_new_tokens, worker=self.worker.name)
        seq = OnlineSeq(r, trace, params=msg.params, ignore_eos=msg.ignore_eos, min_tokens=msg.min_tokens,
                        stop_ids=frozenset(msg.stop_ids), eos_ids=self.eos_ids,
                        generator=request_generator(msg.params, self.device))
        self.held[r.id] = seq
        heapq.heappush(self.pending, (msg.arrival_s, next(self._order), seq))

    def cancel(self, rid: int) -> bool:
        """Drop ``rid`` if this child holds it (False: it does not)."""
        seq = self.held.get(rid)
        if seq is None:
            return False
        self.drop(seq, "abort")
        return True

    def drop(self, seq: OnlineSeq, reason: str, error: str | None = None) -> None:
        seq.cancelled = True  # a pending entry of it is skipped
        self.held.pop(seq.id, None)
        self.scheduler.drop(seq)  # out of its queues, its slot or pages freed
        self.deltas.append(RequestDelta(seq.id, seq.sent, (), (), reason, error))
        self.release(seq.id)

    def admit_arrived(self) -> float | None:
        """Arrived requests to the scheduler; seconds until the next future one (None: none)."""
        now = self.clock()
        while self.pending and (self.pending[0][0] <= now or self.pending[0][2].cancelled):
            _, _, seq = heapq.heappop(self.pending)
            if seq.cancelled:
                continue
            try:
                self.scheduler.add(seq)
            except SplitlabError as exc:  # a request the pool can never hold: it alone fails
                self.held.pop(seq.id, None)
                self.deltas.append(RequestDelta(seq.id, 0, (), (), "error", str(exc)))
                self.release(seq.id)
        return max(0.0, self.pending[0][0] - now) if self.pending else None

    # ---- steps --------------------------------------------------------------------------------
    def turn(self):
        """Arrived requests in, then one step when there is work: ``(its outcome or None,
        seconds until the next arrival or None)``. Work that schedules nothing (no KV slot or
        page can ever free) is a ``WorkerError``."""
        wait = self.admit_arrived()
        if not self.scheduler.has_work():
            return None, wait
        outcome = self.step()
        if outcome is None and self.worker.last_batch is None:
            raise WorkerError("the scheduler has work but scheduled nothing (no KV slot can ever free)")
        return outcome, wait

    def step(self):
        """One step of the worker, its tokens published; a failing step fails only its batch
        (the child fails after ``MAX_FAILED_STEPS`` in a row). None: it failed or ran nothing."""
        worker = self.worker
        worker.last_batch = None
        try:
            outcome = worker.step()
        except Exception as exc:  # noqa: BLE001 - fails this step's requests only
            self.failed_steps += 1
            text = f"the engine step failed: {type(exc).__name__}: {exc}"
            for seq in batch_seqs(worker):
                if seq.id in self.held:
                    self.drop(seq, "error", text)
            if self.failed_steps >= MAX_FAILED_STEPS:
                raise
            return None
        self.failed_steps = 0
        if outcome is not None:
            self.steps.append(worker.steps[-1])
            self.publish(batch_seqs(worker))
            if self.fault is not None:  # outside the try: an injected failure is the child's, not a step's
                self.steps_done += 1
                self.fault(self.steps_done)
        return outcome

    def publish(self, seqs: Iterable[OnlineSeq]) -> None:
        for seq in seqs:
            t = seq.trace
            if len(t.output_ids) == seq.sent or seq.cancelled:
                continue
            start, seq.sent = seq.sent, len(t.output_ids)
            reason = None
            if seq.finished:  # its KV was freed by the scheduler
                reason = "stop" if seq.stopped else "length"
                self.held.pop(seq.id, None)
                self.release(seq.id)
            self.deltas.append(RequestDelta(seq.id, start, tuple(t.output_ids[start:]), tuple(t.token_times_s[start:]),
                                            reason, None, (t.prefill_start_s, t.prefill_end_s) if start == 0 else None))

    # ---- to the parent ------------------------------------------------------------------------
    def state(self, running_extra: int = 0) -> WorkerState:
        sch = self.scheduler
        used, total = sch.kv_usage()
        waiting = len(sch.waiting) + sum(1 for entry in self.pending if not entry[2].cancelled)
        return WorkerState(waiting, len(sch.prefilling), len(sch.running) + running_extra, used, total, self.seen)

    def measure(self, send: Callable[[Measured], None], token: int) -> None:
        """Send ``Measured`` (see there), then reset the device's peak."""
        send(Measured(self.worker.name, token, peak_bytes(self.device), self.scheduler.counters(),
                      self.scheduler.kv_usage()[0]))
        reset_peak(self.device)

    def flush(self, send: Callable[[Tokens], None], running_extra: int = 0) -> None:
        """Send this turn's ``Tokens`` (nothing when nothing changed)."""
        state = self.state(running_extra)
        if not (self.deltas or self.released or self.steps) and state == self._last_state:
            return
        send(Tokens(self.worker.name, tuple(self.deltas), tuple(self.steps), state, tuple(self.released)))
        self.deltas.clear()
        self.released.clear()
        self.steps.clear()
        self._last_state = state
