"""The ``streams`` and ``green`` backends of ``split``: one process, two threads.

Both workers address one KV pool and one copy of the weights, through two ``ModelRunner``
objects (so they never share a scratch buffer: the prefill runner only runs eager
prefills, the decode runner owns the CUDA graphs and their static inputs).

- ``streams``: on CUDA, each thread runs on its own ``torch.cuda.Stream`` (the decode stream
  at the highest priority when ``high_priority_decode``); on CPU, plain threads.
- ``green``: each thread runs on the stream of its own green context; the two contexts hold
  disjoint SM sets (``splitlab.system.green.split_sms``). The decode graphs are captured
  on the decode context's stream, so the captured kernels belong to its SMs.

Ordering without events: a prefill step ends with ``.tolist()`` of its tokens, a host sync
of the prefill stream that returns only after every kernel before it (the KV writes
included) finished; only then is the handoff queued, so the decode stream's first read of
that slot (or those pages) comes after the writes. A slot or page is freed after the decode
step that finished its sequence returned its tokens (a sync of the decode stream), so the
prefill stream never overwrites KV that a queued decode kernel still reads. The allocator
is the prefill thread's alone (one per run); frees come back to it through a queue.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import torch

from splitlab.config import EngineConfig, SplitConfig
from splitlab.errors import ModeError, WorkerError
from splitlab.engine.loop import DecodeWorker, PrefillWorker, build_engine
from splitlab.engine.runner import ModelRunner
from splitlab.engine.warmup import warm_up
from splitlab.modes.split.adaptive import GreenPlan, SMController
from splitlab.modes.common import (Fault, FreedSlots, Stopped, decode_loop, fault_for, peak_bytes, prefill_loop,
                                   reset_peak, worker_facts)
from splitlab.modes.worker_kv import new_allocator, warm_chunk, warm_decode_step
from splitlab.system.env import synchronize

_END = object()
GREEN_HINT = ("split backend green needs an NVIDIA GPU with green contexts (CUDA 12.4+ driver, cuda-python); "
              "use backend='processes' or 'streams'")

def green_partition(device: torch.device, prefill_sms: int | None, high_priority_decode: bool):
    """``(partition, prefill_sms, decode_sms)``: disjoint green contexts, prefill first."""
    from splitlab.system import green

    if device.type != "cuda" or not torch.cuda.is_available():
        raise ModeError(GREEN_HINT)
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    total = int(props.multi_processor_count)
    gran = green.sm_granularity((props.major, props.minor))
    if prefill_sms is None:
        prefill_sms = max(gran, (total // 2) // gran * gran)
    first, second = green.plan_split((prefill_sms, gran), total, gran)
    priority = -1 if high_priority_decode else 0
    # made once per (device, split, priorities) and reused: green contexts are never destroyed
    part = green.cached_split_sms((first, second), device=index, priorities=(0, priority))
    return part, int(part.sm_counts[0]), int(part.sm_counts[1])


def _stream_ctx(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


class ThreadSplit:
    """A built engine (one KV pool, a prefill runner and a decode runner with its CUDA graphs)
    that serves runs with two threads; see the module docstring."""

    mps = None
    children: dict[str, dict[str, Any]] = {}

    def __init__(self, model, config: EngineConfig, split: SplitConfig, faults: tuple[Fault, ...] = ()):
        self.config = config
        self.split = split
        self.faults = {name: fault_for(faults, name) for name in ("prefill", "decode")}
        self.device = torch.device(model.device)
        cuda = self.device.type == "cuda"
        self.green: dict[str, Any] | None = None
        self.plan: GreenPlan | None = None  # the lanes of an adaptive sm_policy, and its policy
        self.policy = None
        prefill_stream = decode_stream = None
        if split.backend == "green" and split.sm_policy == "static":
            part, p_sms, d_sms = green_partition(self.device, split.prefill_sms, split.high_priority_decode)
            prefill_stream, decode_stream = part.streams
            self.green = {**part.to_dict(), "prefill_sms": p_sms, "decode_sms": d_sms}
        elif cuda:
            prefill_stream = torch.cuda.Stream(self.device)
            decode_stream = torch.cuda.Stream(self.device, priority=-1 if split.high_priority_decode else 0)
        self.streams = (prefill_stream, decode_stream)
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        parts = build_engine(model, config)
        self.kv = parts.kv
        self.prefill_runner = parts.runner
        arch, weights = parts.runner.export()
        self.decode_runner = ModelRunner.for_config(arch, weights, parts.kv, config, max_batch=parts.runner.max_batch)
        if self.green is not None:
            self.decode_runner.capture_stream = decode_stream
            for runner, sms in ((self.prefill_runner, self.green["prefill_sms"]),
                                (self.decode_runner, self.green["decode_sms"])):
                if hasattr(runner.kernels, "sm_count"):  # split-K decode attention sizes its grid by it
                    runner.kernels.sm_count = sms
        # One long-lived thread per worker, kept across runs: cuDNN keeps its attention plans
        # per thread, and cuBLAS its handles per (thread, stream), so what warm-up builds on
        # these threads is what the runs use.
        self.pools = {name: ThreadPoolExecutor(1, thread_name_prefix=f"splitlab-{name}")
                      for name in ("prefill", "decode")}
        self.graphs: list[int] = []
        if split.sm_policy != "static":
            self._plan_lanes(split)
            prefill_stream, decode_stream = self.streams
        if config.warmup:
            # one after the other: a graph capture must not overlap the other stream's work
            if self.plan is None or self.plan.simulated:
                self.graphs = self.pools["decode"].submit(self._on_stream, decode_stream, warm_up,
                                                          self.decode_runner, prefill=False).result()
            else:
                self.graphs = self.decode_runner.capture_graphs()  # captured by the plan: just the list
            self.pools["prefill"].submit(self._warm_prefill, prefill_stream, config.token_budget).result()

    def _plan_lanes(self, split: SplitConfig) -> None:
        """An adaptive policy's lanes and the policy; the whole-GPU lanes become the streams."""
        from splitlab.modes.split.policy import SMProfile, make_policy

        profile = SMProfile.load(split.sm_profile)
        if split.backend == "green":
            self.plan = self.pools["decode"].submit(GreenPlan.partitioned, self.prefill_runner, self.config,
                                                    split.decode_sm_choices, split.high_priority_decode).result()
        else:
            self.plan = GreenPlan.simulated(self.decode_runner, profile.total_sms, split.decode_sm_choices)
        plan = self.plan
        self.policy = make_policy(split.sm_policy, total_sms=plan.total_sms, choices=plan.choices,
                                  static_decode_sms=plan.choices[0], profile=profile, gap_s=split.gap_s)
        self.decode_runner = plan.decode[plan.total_sms].runner
        self.streams = (plan.prefill[plan.total_sms].stream, plan.decode[plan.total_sms].stream)
        self.green = {"sm_policy": split.sm_policy, **plan.facts()}

    def _warm_prefill(self, stream, token_budget: int) -> None:
        """The prompt path on the prefill thread; with lanes, a short prompt on each lane's
        stream too (cuBLAS keeps a workspace per stream)."""
        with _stream_ctx(stream):
            warm_up(self.prefill_runner, decode=False, token_budget=token_budget)
        for lane in (self.plan.prefill.values() if self.plan is not None else ()):
            with _stream_ctx(lane.stream):
                self.prefill_runner.prefill([warm_chunk(self.kv, 16)])
        synchronize(self.device)

    @property
    def pids(self) -> dict[str, int]:
        return {"process": os.getpid()}

    @staticmethod
    def _on_stream(stream, fn, *args, **kwargs):
        with _stream_ctx(stream):
            return fn(*args, **kwargs)

    def facts(self) -> dict[str, dict[str, Any]]:
        """Each worker's ``worker_facts`` (the decode one with its graphs and stream priority)."""
        decode_stream = self.streams[1]
        return {
            "prefill": worker_facts(self.prefill_runner, self.config.warmup),
            "decode": {**worker_facts(self.decode_runner, self.config.warmup), "decode_graphs": self.graphs,
                       "decode_stream_priority": getattr(decode_stream, "priority", None)},  # None off CUDA
        }

    def run(self, workload, progress: bool = True):
        """``(traces, steps, memory)`` of one run of ``workload``."""
        from tqdm.auto import tqdm

        run = _ThreadRun(self, workload)
        bar = None
        futures: list = []
        try:
            futures = [self.pools[name].submit(run.guarded(name, body))
                       for name, body in (("prefill", run.prefill_main), ("decode", run.decode_main))]
            run.wait_ready(futures, self.split.ready_timeout_s)
            reset_peak(self.device)
            bar = tqdm(total=workload.total_output_tokens, unit="tok", desc=f"split {self.split.backend}",
                       disable=not progress, leave=False)
            run.watch(futures, bar)
        except BaseException:
            run.stop.set()
            wait(futures, timeout=30.0)
            raise
        finally:
            if bar is not None:
                bar.close()
        seqs = run.results["prefill"]
        for s in seqs.values():
            s.trace.worker = "split"
        if run.controller is not None:
            self.green = {"sm_policy": self.split.sm_policy, **run.controller.facts()}
        run.every_kv_back()
        peak = peak_bytes(self.device)
        return ([s.trace for s in seqs.values()], run.pre.steps + run.dec.steps,
                {"peak_bytes": peak, "per_worker": {"process": peak}, **run.pre.scheduler.counters()})

    def release_threads(self) -> None:
        """Stop the two worker threads and keep the built engine (the online split engine
        runs its own loops over it; it cannot ``run`` afterwards)."""
        for pool in self.pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
        self.pools = {}

    def close(self) -> None:
        self.release_threads()
        self.prefill_runner = self.decode_runner = None  # graphs and buffers go with them
        self.kv = None


class _ThreadRun:
    """One run of a ``ThreadSplit``: both loops on their threads, watched from the caller's.

    Each thread first runs one step of its own on its stream (library handles and workspaces
    of this thread, before t0), says it is ready, and waits for ``go``; a failure on either
    thread stops the other (``stop``) and is raised by the caller as a ``WorkerError``."""

    def __init__(self, engine: ThreadSplit, workload):
        self.engine = engine
        self.workload = workload
        self.t0 = 0.0
        self.allocator = new_allocator(engine.kv, engine.config)
        self.hand_q: queue.Queue = queue.Queue()
        self.freed_q: queue.Queue = queue.Queue()
        self.freed = FreedSlots(self.freed_q.put)
        self.pre = PrefillWorker(engine.prefill_runner, self.allocator, engine.config, self.clock)
        self.dec = DecodeWorker(engine.decode_runner, self.freed, engine.config, self.clock)
        self.controller = None
        if engine.plan is not None:  # an adaptive sm_policy: every step asks where it runs
            self.controller = SMController(engine.policy, engine.plan, self.clock, engine.split.prefill_layer_group)
            self.pre.placer = self.controller.prefill_placer()
            self.dec.placer = self.controller.decode_placer()
        self.stop = threading.Event()
        self.go = threading.Event()
        self.ready = {"prefill": threading.Event(), "decode": threading.Event()}
        self.errors: list[tuple[str, BaseException, str]] = []
        self.results: dict[str, Any] = {}
        self.tokens = {"prefill": 0, "decode": 0}

    def clock(self) -> float:
        return time.perf_counter() - self.t0

    # ---- the transport of the loops (queue.Queue) --------------------------------------------
    def wait_freed(self, timeout: float) -> list[int]:
        out: list[int] = []
        try:
            out.extend(self.freed_q.get(timeout=timeout) if timeout > 0 else self.freed_q.get_nowait())
            while True:
                out.extend(self.freed_q.get_nowait())
        except queue.Empty:
            pass
        return out

    def every_kv_back(self) -> None:
        """After both threads ended: the decode side's last frees into the allocator, which
        must then hold every slot or page again (else a sequence leaked KV: a bug)."""
        for kv_id in self.wait_freed(0.0):
            self.allocator.free(kv_id)
        held = self.allocator.capacity - self.allocator.num_free
        if held:
            raise WorkerError(f"split {self.engine.split.backend}: {held} KV slots or pages were still held after "
                              "the run ended (a leak in the split engine; please report it)")

    def receive(self, timeout: float):
        pairs, ended = [], False
        try:
            item = self.hand_q.get(timeout=timeout) if timeout > 0 else self.hand_q.get_nowait()
            while True:
                if item is _END:
                    ended = True
                else:
                    pairs.extend((h, seq.trace) for h, seq in item)
                item = self.hand_q.get_nowait()
        except queue.Empty:
            pass
        return pairs, ended

    def _counter(self, name: str):
        def on_step(step, outcome, *_):
            self.tokens[name] += outcome.num_new_tokens
        return on_step

    def _wait_go(self) -> None:
        while not self.go.wait(0.05):
            if self.stop.is_set():
                raise Stopped

    # ---- the two threads ---------------------------------------------------------------------
    def prefill_main(self) -> None:
        engine = self.engine
        with _stream_ctx(engine.streams[0]):
            engine.prefill_runner.prefill([warm_chunk(engine.kv, 4)])
            synchronize(engine.device)
            self.ready["prefill"].set()
            self._wait_go()
            self.results["prefill"] = prefill_loop(
                self.pre, self.allocator, self.workload.requests, self.clock, hand_off=self.hand_q.put,
                wait_freed=self.wait_freed, on_step=self._counter("prefill"), stop=self.stop.is_set,
                fault=engine.faults["prefill"], poll_s=engine.split.poll_s)
            self.hand_q.put(_END)

    def decode_main(self) -> None:
        engine = self.engine
        with _stream_ctx(engine.streams[1]):
            warm_decode_step(engine.decode_runner)
            synchronize(engine.device)
            self.ready["decode"].set()
            self._wait_go()
            self.results["decode"] = decode_loop(
                self.dec, self.freed, receive=self.receive, on_step=self._counter("decode"), stop=self.stop.is_set,
                fault=engine.faults["decode"], poll_s=engine.split.poll_s)

    def guarded(self, name: str, body):
        def run() -> None:
            try:
                body()
            except Stopped:
                pass
            except BaseException as exc:  # noqa: BLE001 - reported by the caller's thread
                self.errors.append((name, exc, traceback.format_exc()))
                self.stop.set()
        return run

    # ---- the caller's thread -----------------------------------------------------------------
    def wait_ready(self, futures, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(e.is_set() for e in self.ready.values()):
            _raise_first(self.errors)
            if all(f.done() for f in futures) or time.monotonic() > deadline:
                _raise_first(self.errors)
                raise WorkerError("the split worker threads did not get ready")
            time.sleep(0.01)

    def watch(self, futures, bar) -> None:
        """Start the run (t0, go) and update ``bar`` until both threads are done."""
        self.t0 = time.perf_counter()
        self.go.set()
        shown = 0
        while not all(f.done() for f in futures):
            wait(futures, timeout=0.1)
            _raise_first(self.errors)
            now = self.tokens["prefill"] + self.tokens["decode"]
            bar.update(now - shown)
            shown = now
        _raise_first(self.errors)


def _raise_first(errors) -> None:
    if errors:
        name, exc, tb = errors[0]
        raise WorkerError(f"worker {name} failed: {exc.__class__.__name__}: {exc}\n{tb}") from exc
