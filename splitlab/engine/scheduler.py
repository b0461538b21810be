"""Continuous-batching scheduler: waiting -> prefilling -> running, one ``ScheduledBatch`` a step.

The scheduler only sees requests the engine loop has ``add``-ed, and the loop adds a request
only once its ``arrival_s`` has passed. Admission needs a free KV slot (``SlotAllocator``)
and room in the decode batch (``max_batch``); a request that cannot be admitted stays
waiting, first come first served.

Policies:

- ``serial`` (vLLM v0): if prompts are waiting and can be admitted, the step is a prefill of
  as many whole waiting prompts as fit ``token_budget`` (the first one always fits);
  otherwise the step decodes every running sequence.
- ``chunked`` (Sarathi-Serve / vLLM v1): every step carries every running sequence's decode
  token plus prompt tokens up to a total of ``chunk_size``; in-progress prompts continue
  first, then new ones are admitted; a prompt may span several steps.
- ``prefill``: prefill steps only (the prefill worker of a split engine); a sequence whose
  prompt is done leaves this scheduler (``postprocess`` returns it as prefilled).
- ``decode``: decode steps only (the decode worker of a split engine); sequences enter
  through ``add_running``.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from splitlab.errors import ConfigError
from splitlab.measure.metrics import RequestTrace
from splitlab.workload import Request

POLICIES = ("serial", "chunked", "prefill", "decode")


@dataclasses.dataclass(eq=False)
class SeqState:
    """The engine's state of one request. ``trace`` receives its timestamps and tokens."""

    request: Request
    trace: RequestTrace
    slot: int | None = None
    num_computed: int = 0  # prompt positions whose KV is in the pool

    @classmethod
    def new(cls, request: Request, worker: str = "") -> "SeqState":
        trace = RequestTrace(id=request.id, arrival_s=request.arrival_s, prompt_len=request.prompt_len,
                             max_new_tokens=request.max_new_tokens, worker=worker)
        return cls(request, trace)

    @property
    def id(self) -> int:
        return self.request.id

    @property
    def prompt_len(self) -> int:
        return self.request.prompt_len

    @property
    def output(self) -> list[int]:
        return self.trace.output_ids

    @property
    def prompt_done(self) -> bool:
        return self.num_computed >= self.prompt_len

    @property
    def finished(self) -> bool:
        return len(self.trace.output_ids) >= self.request.max_new_tokens

    @property
    def next_position(self) -> int:
        """Position of the next decode input (the last output token)."""
        return self.prompt_len + len(self.trace.output_ids) - 1


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """Prompt positions ``start .. start + length - 1`` of ``seq`` in this step."""

    seq: SeqState
    start: int
    length: int

    @property
    def last(self) -> bool:
        return self.start + self.length >= self.seq.prompt_len

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.seq.request.prompt_ids[self.start:self.start + self.length]


@dataclasses.dataclass(frozen=True)
class ScheduledBatch:
    """What one step runs: decode rows (one token per sequence) and prompt chunks."""

    decode: tuple[SeqState, ...]
    chunks: tuple[ChunkPlan, ...]

    @property
    def kind(self) -> str:
        if self.decode and self.chunks:
            return "mixed"
        return "decode" if self.decode else "prefill"

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(c.length for c in self.chunks)

    @property
    def request_ids(self) -> list[int]:
        return [s.id for s in self.decode] + [c.seq.id for c in self.chunks]

    def decode_inputs(self) -> tuple[list[int], list[int], list[int]]:
        """``(slots, tokens, positions)`` of the decode rows."""
        return ([s.slot for s in self.decode], [s.output[-1] for s in self.decode],
                [s.next_position for s in self.decode])


@dataclasses.dataclass
class StepOutcome:
    """What ``postprocess`` changed: sequences whose prompt finished this step, and sequences
    that produced their last token this step (their slots are already freed)."""

    prefilled: list[SeqState]
    finished: list[SeqState]
    num_new_tokens: int


class Scheduler:
    """Queues and policy of one worker. ``allocator``: any object with ``alloc() -> int | None``,
    ``free(slot)`` and ``num_free`` (a ``SlotAllocator``, or a proxy to one in another process)."""

    def __init__(self, policy: str, allocator: Any, max_batch: int, token_budget: int = 8192,
                 chunk_size: int = 512):
        if policy not in POLICIES:
            raise ConfigError(f"unknown scheduler policy {policy!r}; accepted: {', '.join(POLICIES)}")
        if policy == "chunked" and chunk_size <= max_batch:
            raise ConfigError(f"chunk_size ({chunk_size}) must exceed max_batch ({max_batch})")
        self.policy = policy
        self.allocator = allocator
        self.max_batch = max_batch
        self.token_budget = token_budget
        self.chunk_size = chunk_size
        self.waiting: collections.deque[SeqState] = collections.deque()  # arrived, no slot yet
        self.prefilling: list[SeqState] = []  # slot held, prompt partly in the pool
        self.running: list[SeqState] = []  # prompt done, decoding

    # ---- input ------------------------------------------------------------------------------
    def add(self, seq: SeqState) -> None:
        """A request that has arrived (the caller guarantees its arrival time has passed)."""
        if self.policy == "decode":
            raise ConfigError("a decode-only scheduler takes prefilled sequences through add_running")
        self.waiting.append(seq)

    def add_running(self, seq: SeqState) -> None:
        """A sequence whose prompt is in the pool and whose first token is known."""
        if seq.slot is None or not seq.prompt_done or not seq.output:
            raise ConfigError(f"request {seq.id}: add_running needs a slot, a finished prompt and a first token")
        self.running.append(seq)

    # ---- state ------------------------------------------------------------------------------
    @property
    def num_active(self) -> int:
        return len(self.running) + len(self.prefilling)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    # ---- policy -----------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        """The next step's batch, or None when there is nothing to run."""
        if self.policy == "chunked":
            return self._schedule_chunked()
        if self.policy in ("serial", "prefill"):
            chunks = self._admit_whole_prompts()
            if chunks:
                return ScheduledBatch((), tuple(chunks))
            if self.policy == "prefill":
                return None
        if self.running:
            return ScheduledBatch(tuple(self.running), ())
        return None

    def _admit(self) -> SeqState | None:
        """Give the head of the queue a slot, if a slot and batch room are free."""
        if not self.waiting or self.num_active >= self.max_batch:
            return None
        slot = self.allocator.alloc()
        if slot is None:
            return None
        seq = self.waiting.popleft()
        seq.slot = slot
        seq.num_computed = 0
        self.prefilling.append(seq)
        return seq

    def _admit_whole_prompts(self) -> list[ChunkPlan]:
        chunks: list[ChunkPlan] = []
        budget = self.token_budget
        while self.waiting:
            need = self.waiting[0].prompt_len
            if chunks and need > budget:
                break
            seq = self._admit()
            if seq is None:
                break
            chunks.append(ChunkPlan(seq, 0, need))
            budget -= need
        return chunks

    def _schedule_chunked(self) -> ScheduledBatch | None:
        decode = tuple(self.running)
        budget = self.chunk_size - len(decode)
        chunks: list[ChunkPlan] = []
        for seq in self.prefilling:  # prompts already under way continue first
            if budget <= 0:
                break
            n = min(seq.prompt_len - seq.num_computed, budget)
            chunks.append(ChunkPlan(seq, seq.num_computed, n))
            budget -= n
        while budget > 0:
            seq = self._admit()
            if seq is None:
                break
            n = min(seq.prompt_len, budget)
            chunks.append(ChunkPlan(seq, 0, n))
            budget -= n
        if not decode and not chunks:
            return None
        return ScheduledBatch(decode, tuple(chunks))

    # ---- results ----------------------------------------------------------------------------
    def postprocess(self, batch: ScheduledBatch, decode_tokens: list[int], chunk_tokens: list[int | None],
                    start_s: float, end_s: float) -> StepOutcome:
        """Record the step's tokens (stamped ``end_s``, the host sync that produced them) and
        prefill times; move finished prompts to running (or out, for ``prefill``); free the
        slots of finished sequences."""
        if len(decode_tokens) != len(batch.decode) or len(chunk_tokens) != len(batch.chunks):
            raise RuntimeError("postprocess: the runner returned a different number of tokens than scheduled")
        new_tokens = 0
        finished: list[SeqState] = []
        prefilled: list[SeqState] = []
        for seq, tok in zip(batch.decode, decode_tokens):
            seq.trace.output_ids.append(int(tok))
            seq.trace.token_times_s.append(end_s)
            new_tokens += 1
            if seq.finished:
                finished.append(seq)
        for chunk, tok in zip(batch.chunks, chunk_tokens):
            seq = chunk.seq
            if chunk.start == 0:
                seq.trace.prefill_start_s = start_s
            seq.num_computed = chunk.start + chunk.length
            if chunk.last:
                if tok is None:
                    raise RuntimeError(f"request {seq.id}: the prompt's last chunk returned no token")
                seq.trace.prefill_end_s = end_s
                seq.trace.output_ids.append(int(tok))
                seq.trace.token_times_s.append(end_s)
                new_tokens += 1
                prefilled.append(seq)
                if seq.finished:
                    finished.append(seq)
        if prefilled:
            done = set(map(id, prefilled))
            self.prefilling = [s for s in self.prefilling if id(s) not in done]
            if self.policy != "prefill":
                self.running.extend(s for s in prefilled if not s.finished)
        if finished:
            gone = set(map(id, finished))
            self.running = [s for s in self.running if id(s) not in gone]
            for seq in finished:
                self.allocator.free(seq.slot)
                seq.slot = None
        return StepOutcome(prefilled, finished, new_tokens)
