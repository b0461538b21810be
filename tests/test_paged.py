"""The paged KV pool end to end: greedy parity with HF ``generate()`` in fp32 on CPU.

``serial`` and ``chunked`` with pages of a few positions, so every prompt spans many pages;
arrivals spread over time and more requests than the pool holds, so freed pages are reused;
and a pool so small that running sequences outgrow it, so the newest is preempted and later
recomputed (re-prefilled over its prompt and the tokens it had), its output continuing
exactly: no request lost, none duplicated, every page back at the end. The split workers
hand a sequence's pages over (``Handoff.blocks``). With the prefix cache, prompts that share
a system prompt share its pages and compute only the rest.
"""

from __future__ import annotations

import random
import time

import pytest
from _colocation import drive_split_workers
from _oracle import hf_greedy
from _traces import assert_traces_complete

import splitlab
from splitlab.config import EngineConfig
from splitlab.errors import ConfigError, WorkloadError
from splitlab.engine.loop import DecodeWorker, Handoff, Worker, build_engine, drive
from splitlab.engine.scheduler import Scheduler
from splitlab.engine.warmup import warm_up
from splitlab.workload import from_prompts


def workload_of(seed: int, n: int = 10, longest: int = 40, spread_s: float = 0.2):
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, 260) for _ in range(rng.randrange(2, longest))] for _ in range(n)]
    news = [rng.randrange(1, 14) for _ in range(n)]
    arrivals = [0.0] * (n // 2) + sorted(rng.uniform(0, spread_s) for _ in range(n - n // 2))
    return from_prompts(prompts, news, arrivals, name=f"paged-{seed}")


@pytest.fixture(scope="module")
def workload():
    return workload_of(0)


@pytest.fixture(scope="module")
def expected(tiny, workload):
    return {r.id: hf_greedy(tiny, list(r.prompt_ids), r.max_new_tokens) for r in workload}


def serve(model, workload, mode: str, config: EngineConfig):
    """What ``splitlab.run`` does for serial / chunked, with the scheduler kept to read its
    counters and the allocator to check every page came back."""
    parts = build_engine(model, config)
    warm_up(parts.runner, token_budget=config.token_budget)
    scheduler = Scheduler(mode, parts.allocator, parts.runner.max_batch, config.token_budget, config.chunk_size)
    t0 = time.perf_counter()
    clock = lambda: time.perf_counter() - t0  # noqa: E731
    worker = Worker(mode, parts.runner, scheduler, clock)
    traces = drive(worker, workload, clock, progress=False)
    assert parts.allocator.num_free == parts.allocator.capacity  # every page came back
    return traces, scheduler, worker.steps, parts


@pytest.mark.parametrize("mode,cfg", [
    ("serial", dict(token_budget=48)),
    ("chunked", dict(chunk_size=7)),  # smaller than most prompts: fills span steps and pages
    ("chunked", dict(chunk_size=32)),
])
def test_paged_pool_spanning_many_pages_is_exact(tiny, workload, expected, mode, cfg):
    config = EngineConfig(max_seq_len=64, max_batch=3, kv_block_size=4, num_pages=64, **cfg)
    run = splitlab.run(workload, tiny, mode=mode, config=config, progress=False)
    assert run.output_ids() == expected
    assert_traces_complete(run, workload)
    assert max(r.prompt_len for r in workload) > 8 * 4  # some prompt spans more than 8 pages
    assert run.config.engine.kv_block_size == 4 and run.memory["kv_pool_bytes"] == 2 * 2 * 65 * 4 * 2 * 16 * 4


@pytest.mark.parametrize("mode,cfg", [("serial", dict(token_budget=64)), ("chunked", dict(chunk_size=9))])
def test_preemption_and_recompute_keep_every_output_exact(tiny, mode, cfg):
    """16 pages of 4 positions for 4 sequences of up to 52: decode outgrows the pool, the
    newest sequences are preempted and recomputed, and every output still equals HF's."""
    wl = workload_of(1, n=12, longest=40)
    expected = {r.id: hf_greedy(tiny, list(r.prompt_ids), r.max_new_tokens) for r in wl}
    config = EngineConfig(max_seq_len=64, max_batch=4, kv_block_size=4, num_pages=16, **cfg)
    traces, scheduler, steps, _ = serve(tiny, wl, mode, config)
    assert {rid: t.output_ids for rid, t in traces.items()} == expected
    assert scheduler.preemptions > 0 and scheduler.recomputed_tokens > 0
    for r in wl:  # every token once, in time order, and the first one when the first prefill ended
        t = traces[r.id]
        assert len(t.output_ids) == len(t.token_times_s) == r.max_new_tokens
        assert t.token_times_s[0] == t.prefill_end_s >= t.prefill_start_s >= r.arrival_s
        assert all(b >= a for a, b in zip(t.token_times_s, t.token_times_s[1:]))
    assert sum(s.num_tokens for s in steps) > sum(r.prompt_len + r.max_new_tokens - 1 for r in wl)  # recomputed
    # the same requests through the front door: the same tokens, and the user is told
    with pytest.warns(UserWarning, match="KV pool ran out"):
        run = splitlab.run(wl, tiny, mode=mode, config=config, progress=False)
    assert run.output_ids() == expected
    assert run.memory["preemptions"] > 0 and run.memory["recomputed_tokens"] > 0
    assert (run.config.effective["kv_block_size"], run.config.effective["num_pages"]) == (4, 16)


def test_a_request_the_pool_can_never_hold_is_refused(tiny):
    wl = from_prompts([[5] * 30], 10, name="too-big")  # 39 positions: 10 pages of 4, plus headroom
    config = EngineConfig(max_seq_len=64, max_batch=2, chunk_size=8, kv_block_size=4, num_pages=10)
    with pytest.raises(WorkloadError, match="num_pages"):
        splitlab.run(wl, tiny, mode="serial", config=config, progress=False)


def test_split_workers_hand_over_pages(tiny, workload, expected):
    """The split building blocks over a paged pool: the prefill worker reserves every page a
    sequence will write and hands them over in ``Handoff.blocks``; the decode worker decodes
    through them and frees them; nothing is copied, every page comes back."""
    config = EngineConfig(max_seq_len=64, max_batch=3, token_budget=64, kv_block_size=8, num_pages=24)

    def check(h, seq):  # every page the sequence will write, reserved by the prefill side
        r = seq.request
        assert h.slot is None and len(h.blocks) == -(-(r.prompt_len + r.max_new_tokens - 1) // 8)

    seqs, pre, dec, parts, clock = drive_split_workers(tiny, config, workload, check)
    assert pre.scheduler.reserve == "full"
    assert {rid: s.output for rid, s in seqs.items()} == expected
    assert parts.allocator.num_free == 24
    h = Handoff(7, None, 3, 42, 4, 0.0, 0.0, 1.0, (5, 6))  # rebuilt in another process from the handoff alone
    seq = DecodeWorker(parts.runner, parts.allocator, config, clock).accept(h)
    assert seq.blocks == [5, 6] and seq.next_position == 3 and seq.slot is None


@pytest.mark.parametrize("mode", ["serial", "chunked"])
def test_prefix_cache_shares_a_system_prompt_and_stays_exact(tiny, mode):
    """Prompts behind one 21-token system prompt, pages of 4: once the first is prefilled,
    later requests take its five full blocks from the cache (their prefill is a later chunk
    attending to them in place) and every output is still HF's."""
    rng = random.Random(3)
    system = [rng.randrange(4, 260) for _ in range(21)]
    prompts = [system + [rng.randrange(4, 260) for _ in range(rng.randrange(1, 12))] for _ in range(8)]
    prompts.append(list(prompts[2]))  # one prompt twice: all but its last block shared
    wl = from_prompts(prompts, [rng.randrange(2, 9) for _ in prompts], [0.0] + [0.05 * i for i in range(1, 9)],
                      name="system-prompt")
    expected = {r.id: hf_greedy(tiny, list(r.prompt_ids), r.max_new_tokens) for r in wl}
    config = EngineConfig(max_seq_len=64, max_batch=3, chunk_size=9, kv_block_size=4, num_pages=60,
                          kv_prefix_cache=True)
    traces, scheduler, steps, _ = serve(tiny, wl, mode, config)
    assert {rid: t.output_ids for rid, t in traces.items()} == expected
    stats = scheduler.counters()
    # (bounds with slack: a request arriving while the first is still prefilling finds less)
    assert stats["prefix_blocks_hit"] >= 5 * 4 and stats["prefix_hit_rate"] > 0.3
    assert sum(s.num_tokens for s in steps) < sum(r.prompt_len + r.max_new_tokens - 1 for r in wl)  # work saved
    run = splitlab.run(wl, tiny, mode=mode, config=config, progress=False)
    assert run.output_ids() == expected


@pytest.mark.parametrize("mode,kwargs", [("split", {"backend": "streams"}), ("replicas", {"num_replicas": 2})])
def test_split_and_replicas_refuse_a_paged_pool_for_now(tiny, mode, kwargs):
    config = EngineConfig(max_seq_len=64, max_batch=2, chunk_size=8, kv_block_size=16)
    with pytest.raises(ConfigError, match="serial and chunked"):
        splitlab.run(from_prompts([[5, 6, 7]], 2), tiny, mode=mode, config=config, progress=False, **kwargs)
