"""Scheduler policies and invariants, without a model: a fake runner that models the KV pool.

The fake runner keeps, per slot, the tokens written at each position and answers with a hash
of the slot's whole sequence, so any wrong slot, position, token or order changes the
output; the expected output of every request is computed independently from its prompt.
"""

from __future__ import annotations

import random

import pytest

from splitlab.config import EngineConfig
from splitlab.errors import ConfigError, WorkloadError
from splitlab.engine.kv import PageAllocator, SlotAllocator
from splitlab.engine.plan import as_chunk
from splitlab.engine.scheduler import Scheduler, SeqState
from splitlab.engine.loop import Worker
from splitlab.workload import Request


def next_token(seq: list[int]) -> int:
    h = 17
    for t in seq:
        h = (h * 31 + t) % 1_000_003
    return h % 997


def expected_output(r: Request) -> list[int]:
    seq = list(r.prompt_ids)
    out = []
    for _ in range(r.max_new_tokens):
        out.append(next_token(seq))
        seq.append(out[-1])
    return out


class FakeRunner:
    """Models the KV pool as flat rows: position ``p`` of a sequence is row ``slot * row_len + p``
    (slot pool) or ``table[p // row_len] * row_len + p % row_len`` (paged pool, ``row_len`` the
    block size). Each forward writes its tokens' rows, then reads the sequence back through the
    same mapping and answers with a hash of it: a wrong slot, page, position, token or order,
    a page another sequence overwrote, or a never-written position (KeyError) shows."""

    def __init__(self, num_rows: int, row_len: int, paged: bool = False):
        self.num_rows, self.row_len, self.paged = num_rows, row_len, paged
        self.kv: dict[int, int] = {}
        self.written: set[int] = set()  # rows written since the caller last cleared it

    def _row(self, slot, blocks, pos: int) -> int:
        if self.paged:
            assert blocks is not None and slot is None, "a paged forward names pages, not slots"
            page = blocks[pos // self.row_len]
            assert 0 <= page < self.num_rows
            return page * self.row_len + pos % self.row_len
        assert blocks is None and 0 <= slot < self.num_rows and pos < self.row_len
        return slot * self.row_len + pos

    def _forward(self, slot, blocks, start: int, ids) -> int:
        for i, t in enumerate(ids):
            row = self._row(slot, blocks, start + i)
            self.kv[row] = t
            self.written.add(row)
        return next_token([self.kv[self._row(slot, blocks, p)] for p in range(start + len(ids))])

    def prefill(self, chunks, between_layers=None):  # no layers here: the hook is never called
        return self.mixed_step(None, chunks)[1]

    def decode_step(self, slots, tokens, positions, blocks=None):
        if self.paged:
            writes = [table[pos // self.row_len] for table, pos in zip(blocks, positions)]
            assert len(set(writes)) == len(writes), "two rows of one step write one page"
        else:
            assert len(set(slots)) == len(slots), "two rows of one step share a slot"
        tables = blocks if blocks is not None else [None] * len(slots)
        return [self._forward(s, bl, p, [t]) for s, t, p, bl in zip(slots, tokens, positions, tables)]

    def mixed_step(self, decode, chunks):
        dec = self.decode_step(*decode) if decode is not None else []
        out = []
        for c in map(as_chunk, chunks):
            tok = self._forward(c.slot, c.blocks, c.start_pos, list(c.token_ids))
            out.append(tok if c.last else None)
        return dec, out


def random_requests(n: int, seed: int, max_prompt: int = 40, max_new: int = 9) -> list[Request]:
    rng = random.Random(seed)
    return [Request(i, tuple(rng.randrange(1, 500) for _ in range(rng.randrange(1, max_prompt))),
                    rng.randrange(1, max_new), arrival_s=float(rng.randrange(0, 12)))
            for i in range(n)]


def simulate(policy: str, requests: list[Request], num_slots: int, max_batch: int, token_budget: int = 64,
             chunk_size: int = 16, block_size: int | None = None, prefix_cache: bool = False):
    """Step a Worker on the fake runner; arrivals in step units ('arrival_s' = step index).
    ``block_size``: a paged pool of ``num_slots`` pages of that many positions."""
    alloc = SlotAllocator(num_slots) if block_size is None else PageAllocator(num_slots, block_size, prefix_cache)
    sched = Scheduler(policy, alloc, max_batch, token_budget, chunk_size)
    clock_now = [0.0]
    runner = FakeRunner(num_slots, block_size or 64, paged=block_size is not None)
    worker = Worker(policy, runner, sched, clock=lambda: clock_now[0])
    seqs = {r.id: SeqState.new(r) for r in requests}
    pending = sorted(requests, key=lambda r: r.arrival_s)
    done = 0
    active_slots_seen = []
    for step in range(10_000):
        clock_now[0] = float(step)
        while pending and pending[0].arrival_s <= step:
            sched.add(seqs[pending.pop(0).id])
        if not sched.has_work():
            if not pending:
                break
            continue
        live = sched.running + sched.prefilling
        held = [s.slot for s in live] if block_size is None else [p for s in live for p in s.blocks]
        shared = {p for p in held if held.count(p) > 1}
        assert not shared or prefix_cache, "two live sequences share a KV slot or page"
        assert len(live) <= max_batch and alloc.num_used == len(set(held))
        assert all(not s.blocks and s.slot is None for s in sched.waiting)  # waiting holds no KV
        active_slots_seen.append(len(live))
        runner.written.clear()
        outcome = worker.step()
        assert outcome is not None
        # a page two sequences share is a cached full block: read, never written
        assert not {r // runner.row_len for r in runner.written} & shared
        live = sched.running + sched.prefilling
        held = {s.slot for s in live} if block_size is None else {p for s in live for p in s.blocks}
        assert sched.kv_usage() == (len(held), num_slots)
        assert (worker.steps[-1].kv_used, worker.steps[-1].kv_total) == (len(held), num_slots)  # the step trace
        done += len(outcome.finished)
    assert done == len(requests) and not pending
    assert alloc.num_free == num_slots  # every slot or page came back
    return seqs, worker.steps, active_slots_seen, sched


@pytest.mark.parametrize("policy", ["serial", "chunked"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_token_of_every_request_exactly_once(policy, seed):
    requests = random_requests(25, seed)
    seqs, steps, active, _ = simulate(policy, requests, num_slots=4, max_batch=4, token_budget=50, chunk_size=9)
    for r in requests:
        t = seqs[r.id].trace
        assert t.output_ids == expected_output(r), f"request {r.id}"
        assert len(t.token_times_s) == r.max_new_tokens
        assert t.prefill_start_s is not None and t.prefill_start_s >= r.arrival_s  # never before arrival
        assert t.prefill_end_s >= t.prefill_start_s and t.token_times_s[0] == t.prefill_end_s
    produced = {}
    for s in steps:  # each step's rows name distinct requests
        assert len(set(s.request_ids)) == len(s.request_ids)
        for rid in s.request_ids:
            produced[rid] = produced.get(rid, 0) + 1
    assert max(active) <= 4
    waited = [r.id for r in requests if seqs[r.id].trace.prefill_start_s > r.arrival_s + 3]
    assert waited  # arrivals outran the 4 slots: some requests waited, and still finished
    if policy == "chunked":
        assert all(s.num_tokens <= 9 for s in steps)
        assert any(s.kind == "mixed" for s in steps)
        # some prompt spanned several steps (prompts are up to 39 tokens, chunks 9)
        assert any(produced[r.id] > r.max_new_tokens for r in requests if r.prompt_len > 9)
    else:
        assert {s.kind for s in steps} == {"prefill", "decode"}
        for s in steps:
            if s.kind == "prefill" and len(s.request_ids) > 1:
                assert s.num_tokens <= 50


def test_serial_prefill_admits_by_budget_slots_and_batch():
    alloc = SlotAllocator(3)
    sched = Scheduler("serial", alloc, max_batch=3, token_budget=10)
    reqs = [Request(i, tuple(range(1, n + 1)), 4) for i, n in enumerate([4, 5, 3, 2])]
    for r in reqs:
        sched.add(SeqState.new(r))
    b = sched.schedule()
    assert b.kind == "prefill" and [c.seq.id for c in b.chunks] == [0, 1]  # 4 + 5 <= 10 < 4 + 5 + 3
    assert all(c.start == 0 and c.last for c in b.chunks)
    sched.postprocess(b, [], [7, 8], 0.0, 1.0)
    b = sched.schedule()
    assert [c.seq.id for c in b.chunks] == [2]  # one slot left
    sched.postprocess(b, [], [9], 1.0, 2.0)
    b = sched.schedule()  # request 3 waits: no slot; decode everyone
    assert b.kind == "decode" and [s.id for s in b.decode] == [0, 1, 2] and len(sched.waiting) == 1
    assert b.decode_inputs() == ([0, 1, 2], [7, 8, 9], [4, 5, 3])


def test_serial_runs_an_oversized_prompt_alone():
    sched = Scheduler("serial", SlotAllocator(4), max_batch=4, token_budget=8)
    sched.add(SeqState.new(Request(0, tuple(range(1, 21)), 2)))
    sched.add(SeqState.new(Request(1, (1, 2), 2)))
    b = sched.schedule()
    assert [c.seq.id for c in b.chunks] == [0] and b.num_tokens == 20


def test_chunked_continues_prompts_first_and_fills_the_budget():
    alloc = SlotAllocator(4)
    sched = Scheduler("chunked", alloc, max_batch=3, chunk_size=8)
    sched.add(SeqState.new(Request(0, tuple(range(1, 13)), 3)))  # 12 tokens
    sched.add(SeqState.new(Request(1, (5, 6, 7), 3)))
    b = sched.schedule()
    assert [(c.seq.id, c.start, c.length, c.last) for c in b.chunks] == [(0, 0, 8, False)]
    sched.postprocess(b, [], [None], 0.0, 1.0)
    b = sched.schedule()
    assert [(c.seq.id, c.start, c.length, c.last) for c in b.chunks] == [(0, 8, 4, True), (1, 0, 3, True)]
    sched.postprocess(b, [], [11, 12], 1.0, 2.0)
    sched.add(SeqState.new(Request(2, tuple(range(1, 30)), 3)))
    b = sched.schedule()
    assert b.kind == "mixed" and [s.id for s in b.decode] == [0, 1]
    assert [(c.seq.id, c.start, c.length) for c in b.chunks] == [(2, 0, 6)] and b.num_tokens == 8
    assert sched.running[0].trace.prefill_start_s == 0.0 and sched.running[0].trace.prefill_end_s == 2.0


def test_one_token_requests_finish_at_prefill_and_free_their_slot():
    alloc = SlotAllocator(1)
    sched = Scheduler("serial", alloc, max_batch=1)
    seq = SeqState.new(Request(0, (1, 2, 3), 1))
    sched.add(seq)
    b = sched.schedule()
    out = sched.postprocess(b, [], [42], 0.0, 0.5)
    assert out.finished == [seq] and seq.trace.output_ids == [42] and alloc.num_free == 1
    assert not sched.has_work() and sched.schedule() is None


def test_split_policies():
    alloc = SlotAllocator(2)
    pre = Scheduler("prefill", alloc, max_batch=2)
    dec = Scheduler("decode", alloc, max_batch=2)
    seq = SeqState.new(Request(0, (1, 2), 3))
    pre.add(seq)
    b = pre.schedule()
    out = pre.postprocess(b, [], [5], 0.0, 1.0)
    assert out.prefilled == [seq] and not pre.running and pre.schedule() is None
    dec.add_running(seq)
    assert dec.schedule().kind == "decode"
    with pytest.raises(ConfigError):
        dec.add(SeqState.new(Request(1, (1,), 1)))
    with pytest.raises(ConfigError):
        dec.add_running(SeqState.new(Request(2, (1,), 1)))  # no slot, no first token


def test_bad_policy_and_budget():
    with pytest.raises(ConfigError, match="policy"):
        Scheduler("fifo", SlotAllocator(1), 1)
    with pytest.raises(ConfigError, match="chunk_size"):
        Scheduler("chunked", SlotAllocator(1), max_batch=8, chunk_size=8)
    with pytest.raises(ConfigError, match="chunk_size"):
        EngineConfig(max_batch=64, chunk_size=64)
    with pytest.raises(ConfigError, match="unknown"):
        EngineConfig.from_dict({"max_batch": 4, "chunk_size": 8, "slots": 3})
    with pytest.raises(ConfigError):
        EngineConfig(kv_memory_fraction=1.5)
    with pytest.raises(ConfigError):
        EngineConfig(kernels="cuda")
    assert EngineConfig.from_dict(EngineConfig(max_batch=4, chunk_size=8).to_dict()).max_batch == 4


# ---- the paged pool: admission by pages, growth, preemption and recompute -------------------------

@pytest.mark.parametrize("policy", ["serial", "chunked"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_paged_every_token_exactly_once_through_preemption(policy, seed):
    """A pool of 14 pages of 4 positions for up to 4 sequences of up to 46 positions: sequences
    outgrow it mid-decode, the newest are preempted and recomputed, and every request still
    gets exactly its tokens; no page is ever held twice and every page comes back."""
    requests = random_requests(25, seed)
    seqs, steps, active, sched = simulate(policy, requests, num_slots=14, max_batch=4, token_budget=50,
                                          chunk_size=9, block_size=4)
    for r in requests:
        t = seqs[r.id].trace
        assert t.output_ids == expected_output(r), f"request {r.id}"
        assert len(t.token_times_s) == r.max_new_tokens
        assert t.prefill_start_s >= r.arrival_s and t.token_times_s[0] == t.prefill_end_s
        assert all(b >= a for a, b in zip(t.token_times_s, t.token_times_s[1:]))
    assert sched.preemptions > 0 and sched.recomputed_tokens > 0  # the pool really ran out
    assert sched.counters() == {"preemptions": sched.preemptions, "recomputed_tokens": sched.recomputed_tokens}
    # a recompute re-prefills what the preempted sequence had: more rows than one pass needs
    assert sum(s.num_tokens for s in steps) > sum(r.prompt_len + r.max_new_tokens - 1 for r in requests)


def test_paged_admission_needs_the_prompt_pages_plus_one():
    alloc = PageAllocator(5, 4)
    sched = Scheduler("serial", alloc, max_batch=4, token_budget=100)
    a = SeqState.new(Request(0, tuple(range(1, 10)), 3))  # 9 positions: 3 pages (+1 free)
    b = SeqState.new(Request(1, tuple(range(1, 6)), 3))  # 5 positions: 2 pages (+1 free)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert [c.seq.id for c in batch.chunks] == [0] and a.blocks == [0, 1, 2]  # b waits: 2 free < 2 + 1
    assert alloc.num_free == 2 and list(sched.waiting) == [b]
    decode, chunks = batch.runner_inputs()
    assert decode is None and chunks[0].blocks == [0, 1, 2] and chunks[0].slot is None
    sched.postprocess(batch, [], [7], 0.0, 1.0)
    batch = sched.schedule()  # nothing admissible: decode; position 9 needs no new page yet
    assert batch.kind == "decode" and a.blocks == [0, 1, 2]
    sched.postprocess(batch, [8], [], 1.0, 2.0)
    batch = sched.schedule()  # position 10 ... still page 2; the token at 9 was written in page 2
    assert batch.decode_inputs() == ([None], [8], [10]) and a.blocks == [0, 1, 2]
    sched.postprocess(batch, [9], [], 2.0, 3.0)
    assert a.finished and alloc.num_free == 5 and a.blocks == []  # freed at the end
    batch = sched.schedule()
    assert [c.seq.id for c in batch.chunks] == [1] and b.blocks == [0, 1]  # lowest pages first


def test_paged_growth_and_preemption_of_the_newest_with_exact_recompute():
    alloc = PageAllocator(5, 2)
    sched = Scheduler("serial", alloc, max_batch=2, token_budget=100)
    old = SeqState.new(Request(0, (1, 2, 3), 5))
    new = SeqState.new(Request(1, (4, 5), 5))
    for s in (old, new):
        sched.add(s)
    batch = sched.schedule()  # old: 2 pages (+1 free): admitted; new: 1 page (+1 free): admitted
    assert [c.seq.id for c in batch.chunks] == [0, 1] and old.blocks == [0, 1] and new.blocks == [2]
    sched.postprocess(batch, [], [10, 20], 0.0, 1.0)
    batch = sched.schedule()  # positions 3 (in page 1) and 2 (a new page for `new`)
    assert batch.kind == "decode" and old.blocks == [0, 1] and new.blocks == [2, 3]
    sched.postprocess(batch, [11, 21], [], 1.0, 2.0)
    batch = sched.schedule()  # position 4 of old takes the last page; position 3 of new is in page 3
    assert old.blocks == [0, 1, 4] and alloc.num_free == 0 and sched.preemptions == 0
    sched.postprocess(batch, [12, 22], [], 2.0, 3.0)
    batch = sched.schedule()  # new needs a page at position 4: none free, it is the newest: it goes
    assert sched.preemptions == 1 and sched.recomputed_tokens == 4  # its positions 0..3 were in the pool
    assert [s.id for s in batch.decode] == [0] and list(sched.waiting) == [new] and alloc.num_free == 2
    assert new.blocks == [] and new.recompute == 3 and new.fill_len == 5
    assert new.fill_ids(0, 5) == (4, 5, 20, 21, 22)  # re-prefilled over its prompt and its tokens
    sched.postprocess(batch, [13], [], 3.0, 4.0)
    batch = sched.schedule()  # 2 free < 3 pages + 1: new waits; old decodes its last token
    assert batch.kind == "decode" and [s.id for s in batch.decode] == [0]
    sched.postprocess(batch, [14], [], 4.0, 5.0)
    assert old.finished and alloc.num_free == 5
    batch = sched.schedule()  # the recompute: one chunk over the whole fill, its token the 4th output
    assert [(c.seq.id, c.start, c.length, c.last) for c in batch.chunks] == [(1, 0, 5, True)]
    assert batch.chunks[0].token_ids == (4, 5, 20, 21, 22) and new.blocks == [0, 1, 2]
    sched.postprocess(batch, [], [23], 5.0, 6.0)
    assert new.output == [20, 21, 22, 23] and new.trace.prefill_end_s == 1.0  # TTFT: the first prefill
    assert new.trace.token_times_s == [1.0, 2.0, 3.0, 6.0] and sched.running == [new]


def test_paged_full_reservation_for_the_split_workers():
    """The prefill worker reserves every page a sequence will write; the decode worker grows
    nothing and frees the pages one id at a time (as a proxy to another process sees them)."""
    alloc = PageAllocator(6, 4)
    pre = Scheduler("prefill", alloc, max_batch=2)
    freed: list[int] = []

    class Proxy:  # what the decode side of a split engine holds: frees, never allocates
        def alloc(self, n=1):
            raise AssertionError("the decode side allocated")

        def free(self, page):
            assert isinstance(page, int)
            freed.append(page)

        num_free = 0

    dec = Scheduler("decode", Proxy(), max_batch=2)
    seq = SeqState.new(Request(0, tuple(range(1, 7)), 7))  # writes positions 0..11: 3 pages
    pre.add(seq)
    other = SeqState.new(Request(1, tuple(range(1, 12)), 4))  # 14 positions: 4 pages > 3 left: waits
    pre.add(other)
    batch = pre.schedule()
    assert [c.seq.id for c in batch.chunks] == [0] and seq.blocks == [0, 1, 2]
    out = pre.postprocess(batch, [], [9], 0.0, 1.0)
    assert out.prefilled == [seq] and pre.schedule() is None  # other still waits for pages
    dec.add_running(seq)
    for step in range(6):
        b = dec.schedule()
        assert b.runner_inputs()[0].blocks == [[0, 1, 2]]
        dec.postprocess(b, [step], [], 1.0 + step, 2.0 + step)
    assert seq.finished and sorted(freed) == [0, 1, 2] and dec.schedule() is None
    alloc.free(freed)
    assert pre.schedule().chunks[0].seq is other
    with pytest.raises(ConfigError, match="reserve='full'"):
        Scheduler("prefill", alloc, max_batch=2, reserve="grow")
    with pytest.raises(ConfigError, match="reservation"):
        Scheduler("serial", alloc, max_batch=2, reserve="lazy")


def test_paged_request_that_can_never_fit_is_refused():
    sched = Scheduler("serial", PageAllocator(4, 4), max_batch=2)
    sched.add(SeqState.new(Request(0, tuple(range(1, 10)), 4)))  # 12 positions: 3 pages + 1 headroom = 4
    with pytest.raises(WorkloadError, match="num_pages"):
        sched.add(SeqState.new(Request(1, tuple(range(1, 10)), 5)))  # 13 positions: 4 pages + 1 > 4


def test_drop_frees_what_a_sequence_holds():
    alloc = PageAllocator(5, 2)
    sched = Scheduler("chunked", alloc, max_batch=2, chunk_size=4)
    seq = SeqState.new(Request(0, (1, 2, 3, 4, 5), 3))
    sched.add(seq)
    sched.schedule()  # admitted with 3 pages, first chunk of 4 under way
    assert alloc.num_used == 3 and sched.prefilling == [seq]
    sched.drop(seq)
    assert alloc.num_free == 5 and not sched.has_work() and seq.blocks == []
    slots = SlotAllocator(1)
    s2 = Scheduler("serial", slots, max_batch=1)
    other = SeqState.new(Request(1, (1,), 2))
    s2.add(other)
    s2.schedule()
    s2.drop(other)
    assert slots.num_free == 1 and other.slot is None


# ---- shared prefixes ------------------------------------------------------------------------------

def prefixed_requests(n: int, seed: int, prefix_len: int = 13) -> list[Request]:
    """Requests whose prompts share their first ``prefix_len`` tokens (a system prompt), and a
    few that repeat another's prompt whole."""
    rng = random.Random(seed)
    system = tuple(rng.randrange(1, 500) for _ in range(prefix_len))
    out = []
    for i in range(n):
        if i % 5 == 4:
            prompt = out[i - 2].prompt_ids  # the same prompt again
        else:
            prompt = system + tuple(rng.randrange(1, 500) for _ in range(rng.randrange(1, 20)))
        out.append(Request(i, prompt, rng.randrange(1, 9), arrival_s=float(rng.randrange(0, 20))))
    return out


@pytest.mark.parametrize("policy", ["serial", "chunked"])
@pytest.mark.parametrize("seed", [0, 1])
def test_prefix_cache_shares_full_blocks_and_keeps_every_output(policy, seed):
    """Prompts with a common 13-token prefix over pages of 4: the first three blocks are
    computed once and shared; outputs are unchanged, fewer rows run, a shared page is never
    written, and every page comes back (cached blocks nobody holds count as free)."""
    requests = prefixed_requests(20, seed)
    seqs, steps, _, sched = simulate(policy, requests, num_slots=48, max_batch=4, token_budget=50, chunk_size=9,
                                     block_size=4, prefix_cache=True)
    for r in requests:
        assert seqs[r.id].trace.output_ids == expected_output(r), f"request {r.id}"
        assert seqs[r.id].trace.prefill_start_s >= r.arrival_s
    stats = sched.counters()
    assert stats["prefix_blocks_hit"] > 0 and 0 < stats["prefix_hit_rate"] <= 1
    _, plain_steps, _, plain = simulate(policy, requests, num_slots=48, max_batch=4, token_budget=50, chunk_size=9,
                                        block_size=4)
    assert sched.preemptions == plain.preemptions == 0  # so the rows differ by the cached ones only
    saved = sum(s.num_tokens for s in plain_steps) - sum(s.num_tokens for s in steps)
    assert saved == 4 * stats["prefix_blocks_hit"]  # each hit skips one block's rows


def test_prefix_cache_allocator_refcounts_lru_and_content_check():
    alloc = PageAllocator(4, 2, prefix_cache=True)
    fill = (1, 2, 3, 4, 5)
    hashes = alloc.block_hashes(fill)
    assert len(hashes) == 2 and hashes != alloc.block_hashes((9, 9, 3, 4))[:2]  # chained on the earlier blocks
    pages, hits = alloc.take(fill, 2, 3)
    assert (pages, hits) == ([0, 1, 2], 0) and alloc.prefix_stats["prefix_blocks_queried"] == 2
    alloc.register(pages[0], hashes[0], fill[:2])
    alloc.register(pages[1], hashes[1], fill[2:4])
    again, hits = alloc.take(fill, 2, 3)  # the same prompt: its two full blocks shared, one fresh page
    assert (again, hits) == ([0, 1, 3], 2) and alloc.num_free == 0 and alloc.num_used == 4
    assert alloc.prefix_stats == {"prefix_blocks_queried": 4, "prefix_blocks_hit": 2, "prefix_hit_rate": 0.5}
    assert alloc.take((1, 2, 7, 7, 7), 2, 3) is None  # one block shared, two fresh needed, none free
    alloc.free(pages)
    alloc.free(again)
    assert alloc.num_free == 4 and alloc.num_used == 0  # cached blocks nobody holds are free...
    third, hits = alloc.take((1, 2, 7, 7, 7), 2, 3)  # ...and still found: block 0 hit, block 1 differs
    assert hits == 1 and third[0] == 0 and 1 not in third[1:]  # never-cached pages before cached ones
    assert alloc.alloc(1) == [1]  # the last page: the least recently freed cached block, now uncached
    alloc.free(third + [1])
    assert alloc.take(fill, 2, 3)[1] == 1  # block 1's page was reused: only block 0 still cached
    with pytest.raises(ValueError, match="not allocated"):
        alloc.register(3, 123, (0, 0))
    plain = PageAllocator(4, 2)
    plain.register(0, 1, (1, 2))  # no cache: nothing kept
    assert plain.take(fill, 2, 3) == ([0, 1, 2], 0) and plain.prefix_stats["prefix_hit_rate"] is None


# ---- the KV usage a step trace records ------------------------------------------------------------

def test_kv_usage_counts_held_slots_and_pages_and_frees():
    slots = Scheduler("serial", SlotAllocator(4), max_batch=4, token_budget=100)
    assert slots.kv_usage() == (0, 4)
    a, b = SeqState.new(Request(0, (1, 2, 3), 2)), SeqState.new(Request(1, (4, 5), 1))
    slots.add(a)
    slots.add(b)
    assert slots.kv_usage() == (0, 4)  # waiting holds nothing
    batch = slots.schedule()
    assert slots.kv_usage() == (2, 4)
    slots.postprocess(batch, [], [7, 8], 0.0, 1.0)  # b had one token: done, its slot back
    assert slots.kv_usage() == (1, 4)
    slots.postprocess(slots.schedule(), [9], [], 1.0, 2.0)
    assert slots.kv_usage() == (0, 4)

    pages = Scheduler("serial", PageAllocator(5, 2), max_batch=2, token_budget=100)
    c = SeqState.new(Request(2, (1, 2, 3), 4))
    pages.add(c)
    batch = pages.schedule()
    assert pages.kv_usage() == (2, 5)  # 3 positions: 2 pages of 2
    pages.postprocess(batch, [], [10], 0.0, 1.0)
    pages.postprocess(pages.schedule(), [11], [], 1.0, 2.0)  # position 3: still page 1
    assert pages.kv_usage() == (2, 5)
    pages.schedule()  # position 4 starts a page: the scheduler takes it before the step runs
    assert pages.kv_usage() == (3, 5)


def test_kv_usage_counts_an_unheld_cached_block_as_free_and_knows_no_total_on_the_decode_side():
    alloc = PageAllocator(6, 2, prefix_cache=True)
    sched = Scheduler("serial", alloc, max_batch=2, token_budget=100)
    seq = SeqState.new(Request(0, (1, 2, 3, 4, 5), 1))
    sched.add(seq)
    sched.postprocess(sched.schedule(), [], [9], 0.0, 1.0)
    assert alloc.prefix_stats["prefix_blocks_queried"] == 2  # its two full blocks are now cached
    assert sched.kv_usage() == (0, 6)  # cached but unheld: free to reuse

    from splitlab.modes.common import FreedSlots

    decode = Scheduler("decode", FreedSlots(lambda slots: None), max_batch=2)
    assert decode.kv_usage() == (None, None)  # it hands KV back, it sees no pool
