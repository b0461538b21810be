"""The ``streams`` and ``green`` backends of ``split``: one process, two threads.

Both workers address one KV pool and one copy of the weights, through two ``ModelRunner``
objects (so they never share a scratch buffer: the prefill runner only runs eager
prefills, the decode runner owns the CUDA graphs and their static inputs).

- ``streams``: on CUDA, each thread runs on its own ``torch.cuda.Stream`` (the decode stream
  at the highest priority when ``high_priority_decode``); on CPU, plain threads.
- ``green``: each thread runs on the stream of its own green context; the two contexts hold
  disjoint SM sets (``splitlab.system.green.split_sms``). The decode graphs are captured
  on the decode context's stream, so the captured kernels belong to its SMs.

A ``ThreadSplit`` builds the engine; every run is a replay (``splitlab.engine.replay``)
through the online split engine over it (``splitlab.modes.split.online_threads``), whose two
threads run the prefill and the decode loop: one loop for a server and an offline run.

Ordering without events: a prefill step ends with ``.tolist()`` of its tokens, a host sync
of the prefill stream that returns only after every kernel before it (the KV writes
included) finished; only then is the request handed over, so the decode stream's first read
of that slot (or those pages) comes after the writes. A slot or page is freed after the
decode step that finished its sequence returned its tokens (a sync of the decode stream), so
the prefill stream never overwrites KV that a queued decode kernel still reads.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from splitlab.config import EngineConfig, SplitConfig
from splitlab.errors import ModeError, WorkerError
from splitlab.engine.loop import build_engine
from splitlab.engine.runner import ModelRunner
from splitlab.engine.warmup import warm_chunk, warm_up
from splitlab.modes.split.adaptive import GreenPlan
from splitlab.modes.common import Fault, fault_for, peak_bytes, reset_peak, worker_facts
from splitlab.system.env import synchronize

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
        self.model = model
        self.config = config
        self.split = split
        self.faults = {name: fault_for(faults, name) for name in ("prefill", "decode")}
        self.online = None  # the online split engine every run replays through (made at the first)
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
        """``(traces, steps, memory)`` of one run of ``workload``: a replay through this engine's
        online split engine (made at the first run; its two threads then serve every run)."""
        from splitlab.engine.replay import counters_since, replay
        from splitlab.modes.split.online_threads import OnlineSplitEngine
        from splitlab.workload import MAX_REQUESTS

        if self.online is None:
            self.online = OnlineSplitEngine(self.model, "split", self.config, split=self.split, built=self,
                                            faults=self.faults, keep_steps=None, max_queued=MAX_REQUESTS,
                                            ready_timeout_s=self.split.ready_timeout_s)
        online = self.online
        if online.controller is not None:  # a run's decisions are its own
            online.controller.decisions.clear()
            online.controller.prefill_moves = 0
        before = online.scheduler.counters()
        reset_peak(self.device)
        traces, steps = replay(online, workload, progress=progress, desc=f"split {self.split.backend}",
                               stall_timeout_s=self.split.stall_timeout_s)
        allocator = online.parts.allocator
        if allocator.num_free != allocator.capacity:  # every request ended, so every slot or page is back
            raise WorkerError(f"split {self.split.backend}: {allocator.capacity - allocator.num_free} KV slots or "
                              "pages were still held after the run ended (a leak in the split engine; please "
                              "report it)")
        if online.controller is not None:
            self.green = {"sm_policy": self.split.sm_policy, **online.controller.facts()}
        for t in traces:
            t.worker = "split"
        peak = peak_bytes(self.device)
        return (traces, steps, {"peak_bytes": peak, "per_worker": {"process": peak},
                                **counters_since(before, online.scheduler.counters())})

    def release_threads(self) -> None:
        """Stop the two worker threads and keep the built engine (the online split engine
        runs its own loops over it; it cannot ``run`` afterwards)."""
        for pool in self.pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
        self.pools = {}

    def close(self) -> None:
        if self.online is not None:
            self.online.close(abort=True)
            self.online = None
        self.release_threads()
        self.prefill_runner = self.decode_runner = None  # graphs and buffers go with them
        self.kv = None
