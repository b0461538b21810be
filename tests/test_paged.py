"""The paged KV pool end to end: greedy parity with HF ``generate()`` in fp32 on CPU.

``serial`` and ``chunked`` with pages of a few positions, so every prompt spans many pages;
arrivals spread over time and more requests than the pool holds, so freed pages are reused;
and a pool so small that running sequences outgrow it, so the newest is preempted and later
recomputed (re-prefilled over its prompt and the tokens it had), its output continuing
exactly: no request lost, none duplicated, every page back at the end. The split workers
hand a sequence's pages over (``Handoff.blocks``); ``split`` (two threads, two processes)
runs on such a pool with the prefill side reserving every page a sequence will write and
the decode side handing them back, and each ``replicas`` engine on its share of the pages.
With the prefix cache, prompts that share a system prompt share its pages and compute only
the rest (serial, chunked, and split on threads and on processes).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from _colocation import assert_clean, check_split_run, drive_split_workers, snapshot
from _oracle import hf_greedy
from _traces import assert_traces_complete

import splitlab
from splitlab.config import EngineConfig
from splitlab.errors import WorkloadError
from splitlab.engine.loop import DecodeWorker, Handoff
from splitlab.engine.online import OnlineEngine
from splitlab.engine.replay import replay
from splitlab.engine.scheduler import Scheduler
from splitlab.modes.split import SplitSession
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
    """What ``splitlab.run`` does for serial / chunked (a replay through the online engine),
    with the scheduler kept to read its counters and its allocator to check every page came back."""
    with OnlineEngine(model, mode, config, keep_steps=None, max_queued=len(workload)) as engine:
        traces, steps = replay(engine, workload, progress=False)
        scheduler = engine.scheduler
        assert scheduler.allocator.num_free == scheduler.allocator.capacity  # every page came back
    return {t.id: t for t in traces}, scheduler, steps, engine.parts


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


def system_prompt_workload():
    """Eight prompts behind one 21-token system prompt (one of them twice), arriving over 0.4 s."""
    rng = random.Random(3)
    system = [rng.randrange(4, 260) for _ in range(21)]
    prompts = [system + [rng.randrange(4, 260) for _ in range(rng.randrange(1, 12))] for _ in range(8)]
    prompts.append(list(prompts[2]))  # one prompt twice: all but its last block shared
    return from_prompts(prompts, [rng.randrange(2, 9) for _ in prompts], [0.0] + [0.05 * i for i in range(1, 9)],
                        name="system-prompt")


@pytest.mark.parametrize("mode", ["serial", "chunked"])
def test_prefix_cache_shares_a_system_prompt_and_stays_exact(tiny, mode):
    """Prompts behind one 21-token system prompt, pages of 4: once the first is prefilled,
    later requests take its five full blocks from the cache (their prefill is a later chunk
    attending to them in place) and every output is still HF's."""
    wl = system_prompt_workload()
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


# ---- split and replicas on a paged pool ----------------------------------------------------------

PAGED_SPLIT = EngineConfig(max_seq_len=64, max_batch=3, token_budget=48, kv_block_size=4, num_pages=30)


def pages_of(r, block: int) -> int:
    """Pages a split worker reserves for ``r``: every position it will write."""
    return -(-(r.prompt_len + r.max_new_tokens - 1) // block)


def assert_pages_never_overcommitted(run, workload, block: int, num_pages: int) -> None:
    """A split request holds its pages from (before) its prefill start to (after) its last
    token: the pages of the requests live at any moment never exceed the pool, and the whole
    workload needs more pages than the pool has, so pages were freed and handed out again."""
    need = {r.id: pages_of(r, block) for r in workload}
    events = sorted([(t.prefill_start_s, need[t.id]) for t in run.traces]
                    + [(t.token_times_s[-1], -need[t.id]) for t in run.traces])  # a free before an alloc at a tie
    held = peak = 0
    for _, d in events:
        held += d
        peak = max(peak, held)
    assert peak <= num_pages and sum(need.values()) > num_pages


@pytest.mark.parametrize("backend,policy", [
    ("streams", {}),
    # the adaptive split's lanes and decisions (simulated off a GPU) over the paged pool
    ("streams", {"sm_policy": "table", "sm_profile": str(Path(__file__).resolve().parents[1] / "results"
                                                         / "sm_profile_h200.json")}),
    ("processes", {}),
], ids=["streams", "streams-table", "processes"])
def test_split_on_a_paged_pool_is_exact_and_hands_every_page_back(tiny, workload, expected, backend, policy):
    """Two runs in one session, each needing more pages than the pool has: the prefill side
    reserves, the decode side frees, and a run only completes (streams) or starts (processes,
    the second) once every page of the last one is back in the prefill side's allocator."""
    before = snapshot()
    other = workload_of(4, n=8)
    with SplitSession(tiny, PAGED_SPLIT, backend=backend, **policy) as session:
        runs = [(session.run(wl, progress=False), wl) for wl in (workload, other)]
    assert runs[0][0].output_ids() == expected
    assert runs[1][0].output_ids() == {r.id: hf_greedy(tiny, list(r.prompt_ids), r.max_new_tokens) for r in other}
    for run, wl in runs:
        check_split_run(run, wl, num_slots=PAGED_SPLIT.num_pages)  # every row computed once: nothing preempted
        assert_pages_never_overcommitted(run, wl, 4, PAGED_SPLIT.num_pages)
        assert max(len(s.request_ids) for s in run.steps if s.worker == "decode") <= PAGED_SPLIT.max_batch
        assert run.memory["preemptions"] == 0 and run.memory["kv_pool_bytes"] == 2 * 2 * 31 * 4 * 2 * 16 * 4
    assert max(r.prompt_len for r in workload) > 8 * 4  # some prompt spans more than 8 pages
    for facts in runs[0][0].config.workers.values():  # both workers view the one pool as paged
        assert (facts["kv_block_size"], facts["num_pages"], facts["num_slots"]) == (4, 30, None)
    if backend == "processes":
        assert runs[0][0].config.effective["decode_weights_shared"] is True  # weights and KV mapped, not copied
    if policy:
        assert runs[0][0].config.green["decisions"] > 0 and all(s.sms for s in runs[0][0].steps)
    assert_clean(before, session.children)


def test_the_adaptive_prefill_placer_waits_for_a_prompts_pages():
    """A waiting prompt keeps the prefill side's SMs only when the pages it will be admitted
    with are free (a slot pool: a free slot)."""
    from types import SimpleNamespace

    from splitlab.engine.kv import PageAllocator
    from splitlab.engine.scheduler import SeqState
    from splitlab.modes.split.adaptive import _PrefillPlacer

    allocator = PageAllocator(10, 4)
    scheduler = Scheduler("prefill", allocator, max_batch=4)
    scheduler.add(SeqState.new(from_prompts([[5] * 10], 4).requests[0]))  # 13 positions: 4 pages
    taken = allocator.alloc(7)
    placer = _PrefillPlacer(SimpleNamespace(prefill_tokens=-1))
    placer.done(scheduler)
    assert placer.c.prefill_tokens == 0  # 3 pages free: it cannot run next
    allocator.free(taken[0])
    placer.done(scheduler)
    assert placer.c.prefill_tokens == 10


def test_split_decode_batches_stay_within_max_batch_when_the_pages_hold_more(tiny):
    """Short prompts and long outputs on a big pool: more sequences are prefilled (and hold
    their pages) than a decode batch takes; the rest wait for room, in order, and stay exact."""
    wl = from_prompts([[7 + i, 9, 11] for i in range(8)], 30, name="short-long")
    config = EngineConfig(max_seq_len=64, max_batch=2, token_budget=48, kv_block_size=4, num_pages=80)
    run = splitlab.run(wl, tiny, mode="split", config=config, backend="streams", progress=False)
    assert run.output_ids() == {r.id: hf_greedy(tiny, list(r.prompt_ids), 30) for r in wl}
    assert max(len(s.request_ids) for s in run.steps if s.worker == "decode") == 2
    ends = sorted(t.token_times_s[-1] for t in run.traces)
    prefilled_before_first_end = sum(t.prefill_end_s < ends[0] for t in run.traces)
    assert prefilled_before_first_end > 2  # more handed over than a batch holds


@pytest.mark.parametrize("backend", ["streams", "processes"])
def test_split_shares_a_cached_prefix_and_stays_exact(tiny, backend):
    wl = system_prompt_workload()
    config = EngineConfig(max_seq_len=64, max_batch=3, token_budget=64, kv_block_size=4, num_pages=60,
                          kv_prefix_cache=True)
    run = splitlab.run(wl, tiny, mode="split", config=config, backend=backend, progress=False)
    assert run.output_ids() == {r.id: hf_greedy(tiny, list(r.prompt_ids), r.max_new_tokens) for r in wl}
    assert run.memory["prefix_blocks_hit"] >= 5 * 4  # the prefill side's allocator found them
    rows = sum(s.num_tokens for s in run.steps)
    assert rows < sum(r.prompt_len + r.max_new_tokens - 1 for r in wl)  # the cached blocks were not computed


def test_replicas_each_serve_their_share_of_the_pages_exactly(tiny):
    """32 pages for two replicas: 16 each. Four requests per replica, all at once, grow past
    their share, so each replica preempts and recomputes as serial does, exactly."""
    rng = random.Random(5)
    wl = from_prompts([[rng.randrange(4, 260) for _ in range(17 + 2 * i)] for i in range(8)], 20, name="replica-pages")
    expected = {r.id: hf_greedy(tiny, list(r.prompt_ids), 20) for r in wl}
    config = EngineConfig(max_seq_len=64, max_batch=4, token_budget=64, kv_block_size=4, num_pages=32)
    before = snapshot()
    with pytest.warns(UserWarning, match="replicas x2: the KV pool ran out"):
        run = splitlab.run(wl, tiny, mode="replicas", config=config, num_replicas=2, engine="serial",
                           progress=False)
    assert run.output_ids() == expected
    assert_traces_complete(run, wl)
    for facts in run.config.workers.values():
        assert (facts["kv_block_size"], facts["num_pages"]) == (4, 16)
    assert run.memory["kv_pool_bytes"] == 2 * (2 * 2 * 17 * 4 * 2 * 16 * 4)
    assert run.memory["preemptions"] > 0 and run.memory["recomputed_tokens"] > 0
    assert_clean(before)


@pytest.mark.parametrize("mode,kwargs,pages,need", [
    ("split", {"backend": "streams"}, 9, "10 KV pages"),
    ("replicas", {"num_replicas": 2}, 18, r"11 KV pages of 4 positions \(one of them headroom\)"),  # 9 each
])
def test_split_and_replicas_refuse_a_request_their_pages_can_never_hold(tiny, mode, kwargs, pages, need):
    wl = from_prompts([[5] * 30, [6] * 3], [10, 2], name="too-big")  # 39 positions: 10 pages of 4
    config = EngineConfig(max_seq_len=64, max_batch=2, chunk_size=8, kv_block_size=4, num_pages=pages)
    before = snapshot()
    with pytest.raises(WorkloadError, match=f"request 0 .* needs {need}.*has 9; raise EngineConfig.num_pages"):
        splitlab.run(wl, tiny, mode=mode, config=config, progress=False, **kwargs)
    assert_clean(before)
