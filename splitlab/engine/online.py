"""The online engine: a long-lived engine that takes requests while it runs (what a server needs).

``OnlineEngine(model, mode="serial" | "chunked", config)`` builds the engine the offline modes
build (``build_engine``, ``warm_up``, a ``Scheduler`` of the mode's policy) on ONE background
thread, which then runs the same ``Worker`` step loop (schedule -> run -> postprocess) for as
long as the engine lives. The other modes' online engines live with their modes and have the
API below too; ``splitlab.online_engine(model, mode, ...)`` (``splitlab.api``) builds the one
of any mode.
Any thread may ``submit`` a request; its tokens come back through the ``RequestHandle`` as
they are made (a thread-safe queue for ``for delta in handle``, or an asyncio queue for
``async for delta in handle`` when submitted with ``loop=``); ``cancel`` frees its KV at the
next step boundary; ``close`` stops the thread(s).

Which path makes a request's tokens:

- greedy with EOS masked for the whole request (``ignore_eos``, or ``min_tokens >= max_tokens``)
  and no ``stop_ids``: the runner's own path (``decode_step`` / ``prefill`` / ``mixed_step``;
  CUDA-graph replay of decode steps on a GPU), the exact oracle path of the offline modes:
  the tokens of HF ``generate(do_sample=False, min_new_tokens=n)``.
- anything else (sampling, or EOS or a stop id allowed to end the request): a step that holds
  such a request runs eagerly through ``ModelRunner.step_logits`` (no CUDA graph) and
  ``sample`` picks each row's token from its logits, outside any graph. Greedy requests in
  that step take the argmax, so greedy stays exact; a greedy request that may stop at EOS
  gets HF ``generate(do_sample=False)``'s tokens up to and including the EOS.

``ignore_eos`` masks EOS (it is never emitted; HF's ``min_new_tokens`` does the same), which
differs from vLLM, which may emit EOS and go on. ``min_tokens`` masks EOS and ``stop_ids``
until that many tokens exist. Stop *strings* are the caller's job (the server checks them on
the detokenised text and cancels).

Times are seconds of ``engine.clock()`` (``perf_counter`` since the engine became ready); a
request's trace (``handle.trace``, a ``RequestTrace``) holds its arrival (when ``submit`` was
called, or the ``arrival_s`` given) and one time per token, as in every offline ``Run``.
``submit(..., arrival_s=t, request_id=i)`` with a future ``t`` is admitted only once the clock
passes ``t``.

Sampling lives in ``splitlab.engine.sampling``, the handles and the per-request state in
``splitlab.engine.handles``; this module is the engine and its loop.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import heapq
import itertools
import threading
import time
import traceback
from typing import Any, Callable, Iterable, Sequence

from splitlab.config import EngineConfig, SplitConfig
from splitlab.errors import ConfigError, ModeError, SplitlabError, WorkerError, WorkloadError
from splitlab.engine.handles import (FINISH_REASONS, Delta, OnlineSeq, RequestHandle, RequestLimits,
                                     checked_request)
from splitlab.engine.kv import new_allocator
from splitlab.engine.loop import EngineParts, Worker, build_engine
from splitlab.engine.plan import split_outputs
from splitlab.engine.sampling import GREEDY, SamplingParams, request_generator, sample
from splitlab.engine.scheduler import ScheduledBatch, Scheduler
from splitlab.engine.warmup import warm_chunk, warm_up
from splitlab.measure.metrics import RequestTrace

__all__ = ["FINISH_REASONS", "GREEDY", "MAX_QUEUED", "Delta", "EngineBusyError", "OnlineEngine",
           "OnlineSeq", "OnlineWorker", "RequestHandle", "SamplingParams", "sample"]

#: Most requests waiting or running at once; beyond it ``submit`` raises EngineBusyError.
MAX_QUEUED = 4096
#: Consecutive failing steps after which the engine stops (each failure fails only its batch).
MAX_FAILED_STEPS = 3


class EngineBusyError(SplitlabError, RuntimeError):
    """The engine holds its most requests (``max_queued``); retry later (a server answers 503)."""


class OnlineWorker(Worker):
    """A ``Worker`` whose steps take the logits path when a row needs it (see the module doc).
    ``fault``: called with the count of steps done after each one (fault injection, tests)."""

    last_batch: ScheduledBatch | None = None
    fault: Callable[[int], None] | None = None
    steps_done = 0

    def run(self, batch: ScheduledBatch, runner=None, between_layers=None) -> tuple[list[int], list[int | None]]:
        runner = self.runner if runner is None else runner
        self.last_batch = batch
        rows = list(batch.decode) + [c.seq for c in batch.chunks if c.last]
        if all(getattr(s, "exact_path", True) for s in rows):
            return super().run(batch, runner, between_layers)
        decode, chunks = batch.runner_inputs()
        logits = runner.step_logits(decode, chunks)
        tokens = [seq.pick(logits[i]) for i, seq in enumerate(rows)]
        return split_outputs(tokens, decode, chunks)


# ---- the engine -------------------------------------------------------------------------------

class OnlineEngine:
    """A long-lived serial or chunked engine on one background thread; see the module doc.

    ``model``: a ``LoadedModel``. ``config``: its ``EngineConfig`` (None: the default).
    ``keep_steps``: how many ``StepTrace`` s ``engine.steps`` keeps (None: all, for a replay
    that builds a ``Run``). ``max_queued``: most requests waiting or running at once.
    ``ready_timeout_s``: how long the build and warm-up may take before ``WorkerError``.
    """

    modes: tuple[str, ...] = ("serial", "chunked")  # a subclass runs its own

    def __init__(self, model, mode: str = "serial", config: EngineConfig | None = None, *,
                 split: SplitConfig | None = None, parts: EngineParts | None = None,
                 keep_steps: int | None = 10_000, max_queued: int = MAX_QUEUED, ready_timeout_s: float = 600.0):
        if mode not in self.modes:
            raise ModeError(f"{type(self).__name__} runs mode {' or '.join(map(repr, self.modes))}, not {mode!r}; "
                            "splitlab.online_engine(model, mode, ...) builds the engine of every mode")
        self.split = split if split is not None else SplitConfig()
        self._given_parts = parts  # an engine built (and warmed) by the caller: this one steps it
        config = config if config is not None else EngineConfig()
        if not isinstance(config, EngineConfig):
            raise ConfigError(f"config must be a splitlab.config.EngineConfig, got {type(config).__name__}")
        if not hasattr(model, "facts") or not hasattr(model, "model"):
            raise ConfigError(f"model must be a LoadedModel (splitlab.load_model), got {model!r}")
        model.require_engine_support(mode)
        self.mode, self.config, self.model = mode, config, model
        self.keep_steps, self.max_queued = keep_steps, int(max_queued)
        self.vocab_size = int(model.facts.vocab_size)
        self._cv = threading.Condition()
        self._inbox: list[OnlineSeq] = []
        self._cancels: set[int] = set()
        self._pending: list[tuple[float, int, OnlineSeq]] = []  # future arrivals, a heap
        self._active: dict[int, OnlineSeq] = {}
        self._ids = itertools.count()
        self._closing = self._abort = False
        self._failure: BaseException | None = None
        self._failure_text = ""
        self._ready = threading.Event()
        self.t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._main, name=f"splitlab-online-{mode}", daemon=True)
        self._thread.start()
        if not self._ready.wait(ready_timeout_s):
            self.close(timeout=5.0)
            raise WorkerError(f"the online engine did not get ready within {ready_timeout_s:g} s (build and warm-up)")
        if self._failure is not None:
            self._thread.join(5.0)
            if isinstance(self._failure, SplitlabError):
                raise self._failure
            raise WorkerError(f"the online engine failed to start: {self._failure_text}") from self._failure

    # ---- facts ------------------------------------------------------------------------------
    def clock(self) -> float:
        """Seconds since the engine became ready (the time base of every trace)."""
        return time.perf_counter() - self.t0

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._failure is None and self._ready.is_set()

    @property
    def max_seq_len(self) -> int:
        return self.parts.max_seq_len

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return tuple(self.parts.runner.arch.get("eos_token_ids") or ())

    @property
    def steps(self):
        return self.worker.steps

    def stats(self) -> dict[str, Any]:
        """What the loop holds now (read without stopping it): queue depth (arrived or future
        requests without a KV slot), prompts under way, the running batch, KV slots in use."""
        sch, alloc = self.scheduler, self.parts.allocator
        return {"waiting": len(sch.waiting) + len(self._pending) + len(self._inbox),
                "prefilling": len(sch.prefilling), "running": len(sch.running),
                "kv_slots_in_use": alloc.capacity - alloc.num_free, "kv_slots": alloc.capacity,
                "active": len(self._active), "alive": self.alive}

    # ---- the caller's side -----------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], max_tokens: int, *, sampling: SamplingParams | None = None,
               ignore_eos: bool = False, min_tokens: int = 0, stop_ids: Iterable[int] = (),
               arrival_s: float | None = None, request_id: int | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue one request; return its handle at once. ``arrival_s``: engine-clock time it
        arrives (None: now). ``request_id``: its id (None: the next free one; ids of requests
        in flight must differ). ``loop``: the asyncio loop that will ``async for`` the handle.
        Bad input raises ``WorkloadError`` / ``ConfigError``; a full engine ``EngineBusyError``;
        a closed or failed one ``WorkerError``."""
        rid = next(self._ids) if request_id is None else request_id
        request, sampling, stops = checked_request(prompt_ids, max_tokens, rid, self._limits(), sampling=sampling,
                                                   ignore_eos=ignore_eos, min_tokens=min_tokens, stop_ids=stop_ids)
        arrival = self.clock() if arrival_s is None else float(arrival_s)
        trace = RequestTrace(id=request.id, arrival_s=arrival, prompt_len=request.prompt_len,
                             max_new_tokens=request.max_new_tokens, worker=self.mode)
        handle = RequestHandle(request, trace, loop)
        seq = OnlineSeq(request, trace, handle=handle, params=sampling, ignore_eos=ignore_eos, min_tokens=min_tokens,
                        stop_ids=stops, eos_ids=frozenset(self.eos_ids),
                        generator=request_generator(sampling, self.parts.runner.device))
        with self._cv:
            self._check_open()
            if len(self._inbox) + len(self._active) >= self.max_queued:
                raise EngineBusyError(f"the engine holds {self.max_queued} requests (max_queued); retry later")
            if any(s.id == rid for s in self._inbox) or rid in self._active:
                raise WorkloadError(f"request id {rid} is already in flight; give each request its own id")
            self._inbox.append(seq)
            self._cv.notify()
        return handle

    def _limits(self) -> RequestLimits:
        """What a request must fit: on a paged pool the pages the scheduler will ask for (one
        of them headroom when it grows sequences page by page)."""
        alloc = self.parts.allocator
        block = getattr(alloc, "block_size", None)
        return RequestLimits(self.vocab_size, self.max_seq_len, block, alloc.capacity if block else None,
                             int(self.scheduler.reserve == "grow"))

    def _check_open(self) -> None:
        if self._failure is not None:
            raise WorkerError(f"the online engine failed: {self._failure_text}")
        if self._closing or not self._thread.is_alive():
            raise WorkerError("the online engine is closed; make a new one")

    def cancel(self, handle: RequestHandle, wait: bool = True, timeout: float = 30.0) -> bool:
        """Stop ``handle``'s request and free its KV slot at the next step boundary (its last
        delta says ``abort``). ``wait``: return once that happened. False if it had ended."""
        if handle.done:
            return False
        with self._cv:
            self._cancels.add(handle.id)
            self._cv.notify()
        if wait and threading.current_thread() is not self._thread:
            handle.wait(timeout)
        return True

    def close(self, abort: bool = True, timeout: float = 30.0, wait: bool = True) -> None:
        """Stop the engine thread. ``abort``: end every request in flight (``abort``); else
        take no new request and finish those in flight first. ``wait``: return once the
        thread ended (``WorkerError`` after ``timeout`` seconds). Idempotent."""
        with self._cv:
            self._closing = True
            self._abort = self._abort or abort
            self._cv.notify()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise WorkerError(f"the online engine thread did not stop within {timeout:g} s")

    def __enter__(self) -> "OnlineEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the engine thread -----------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._build()
        except BaseException as exc:  # noqa: BLE001 - raised by the constructor's thread
            self._failure, self._failure_text = exc, f"{type(exc).__name__}: {exc}"
            self._ready.set()
            return
        self.t0 = time.perf_counter()
        self._ready.set()
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - reported to every request and to submit
            self._fail(exc)
        finally:
            self._end_all()

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure, self._failure_text = exc, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"

    def _build(self) -> None:
        """KV pool, runner, allocator, warm-up, scheduler, worker; over ``parts`` when given
        (a fresh allocator, and one short prompt so this thread's library handles exist)."""
        config = self.config
        if self._given_parts is None:
            self.parts = build_engine(self.model, config)
            if config.warmup:
                warm_up(self.parts.runner, token_budget=config.token_budget)
        else:
            given = self._given_parts
            self.parts = dataclasses.replace(given, allocator=new_allocator(given.kv, config))
            self.parts.runner.prefill([warm_chunk(given.kv, 4)])
        runner = self.parts.runner
        self.scheduler = Scheduler(self.mode, self.parts.allocator, runner.max_batch, config.token_budget,
                                   config.chunk_size)
        self.worker = self._worker(self.mode, runner, self.scheduler)

    def _worker(self, name: str, runner, scheduler: Scheduler) -> "OnlineWorker":
        worker = OnlineWorker(name, runner, scheduler, self.clock)
        if self.keep_steps is not None:
            worker.steps = collections.deque(maxlen=self.keep_steps)
        return worker

    def _serve(self) -> None:
        while True:
            with self._cv:
                self._take_inbox()
                ready = self._await_work(busy=bool(self._active))
            if ready is None:
                return
            if not ready:
                continue
            outcome = self._step(self.worker)
            if outcome is not None:
                self._publish(self._batch_seqs(self.worker))
            elif self.worker.last_batch is None:
                raise WorkerError("the scheduler has work but scheduled nothing (no KV slot can ever free)")

    def _step(self, worker: "OnlineWorker"):
        """One step of ``worker``; a failing step fails only its batch's requests (the engine
        stops after ``MAX_FAILED_STEPS`` in a row). None when it failed or had nothing to run."""
        worker.last_batch = None
        try:
            outcome = worker.step()
            if outcome is not None and worker.fault is not None:
                worker.steps_done += 1
                worker.fault(worker.steps_done)
        except Exception as exc:  # noqa: BLE001 - fails this step's requests only
            worker.failed_steps = getattr(worker, "failed_steps", 0) + 1
            self._fail_batch(exc, worker)
            if worker.failed_steps >= MAX_FAILED_STEPS:  # the engine's failure names the worker, as each request's does
                raise WorkerError(f"worker {worker.name} failed: {type(exc).__name__}: {exc}") from exc
            return None
        worker.failed_steps = 0
        return outcome

    @staticmethod
    def _batch_seqs(worker: "OnlineWorker") -> list[OnlineSeq]:
        batch = worker.last_batch
        return [] if batch is None else list(batch.decode) + [c.seq for c in batch.chunks]

    def _take_inbox(self) -> None:
        """Under the lock: new requests in, cancels and a closing abort applied."""
        for seq in self._inbox:
            self._active[seq.id] = seq
            heapq.heappush(self._pending, (seq.trace.arrival_s, seq.id, seq))
        self._inbox.clear()
        cancels = list(self._active) if (self._closing and self._abort) else list(self._cancels)
        for rid in cancels:
            seq = self._active.get(rid)
            if seq is not None and self._owns(seq):
                self._drop(seq, Delta((), (), "abort"))
            if seq is None or self._owns(seq):
                self._cancels.discard(rid)

    def _owns(self, seq: OnlineSeq) -> bool:
        """Whether the calling loop may drop ``seq`` now (one loop owns every request here)."""
        return True

    def _await_work(self, busy: bool) -> bool | None:
        """Under the lock, the inbox taken: None when the engine closes and aborts or has
        nothing ``busy`` left (the loop ends); else the arrived requests admitted, then False
        after waiting (until the next arrival or a notify) when the scheduler has no work, True
        when it has (the loop steps)."""
        if self._closing and (self._abort or not busy):
            return None
        wait = self._admit_arrived()
        if not self.scheduler.has_work():
            self._cv.wait(wait)
            return False
        return True

    def _admit_arrived(self) -> float | None:
        """Arrived requests to the scheduler; seconds until the next future one (None: none)."""
        now = self.clock()
        while self._pending and (self._pending[0][0] <= now or self._pending[0][2].cancelled):
            _, _, seq = heapq.heappop(self._pending)
            if seq.cancelled:
                continue
            try:
                self.scheduler.add(seq)
            except SplitlabError as exc:  # a request the pool can never hold: it alone fails
                self._active.pop(seq.id, None)
                seq.handle._deliver(Delta((), (), "error", str(exc)))
        return max(0.0, self._pending[0][0] - now) if self._pending else None

    def _drop(self, seq: OnlineSeq, final: Delta, scheduler: Scheduler | None = None) -> None:
        """Under the lock: take ``seq`` out of every queue, free its KV (``scheduler``: the one
        that holds it), end its handle with ``final``."""
        seq.cancelled = True
        if any(entry[2] is seq for entry in self._pending):
            self._pending = [entry for entry in self._pending if entry[2] is not seq]
            heapq.heapify(self._pending)
        (scheduler or self.scheduler).drop(seq)  # out of its queues, its KV (slot or pages) freed
        self._active.pop(seq.id, None)
        self._cancels.discard(seq.id)
        seq.handle._deliver(final)

    def _publish(self, seqs: Iterable[OnlineSeq]) -> None:
        """The new tokens of ``seqs`` to their handles; finished ones end (their KV is free)."""
        for seq in seqs:  # once per request per step: kept lean
            trace, sent = seq.trace, seq.sent
            n = len(trace.output_ids)
            if n == sent or seq.cancelled:
                continue
            seq.sent = n
            reason = None
            if n >= seq.request.max_new_tokens or seq.stopped:
                reason = "stop" if seq.stopped else "length"
                with self._cv:
                    self._active.pop(seq.id, None)
                    self._cancels.discard(seq.id)
            seq.handle._deliver(Delta(tuple(trace.output_ids[sent:]), tuple(trace.token_times_s[sent:]), reason))

    def _fail_batch(self, exc: BaseException, worker: "OnlineWorker") -> None:
        text = f"worker {worker.name} failed: {type(exc).__name__}: {exc}"
        with self._cv:
            for seq in self._batch_seqs(worker):
                if seq.id in self._active:
                    self._drop(seq, Delta((), (), "error", text), worker.scheduler)

    def _end_all(self) -> None:
        """Every loop has ended: every request still held gets its last delta."""
        with self._cv:
            self._closing = True
            self._take_inbox()
            reason, text = ("error", f"the online engine failed: {self._failure_text}") \
                if self._failure is not None else ("abort", None)
            for seq in list(self._active.values()):
                try:
                    for scheduler in self._schedulers():
                        scheduler.drop(seq)  # frees its KV wherever it is (a no-op where it is not)
                except Exception:  # noqa: BLE001 - a broken queue must not keep other handles waiting
                    pass
                self._active.pop(seq.id, None)
                seq.handle._deliver(Delta((), (), reason, text))
            self._cancels.clear()

    def _schedulers(self) -> list[Scheduler]:
        return [self.scheduler]
