"""Continuous-batching scheduler: waiting -> prefilling -> running, one ``ScheduledBatch`` a step.

The scheduler only sees requests the engine loop has ``add``-ed, and the loop adds a request
only once its ``arrival_s`` has passed. Admission needs KV memory (below) and room in the
decode batch (``max_batch``); a request that cannot be admitted stays waiting, first come
first served.

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

KV memory. With a ``SlotAllocator`` (the slot pool) a request is admitted into a free slot.
With a ``PageAllocator`` (a paged pool; any allocator with a ``block_size``) it is admitted
by free pages, under one of two reservation policies (``reserve``):

- ``"grow"`` (the default of ``serial`` and ``chunked``): the head of the queue is admitted
  when the pages of its whole *fill* (its prompt; for a recomputed sequence, its prompt and
  every token it had produced) plus one more page are free. It gets the fill's pages at
  once, so its prefill chunks never wait for memory; the extra free page is headroom, so an
  admission never leaves the running batch without a page to grow into. A decoding sequence
  gets one more page when its next position starts one. When none is free, the newest active
  sequence (the last admitted, prefilling or running, possibly the one that needs the page)
  is preempted: its pages are freed and it goes back to the front of the queue, to be
  recomputed when admitted again (re-prefilled over its fill, vLLM's default), its next
  token continuing its output. Nothing is lost or produced twice. ``preemptions`` counts the
  preemptions, ``recomputed_tokens`` the KV positions they threw away.
- ``"full"`` (the default of the split policies): a request is admitted when the pages of
  every position it will ever write (prompt + max_new_tokens - 1) are free, and gets them all
  at once: it never grows and is never preempted, so a decode worker (which cannot
  allocate) never needs a page.

A sequence's KV is freed when it finishes: its slot, or each of its pages (one id per
``allocator.free`` call, so a proxy that forwards ids to another process serves both pools).

Shared prefixes (a ``PageAllocator`` with ``prefix_cache``): at admission the fill's full
blocks, up to the one before its last position, are looked up by content; the cached ones
are shared (read-only: full, nobody writes them again) and the fill's prefill starts after
them, at ``num_computed``. Each full block of a fill is registered once it is written.
``counters`` then carries the blocks looked up, found, and the hit rate.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from splitlab.errors import ConfigError, WorkloadError
from splitlab.engine.kv import pages_written
from splitlab.engine.plan import DecodeBatch, PrefillChunk
from splitlab.measure.metrics import RequestTrace
from splitlab.workload import Request

POLICIES = ("serial", "chunked", "prefill", "decode")
RESERVE_POLICIES = ("grow", "full")


class RequestFacts:
    """``id`` and ``prompt_len``: those of the ``request`` it carries (a sequence, a handle)."""

    request: Request

    @property
    def id(self) -> int:
        return self.request.id

    @property
    def prompt_len(self) -> int:
        return self.request.prompt_len


@dataclasses.dataclass(eq=False)
class SeqState(RequestFacts):
    """The engine's state of one request. ``trace`` receives its timestamps and tokens.

    ``slot``: its slot in a slot pool; ``blocks``: its block table (page ids) in a paged pool.
    ``recompute``: output tokens that are part of its current fill (0 unless it was
    preempted: it is then re-prefilled over its prompt and those tokens)."""

    request: Request
    trace: RequestTrace
    slot: int | None = None
    num_computed: int = 0  # fill positions whose KV is in the pool
    blocks: list[int] = dataclasses.field(default_factory=list)
    recompute: int = 0
    admitted: int = -1  # admission order (the newest is preempted first)
    block_hashes: list[int] = dataclasses.field(default_factory=list)  # its fill's full blocks (prefix cache)

    @classmethod
    def new(cls, request: Request, worker: str = "") -> "SeqState":
        trace = RequestTrace(id=request.id, arrival_s=request.arrival_s, prompt_len=request.prompt_len,
                             max_new_tokens=request.max_new_tokens, worker=worker)
        return cls(request, trace)

    @property
    def output(self) -> list[int]:
        return self.trace.output_ids

    @property
    def fill_len(self) -> int:
        """Positions a prefill of this sequence computes: the prompt, plus ``recompute`` outputs."""
        return self.request.prompt_len + self.recompute

    def fill_ids(self, start: int, length: int) -> tuple[int, ...]:
        """Tokens ``start .. start + length - 1`` of the fill."""
        prompt = self.request.prompt_ids
        if start + length <= len(prompt):
            return tuple(prompt[start:start + length])
        return (tuple(prompt) + tuple(self.output[:self.recompute]))[start:start + length]

    @property
    def prompt_done(self) -> bool:
        return self.num_computed >= self.fill_len

    @property
    def finished(self) -> bool:
        return len(self.trace.output_ids) >= self.request.max_new_tokens

    @property
    def next_position(self) -> int:
        """Position of the next decode input (the last output token)."""
        return self.prompt_len + len(self.trace.output_ids) - 1


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """Fill positions ``start .. start + length - 1`` of ``seq`` in this step."""

    seq: SeqState
    start: int
    length: int

    @property
    def last(self) -> bool:
        return self.start + self.length >= self.seq.fill_len

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.seq.fill_ids(self.start, self.length)


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

    def runner_inputs(self) -> tuple[DecodeBatch | None, list[PrefillChunk]]:
        """The runner's view of the step: the decode rows (with their block tables when the
        sequences hold pages) and the prompt chunks."""
        decode = None
        if self.decode:
            paged = bool(self.decode[0].blocks)
            decode = DecodeBatch(*self.decode_inputs(), [s.blocks for s in self.decode] if paged else None)
        chunks = [PrefillChunk(c.seq.slot, c.token_ids, c.start, c.last, c.seq.blocks or None) for c in self.chunks]
        return decode, chunks


@dataclasses.dataclass
class StepOutcome:
    """What ``postprocess`` changed: sequences whose prompt finished this step, and sequences
    that produced their last token this step (their slots or pages are already freed)."""

    prefilled: list[SeqState]
    finished: list[SeqState]
    num_new_tokens: int


class Scheduler:
    """Queues and policy of one worker. ``allocator``: a ``SlotAllocator`` or a
    ``PageAllocator`` (or a proxy to one in another process: ``alloc``, ``free`` of one id,
    ``num_free``; ``block_size`` and ``capacity`` for pages). ``reserve``: the page
    reservation policy, ``"grow"`` or ``"full"`` (None: ``"full"`` for the split policies,
    else ``"grow"``; see the module docstring); slot pools ignore it."""

    def __init__(self, policy: str, allocator: Any, max_batch: int, token_budget: int = 8192,
                 chunk_size: int = 512, reserve: str | None = None):
        if policy not in POLICIES:
            raise ConfigError(f"unknown scheduler policy {policy!r}; accepted: {', '.join(POLICIES)}")
        if policy == "chunked" and chunk_size <= max_batch:
            raise ConfigError(f"chunk_size ({chunk_size}) must exceed max_batch ({max_batch})")
        split = policy in ("prefill", "decode")
        reserve = reserve or ("full" if split else "grow")
        if reserve not in RESERVE_POLICIES:
            raise ConfigError(f"unknown page reservation {reserve!r}; accepted: {', '.join(RESERVE_POLICIES)}")
        self.block_size: int | None = getattr(allocator, "block_size", None)
        self.prefix_cache = bool(getattr(allocator, "prefix_cache", False))
        if split and self.block_size is not None and reserve != "full":
            raise ConfigError(f"a {policy} worker of a split engine needs reserve='full': the decode worker "
                              "never allocates, so every page a sequence will write is reserved at admission")
        self.policy = policy
        self.allocator = allocator
        self.max_batch = max_batch
        self.token_budget = token_budget
        self.chunk_size = chunk_size
        self.reserve = reserve
        self.waiting: collections.deque[SeqState] = collections.deque()  # arrived, no KV yet
        self.prefilling: list[SeqState] = []  # KV held, fill partly in the pool
        self.running: list[SeqState] = []  # fill done, decoding
        self.preemptions = 0
        self.recomputed_tokens = 0
        self._admissions = 0

    @property
    def paged(self) -> bool:
        return self.block_size is not None

    def counters(self) -> dict[str, Any]:
        """What a run reports of the scheduler: preemptions and the KV positions they discarded
        (and, with a prefix cache, its blocks looked up, found and the hit rate)."""
        out: dict[str, Any] = {"preemptions": self.preemptions, "recomputed_tokens": self.recomputed_tokens}
        if self.prefix_cache:
            out.update(self.allocator.prefix_stats)
        return out

    # ---- input ------------------------------------------------------------------------------
    def add(self, seq: SeqState) -> None:
        """A request that has arrived (the caller guarantees its arrival time has passed)."""
        if self.policy == "decode":
            raise ConfigError("a decode-only scheduler takes prefilled sequences through add_running")
        capacity = getattr(self.allocator, "capacity", None)
        if self.paged and capacity is not None:
            r = seq.request
            need = self._pages(r.prompt_len + r.max_new_tokens - 1) + (self.reserve == "grow")
            if need > capacity:
                raise WorkloadError(
                    f"request {r.id} (prompt {r.prompt_len} + {r.max_new_tokens} new) needs {need} KV pages of "
                    f"{self.block_size} positions{' (one of them headroom)' if self.reserve == 'grow' else ''} "
                    f"but the pool has {capacity}; raise EngineConfig.num_pages (or the KV memory) or shorten it")
        self.waiting.append(seq)

    def add_running(self, seq: SeqState) -> None:
        """A sequence whose prompt is in the pool and whose first token is known."""
        if (seq.slot is None and not seq.blocks) or not seq.prompt_done or not seq.output:
            raise ConfigError(f"request {seq.id}: add_running needs a slot or pages, a finished prompt and a "
                              "first token")
        self.running.append(seq)

    def drop(self, seq: SeqState) -> None:
        """Take ``seq`` out of every queue and free its KV (a cancelled request)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.prefilling = [s for s in self.prefilling if s is not seq]
        self.running = [s for s in self.running if s is not seq]
        self._release(seq)

    # ---- state ------------------------------------------------------------------------------
    @property
    def num_active(self) -> int:
        return len(self.running) + len(self.prefilling)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def kv_usage(self) -> tuple[int, int] | tuple[None, None]:
        """``(used, total)`` of the KV pool as this worker's allocator sees it now: slots of a
        slot pool, pages of a paged pool (a cached prefix block nobody holds counts as free).
        ``(None, None)`` when the allocator knows no total (a split's decode side, which only
        hands pages back). Two attribute reads: cheap enough for every step."""
        total = getattr(self.allocator, "capacity", None)
        if not isinstance(total, int) or isinstance(total, bool):
            return None, None
        return total - self.allocator.num_free, total

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
        self._make_room()
        if self.running:
            return ScheduledBatch(tuple(self.running), ())
        return None

    def _admit(self) -> SeqState | None:
        """Give the head of the queue its KV (a slot, or pages), if KV and batch room are free."""
        if not self.waiting or self.num_active >= self.max_batch:
            return None
        seq = self.waiting[0]
        cached = 0
        if self.paged:
            got = self._pages_to_admit(seq)
            if got is None:
                return None
            seq.blocks, cached = got
        else:
            slot = self.allocator.alloc()
            if slot is None:
                return None
            seq.slot = slot
        self.waiting.popleft()
        seq.num_computed = cached
        seq.admitted = self._admissions
        self._admissions += 1
        self.prefilling.append(seq)
        return seq

    def _pages(self, positions: int) -> int:
        return -(-max(1, positions) // self.block_size)

    def _pages_to_admit(self, seq: SeqState) -> tuple[list[int], int] | None:
        """The pages ``seq`` is admitted with under the reservation policy and the fill
        positions already in them (a cached prefix), or None (not now)."""
        if self.reserve == "full":
            need, headroom = pages_written(seq.request, self.block_size), 0
        else:
            need, headroom = self._pages(seq.fill_len), 1
        if self.prefix_cache:
            fill = seq.fill_ids(0, seq.fill_len)
            seq.block_hashes = self.allocator.block_hashes(fill)
            # never the block of the fill's last position: its logits must be computed
            got = self.allocator.take(fill, (seq.fill_len - 1) // self.block_size, need, headroom)
            return None if got is None else (got[0], got[1] * self.block_size)
        if self.allocator.num_free < need + headroom:
            return None
        return self.allocator.alloc(need), 0

    def _make_room(self) -> None:
        """``grow``: every running sequence gets the page its next position needs, oldest first;
        when none is free, the newest active sequence is preempted (maybe the one asking)."""
        if not self.paged or self.reserve != "grow":
            return
        for seq in list(self.running):
            need = self._pages(seq.next_position + 1)
            while seq.admitted >= 0 and len(seq.blocks) < need:
                got = self.allocator.alloc(1)
                if got is not None:
                    seq.blocks.extend(got)
                    continue
                victim = max(self.running + self.prefilling, key=lambda s: s.admitted)
                self._preempt(victim)

    def _preempt(self, seq: SeqState) -> None:
        """Free ``seq``'s pages and queue it first, to be recomputed over its prompt and outputs."""
        running = any(s is seq for s in self.running)
        self.recomputed_tokens += seq.next_position if running else seq.num_computed
        self.running = [s for s in self.running if s is not seq]
        self.prefilling = [s for s in self.prefilling if s is not seq]
        self._release(seq)
        seq.num_computed = 0
        seq.recompute = len(seq.output)
        seq.admitted = -1
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _register_blocks(self, seq: SeqState, chunk: ChunkPlan) -> None:
        """Cache the full blocks of ``seq``'s fill that ``chunk`` finished writing."""
        b = self.block_size
        for i in range(chunk.start // b, min(seq.num_computed // b, len(seq.block_hashes))):
            self.allocator.register(seq.blocks[i], seq.block_hashes[i], seq.fill_ids(i * b, b))

    def _release(self, seq: SeqState) -> None:
        """Free whatever KV ``seq`` holds: its pages (one id per call) or its slot."""
        for page in seq.blocks:
            self.allocator.free(page)
        seq.blocks = []
        if seq.slot is not None:
            self.allocator.free(seq.slot)
            seq.slot = None

    def _admit_whole_prompts(self) -> list[ChunkPlan]:
        chunks: list[ChunkPlan] = []
        budget = self.token_budget
        while self.waiting:
            need = self.waiting[0].fill_len
            if chunks and need > budget:
                break
            seq = self._admit()
            if seq is None:
                break
            chunks.append(ChunkPlan(seq, seq.num_computed, seq.fill_len - seq.num_computed))
            budget -= chunks[-1].length
        return chunks

    def _schedule_chunked(self) -> ScheduledBatch | None:
        self._make_room()
        decode = tuple(self.running)
        budget = self.chunk_size - len(decode)
        chunks: list[ChunkPlan] = []
        for seq in self.prefilling:  # prompts already under way continue first
            if budget <= 0:
                break
            n = min(seq.fill_len - seq.num_computed, budget)
            chunks.append(ChunkPlan(seq, seq.num_computed, n))
            budget -= n
        while budget > 0:
            seq = self._admit()
            if seq is None:
                break
            n = min(seq.fill_len - seq.num_computed, budget)
            chunks.append(ChunkPlan(seq, seq.num_computed, n))
            budget -= n
        if not decode and not chunks:
            return None
        return ScheduledBatch(decode, tuple(chunks))

    # ---- results ----------------------------------------------------------------------------
    def postprocess(self, batch: ScheduledBatch, decode_tokens: list[int], chunk_tokens: list[int | None],
                    start_s: float, end_s: float) -> StepOutcome:
        """Record the step's tokens (stamped ``end_s``, the host sync that produced them) and
        prefill times (a recompute keeps its first ones); move finished fills to running (or
        out, for ``prefill``); free the KV of finished sequences."""
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
            if seq.trace.prefill_start_s is None:  # a recompute keeps its first; a cached prefix starts later
                seq.trace.prefill_start_s = start_s
            seq.num_computed = chunk.start + chunk.length
            if self.prefix_cache:
                self._register_blocks(seq, chunk)
            if chunk.last:
                if tok is None:
                    raise RuntimeError(f"request {seq.id}: the prompt's last chunk returned no token")
                if not seq.output:  # a recompute's prefill is not its prefill: TTFT stays the first one
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
                self._release(seq)
        return StepOutcome(prefilled, finished, new_tokens)
