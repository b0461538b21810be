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

This module is the children's start-up (``prefill_setup`` / ``decode_setup``, ``Setup``) and
their end (``say_bye``, ``Bye``); what they run in between is the online engine's loop
(``splitlab.modes.split.online_processes``): there is no second, offline one. A
``ProcessSplit`` (what a ``SplitSession`` on these backends holds) starts ONE
``OnlineProcessSplit`` and replays every run through it (``splitlab.engine.replay``), as
``ThreadSplit`` does for the thread backends. Per run it asks both children to ``measure``
before (each starts a new device peak) and after (each worker's peak, the prefill child's
scheduler counters: preemptions, prefix-cache hits), and checks that every slot or page came
back to the prefill child's allocator, the pool's only one.

Between the children: ``Setup`` once (prefill -> decode, on the handoff queue); ``Freed``
(slots or page ids and their requests) and, at close, ``Bye`` on the prefill child's inbox.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from typing import Any

import torch

from splitlab.config import EngineConfig, SplitConfig
from splitlab.engine.kv import KVPool, PagedKVPool
from splitlab.engine.loop import build_engine
from splitlab.engine.runner import ModelRunner
from splitlab.engine.warmup import warm_up
from splitlab.errors import WorkerError
from splitlab.modes.common import (Fault, cpu_threads_per_worker, fault_for, mapped_not_owned, total_or_none,
                                   weight_fingerprint, worker_facts)
from splitlab.modes.session import Ready, get_checking_parent
from splitlab.system.env import synchronize

#: seconds a finished run waits for the decode child's last freed slots or pages to reach the
#: prefill child (each is one queue message away)
KV_BACK_S = 30.0

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
class Freed:
    """Slots or page ids the decode child freed, and the requests they were of."""

    slots: tuple[int, ...]
    request_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Bye:
    """The decode child let go of the prefill child's memory."""


# ---- the children's start and end ----------------------------------------------------------------

def prefill_setup(channel, model_args: dict[str, Any], config: EngineConfig, handoff_q):
    """The prefill child's start-up: load the model, build the engine, share its weights and
    KV pool with the decode child (``Setup``), warm up; the engine's parts and the ``Ready``
    to send (its facts carry the model's EOS ids)."""
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


# ---- the parent side -----------------------------------------------------------------------------

class ProcessSplit:
    """The two children of ``processes`` / ``mps`` (and the MPS daemon), up between runs: one
    ``OnlineProcessSplit`` that every run replays through (see the module docstring)."""

    streams = (None, None)
    green = None

    def __init__(self, model, config: EngineConfig, split: SplitConfig, faults: tuple[Fault, ...] = ()):
        from splitlab.modes.split.online_processes import OnlineProcessSplit
        from splitlab.workload import MAX_REQUESTS

        self.split = split
        self.label = f"split {split.backend}"
        # every step is kept (a run's steps are its record); forget_steps drops the last run's
        self.online = OnlineProcessSplit(model, config, split=split, keep_steps=None, max_queued=MAX_REQUESTS,
                                         ready_timeout_s=split.ready_timeout_s,
                                         faults={name: fault_for(faults, name) for name in ("prefill", "decode")})

    @property
    def mps(self) -> dict[str, Any] | None:
        return self.online.mps

    @property
    def pids(self) -> dict[str, int]:
        return self.online.pids

    @property
    def children(self) -> dict[str, dict[str, Any]]:
        """Each worker process: ``{"pid", "tmpdir", "exitcode"}``, kept after ``close()``."""
        return self.online.children

    def facts(self) -> dict[str, dict[str, Any]]:
        """Each worker's ``worker_facts`` (and what its set-up measured)."""
        return self.online.facts()["workers"]

    def run(self, workload, progress: bool = True):
        """``(traces, steps, memory)`` of one run of ``workload``: a replay through the online
        engine, measured by both children. A run that fails closes the engine (and the session)."""
        from splitlab.engine.replay import counters_since, replay

        online, names = self.online, ("prefill", "decode")
        if not online.alive:
            raise WorkerError(f"this {self.label} session is closed (a run failed or close() was called); "
                              "start a new one")
        try:
            online.forget_steps()
            before = online.measure(names)  # each child starts a new peak: this run's
            traces, steps = replay(online, workload, progress=progress, desc=self.label,
                                   stall_timeout_s=self.split.stall_timeout_s)
            unreleased = online.wait_released(KV_BACK_S)
            after = online.measure(names)
        except BaseException as exc:
            error = online.error  # what failed the engine (a child's error or death, a stall)
            online.close(abort=True)
            if isinstance(exc, WorkerError) and isinstance(error, WorkerError) and error is not exc:
                raise WorkerError(str(error)) from exc  # the child's own words, not "requests unfinished"
            raise
        held = after["prefill"].kv_in_use
        if unreleased or held:  # every request ended, so every slot or page must be back
            online.close(abort=True)
            raise WorkerError(f"{self.label}: {held} KV slots or pages were still held ({unreleased} requests not "
                              "reported free) after the run ended (a leak in the split engine; please report it)")
        for t in traces:
            t.worker = "split"
        peaks = {name: after[name].peak_bytes for name in names}
        counters = counters_since(before["prefill"].counters, after["prefill"].counters)  # the allocating side's
        if "prefix_blocks_queried" in counters:  # this run's rate, not the session's
            queried = counters["prefix_blocks_queried"]
            counters["prefix_hit_rate"] = counters["prefix_blocks_hit"] / queried if queried else None
        return traces, steps, {"peak_bytes": total_or_none(peaks.values()), "per_worker": peaks, **counters}

    def close(self) -> None:
        self.online.close(abort=True)
