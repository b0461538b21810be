"""The online engine: a long-lived engine that takes requests while it runs (what a server needs).

``OnlineEngine(model, mode="serial" | "chunked", config)`` builds the engine the offline modes
build (``build_engine``, ``warm_up``, a ``Scheduler`` of the mode's policy) on ONE background
thread, which then runs the same ``Worker`` step loop (schedule -> run -> postprocess) for as
long as the engine lives. ``mode="split"`` with ``split=SplitConfig(backend=...)``:
``streams`` or ``green`` give an ``OnlineSplitEngine``, the offline split's two-thread engine
(a prefill thread and a decode thread, one KV pool, the SM policy of ``split``);
``processes`` or ``mps`` give ``splitlab.modes.split.online_processes.OnlineProcessSplit``
(the two spawned children). ``mode="replicas"`` gives
``splitlab.modes.online_replicas.OnlineReplicas``. All have the API below.
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
passes ``t``: the offline replay (``engine.loop.drive``) could submit a whole workload this
way and build its ``Run`` from the handles' traces.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import heapq
import itertools
import math
import queue
import secrets
import threading
import time
import traceback
from typing import Any, Iterable, Iterator, Sequence

import torch

from splitlab.config import EngineConfig, SplitConfig
from splitlab.errors import ConfigError, ModeError, SplitlabError, WorkerError, WorkloadError
from splitlab.engine.kv import pages_written
from splitlab.engine.loop import Worker, build_engine
from splitlab.engine.runner import ModelRunner
from splitlab.engine.plan import split_outputs
from splitlab.engine.scheduler import RequestFacts, ScheduledBatch, Scheduler, SeqState
from splitlab.engine.warmup import warm_up
from splitlab.system.env import synchronize
from splitlab.measure.metrics import RequestTrace
from splitlab.workload import Request

MODES = ("serial", "chunked", "split", "replicas")
FINISH_REASONS = ("length", "stop", "abort", "error")
#: Most requests waiting or running at once; beyond it ``submit`` raises EngineBusyError.
MAX_QUEUED = 4096
#: Consecutive failing steps after which the engine stops (each failure fails only its batch).
MAX_FAILED_STEPS = 3


class EngineBusyError(SplitlabError, RuntimeError):
    """The engine holds its most requests (``max_queued``); retry later (a server answers 503)."""


# ---- sampling ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. ``temperature`` 0: greedy (argmax). ``top_k`` 0 (or
    -1): off. ``top_p`` 1: off. ``seed``: the request's own ``torch.Generator`` seed (None: a
    random one), so a seeded request draws the same tokens every time."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        t, p, k, seed = self.temperature, self.top_p, self.top_k, self.seed
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ConfigError(f"temperature must be a finite number >= 0, got {t!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {p!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < -1:
            raise ConfigError(f"top_k must be an integer >= -1 (0 or -1: off), got {k!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        object.__setattr__(self, "top_k", max(0, k))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """The next token from one row of logits (``[vocab]``, fp32; masked ids already -inf).

    Greedy: the argmax. Otherwise HF's order: divide by the temperature, keep the ``top_k``
    largest, then the smallest set of most likely tokens whose probability reaches ``top_p``
    (at least one), and draw from the softmax of what is left with ``generator``.
    """
    if params.greedy:
        return int(torch.argmax(logits))
    x = logits / params.temperature
    if 0 < params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        ascending, order = torch.sort(x)
        drop = ascending.softmax(-1).cumsum(-1) <= 1.0 - params.top_p
        drop[-1] = False  # the most likely token always stays
        x = x.index_fill(0, order[drop], float("-inf"))
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def request_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own generator (None for greedy): seeded by ``params.seed`` or at random."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)


# ---- what the caller holds --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Delta:
    """New tokens of one request from one step (``times_s``: engine clock), or its end:
    ``finish_reason`` is set on the last delta (``length``, ``stop`` (EOS or a stop id),
    ``abort`` (cancelled or the engine closed), ``error`` (``error`` says what))."""

    token_ids: tuple[int, ...]
    times_s: tuple[float, ...]
    finish_reason: str | None = None
    error: str | None = None


class RequestHandle(RequestFacts):
    """One submitted request: iterate it for its ``Delta`` s (``for`` when submitted without
    ``loop``, ``async for`` with one), or wait with ``result()``. ``trace`` is its
    ``RequestTrace``; ``output_ids`` and ``finish_reason`` fill in as it runs."""

    def __init__(self, request: Request, trace: RequestTrace, loop: asyncio.AbstractEventLoop | None = None):
        self.request = request
        self.trace = trace
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._done = threading.Event()
        self._loop = loop
        self._queue: queue.SimpleQueue | None = queue.SimpleQueue() if loop is None else None
        self._aqueue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._iterated = False

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _deliver(self, delta: Delta) -> None:
        """Called on the engine thread: record, then hand over."""
        self.output_ids.extend(delta.token_ids)
        if delta.finish_reason is not None:
            self.finish_reason, self.error = delta.finish_reason, delta.error
        if self._aqueue is not None:
            try:
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, delta)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening
                pass
        else:
            self._queue.put(delta)
        if delta.finish_reason is not None:
            self._done.set()

    def _claim(self, is_async: bool) -> None:
        if (self._aqueue is not None) != is_async:
            how = "async for (it was submitted with loop=...)" if self._aqueue is not None else \
                "a plain for loop (submit with loop=asyncio.get_running_loop() to use async for)"
            raise ConfigError(f"request {self.id}: iterate this handle with {how}")
        if self._iterated:
            raise ConfigError(f"request {self.id}: a handle's deltas can be iterated once")
        self._iterated = True

    def __iter__(self) -> Iterator[Delta]:
        self._claim(False)
        while True:
            delta = self._queue.get()
            yield delta
            if delta.finish_reason is not None:
                return

    async def __aiter__(self):
        self._claim(True)
        while True:
            delta = await self._aqueue.get()
            yield delta
            if delta.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> list[int]:
        """Wait for the end; the output ids. TimeoutError after ``timeout`` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return list(self.output_ids)


# ---- the engine's state of one request -------------------------------------------------------

@dataclasses.dataclass(eq=False)
class OnlineSeq(SeqState):
    """A ``SeqState`` that may end before ``max_new_tokens`` (EOS, a stop id) and picks its
    tokens by its own sampling parameters."""

    handle: RequestHandle | None = None
    params: SamplingParams = GREEDY
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_ids: frozenset = frozenset()
    eos_ids: frozenset = frozenset()
    generator: torch.Generator | None = None
    sent: int = 0  # tokens already delivered to the handle
    cancelled: bool = False
    owner: str = "prefill"  # the loop that holds it (a split engine has two)

    @property
    def finished(self) -> bool:
        out = self.trace.output_ids
        return len(out) >= self.request.max_new_tokens or self.stopped

    @property
    def stopped(self) -> bool:
        """The last token ends the request (a stop id, or EOS unless ``ignore_eos``)."""
        out = self.trace.output_ids
        return bool(out) and (out[-1] in self.stop_ids or (not self.ignore_eos and out[-1] in self.eos_ids))

    @property
    def exact_path(self) -> bool:
        """Greedy with EOS masked throughout and no stop ids: the runner's own greedy path."""
        return (self.params.greedy and not self.stop_ids
                and (self.ignore_eos or self.min_tokens >= self.request.max_new_tokens))

    def suppressed(self) -> list[int]:
        """Token ids the next token may not be (EOS and stop ids before ``min_tokens``)."""
        n = len(self.trace.output_ids)
        ids = set(self.eos_ids) if (self.ignore_eos or n < self.min_tokens) else set()
        if n < self.min_tokens:
            ids |= self.stop_ids
        return sorted(ids)

    def pick(self, logits: torch.Tensor) -> int:
        masked = self.suppressed()
        if masked:
            logits = logits.index_fill(0, torch.tensor(masked, device=logits.device), float("-inf"))
        return sample(logits, self.params, self.generator)


class OnlineWorker(Worker):
    """A ``Worker`` whose steps take the logits path when a row needs it (see the module doc)."""

    last_batch: ScheduledBatch | None = None

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

    def __new__(cls, model=None, mode: str = "serial", *args, split: SplitConfig | None = None,
                replicas: Any = None, **kwargs):
        if cls is not OnlineEngine:
            return super().__new__(cls)
        if mode == "split":
            if split is not None and not isinstance(split, SplitConfig):
                raise ConfigError(f"split must be a splitlab.config.SplitConfig, got {type(split).__name__}")
            if split is not None and split.backend in ("processes", "mps"):  # two spawned children
                from splitlab.modes.split.online_processes import OnlineProcessSplit

                return OnlineProcessSplit(model, *args, split=split, **kwargs)
            return super().__new__(OnlineSplitEngine)  # two threads: streams or green
        if mode == "replicas":
            from splitlab.modes.online_replicas import OnlineReplicas

            return OnlineReplicas(model, *args, replicas=replicas, **kwargs)
        return super().__new__(cls)

    def __init__(self, model, mode: str = "serial", config: EngineConfig | None = None, *,
                 split: SplitConfig | None = None, keep_steps: int | None = 10_000, max_queued: int = MAX_QUEUED,
                 ready_timeout_s: float = 600.0):
        if mode not in MODES:
            raise ModeError(f"the online engine runs modes {', '.join(MODES)}; got {mode!r}")
        self.split = split if split is not None else SplitConfig()
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
        sampling = GREEDY if sampling is None else sampling
        if not isinstance(sampling, SamplingParams):
            raise ConfigError(f"sampling must be a SamplingParams, got {sampling!r}")
        for name, flag in (("ignore_eos", ignore_eos),):
            if not isinstance(flag, bool):
                raise ConfigError(f"{name} must be True or False, got {flag!r}")
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
            raise ConfigError(f"min_tokens must be an integer >= 0, got {min_tokens!r}")
        stops = frozenset(self._check_ids(stop_ids, "stop_ids"))
        rid = next(self._ids) if request_id is None else request_id
        request = Request(rid, prompt_ids, max_tokens)  # checks the ids and lengths
        if min_tokens > request.max_new_tokens:
            raise ConfigError(f"min_tokens ({min_tokens}) must not exceed max_tokens ({request.max_new_tokens})")
        self._check_fits(request)
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

    def _check_ids(self, ids: Iterable[int], what: str) -> list[int]:
        try:
            given = list(ids)
        except TypeError:
            raise ConfigError(f"{what} must be a list of token ids, got {ids!r}") from None
        for i in given:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise ConfigError(f"{what} must be token ids in [0, {self.vocab_size}), got {given!r}")
        return given

    def _check_fits(self, request: Request) -> None:
        top, low = max(request.prompt_ids), min(request.prompt_ids)
        if top >= self.vocab_size or low < 0:
            raise WorkloadError(f"token id {top if top >= self.vocab_size else low} is outside the model's "
                                f"vocabulary [0, {self.vocab_size})")
        need, room = request.prompt_len + request.max_new_tokens, self.max_seq_len
        if need > room:
            raise WorkloadError(f"the request needs {need} positions (prompt {request.prompt_len} + "
                                f"{request.max_new_tokens} new) but the engine's context is {room}; "
                                "shorten the prompt or ask for fewer tokens")
        block = getattr(self.parts.allocator, "block_size", None)
        if block is not None:  # a paged pool: the pages the scheduler will ask for (one of them headroom)
            pages = pages_written(request, block) + (self.scheduler.reserve == "grow")
            if pages > self.parts.allocator.capacity:
                raise WorkloadError(f"the request needs {pages} KV pages of {block} positions but the pool has "
                                    f"{self.parts.allocator.capacity}; shorten the prompt or ask for fewer tokens")

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
            handle._done.wait(timeout)
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
        """The offline modes' engine: KV pool, runner, allocator, warm-up, scheduler, worker."""
        config = self.config
        self.parts = build_engine(self.model, config)
        runner = self.parts.runner
        if config.warmup:
            warm_up(runner, token_budget=config.token_budget)
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
        except Exception as exc:  # noqa: BLE001 - fails this step's requests only
            worker.failed_steps = getattr(worker, "failed_steps", 0) + 1
            self._fail_batch(exc, worker)
            if worker.failed_steps >= MAX_FAILED_STEPS:
                raise
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
        for seq in seqs:
            out = seq.trace.output_ids
            if len(out) == seq.sent or seq.cancelled:
                continue
            new = tuple(out[seq.sent:])
            times = tuple(seq.trace.token_times_s[seq.sent:])
            seq.sent = len(out)
            reason = None
            if seq.finished:
                reason = "stop" if seq.stopped else "length"
                with self._cv:
                    self._active.pop(seq.id, None)
                    self._cancels.discard(seq.id)
            seq.handle._deliver(Delta(new, times, reason))

    def _fail_batch(self, exc: BaseException, worker: "OnlineWorker") -> None:
        text = f"the engine step failed: {type(exc).__name__}: {exc}"
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


# ---- the split engine: a prefill thread and a decode thread ----------------------------------------

class _LockedAllocator:
    """One KV allocator for the two threads of a split engine: every call under one lock."""

    def __init__(self, inner: Any):
        self._inner = inner
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if not callable(value):
            return value

        def locked(*args, **kwargs):
            with self._lock:
                return value(*args, **kwargs)
        return locked


_END = object()


class OnlineSplitEngine(OnlineEngine):
    """``OnlineEngine(model, "split", config, split=SplitConfig(backend="streams" | "green"))``:
    the split of ``modes/split/threads`` as an online engine. A prefill thread (the engine
    thread: arrivals, admission, prompt steps, first tokens) and a decode thread (decode steps
    of everything handed over) over one KV pool and two runners (the decode one owns the CUDA
    graphs), built by ``ThreadSplit`` exactly as for an offline run: on CUDA each thread runs on
    its own stream (decode at the higher priority), on a green context of its own with
    ``backend="green"``; an adaptive ``sm_policy`` picks each step's SM split through the same
    ``SMController`` as offline. A prefilled request is handed over after the host sync that
    returned its first token, and its KV is freed after the decode step that finished it
    returned, so neither stream touches KV the other still uses. Each request belongs to one
    thread at a time, which alone delivers its deltas and drops it on cancel."""

    def _build(self) -> None:
        from splitlab.engine.loop import EngineParts
        from splitlab.modes.split.adaptive import SMController
        from splitlab.modes.split.threads import ThreadSplit
        from splitlab.modes.worker_kv import new_allocator, warm_chunk

        config, split = self.config, self.split
        if getattr(config, "kv_prefix_cache", False):
            raise ConfigError("the online split engine does not share prefix pages; set kv_prefix_cache=False")
        # the offline split's engine: pool, runners, streams or green contexts, graphs, SM lanes
        self.built = built = ThreadSplit(self.model, config, split)
        built.release_threads()  # this engine's own two threads run the loops
        self.parts = EngineParts(built.kv, built.prefill_runner, new_allocator(built.kv, config), config,
                                 built.kv.max_seq_len)
        allocator = _LockedAllocator(self.parts.allocator)
        self.scheduler = Scheduler("prefill", allocator, built.prefill_runner.max_batch, config.token_budget)
        self.decode_scheduler = Scheduler("decode", allocator, built.decode_runner.max_batch)
        self.worker = self._worker("prefill", built.prefill_runner, self.scheduler)
        self.decode_worker = self._worker("decode", built.decode_runner, self.decode_scheduler)
        self.controller = None
        if built.plan is not None:  # an adaptive sm_policy: every step asks where it runs
            self.controller = SMController(built.policy, built.plan, self.clock, split.prefill_layer_group)
            if self.keep_steps is not None:  # a server's decisions would grow without end
                self.controller.decisions = collections.deque(maxlen=self.keep_steps)
            self.worker.placer = self.controller.prefill_placer()
            self.decode_worker.placer = self.controller.decode_placer()
        self._streams = built.streams
        self._hand_q: queue.SimpleQueue = queue.SimpleQueue()
        self._decode_ready = threading.Event()
        self._decode_thread = threading.Thread(target=self._decode_main, name="splitlab-online-decode", daemon=True)
        self._decode_thread.start()
        # one after the other: library handles of this thread, while the other stream is idle
        while not self._decode_ready.wait(0.05):
            if not self._decode_thread.is_alive():
                raise self._failure or WorkerError("the decode thread of the online split engine died")
        try:
            lanes = [lane.stream for lane in built.plan.prefill.values()] if built.plan is not None else []
            for stream in (self._streams[0], *lanes):
                with _on_stream(stream):
                    built.prefill_runner.prefill([warm_chunk(built.kv, 4)])
            synchronize(built.device)
        except BaseException:
            self._hand_q.put(_END)  # the decode thread ends with the failed build
            self._decode_thread.join(30.0)
            raise

    def sm_split(self) -> tuple[int | None, int | None]:
        """(decode SMs, prefill SMs) now: the last decision of an adaptive policy, a static green
        partition, or None (no partition: streams share every SM)."""
        if self.controller is not None and self.controller.decisions:
            _, _, decode, prefill, _ = self.controller.decisions[-1]
            return decode, prefill
        green = self.built.green or {}
        return green.get("decode_sms"), green.get("prefill_sms")

    @property
    def steps(self):
        return sorted([*self.worker.steps, *self.decode_worker.steps], key=lambda s: s.start_s)

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["running"] = len(self.decode_scheduler.running)
        out["decode_sms"], out["prefill_sms"] = self.sm_split()
        return out

    def facts(self) -> dict[str, Any]:
        """What the split runs with: the backend, each worker's runner facts, the SM lanes and
        the policy's decisions so far (an adaptive ``sm_policy``)."""
        green = self.controller.facts() if self.controller is not None else self.built.green
        return {"backend": self.split.backend, "sm_policy": self.split.sm_policy, "green": green,
                "workers": self.built.facts()}

    def _schedulers(self) -> list[Scheduler]:
        return [self.scheduler, self.decode_scheduler]

    def _owns(self, seq: OnlineSeq) -> bool:
        return threading.current_thread() is (self._thread if seq.owner == "prefill" else self._decode_thread)

    # ---- the prefill thread (the engine thread) ---------------------------------------------
    def _serve(self) -> None:
        try:
            with _on_stream(self._streams[0]):
                self._prefill_loop()
        finally:
            with self._cv:
                if self._failure is not None:
                    self._abort = True
            self._hand_q.put(_END)
            self._decode_thread.join()

    def _prefill_loop(self) -> None:
        while True:
            with self._cv:
                self._take_inbox()
                if self._failure is not None:
                    return
                ready = self._await_work(busy=bool(self._pending) or self.scheduler.has_work())
            if ready is None:
                return
            if not ready:
                continue
            outcome = self._step(self.worker)
            if outcome is None:
                if self.worker.last_batch is None:  # every KV slot is held by the decode side
                    with self._cv:
                        self._cv.wait(0.05)
                continue
            self._publish(self._batch_seqs(self.worker))  # first tokens before the handoff
            for seq in outcome.prefilled:
                if not seq.finished and not seq.cancelled:
                    seq.owner = "decode"
                    self._hand_q.put(seq)

    # ---- the decode thread ------------------------------------------------------------------
    def _decode_main(self) -> None:
        from splitlab.modes.worker_kv import warm_decode_step

        try:
            with _on_stream(self._streams[1]):
                warm_decode_step(self.decode_worker.runner)  # graphs were captured by the build
                synchronize(self.built.device)
                self._decode_ready.set()
                self._decode_loop()
        except BaseException as exc:  # noqa: BLE001 - the engine thread reports it
            self._fail(exc)
            with self._cv:
                self._closing = self._abort = True
                self._cv.notify_all()
            if not self._decode_ready.is_set():
                self._decode_ready.set()

    def _decode_loop(self) -> None:
        ended = False
        sch = self.decode_scheduler
        while True:
            ended = self._receive(block=not sch.has_work()) or ended
            with self._cv:
                self._decode_cancels()
            if ended and not sch.has_work():
                return
            if not sch.has_work():
                continue
            outcome = self._step(self.decode_worker)
            if outcome is not None:
                self._publish(self._batch_seqs(self.decode_worker))
            with self._cv:
                self._cv.notify_all()  # KV may have freed: the prefill thread may admit

    def _receive(self, block: bool) -> bool:
        """Handed-over requests into the decode batch; True once the end marker came."""
        ended = False
        try:
            item = self._hand_q.get(timeout=0.05) if block else self._hand_q.get_nowait()
            while True:
                if item is _END:
                    ended = True
                else:
                    with self._cv:
                        self.decode_scheduler.add_running(item)
                item = self._hand_q.get_nowait()
        except queue.Empty:
            pass
        return ended

    def _decode_cancels(self) -> None:
        """Under the lock: cancelled requests of the decode batch dropped (all, on an abort)."""
        abort = self._closing and self._abort
        for seq in list(self.decode_scheduler.running):
            if abort or seq.id in self._cancels:
                self._drop(seq, Delta((), (), "abort"), self.decode_scheduler)


def _on_stream(stream):
    import contextlib

    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
