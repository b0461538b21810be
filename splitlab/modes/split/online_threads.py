"""The ``streams`` and ``green`` split as an online engine: ``splitlab.online_engine(model, "split",
config, split=SplitConfig(backend="streams" | "green", ...))`` returns an ``OnlineSplitEngine``.

It is built by ``ThreadSplit`` exactly as an offline split run is (one KV pool, a prefill runner
and a decode runner with its CUDA graphs, streams or green contexts, the SM lanes of an adaptive
policy), then runs its own two loops: the engine thread prefills and the decode thread decodes,
each on its stream, handing requests over through a queue (see ``OnlineSplitEngine``).
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
from typing import Any

import torch

from splitlab.errors import WorkerError
from splitlab.engine.handles import Delta, OnlineSeq
from splitlab.engine.online import OnlineEngine
from splitlab.engine.scheduler import Scheduler
from splitlab.system.env import synchronize


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
    """``splitlab.online_engine(model, "split", config, split=SplitConfig(backend="streams" | "green"))``:
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

    modes = ("split",)

    def __init__(self, model, mode: str = "split", config=None, *, built=None, faults=None, **kwargs):
        """``built``: a ``ThreadSplit`` to run over (an offline session's; else one is built);
        ``faults``: ``{"prefill" | "decode": Fault}`` injected after a worker's steps (tests)."""
        self._given_built = built
        self._faults = dict(faults or {})
        super().__init__(model, mode, config, **kwargs)

    def _build(self) -> None:
        from splitlab.engine.loop import EngineParts
        from splitlab.modes.split.adaptive import SMController
        from splitlab.modes.split.threads import ThreadSplit
        from splitlab.engine.kv import new_allocator
        from splitlab.engine.warmup import warm_chunk

        config, split = self.config, self.split
        # the split's engine: pool, runners, streams or green contexts, graphs, SM lanes
        self.built = built = self._given_built or ThreadSplit(self.model, config, split)
        built.release_threads()  # this engine's own two threads run the loops
        self.parts = EngineParts(built.kv, built.prefill_runner, new_allocator(built.kv, config), config,
                                 built.kv.max_seq_len)
        allocator = _LockedAllocator(self.parts.allocator)
        self.scheduler = Scheduler("prefill", allocator, built.prefill_runner.max_batch, config.token_budget)
        self.decode_scheduler = Scheduler("decode", allocator, built.decode_runner.max_batch)
        self.worker = self._worker("prefill", built.prefill_runner, self.scheduler)
        self.decode_worker = self._worker("decode", built.decode_runner, self.decode_scheduler)
        self.worker.fault, self.decode_worker.fault = self._faults.get("prefill"), self._faults.get("decode")
        # handed over while the decode batch is full (a paged pool can hold more sequences than
        # the largest graph bucket): they join as others finish
        self._backlog: collections.deque = collections.deque()
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
        from splitlab.engine.warmup import warm_decode_step

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
                    self._backlog.append(item)
                item = self._hand_q.get_nowait()
        except queue.Empty:
            pass
        running, room = self.decode_scheduler.running, self.decode_worker.runner.max_batch
        with self._cv:
            while self._backlog and len(running) < room:
                seq = self._backlog.popleft()
                if not seq.cancelled:
                    self.decode_scheduler.add_running(seq)
        return ended

    def _decode_cancels(self) -> None:
        """Under the lock: cancelled requests of the decode batch dropped (all, on an abort)."""
        abort = self._closing and self._abort
        for seq in [*self.decode_scheduler.running, *self._backlog]:
            if abort or seq.id in self._cancels:
                self._drop(seq, Delta((), (), "abort"), self.decode_scheduler)  # frees its KV at once
        self._backlog = collections.deque(s for s in self._backlog if not s.cancelled)


def _on_stream(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
