"""Workers: the engine loop ``schedule -> run -> postprocess`` around one ModelRunner.

``Worker.step()`` is the whole loop body: the scheduler picks a ``ScheduledBatch``, the
runner runs it (a decode step, a prefill, or a mixed step), and the scheduler records the
tokens and frees what finished. The online engine (``splitlab.engine.online``) steps it, for a
server and an offline run alike; ``build_engine`` makes the KV pool, the runner and the slot
allocator of a model (warm it with ``splitlab.engine.warmup.warm_up``).

A split engine reuses the same pieces: ``PrefillWorker`` (policy ``prefill``)
prefills arrived prompts into the KV pool and emits a ``Handoff`` per finished prompt;
``DecodeWorker`` (policy ``decode``) accepts handoffs and batches them. Both address the
same KV pool, so a handoff carries a slot number or page ids, never KV bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Protocol

import torch

from splitlab.config import EngineConfig
from splitlab.errors import WorkloadError
from splitlab.engine.kv import KVPool, PageAllocator, PagedKVPool, SlotAllocator, build_kv
from splitlab.measure.metrics import RequestTrace, StepTrace
from splitlab.engine.runner import ModelRunner
from splitlab.engine.weights import extract_arch, extract_weights
from splitlab.engine.scheduler import ScheduledBatch, Scheduler, SeqState, StepOutcome
from splitlab.workload import Workload


# ---- handoff between a prefill worker and a decode worker --------------------------------------

@dataclasses.dataclass(frozen=True)
class Handoff:
    """A prefilled sequence, as the decode worker needs it: picklable, no tensors.

    The KV of positions ``0 .. prompt_len - 1`` is in ``slot`` of the shared pool, or (a
    paged pool; ``slot`` None) in the pages ``blocks``, which already cover every position the
    sequence will write (the prefill side reserves them all); ``first_token`` is the greedy
    token after the prompt.
    """

    request_id: int
    slot: int
    prompt_len: int
    first_token: int
    max_new_tokens: int
    arrival_s: float
    prefill_start_s: float
    prefill_end_s: float
    blocks: tuple[int, ...] = ()

    @classmethod
    def of(cls, seq: SeqState) -> "Handoff":
        t = seq.trace
        return cls(seq.id, seq.slot, seq.prompt_len, t.output_ids[0], seq.request.max_new_tokens,
                   seq.request.arrival_s, t.prefill_start_s, t.prefill_end_s, tuple(seq.blocks))


# ---- the worker ----------------------------------------------------------------------------

class Worker:
    """One loop of ``schedule -> run -> postprocess`` over ``runner``; timestamps from ``clock``
    (seconds since the run's start)."""

    def __init__(self, name: str, runner: ModelRunner, scheduler: Scheduler, clock: Callable[[], float],
                 placer: "Placer | None" = None):
        self.name = name
        self.runner = runner
        self.scheduler = scheduler
        self.clock = clock
        self.placer = placer
        self.steps: list[StepTrace] = []

    def step(self) -> StepOutcome | None:
        """Run one step; None when the scheduler had nothing to run."""
        batch = self.scheduler.schedule()
        if batch is None:
            return None
        lane = self.placer.place(batch, self.scheduler) if self.placer is not None else None
        start = self.clock()
        if lane is None:
            decode_tokens, chunk_tokens = self.run(batch, self.runner)
        else:
            # a lane without a stream (the streams backend's policy check) runs where the thread is;
            # a prefill may move to another lane between its layer groups (``Placer.regroup``)
            regroup = getattr(self.placer, "regroup", None) if batch.kind == "prefill" else None
            with torch.cuda.stream(lane.stream) if lane.stream is not None else contextlib.nullcontext():
                decode_tokens, chunk_tokens = self.run(batch, lane.runner or self.runner, regroup)
        end = self.clock()  # after the host sync that returned the tokens
        outcome = self.scheduler.postprocess(batch, decode_tokens, chunk_tokens, start, end)
        if self.placer is not None:
            self.placer.done(self.scheduler)
        self.steps.append(StepTrace(self.name, batch.kind, start, end, batch.request_ids, batch.num_tokens,
                                    lane.sms if lane is not None else None, *self.scheduler.kv_usage()))
        return outcome

    @staticmethod
    def run(batch: ScheduledBatch, runner: ModelRunner, between_layers: Callable[[int], Any] | None = None
            ) -> tuple[list[int], list[int | None]]:
        """Execute ``batch`` on ``runner``: ``(decode tokens, chunk tokens)``; ``between_layers``:
        a prefill's hook between layers (``ModelRunner.prefill``)."""
        decode, chunks = batch.runner_inputs()
        if batch.kind == "decode":
            paged = {} if decode.blocks is None else {"blocks": decode.blocks}  # block tables of a paged pool
            return runner.decode_step(decode.slots, decode.tokens, decode.positions, **paged), []
        if batch.kind == "prefill":
            return [], runner.prefill(chunks, between_layers)
        return runner.mixed_step(decode, chunks)


class Placer(Protocol):
    """Where each step of a worker runs (the adaptive green split's SM lanes): ``place``
    returns a lane (``stream``, ``runner`` or None for the worker's own, ``sms``) for the
    scheduled batch, ``done`` sees the scheduler after the step's tokens were recorded. A
    placer may also have ``regroup(layer) -> stream | None``, asked between a prefill's layers."""

    def place(self, batch: ScheduledBatch, scheduler: Scheduler) -> Any: ...

    def done(self, scheduler: Scheduler) -> None: ...


class PrefillWorker(Worker):
    """Prefills arrived prompts into KV slots or pages (on a paged pool it reserves every page
    a sequence will write); every finished prompt becomes a ``Handoff``."""

    def __init__(self, runner: ModelRunner, allocator: Any, config: EngineConfig, clock: Callable[[], float],
                 name: str = "prefill"):
        super().__init__(name, runner, Scheduler("prefill", allocator, runner.max_batch, config.token_budget),
                         clock)

    def add(self, seq: SeqState) -> None:
        seq.trace.worker = self.name
        self.scheduler.add(seq)

    def step_handoffs(self) -> tuple[list[Handoff], StepOutcome | None]:
        """One prefill step: the handoffs for the decode worker (sequences that need more
        tokens) and the outcome (``finished`` holds one-token requests, already complete)."""
        outcome = self.step()
        if outcome is None:
            return [], None
        return [Handoff.of(s) for s in outcome.prefilled if not s.finished], outcome


class DecodeWorker(Worker):
    """Continuously batches handed-over sequences; frees their slots or pages when they finish
    (through its allocator, one id per call: a proxy forwards them to the prefill side's)."""

    def __init__(self, runner: ModelRunner, allocator: Any, config: EngineConfig, clock: Callable[[], float],
                 name: str = "decode"):
        super().__init__(name, runner, Scheduler("decode", allocator, runner.max_batch), clock)

    def accept(self, handoff: Handoff, trace: RequestTrace | None = None) -> SeqState:
        """Start decoding a prefilled sequence. ``trace``: the request's trace when the prefill
        side shares this process (else a new one is made from the handoff)."""
        if trace is None:
            trace = RequestTrace(id=handoff.request_id, arrival_s=handoff.arrival_s, prompt_len=handoff.prompt_len,
                                 max_new_tokens=handoff.max_new_tokens, prefill_start_s=handoff.prefill_start_s,
                                 prefill_end_s=handoff.prefill_end_s, token_times_s=[handoff.prefill_end_s],
                                 output_ids=[handoff.first_token])
        request = _HandedRequest(handoff.request_id, handoff.prompt_len, handoff.max_new_tokens, handoff.arrival_s)
        seq = SeqState(request, trace, slot=handoff.slot, num_computed=handoff.prompt_len,  # type: ignore[arg-type]
                       blocks=list(handoff.blocks))
        self.scheduler.add_running(seq)
        return seq


@dataclasses.dataclass(frozen=True)
class _HandedRequest:
    """What a decode worker knows of a request: no prompt ids (its KV is already in the pool)."""

    id: int
    prompt_len: int
    max_new_tokens: int
    arrival_s: float


# ---- building an engine ----------------------------------------------------------------------

@dataclasses.dataclass
class EngineParts:
    kv: KVPool | PagedKVPool
    runner: ModelRunner
    allocator: SlotAllocator | PageAllocator
    config: EngineConfig
    max_seq_len: int


def build_engine(model, config: EngineConfig) -> EngineParts:
    """KV pool, runner and allocator (slots, or pages with ``config.kv_block_size``) for
    ``model`` (a ``LoadedModel``) under ``config``."""
    max_seq_len = min(config.max_seq_len, model.facts.max_positions)
    kv, allocator = build_kv(model, config, max_seq_len)
    model.require_engine_support("engine")
    # the HF model's q/k/v and gate/up become views of the fused tensors: no weight held twice
    weights = extract_weights(model.model, share_storage=True)
    runner = ModelRunner.for_config(extract_arch(model.model), weights, kv, config)
    return EngineParts(kv, runner, allocator, config, max_seq_len)


def check_requests(workload: Workload, max_seq_len: int, model_positions: int) -> None:
    """Every request must fit a KV slot and the model's context."""
    workload.check_fits(model_positions)
    for r in workload:
        need = r.prompt_len + r.max_new_tokens
        if need > max_seq_len:
            raise WorkloadError(
                f"request {r.id} needs {need} positions (prompt {r.prompt_len} + {r.max_new_tokens} new) but "
                f"KV slots hold {max_seq_len}; raise EngineConfig.max_seq_len (up to the model's "
                f"{model_positions}) or shorten the request"
            )
