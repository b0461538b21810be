"""Scheduler policies and invariants, without a model: a fake runner that models the KV pool.

The fake runner keeps, per slot, the tokens written at each position and answers with a hash
of the slot's whole sequence, so any wrong slot, position, token or order changes the
output; the expected output of every request is computed independently from its prompt.
"""

from __future__ import annotations

import random

import pytest

from splitlab.config import EngineConfig
from splitlab.errors import ConfigError
from splitlab.engine.kv import SlotAllocator
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
    """Models KV slots: positions must be written in order; reading unwritten KV fails."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.kv: dict[int, list[int]] = {}

    def _write(self, slot: int, start: int, ids) -> list[int]:
        assert 0 <= slot < self.num_slots
        seq = self.kv.setdefault(slot, [])
        if start == 0:
            seq.clear()  # a new sequence takes the slot over
        assert len(seq) == start, f"slot {slot}: writing position {start} after {len(seq)} positions"
        seq.extend(ids)
        return seq

    def prefill(self, chunks):
        return self.mixed_step(None, chunks)[1]

    def decode_step(self, slots, tokens, positions):
        assert len(set(slots)) == len(slots), "two rows of one step share a slot"
        return [next_token(self._write(s, p, [t])) for s, t, p in zip(slots, tokens, positions)]

    def mixed_step(self, decode, chunks):
        dec = self.decode_step(*decode) if decode is not None else []
        out = []
        for c in map(as_chunk, chunks):
            seq = self._write(c.slot, c.start_pos, list(c.token_ids))
            out.append(next_token(seq) if c.last else None)
        return dec, out


def random_requests(n: int, seed: int, max_prompt: int = 40, max_new: int = 9) -> list[Request]:
    rng = random.Random(seed)
    return [Request(i, tuple(rng.randrange(1, 500) for _ in range(rng.randrange(1, max_prompt))),
                    rng.randrange(1, max_new), arrival_s=float(rng.randrange(0, 12)))
            for i in range(n)]


def simulate(policy: str, requests: list[Request], num_slots: int, max_batch: int, token_budget: int = 64,
             chunk_size: int = 16):
    """Step a Worker on the fake runner; arrivals in step units ('arrival_s' = step index)."""
    alloc = SlotAllocator(num_slots)
    sched = Scheduler(policy, alloc, max_batch, token_budget, chunk_size)
    clock_now = [0.0]
    worker = Worker(policy, FakeRunner(num_slots), sched, clock=lambda: clock_now[0])
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
        slots = [s.slot for s in sched.running + sched.prefilling]
        assert len(slots) == len(set(slots)), "two live sequences share a KV slot"
        assert len(slots) <= max_batch and alloc.num_used == len(slots)
        active_slots_seen.append(len(slots))
        outcome = worker.step()
        assert outcome is not None
        done += len(outcome.finished)
    assert done == len(requests) and not pending
    assert alloc.num_free == num_slots  # every slot came back
    return seqs, worker.steps, active_slots_seen


@pytest.mark.parametrize("policy", ["serial", "chunked"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_token_of_every_request_exactly_once(policy, seed):
    requests = random_requests(25, seed)
    seqs, steps, active = simulate(policy, requests, num_slots=4, max_batch=4, token_budget=50, chunk_size=9)
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
