"""The ``processes`` and ``mps`` backends of ``split``: what the two spawned children run.

The PREFILL child owns everything: it loads the model itself by (spec, device, dtype, seed)
(never the parent, which may hold a non-MPS CUDA context, e.g. a notebook), builds the KV
pool and its runner, and sends ``runner.export()``'s weights plus the pool's K and V
tensors to the decode child through a ``torch.multiprocessing`` queue: CUDA IPC handles on
GPU (no copy: the decode child maps the same memory), shared memory on CPU
(``share_memory_()`` first). It keeps them alive until the decode child said ``bye``.
Memory is one model and one KV pool; the decode child's own allocations are its CUDA
graphs and activations.

Per run (a child serves several; the parent sends ``arm`` then ``go`` with the shared
t0): the prefill child feeds arrivals to its ``PrefillWorker`` and puts each step's
``Handoff`` list on the handoff queue; the decode child batches them and puts the slots of
finished sequences on the freed-slot queue, which the prefill child drains into its
``SlotAllocator``. Both batch their events to the parent: a ``StepTrace`` per step,
prefill timings and first token per request, decode tokens with their times.

Messages: handoff queue (prefill -> decode) ``("setup", {...})`` once, then per run
``("handoffs", run_id, [Handoff, ...])`` and ``("end", run_id)``; freed queue (decode ->
prefill) ``("free", [slot, ...])`` and, at close, ``("bye",)``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import time
from typing import Any

import torch

from splitlab.config import EngineConfig, SplitConfig
from splitlab.engine.kv import KVPool, SlotAllocator
from splitlab.engine.loop import DecodeWorker, PrefillWorker, build_engine
from splitlab.engine.warmup import warm_up
from splitlab.modes.common import (FreedSlots, Outbox, cpu_threads_per_worker, decode_loop, decode_runner, fault_hook, mapped_not_owned, peak_bytes, prefill_loop, reset_peak, runner_facts, step_tuple, weight_fingerprint)


def _get(q, channel, timeout: float, what: str):
    """Block on ``q`` (checking the parent every 0.2 s) for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return q.get(timeout=0.2)
        except queue.Empty:
            channel.check_parent()
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {channel.name}: no {what} within {timeout:.0f} s") from None


def _arm_and_go(channel, run_id: int) -> float:
    channel.send("armed", run_id)
    msg = channel.recv()
    if not (isinstance(msg, tuple) and msg[0] == "go" and msg[1] == run_id):
        raise RuntimeError(f"worker {channel.name}: expected ('go', {run_id}, t0), got {msg!r}")
    return float(msg[2])


def prefill_main(channel, model_args: dict[str, Any], engine_cfg: dict[str, Any], split_cfg: dict[str, Any],
                 handoff_q, freed_q) -> None:
    from splitlab.models import load_model

    config = EngineConfig.from_dict(engine_cfg)
    split = SplitConfig.from_dict(split_cfg)
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
    handoff_q.put(("setup", {"arch": arch, "weights": weights, "k": kv.k, "v": kv.v, "max_batch": runner.max_batch}))
    load_s = time.perf_counter() - started
    if config.warmup:
        warm_up(runner, decode=False, token_budget=config.token_budget)
    channel.send("ready", {"pid": os.getpid(), "fingerprint": fingerprint, "facts": loaded.facts.to_dict(),
                           "load_s": load_s, "ready_s": time.perf_counter() - started, **runner_facts(runner, kv)})
    allocator = SlotAllocator(kv.num_slots)
    bye = [False]

    def take(msg, out: list[int]) -> None:
        if msg[0] == "free":
            out.extend(msg[1])
        elif msg[0] == "bye":
            bye[0] = True
        else:
            raise RuntimeError(f"prefill worker: unexpected message on the freed-slot queue: {msg!r}")

    def wait_freed(timeout: float) -> list[int]:
        out: list[int] = []
        try:
            take(freed_q.get(timeout=timeout) if timeout > 0 else freed_q.get_nowait(), out)
            while True:
                take(freed_q.get_nowait(), out)
        except queue.Empty:
            pass
        return out

    def stop() -> bool:
        channel.check_parent()
        return False

    while True:
        cmd = channel.recv()
        if cmd[0] == "close":
            break
        if cmd[0] != "arm":
            raise RuntimeError(f"prefill worker: unexpected command {cmd!r}")
        _, run_id, workload = cmd
        deadline = time.monotonic() + 30.0
        while allocator.num_free < kv.num_slots:  # every slot back from the last run first
            for slot in wait_freed(0.1):
                allocator.free(slot)
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefill worker: {kv.num_slots - allocator.num_free} KV slots never came back "
                                   "from the decode worker")
        reset_peak(device)
        t0 = _arm_and_go(channel, run_id)

        def clock(t0=t0) -> float:
            return time.perf_counter() - t0

        worker = PrefillWorker(runner, allocator, config, clock)
        outbox = Outbox(channel.send, "steps", split.event_flush_s)

        def hand_off(pairs, run_id=run_id) -> None:
            handoff_q.put(("handoffs", run_id, [h for h, _ in pairs]))

        def on_step(step, outcome, outbox=outbox) -> None:
            outbox.add(("p", step_tuple(step),
                        [(s.id, s.trace.prefill_start_s, s.trace.prefill_end_s, s.trace.output_ids[0])
                         for s in outcome.prefilled]))

        prefill_loop(worker, allocator, workload.requests, clock, hand_off=hand_off, wait_freed=wait_freed,
                     on_step=on_step, stop=stop, fault=fault_hook("prefill"), poll_s=split.poll_s)
        handoff_q.put(("end", run_id))
        outbox.flush()
        channel.send("run_done", {"run": run_id, "peak_bytes": peak_bytes(device), "steps": len(worker.steps)})
    # The decode child maps our weights and KV: keep them until it let go.
    deadline = time.monotonic() + 60.0
    while not bye[0] and time.monotonic() < deadline:
        wait_freed(0.2)
        channel.check_parent()


def decode_main(channel, engine_cfg: dict[str, Any], split_cfg: dict[str, Any], handoff_q, freed_q) -> None:
    config = EngineConfig.from_dict(engine_cfg)
    split = SplitConfig.from_dict(split_cfg)
    started = time.perf_counter()
    msg = _get(handoff_q, channel, split.ready_timeout_s, "weights and KV pool from the prefill worker")
    if msg[0] != "setup":
        raise RuntimeError(f"decode worker: expected the setup message first, got {msg[0]!r}")
    setup = msg[1]
    kv = KVPool.from_tensors(setup["k"], setup["v"])
    device = kv.device
    shared = mapped_not_owned([*setup["weights"].values(), kv.k, kv.v], device)
    if device.type == "cpu":
        cpu_threads_per_worker(2)
    runner = decode_runner(setup["arch"], setup["weights"], kv, config, setup["max_batch"])
    del setup, msg
    graphs = warm_up(runner, prefill=False) if config.warmup else []
    channel.send("ready", {"pid": os.getpid(), "decode_graphs": graphs, "weights_shared": shared,
                           "ready_s": time.perf_counter() - started})
    freed = FreedSlots(lambda slots: freed_q.put(("free", slots)))

    def stop() -> bool:
        channel.check_parent()
        return False

    def serve() -> None:
        while True:
            cmd = channel.recv()
            if cmd[0] == "close":
                break
            if cmd[0] != "arm":
                raise RuntimeError(f"decode worker: unexpected command {cmd!r}")
            run_id = cmd[1]
            reset_peak(device)
            t0 = _arm_and_go(channel, run_id)

            def clock(t0=t0) -> float:
                return time.perf_counter() - t0

            worker = DecodeWorker(runner, freed, config, clock)
            outbox = Outbox(channel.send, "steps", split.event_flush_s)

            def receive(timeout: float, run_id=run_id):
                pairs, ended = [], False
                try:
                    item = handoff_q.get(timeout=timeout) if timeout > 0 else handoff_q.get_nowait()
                    while True:
                        if item[1] != run_id:
                            raise RuntimeError(f"decode worker: a message of run {item[1]} during run {run_id}")
                        if item[0] == "end":
                            ended = True
                        else:
                            pairs.extend((h, None) for h in item[2])
                        item = handoff_q.get_nowait()
                except queue.Empty:
                    pass
                return pairs, ended

            def on_step(step, outcome, seqs, outbox=outbox) -> None:
                outbox.add(("d", step_tuple(step), [(rid, seqs[rid].output[-1]) for rid in step.request_ids]))

            decode_loop(worker, freed, receive=receive, on_step=on_step, stop=stop, fault=fault_hook("decode"),
                        poll_s=split.poll_s)
            outbox.flush()
            channel.send("run_done", {"run": run_id, "peak_bytes": peak_bytes(device), "steps": len(worker.steps)})

    try:
        serve()
    finally:
        # let go of the prefill child's memory (CUDA IPC mappings / shared memory), then say so
        runner = kv = None  # noqa: F841
        with contextlib.suppress(Exception):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            gc.collect()
        freed_q.put(("bye",))
