"""The ``processes`` and ``mps`` backends of ``split``: two spawned children and their parent.

The PREFILL child owns everything: it loads the model itself by (spec, device, dtype, seed)
(never the parent, which may hold a non-MPS CUDA context, e.g. a notebook), builds the KV
pool and its runner, and sends ``runner.export()``'s weights plus the pool's K and V
tensors to the decode child through a ``torch.multiprocessing`` queue: CUDA IPC handles on
GPU (no copy: the decode child maps the same memory), shared memory on CPU
(``share_memory_()`` first). It keeps them alive until the decode child said ``Bye``.
Memory is one model and one KV pool; the decode child's own allocations are its CUDA
graphs and activations.

The pool is slots or pages (``EngineConfig.kv_block_size``); ``Setup`` carries what the
decode child needs to view the same tensors as the same pool (``max_seq_len``, the block size).

Per run (the children serve several, through ``splitlab.modes.session``): the prefill child
feeds arrivals to its ``PrefillWorker`` and puts each step's ``Handoff`` list on the handoff
queue (a slot, or the page ids of every position the sequence will write); the decode child
batches them and puts the slots or page ids of finished sequences on the freed-slot queue,
which the prefill child drains into its allocator, the only one: the decode child never
allocates. Before each run the prefill child waits until every slot or page of the last one
came back, then starts a fresh allocator. At the end of a run each child sends its requests'
traces and its steps; the parent merges them (the decode child's trace of a request is
complete, a one-token request only has the prefill child's).

Between the children: ``Setup`` once (prefill -> decode), then per run ``Handoffs`` and
``End`` on the handoff queue; ``Freed`` and, at close, ``Bye`` on the freed-slot queue.

The online engine of these backends (``online_processes.py``) starts its children with the
same ``prefill_setup`` / ``decode_setup`` and ends them with the same ``Bye``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import queue
import time
from typing import Any, Callable

import torch

from splitlab.config import EngineConfig, SplitConfig
from splitlab.engine.kv import KVPool, PagedKVPool
from splitlab.engine.loop import DecodeWorker, Handoff, PrefillWorker, build_engine
from splitlab.engine.runner import ModelRunner
from splitlab.engine.warmup import warm_up
from splitlab.modes.common import (Fault, FreedSlots, cpu_threads_per_worker, decode_loop, fault_for, mapped_not_owned,
                                   prefill_loop, total_or_none, weight_fingerprint, worker_facts, worker_model_args)
from splitlab.modes.worker_kv import new_allocator
from splitlab.modes.session import (Arm, OnSession, ProcessSession, Ready, clock_from, get_checking_parent,
                                    serve_runs)
from splitlab.system.env import synchronize

# ---- between the two children --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the decode child builds its runner from: the weights and the KV pool, shared.
    ``block_size`` None: a slot pool; else a paged pool of pages that long, whose sequences
    hold up to ``max_seq_len`` positions (the tensors alone do not say so)."""

    arch: dict[str, Any]
    weights: dict[str, torch.Tensor]
    k: torch.Tensor
    v: torch.Tensor
    max_batch: int
    max_seq_len: int
    block_size: int | None

    def pool(self) -> KVPool | PagedKVPool:
        """The prefill child's pool, as a view of the same tensors."""
        if self.block_size is None:
            return KVPool.from_tensors(self.k, self.v)
        kv = PagedKVPool.from_tensors(self.k, self.v, self.max_seq_len)
        if kv.block_size != self.block_size:
            raise RuntimeError(f"decode worker: KV pages of {kv.block_size} positions, {self.block_size} announced")
        return kv


@dataclasses.dataclass(frozen=True)
class Handoffs:
    run_id: int
    handoffs: tuple[Handoff, ...]


@dataclasses.dataclass(frozen=True)
class End:
    """The prefill child handed over everything of run ``run_id``."""

    run_id: int


@dataclasses.dataclass(frozen=True)
class Freed:
    """Slots or page ids the decode child freed; online, also the requests they were of."""

    slots: tuple[int, ...]
    request_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Bye:
    """The decode child let go of the prefill child's memory."""


# ---- the prefill child ---------------------------------------------------------------------------

class _FreedInbox:
    """The prefill child's end of the freed-slot queue (slots or page ids back, and the decode
    child's Bye)."""

    def __init__(self, q):
        self._q = q
        self.bye = False

    def wait(self, timeout: float) -> list[int]:
        """Slots or pages freed since the last call, waiting up to ``timeout`` for the first (0: look)."""
        out: list[int] = []
        try:
            self._take(self._q.get(timeout=timeout) if timeout > 0 else self._q.get_nowait(), out)
            while True:
                self._take(self._q.get_nowait(), out)
        except queue.Empty:
            pass
        return out

    def _take(self, msg, out: list[int]) -> None:
        if isinstance(msg, Freed):
            out.extend(msg.slots)
        elif isinstance(msg, Bye):
            self.bye = True
        else:
            raise RuntimeError(f"prefill worker: unexpected message on the freed-slot queue: {msg!r}")


def prefill_setup(channel, model_args: dict[str, Any], config: EngineConfig, handoff_q):
    """The prefill child's start-up (offline and online alike): load the model, build the
    engine, share its weights and KV pool with the decode child (``Setup``), warm up; the
    engine's parts and the ``Ready`` to send (its facts carry the model's EOS ids)."""
    from splitlab.models import load_model

    device = torch.device(model_args["device"])
    if device.type == "cpu":
        cpu_threads_per_worker(2)
    started = time.perf_counter()
    loaded = load_model(model_args["spec"], device=device, dtype=model_args["dtype"], seed=model_args["seed"])
    fingerprint = weight_fingerprint(loaded.model)
    parts = build_engine(loaded, config)
    runner, kv = parts.runner, parts.kv
    arch, weights = runner.export()
    if device.type == "cpu":
        kv.share_memory_()
        for t in weights.values():
            t.share_memory_()
    handoff_q.put(Setup(arch, weights, kv.k, kv.v, runner.max_batch, kv.max_seq_len,
                        kv.block_size if kv.paged else None))
    load_s = time.perf_counter() - started
    if config.warmup:
        warm_up(runner, decode=False, token_budget=config.token_budget)
    facts = {**worker_facts(runner, config.warmup), "load_s": load_s, "ready_s": time.perf_counter() - started,
             "eos_token_ids": list(runner.arch.get("eos_token_ids") or ())}
    return parts, Ready(facts, loaded.facts.to_dict(), fingerprint)


def prefill_main(channel, model_args: dict[str, Any], config: EngineConfig, split: SplitConfig, fault: Fault | None,
                 handoff_q, freed_q) -> None:
    parts, ready = prefill_setup(channel, model_args, config, handoff_q)
    runner, kv, device = parts.runner, parts.kv, parts.runner.device
    channel.send(ready)
    kv_ids = {"allocator": parts.allocator}  # this run's; the only allocator of the pool
    inbox = _FreedInbox(freed_q)
    what = "pages" if kv.paged else "slots"

    def every_slot_back(arm: Arm) -> None:
        allocator = kv_ids["allocator"]
        deadline = time.monotonic() + 30.0
        while allocator.num_free < allocator.capacity:  # the last run's slots or pages, before this one starts
            for kv_id in inbox.wait(0.1):
                allocator.free(kv_id)
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefill worker: {allocator.capacity - allocator.num_free} KV {what} never came "
                                   "back from the decode worker")
        kv_ids["allocator"] = new_allocator(kv, config)  # a run's prefix cache and its counts are its own

    def serve(arm: Arm, t0: float, report: Callable[[int], None]):
        clock = clock_from(t0)
        allocator = kv_ids["allocator"]
        worker = PrefillWorker(runner, allocator, config, clock)
        seqs = prefill_loop(worker, allocator, arm.requests, clock,
                            hand_off=lambda pairs: handoff_q.put(Handoffs(arm.run_id, tuple(h for h, _ in pairs))),
                            wait_freed=inbox.wait, on_step=lambda step, outcome: report(outcome.num_new_tokens),
                            stop=_parent_check(channel), fault=fault, poll_s=split.poll_s)
        handoff_q.put(End(arm.run_id))
        return [s.trace for s in seqs.values()], worker.steps, worker.scheduler.counters()

    serve_runs(channel, device, serve, split.event_flush_s, prepare=every_slot_back)
    # The decode child maps our weights and KV: keep them until it let go.
    deadline = time.monotonic() + 60.0
    while not inbox.bye and time.monotonic() < deadline:
        inbox.wait(0.2)
        channel.check_parent()


def _parent_check(channel) -> Callable[[], bool]:
    """A loop's ``stop`` callable for a child: never asks to stop, but raises ``ParentGone``
    (which ends the child) once the parent is gone."""
    def stop() -> bool:
        channel.check_parent()
        return False
    return stop


# ---- the decode child ----------------------------------------------------------------------------

def _receiver(handoff_q, run_id: int):
    """The decode loop's ``receive(timeout)`` over the handoff queue, for run ``run_id``."""
    def receive(timeout: float):
        pairs, ended = [], False
        try:
            item = handoff_q.get(timeout=timeout) if timeout > 0 else handoff_q.get_nowait()
            while True:
                if item.run_id != run_id:
                    raise RuntimeError(f"decode worker: a message of run {item.run_id} during run {run_id}")
                if isinstance(item, End):
                    ended = True
                else:
                    pairs.extend((h, None) for h in item.handoffs)
                item = handoff_q.get_nowait()
        except queue.Empty:
            pass
        return pairs, ended
    return receive


def decode_setup(channel, config: EngineConfig, split: SplitConfig, handoff_q):
    """The decode child's start-up: map the prefill child's weights and KV pool (``Setup``),
    build its runner, warm up (CUDA graphs); the runner and the ``Ready`` to send."""
    started = time.perf_counter()
    setup = get_checking_parent(handoff_q, channel, split.ready_timeout_s,
                                f"worker {channel.name}: no weights and KV pool from the prefill worker")
    if not isinstance(setup, Setup):
        raise RuntimeError(f"decode worker: expected the Setup message first, got {setup!r}")
    kv = setup.pool()
    shared = mapped_not_owned([*setup.weights.values(), kv.k, kv.v], kv.device)
    if kv.device.type == "cpu":
        cpu_threads_per_worker(2)
    runner = ModelRunner.for_config(setup.arch, setup.weights, kv, config, max_batch=setup.max_batch)
    del setup
    graphs = warm_up(runner, prefill=False) if config.warmup else []
    facts = {**worker_facts(runner, config.warmup), "decode_graphs": graphs, "weights_shared": shared,
             "ready_s": time.perf_counter() - started}
    return runner, Ready(facts)


def say_bye(device, freed_q) -> None:
    """The decode child, its runner dropped: let go of the prefill child's memory (CUDA IPC
    mappings / shared memory), then say so (``Bye``)."""
    with contextlib.suppress(Exception):
        synchronize(device)
        gc.collect()
    freed_q.put(Bye())


def decode_main(channel, config: EngineConfig, split: SplitConfig, fault: Fault | None, handoff_q, freed_q) -> None:
    runner, ready = decode_setup(channel, config, split, handoff_q)
    device = runner.device
    channel.send(ready)
    freed = FreedSlots(lambda slots: freed_q.put(Freed(tuple(slots))))

    def serve(arm: Arm, t0: float, report: Callable[[int], None]):
        worker = DecodeWorker(runner, freed, config, clock_from(t0))
        seqs = decode_loop(worker, freed, receive=_receiver(handoff_q, arm.run_id),
                           on_step=lambda step, outcome, seqs: report(outcome.num_new_tokens),
                           stop=_parent_check(channel), fault=fault, poll_s=split.poll_s)
        return [s.trace for s in seqs.values()], worker.steps, {}

    try:
        serve_runs(channel, device, serve, split.event_flush_s)
    finally:
        runner = None  # noqa: F841 - the closure's too: nothing maps the prefill child's memory
        say_bye(device, freed_q)


# ---- the parent side -----------------------------------------------------------------------------

class ProcessSplit(OnSession):
    """The two children of ``processes`` / ``mps`` (and the MPS daemon), up between runs."""

    streams = (None, None)
    green = None

    def __init__(self, model, config: EngineConfig, split: SplitConfig, faults: tuple[Fault, ...] = ()):
        def build(group):
            handoff_q, freed_q = group.queue(), group.queue()  # the group owns them and releases them
            return [
                ("prefill", prefill_main, (worker_model_args(model), config, split, fault_for(faults, "prefill"),
                                           handoff_q, freed_q)),
                ("decode", decode_main, (config, split, fault_for(faults, "decode"), handoff_q, freed_q)),
            ]

        shares = {"prefill": split.prefill_share, "decode": split.decode_share} if split.backend == "mps" else None
        self.session = ProcessSession(
            model, build, label=f"split {split.backend}", owner="prefill",
            how=("the processes / mps backends load the model by (spec, device, dtype, seed) in their own "
                 "process: pass an unmodified model, or use backend='streams'"),
            close_order=["decode", "prefill"],  # the decode child lets go of the shared memory first
            ready_timeout_s=split.ready_timeout_s, stall_timeout_s=split.stall_timeout_s, mps_shares=shares)

    @property
    def mps(self) -> dict[str, Any] | None:
        return self.session.mps

    def facts(self) -> dict[str, dict[str, Any]]:
        """Each worker's ``worker_facts`` (and what its set-up measured)."""
        return {name: dict(ready.facts) for name, ready in self.session.ready.items()}

    def run(self, workload, progress: bool = True):
        """``(traces, steps, memory)`` of one run of ``workload``."""
        done = self.session.run({"prefill": workload.requests, "decode": ()}, workload.total_output_tokens,
                                workload.requests[-1].arrival_s, progress)
        traces = {t.id: t for t in done["prefill"].traces}
        traces.update({t.id: t for t in done["decode"].traces})  # complete where decode had the request
        for t in traces.values():
            t.worker = "split"
        peaks = {name: done[name].peak_bytes for name in ("prefill", "decode")}
        steps = [*done["prefill"].steps, *done["decode"].steps]
        return list(traces.values()), steps, {"peak_bytes": total_or_none(peaks.values()), "per_worker": peaks,
                                              **done["prefill"].counters}  # the allocating side's

    def close(self) -> None:
        self.session.close()
