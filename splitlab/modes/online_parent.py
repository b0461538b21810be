"""The parent side of the process-backed online engines: ``ChildEngine``, what
``OnlineProcessSplit`` and ``OnlineReplicas`` share.

The parent loads nothing and runs no step. ``submit`` checks a request as the in-process
``OnlineEngine`` does (the same errors), makes its ``RequestHandle`` and sends a ``Submit``
to the child the subclass picks; ``cancel`` sends a ``Cancel`` to the child the subclass
names. One reader thread takes the children's events from the ``ProcessGroup``: each
``Tokens`` message becomes one ``Delta`` per request (applied in token order: a request's
first token and its later ones come from two children), its steps are kept, its
``WorkerState`` is what ``stats()`` sums; a ``Measured`` (the answer to ``measure()``) is
kept for the caller who asked. A child that fails or dies (the group's
``WorkerError``) fails every open handle with finish reason ``error`` and a message that
names it; the session is then closed. ``close`` aborts (or drains) what is open, then
closes the ``ProcessSession`` (children asked to finish in order, then stopped, MPS daemon
and queues released).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from typing import Any, Iterable, Sequence

from splitlab.config import EngineConfig
from splitlab.engine.handles import Delta, RequestHandle, RequestLimits, checked_request
from splitlab.engine.online import MAX_QUEUED, EngineBusyError
from splitlab.engine.sampling import SamplingParams
from splitlab.errors import ConfigError, WorkerError, WorkloadError
from splitlab.measure.metrics import RequestTrace
from splitlab.modes.online_child import Cancel, Measure, Measured, RequestDelta, Submit, Tokens, WorkerState
from splitlab.modes.session import Go, OnSession, ProcessSession


class ChildEngine(OnSession):
    """An online engine whose steps run in child processes; see the module docstring.
    Subclasses start ``self.session`` and call ``_start``, and say where messages go
    (``_target``, ``_send``)."""

    mode = ""
    #: a request's pages (a paged pool) plus this much headroom must fit one pool
    page_headroom = 0

    def _setup(self, model, config: EngineConfig | None, keep_steps: int | None, max_queued: int) -> EngineConfig:
        config = config if config is not None else EngineConfig()
        if not isinstance(config, EngineConfig):
            raise ConfigError(f"config must be a splitlab.config.EngineConfig, got {type(config).__name__}")
        if not hasattr(model, "facts") or not hasattr(model, "model"):
            raise ConfigError(f"model must be a LoadedModel (splitlab.load_model), got {model!r}")
        self.model, self.config = model, config
        self.keep_steps, self.max_queued = keep_steps, int(max_queued or MAX_QUEUED)
        self.vocab_size = int(model.facts.vocab_size)
        self.session: ProcessSession | None = None
        self._cv = threading.Condition()
        self._handles: dict[int, RequestHandle] = {}
        self._unreleased: set[int] = set()  # requests whose KV no child reported free yet
        self._early: dict[int, list[RequestDelta]] = collections.defaultdict(list)
        self._owner: dict[int, str] = {}
        self._sent: collections.Counter = collections.Counter()  # Submits sent, per child
        self._state: dict[str, WorkerState] = {}
        self._steps: dict[str, collections.deque] = {}
        self._ids = itertools.count()
        self._closing = self._stop_reader = self._abort_now = False
        self._failure: str | None = None
        self.error: BaseException | None = None  # what failed the engine (the group's WorkerError, a stall)
        self._measured: dict[str, Measured] = {}
        self._measures = itertools.count(1)
        self._reader: threading.Thread | None = None
        self._closer: threading.Thread | None = None
        self.t0 = time.perf_counter()
        return config

    def _start_or_close(self, owner: str, names: Sequence[str]) -> None:
        """``_start`` from ``owner``'s Ready facts; a failure closes the session it started."""
        try:
            self._start(self.session.ready[owner].facts, names)
        except BaseException:
            self.session.close(graceful=False)
            raise

    @property
    def mps(self):
        """What the MPS daemon reported (an MPS backend), else None."""
        return self.session.mps

    def _start(self, facts: dict[str, Any], names: Sequence[str]) -> None:
        """The children are Ready (``facts``: the one owning a pool; ``names``: all): one
        clock for all, then the reader thread."""
        self.max_seq_len = int(facts["max_seq_len"])
        self.eos_ids = tuple(facts.get("eos_token_ids") or ())
        self._block = facts.get("kv_block_size")
        self._pool = facts["num_pages"] if self._block is not None else facts["num_slots"]
        for name in names:
            self._steps[name] = collections.deque(maxlen=self.keep_steps)
        self.t0 = time.perf_counter()
        for name in names:
            self.session.group.send(name, Go(0, self.t0))
        self._reader = threading.Thread(target=self._read, name=f"splitlab-online-{self.mode}-reader", daemon=True)
        self._reader.start()

    # ---- facts --------------------------------------------------------------------------------
    def clock(self) -> float:
        """Seconds since the engine became ready (the children share this clock)."""
        return time.perf_counter() - self.t0

    @property
    def alive(self) -> bool:
        return (self._failure is None and not self._closing and self._reader is not None
                and self._reader.is_alive())

    @property
    def _failure_text(self) -> str:
        """Why the engine stopped ("" while it did not fail): what ``replay`` reports."""
        return self._failure or ""

    def facts(self) -> dict[str, Any]:
        """What it runs with: each child's ``Ready`` facts (its runner's settings and what its
        start-up measured) and the MPS daemon's clients (None without MPS)."""
        ready = self.session.ready if self.session is not None else {}
        return {"mode": self.mode, "workers": {name: dict(r.facts) for name, r in ready.items()},
                "mps": self.session.mps if self.session is not None else None}

    @property
    def steps(self):
        with self._cv:
            return sorted((s for d in self._steps.values() for s in d), key=lambda s: s.start_s)

    def forget_steps(self) -> None:
        """Drop the steps kept so far (a session starting its next run: they are the last one's)."""
        with self._cv:
            for kept in self._steps.values():
                kept.clear()

    def measure(self, names: Sequence[str], timeout_s: float = 30.0) -> dict[str, Measured]:
        """Each of ``names``' ``Measured``, asked for now (a ``Measure`` on its channel; only
        children that answer it: the split's). Each child starts a new peak after answering."""
        with self._cv:
            self._check_open()
            token = next(self._measures)
            for name in names:
                self.session.group.send(name, Measure(token))
            deadline = time.monotonic() + timeout_s
            while any(getattr(self._measured.get(n), "token", None) != token for n in names):
                if self._failure is not None:
                    raise WorkerError(f"the online {self.mode} engine failed: {self._failure}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WorkerError(f"workers {list(names)} did not report their measures within "
                                      f"{timeout_s:g} s (hung?); close the engine")
                self._cv.wait(min(left, 0.2))
            return {n: self._measured[n] for n in names}

    def wait_released(self, timeout_s: float) -> int:
        """Wait (at most ``timeout_s``) until a child reported the KV of every ended request
        free; the number of requests still not reported."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._unreleased and self._failure is None and time.monotonic() < deadline:
                self._cv.wait(min(0.2, max(0.0, deadline - time.monotonic())))
            return len(self._unreleased)

    def stats(self) -> dict[str, Any]:
        """Summed over the children, as each last reported (a few ms old at most)."""
        with self._cv:
            states = list(self._state.values())
            in_transit = sum(max(0, n - self._state.get(w, WorkerState()).seen) for w, n in self._sent.items())
            active = len(self._handles)
        owned = [s for s in states if s.kv_total is not None]
        return {"waiting": sum(s.waiting for s in states) + in_transit,
                "prefilling": sum(s.prefilling for s in states), "running": sum(s.running for s in states),
                "kv_slots_in_use": sum(s.kv_in_use for s in owned), "kv_slots": sum(s.kv_total for s in owned),
                "active": active, "alive": self.alive}

    # ---- the caller's side --------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], max_tokens: int, *, sampling: SamplingParams | None = None,
               ignore_eos: bool = False, min_tokens: int = 0, stop_ids: Iterable[int] = (),
               arrival_s: float | None = None, request_id: int | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """As ``OnlineEngine.submit``: queue one request, return its handle at once."""
        rid = next(self._ids) if request_id is None else request_id
        limits = RequestLimits(self.vocab_size, self.max_seq_len, self._block,
                               self._pool if self._block is not None else None, self.page_headroom)
        request, sampling, stops = checked_request(prompt_ids, max_tokens, rid, limits, sampling=sampling,
                                                   ignore_eos=ignore_eos, min_tokens=min_tokens, stop_ids=stop_ids)
        arrival = self.clock() if arrival_s is None else float(arrival_s)
        trace = RequestTrace(id=request.id, arrival_s=arrival, prompt_len=request.prompt_len,
                             max_new_tokens=request.max_new_tokens, worker=self.mode)
        handle = RequestHandle(request, trace, loop)
        msg = Submit(request, arrival, sampling, ignore_eos, min_tokens, tuple(sorted(set(stops))))
        with self._cv:
            self._check_open()
            if len(self._handles) >= self.max_queued:
                raise EngineBusyError(f"the engine holds {self.max_queued} requests (max_queued); retry later")
            if rid in self._handles:
                raise WorkloadError(f"request id {rid} is already in flight; give each request its own id")
            target = self._target(rid)
            self._handles[rid] = handle
            self._unreleased.add(rid)
            self._owner[rid] = target
            self._sent[target] += 1
            self._send(target, msg)
        return handle

    def _check_open(self) -> None:
        if self._failure is not None:
            raise WorkerError(f"the online engine failed: {self._failure}")
        if self._closing or self._reader is None or not self._reader.is_alive():
            raise WorkerError("the online engine is closed; make a new one")

    def cancel(self, handle: RequestHandle, wait: bool = True, timeout: float = 30.0) -> bool:
        """Stop ``handle``'s request and free its KV (its last delta says ``abort``). ``wait``:
        return once the child that held it reported its KV free. False if it had ended."""
        rid = handle.id
        with self._cv:
            if handle.done or self._handles.get(rid) is not handle:
                return False
            if self.alive:
                self._send(self._cancel_target(rid), Cancel(rid))
        if wait:
            deadline = time.monotonic() + timeout
            with self._cv:
                while not (handle.done and rid not in self._unreleased) and self._failure is None:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._cv.wait(min(left, 0.2)) and not self.alive:
                        break
        return True

    def close(self, abort: bool = True, timeout: float = 30.0, wait: bool = True) -> None:
        """End every request in flight (``abort``; else let them finish, for at most
        ``timeout`` s), then stop every child. ``wait``: return once they are gone. Idempotent."""
        with self._cv:
            self._abort_now = self._abort_now or abort
            if self._closer is None:
                self._closing = True
                self._closer = threading.Thread(target=self._shut_down, args=(timeout,), daemon=True,
                                                name=f"splitlab-online-{self.mode}-close")
                self._closer.start()
            self._cv.notify_all()
        if wait and threading.current_thread() is not self._closer:
            self._closer.join(timeout + 30.0)
            if self._closer.is_alive():
                raise WorkerError(f"the online {self.mode} engine did not stop within {timeout + 30.0:g} s")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- subclasses -----------------------------------------------------------------------------
    def _target(self, rid: int) -> str:
        raise NotImplementedError

    def _cancel_target(self, rid: int) -> str:
        return self._owner[rid]

    def _send(self, target: str, msg: Any) -> None:
        self.session.group.send(target, msg)

    def _wake_to_close(self) -> None:
        """Ask children blocked on something else than their channel to look at it now."""

    def _closed(self) -> None:
        """The session is closed: drop what still refers to its queues."""

    # ---- the reader thread ------------------------------------------------------------------------
    def _read(self) -> None:
        group, stall_s = self.session.group, self.session.stall_timeout_s
        checked = heard = time.monotonic()
        try:
            while not self._stop_reader:
                event = group.next_event(timeout=0.1)
                now = time.monotonic()
                if now - checked > 0.5:  # a steady stream of events skips next_event's check
                    group._check_alive()
                    checked = now
                if event is None:
                    if now - heard > stall_s and self._arrived_open():
                        raise WorkerError(f"no worker reported anything for {stall_s:g} s while requests were in "
                                          "flight (a hung worker); stopped the workers")
                    continue
                heard = now
                name, payload = event
                if isinstance(payload, Tokens):
                    self._apply(payload)
                elif isinstance(payload, Measured):
                    with self._cv:
                        self._measured[name] = payload
                        self._cv.notify_all()
                elif not self._closing:
                    raise WorkerError(f"worker {name} sent {payload!r} while the online engine ran")
        except BaseException as exc:  # noqa: BLE001 - every open handle learns it
            if not self._stop_reader:
                self.error = exc
                self._fail(f"{type(exc).__name__}: {exc}")

    def _arrived_open(self) -> bool:
        now = self.clock()
        with self._cv:
            return any(h.trace.arrival_s <= now for h in self._handles.values())

    def _apply(self, msg: Tokens) -> None:
        with self._cv:
            self._state[msg.worker] = msg.state
            self._steps[msg.worker].extend(msg.steps)
            self._unreleased.difference_update(msg.released)
            for d in msg.deltas:
                self._early[d.request_id].append(d)
                self._deliver_ready(d.request_id)
            self._cv.notify_all()

    def _deliver_ready(self, rid: int) -> None:
        """Under the lock: ``rid``'s deltas that continue its output, in order."""
        handle, early = self._handles.get(rid), self._early[rid]
        while handle is not None:
            d = next((d for d in early if d.start == len(handle.trace.output_ids)), None)
            if d is None:
                break
            early.remove(d)
            t = handle.trace
            if d.prefill_s is not None:
                t.prefill_start_s, t.prefill_end_s = d.prefill_s
            t.output_ids.extend(d.token_ids)
            t.token_times_s.extend(d.times_s)
            if d.finish_reason is not None:
                self._end(rid)
            handle._deliver(Delta(d.token_ids, d.times_s, d.finish_reason, d.error))
            if d.finish_reason is not None:
                break
        if handle is None or not early:
            self._early.pop(rid, None)

    def _end(self, rid: int) -> RequestHandle | None:
        self._early.pop(rid, None)
        self._owner.pop(rid, None)
        return self._handles.pop(rid, None)

    def _end_all(self, reason: str, text: str | None) -> None:
        with self._cv:
            for rid in list(self._handles):
                self._end(rid)._deliver(Delta((), (), reason, text))
            self._unreleased.clear()
            self._cv.notify_all()

    def _fail(self, text: str) -> None:
        with self._cv:
            if self._failure is None:
                self._failure = text
        self._end_all("error", f"the online {self.mode} engine failed: {text}")
        self.close(wait=False)  # the other children are stopped

    def _shut_down(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cv:  # a drain: the reader delivers what is in flight
            while self._handles and not self._abort_now and self._failure is None:
                if not self._cv.wait(min(0.2, max(0.0, deadline - time.monotonic()))) \
                        and time.monotonic() > deadline:
                    break
        self._stop_reader = True
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(5.0)
        self._end_all("abort", None)
        if self.session is not None:
            try:
                self._wake_to_close()
            except Exception:  # noqa: BLE001 - a queue already closed: the children are gone
                pass
            self.session.close(graceful=self._failure is None)
            self._closed()
