"""The adaptive green split: partitions made once, the SM split chosen per step.

A CUDA graph keeps the SM set of the context it was captured in, so a decode graph captured
on 16 SMs runs on 16 SMs wherever it is launched, and one captured on the whole GPU ignores
a partition. So every decode SM count the policy may pick gets its own green partition
(decode first, prefill the rest: the decode groups nest, 16 inside 32 inside 64), its own
decode runner over the shared weights and KV pool, and graphs captured on that partition's
stream. The whole GPU (no green context) is one more choice, for when one side is idle.

Both worker threads ask one ``SMController`` before each step: the decode thread tells it
its batch and context, the prefill thread the prompt tokens it is about to run, and the
policy (``splitlab.modes.split.policy``) maps that state to an ``SMChoice``. A step
then runs on the runner and stream of its side of that choice. Switching is a Python
attribute change: every step ends with a host sync (its tokens), so no kernel of the last
step is still queued on the stream left behind. While one side's step is in flight on the
old split, the other's next step may already run on the new one: the two overlap on the
SMs that moved, for at most one step.

A long prompt would hold the split for its whole forward, so a prefill asks again every
``layer_group`` layers (``SplitConfig.prefill_layer_group``): if the policy now picks another
split (decode's batch grew, or decode went idle), the rest of the forward moves to that
split's prefill stream, which first waits for the layers already queued.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import torch

from splitlab.engine.kv import pages_written
from splitlab.engine.runner import ModelRunner
from splitlab.engine.warmup import warm_up
from splitlab.modes.split.policy import SMChoice, SplitState


@dataclasses.dataclass(frozen=True)
class Lane:
    """Where one side runs for one SM count: its stream, and for decode its runner."""

    sms: int
    stream: Any
    runner: ModelRunner | None = None


class GreenPlan:
    """The lanes a policy chooses among: for each decode SM count, decode's lane (a stream and
    a runner whose graphs were captured on it) and prefill's lane on the SMs left, plus the
    whole GPU for each side. ``partitioned`` makes them on green contexts; ``simulated``
    gives every lane the thread's own stream and one runner (the decisions, not the SMs)."""

    def __init__(self, total_sms: int, decode: dict[int, Lane], prefill: dict[int, Lane],
                 capture: dict[int, dict[str, float]], decode_variant: str | None, simulated: bool):
        self.total_sms, self.decode, self.prefill = total_sms, decode, prefill
        self.capture, self.decode_variant, self.simulated = capture, decode_variant, simulated

    @classmethod
    def partitioned(cls, prefill_runner: ModelRunner, config, choices, high_priority_decode: bool = True
                    ) -> "GreenPlan":
        from splitlab.system.green import decode_first_split

        device = prefill_runner.device
        total = int(torch.cuda.get_device_properties(device).multi_processor_count)
        arch, weights = prefill_runner.export()
        priority = -1 if high_priority_decode else 0
        decode: dict[int, Lane] = {}
        prefill: dict[int, Lane] = {}
        capture: dict[int, dict[str, float]] = {}
        variant = None
        lanes = [(total, None)] + [(d, decode_first_split(device.index or 0, d, priority)) for d in sorted(set(choices))]
        for _, part in lanes:
            if part is None:
                dec_stream, pre_stream = torch.cuda.Stream(device, priority=priority), torch.cuda.Stream(device)
                dec_sms, pre_sms = total, total
            else:
                dec_stream, pre_stream = part.streams
                dec_sms, pre_sms = int(part.sm_counts[0]), int(part.sm_counts[1])
            runner = ModelRunner.for_config(arch, weights, prefill_runner.kv,
                                            config if variant is None else config.replace(decode_variant=variant),
                                            max_batch=prefill_runner.max_batch)
            runner.capture_stream = dec_stream
            if part is not None and hasattr(runner.kernels, "sm_count"):  # split-K attention sizes its grid by it
                runner.kernels.sm_count = dec_sms
            capture[dec_sms] = cls._capture(runner, dec_stream)
            variant = variant or runner.decode_variant
            decode[dec_sms] = Lane(dec_sms, dec_stream, runner)
            prefill.setdefault(pre_sms, Lane(pre_sms, pre_stream))
        return cls(total, decode, prefill, capture, variant, simulated=False)

    @classmethod
    def simulated(cls, decode_runner: ModelRunner, total_sms: int, choices) -> "GreenPlan":
        decode = {d: Lane(d, None, decode_runner) for d in (*choices, total_sms)}
        prefill = {total_sms - d: Lane(total_sms - d, None) for d in choices}
        prefill[total_sms] = Lane(total_sms, None)
        return cls(total_sms, decode, prefill, {}, None, simulated=True)

    @staticmethod
    def _capture(runner: ModelRunner, stream) -> dict[str, float]:
        """Every decode graph bucket captured on ``stream``: the seconds and graph-pool bytes."""
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved()
        start = time.perf_counter()
        with torch.cuda.stream(stream):
            warm_up(runner, prefill=False)
            torch.cuda.synchronize()
        return {"seconds": time.perf_counter() - start, "bytes": int(torch.cuda.memory_reserved() - before)}

    @property
    def choices(self) -> list[int]:
        """The decode SM counts with a partition (the whole GPU aside)."""
        return sorted(d for d in self.decode if d != self.total_sms)

    def lanes_for(self, choice: SMChoice) -> tuple[Lane, Lane]:
        """(decode lane, prefill lane) of a choice; a side given 0 SMs idles, so the other's
        whole-GPU lane is what it would use if it ran anyway."""
        dec = self.decode[choice.decode_sms if choice.decode_sms else self.total_sms]
        pre = self.prefill[choice.prefill_sms if choice.prefill_sms else self.total_sms]
        return dec, pre

    def facts(self) -> dict[str, Any]:
        return {"simulated": self.simulated, "decode_sms_choices": self.choices,
                "prefill_sms_choices": sorted(self.prefill),
                "graph_capture": {str(k): v for k, v in sorted(self.capture.items())},
                "graph_bytes_total": sum(v["bytes"] for v in self.capture.values()),
                "graph_capture_s_total": sum(v["seconds"] for v in self.capture.values()),
                "decode_variant": self.decode_variant}


class SMController:
    """The state both threads publish and the split the policy makes of it, per step.

    ``decode_batch`` / ``decode_context``: the decode side's running sequences and their mean
    length; ``prefill_tokens``: prompt tokens the prefill side is running or can run next.
    Each side writes only its own fields (plain attribute writes, atomic under the GIL)."""

    def __init__(self, policy, plan: GreenPlan, clock, layer_group: int | None = None):
        self.policy = policy
        self.plan = plan
        self.clock = clock
        self.layer_group = layer_group  # a prefill asks again every this many layers (None: never)
        self.decode_batch = 0
        self.decode_context = 0
        self.prefill_tokens = 0
        self.prefill_moves = 0  # prefills that moved to another partition between layer groups
        self._lock = threading.Lock()
        self.decisions: list[tuple[float, str, int, int, float]] = []  # (t, side, decode, prefill SMs, s)

    def lane(self, side: str) -> Lane:
        """The lane ``side`` ("decode" or "prefill") runs its next step on."""
        start = time.perf_counter()
        choice = self.policy.choose(SplitState(self.decode_batch, self.decode_context, self.prefill_tokens))
        dec, pre = self.plan.lanes_for(choice)
        spent = time.perf_counter() - start
        with self._lock:
            self.decisions.append((self.clock(), side, choice.decode_sms, choice.prefill_sms, spent))
        return dec if side == "decode" else pre

    def decode_placer(self) -> "_DecodePlacer":
        return _DecodePlacer(self)

    def prefill_placer(self) -> "_PrefillPlacer":
        return _PrefillPlacer(self)

    def facts(self) -> dict[str, Any]:
        """What the run records: every decision, and the decision time's median / p99 / max."""
        with self._lock:
            rows = list(self.decisions)
        spent = sorted(r[4] for r in rows)

        def q(f: float) -> float | None:
            return spent[min(len(spent) - 1, int(f * len(spent)))] if spent else None

        return {"policy": getattr(self.policy, "name", type(self.policy).__name__), **self.plan.facts(),
                "decisions": len(rows), "decide_p50_s": q(0.5), "decide_p99_s": q(0.99),
                "decide_max_s": spent[-1] if spent else None,
                "prefill_layer_group": self.layer_group, "prefill_moves": self.prefill_moves}


class _DecodePlacer:
    def __init__(self, controller: SMController):
        self.c = controller

    def place(self, batch, scheduler) -> Lane:
        running = scheduler.running
        self.c.decode_batch = len(running)
        self.c.decode_context = sum(s.next_position for s in running) // max(1, len(running))
        return self.c.lane("decode")

    def done(self, scheduler) -> None:
        self.c.decode_batch = len(scheduler.running)


class _PrefillPlacer:
    def __init__(self, controller: SMController):
        self.c = controller
        self.current: Lane | None = None

    def place(self, batch, scheduler) -> Lane:
        self.c.prefill_tokens = batch.num_tokens
        self.current = self.c.lane("prefill")
        return self.current

    def regroup(self, layer: int):
        """Between layer groups of a prefill: the stream of the split the policy picks now
        (the decode batch may have grown or finished since the prompt started), or None to stay."""
        group = self.c.layer_group
        if not group or layer % group:
            return None
        lane = self.c.lane("prefill")
        if lane is self.current:
            return None
        self.current = lane
        self.c.prefill_moves += 1
        return lane.stream

    def done(self, scheduler) -> None:
        # prompts that can run next keep the split; none (or none whose KV is free) frees it
        runnable = scheduler.prefilling or (scheduler.waiting and _head_fits(scheduler))
        self.c.prefill_tokens = (sum(s.prompt_len - s.num_computed for s in scheduler.prefilling)
                                 + sum(s.prompt_len for s in scheduler.waiting)) if runnable else 0


def _head_fits(scheduler) -> bool:
    """Whether the first waiting prompt's KV is free now: a slot, or on a paged pool the pages
    of every position it will write (what the prefill side reserves; with a cached prefix it
    may need fewer, and the split is let go one step early)."""
    free = scheduler.allocator.num_free
    if not scheduler.paged:
        return free > 0
    return free >= pages_written(scheduler.waiting[0].request, scheduler.block_size)
