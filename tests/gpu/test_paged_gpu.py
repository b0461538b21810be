"""The paged KV pool on the GPU: CUDA graphs with static block tables, Triton kernels reading
through them, greedy outputs equal to HF generate() in fp32; preemption and recompute forced
with a small pool; in bf16 the paged engine gives the slot engine's very tokens (the same
arithmetic, only the addresses differ). The split backends (green static and adaptive, with
graphs captured per partition over the shared pool; processes, the pool mapped by CUDA IPC)
and the replicas on a pool smaller than the workload needs, so pages are handed back and
handed out again.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import splitlab
from splitlab.config import EngineConfig
from splitlab.measure.analysis import token_match
from splitlab.workload import Request, Workload

from _gpu_helpers import assert_exact, hf_outputs, ragged_workload, rand_ids

pytestmark = pytest.mark.gpu

BASE = dict(max_seq_len=256, max_batch=4, token_budget=256, chunk_size=48)


@pytest.fixture(scope="module")
def workload(fp32_model) -> Workload:
    return ragged_workload(fp32_model, "paged-check")


@pytest.fixture(scope="module")
def expected(fp32_model, workload) -> dict[int, list[int]]:
    return hf_outputs(fp32_model, workload)


@pytest.mark.parametrize("mode, engine", [
    ("serial", dict(kv_block_size=16)),
    ("chunked", dict(kv_block_size=16)),
    ("serial", dict(kv_block_size=64, decode_variant="fused")),
    ("chunked", dict(kv_block_size=32, decode_variant="split")),
    ("serial", dict(kv_block_size=16, decode_combine="kernel")),
], ids=["serial-16", "chunked-16", "serial-64-fused", "chunked-32-split", "serial-16-combine-kernel"])
def test_the_engine_modes_over_a_paged_pool_are_exact(fp32_model, workload, expected, mode, engine):
    config = EngineConfig(**BASE, num_pages=4 * 256 // engine["kv_block_size"], **engine)
    run = splitlab.run(workload, fp32_model, mode=mode, config=config, progress=False)
    assert run.config.effective["cuda_graphs"] is True and run.config.effective["kernels"] == "triton"
    assert_exact(run, expected, " over a paged pool")


@pytest.mark.parametrize("mode", ["serial", "chunked"])
def test_preemption_and_recompute_on_the_gpu_are_exact(fp32_model, mode):
    """10 pages of 16 positions; four sequences admitted with 6 of them grow to need 16: the
    newest are preempted and re-prefilled over their prompt and tokens, every output HF's."""
    from splitlab.engine.online import OnlineEngine
    from splitlab.engine.replay import replay

    gen = random.Random(7)
    vocab = fp32_model.facts.vocab_size
    wl = Workload("paged-preempt", tuple(Request(i, tuple(rand_ids(gen, vocab, n)), 40, 0.0)
                                         for i, n in enumerate([15, 30, 9, 20, 40, 12])))
    expected = hf_outputs(fp32_model, wl)
    config = EngineConfig(**BASE, kv_block_size=16, num_pages=10)
    with OnlineEngine(fp32_model, mode, config, keep_steps=None) as engine:  # what splitlab.run does
        traces = {t.id: t for t in replay(engine, wl, progress=False)[0]}
        scheduler = engine.scheduler
    got = {rid: t.output_ids for rid, t in traces.items()}
    assert token_match(got, expected)["exact"], token_match(got, expected)
    assert scheduler.preemptions > 0, "the pool was meant to run out"
    assert scheduler.allocator.num_free == 10


def test_paged_and_slot_engines_give_the_same_bf16_tokens(bf16_model):
    """Serial mode in bf16 (decode steps through the graphs): the paged pool changes where K/V
    live, not how they are summed, so the tokens are the slot pool's, every one."""
    gen = random.Random(5)
    vocab = bf16_model.facts.vocab_size
    wl = Workload("paged-bf16", tuple(Request(i, tuple(rand_ids(gen, vocab, n)), 24, 0.0)
                                      for i, n in enumerate([200, 31, 77, 130, 9, 64])))
    # one fixed decode variant: "auto" could time a different winner for each engine
    base = EngineConfig(max_seq_len=256, max_batch=8, token_budget=1024, decode_variant="fused")
    slots = splitlab.run(wl, bf16_model, mode="serial", config=base.replace(num_slots=8), progress=False)
    paged = splitlab.run(wl, bf16_model, mode="serial", config=base.replace(kv_block_size=16, num_pages=128),
                         progress=False)
    assert token_match(paged.output_ids(), slots.output_ids())["exact"]


def test_paged_pool_sizing_on_the_gpu(fp32_model):
    from splitlab.engine.kv import PagedKVPool, slot_bytes

    facts = fp32_model.facts
    per_page = slot_bytes(facts.num_layers, 16, facts.num_kv_heads, facts.head_dim, fp32_model.dtype)
    kv = PagedKVPool.for_model(fp32_model, 256, 16, memory_budget_bytes=33 * per_page)
    assert kv.num_pages == 32 and kv.k.is_cuda
    capped = PagedKVPool.for_model(fp32_model, 256, 16, max_batch=2)  # free memory, capped at 2 full sequences
    assert capped.num_pages == 2 * 16
    del kv, capped
    torch.cuda.empty_cache()


@pytest.mark.parametrize("mode", ["serial", "chunked"])
def test_prefix_cache_on_the_gpu_is_exact(fp32_model, mode):
    """Prompts behind one 100-token system prompt share its pages (the prefill after the cached
    prefix is a later chunk reading them in place); every output is HF's."""
    gen = random.Random(9)
    vocab = fp32_model.facts.vocab_size
    system = rand_ids(gen, vocab, 100)
    wl = Workload("paged-prefix", tuple(Request(i, tuple(system + rand_ids(gen, vocab, n)), 12, 0.05 * i)
                                        for i, n in enumerate([7, 30, 1, 64, 16, 45])))
    expected = hf_outputs(fp32_model, wl)
    config = EngineConfig(**BASE, kv_block_size=16, num_pages=64, kv_prefix_cache=True)
    run = splitlab.run(wl, fp32_model, mode=mode, config=config, progress=False)
    assert_exact(run, expected, " over a paged pool")


# 20 pages of 16 positions; the ragged workload's requests need 34 in all (the longest 9)
SPLIT_PAGED = EngineConfig(**BASE, kv_block_size=16, num_pages=20)
PROFILE = str(Path(__file__).resolve().parents[2] / "results" / "sm_profile_h200.json")


def _pages_needed(workload, block: int) -> int:
    return sum(-(-(r.prompt_len + r.max_new_tokens - 1) // block) for r in workload)


@pytest.mark.parametrize("backend, policy", [("green", "static"), ("green", "table"), ("processes", "static")],
                         ids=["green-static", "green-table", "processes"])
def test_split_over_a_paged_pool_is_exact(fp32_model, workload, expected, backend, policy):
    """The prefill side reserves every page a sequence writes and hands their ids over; the
    decode graphs read them through static block tables (on each partition's stream for the
    adaptive split); every token is HF's."""
    extra = {} if policy == "static" else dict(sm_policy=policy, sm_profile=PROFILE, gap_s=0.03)
    run = splitlab.run(workload, fp32_model, mode="split", config=SPLIT_PAGED, backend=backend, progress=False,
                       **extra)
    assert_exact(run, expected, f" split {backend} ({policy}) over a paged pool")
    assert _pages_needed(workload, 16) > SPLIT_PAGED.num_pages  # pages were freed and handed out again
    for name, facts in run.config.workers.items():
        assert (facts["kv_block_size"], facts["num_pages"]) == (16, 20), name
        assert facts["cuda_graphs"] is True, name
    assert run.memory["preemptions"] == 0
    if policy != "static":
        g = run.config.green
        assert g["simulated"] is False and g["decisions"] > 0 and all(s.sms for s in run.steps), g
    if backend == "processes":  # the decode process maps the prefill process's weights and paged KV
        assert run.config.effective["decode_weights_shared"] is True


def test_replicas_over_a_paged_pool_are_exact(fp32_model, workload, expected):
    run = splitlab.run(workload, fp32_model, mode="replicas", config=SPLIT_PAGED.replace(num_pages=40),
                       num_replicas=2, engine="serial", progress=False)
    assert_exact(run, expected, " replicas over a paged pool")
    assert [f["num_pages"] for f in run.config.workers.values()] == [20, 20]
