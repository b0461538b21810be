"""The greedy oracle and the run-level invariants of the ``serial`` and ``chunked`` modes.

For the same prompts, every mode must produce exactly the tokens of HF
``generate(do_sample=False, max_new_tokens=n, min_new_tokens=n)`` run per prompt, fp32 on
CPU: ragged prompts, arrivals spread over time, more requests than KV slots.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from _colocation import drive_split_workers
from _oracle import hf_greedy
from _traces import assert_slots_never_overcommitted, assert_traces_complete

from splitlab.config import EngineConfig
from splitlab.errors import ConfigError, ModelSpecError, ModeError, WorkloadError
from splitlab.measure.metrics import Run, load_run
from splitlab.engine.kv import slot_bytes
from splitlab.engine.loop import DecodeWorker
import splitlab
from splitlab.workload import Workload, from_prompts


def run_continuous(workload, model, mode, config=None, **kwargs):
    """A serial / chunked run, through the one entry point."""
    return splitlab.run(workload, model, mode=mode, config=config, **kwargs)


def ragged_workload(seed: int = 0, n: int = 12, spread_s: float = 0.3) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, 260) for _ in range(rng.randrange(2, 60))] for _ in range(n)]
    news = [rng.randrange(1, 17) for _ in range(n)]
    news[:3] = [16, 12, 9]  # the first burst holds its slots a while
    # half arrive at once (more than the slots: some must wait), the rest spread over time
    arrivals = [0.0] * (n // 2) + sorted(rng.uniform(0, spread_s) for _ in range(n - n // 2))
    return from_prompts(prompts, news, arrivals, name=f"ragged-{seed}")


@pytest.fixture(scope="module")
def workload():
    return ragged_workload()


@pytest.fixture(scope="module")
def expected(tiny, workload):
    return {r.id: hf_greedy(tiny, list(r.prompt_ids), r.max_new_tokens) for r in workload}


def check_invariants(run: Run, workload: Workload, num_slots: int):
    """Arrival respected, every token once, slots never over-committed, steps in sequence."""
    assert_traces_complete(run, workload)
    peak = assert_slots_never_overcommitted(run, num_slots)
    for a, b in zip(run.steps, run.steps[1:]):
        assert b.start_s >= a.end_s  # one worker: steps never overlap
    rows = sum(s.num_tokens for s in run.steps)
    assert rows == sum(r.prompt_len + r.max_new_tokens - 1 for r in workload)  # each token computed once
    return peak


@pytest.mark.parametrize("mode,cfg", [
    ("serial", dict(token_budget=64)),
    ("serial", dict(token_budget=8192)),
    ("chunked", dict(chunk_size=5)),  # smaller than most prompts: prompts span steps
    ("chunked", dict(chunk_size=16)),
    ("chunked", dict(chunk_size=128)),
])
def test_greedy_oracle_tiny(tiny, workload, expected, mode, cfg):
    config = EngineConfig(max_seq_len=96, num_slots=3, max_batch=3, **cfg)
    run = run_continuous(workload, tiny, mode, config, progress=False)
    assert run.output_ids() == expected
    peak = check_invariants(run, workload, num_slots=3)
    assert peak == 3
    waited = [t for t in run.traces if t.prefill_start_s - t.arrival_s > 0.0]
    assert waited
    if mode == "chunked":
        assert max(s.num_tokens for s in run.steps) <= cfg["chunk_size"]
        assert {s.kind for s in run.steps} >= {"mixed"}
    else:
        assert {s.kind for s in run.steps} == {"prefill", "decode"}
        assert all(s.num_tokens <= cfg["token_budget"] for s in run.steps if len(s.request_ids) > 1)
    if cfg.get("chunk_size") == 5:  # some prompt really was split over steps
        multi = [r for r in workload if sum(r.id in s.request_ids for s in run.steps) > r.max_new_tokens]
        assert multi


def test_kv_exhaustion_requests_wait_none_lost(tiny):
    rng = random.Random(3)
    prompts = [[rng.randrange(4, 260) for _ in range(rng.randrange(3, 20))] for _ in range(8)]
    wl = from_prompts(prompts, 6, name="burst")  # all arrive at once
    expected = {r.id: hf_greedy(tiny, list(r.prompt_ids), 6) for r in wl}
    for mode in ("serial", "chunked"):
        run = run_continuous(wl, tiny, mode, EngineConfig(max_seq_len=32, num_slots=2, max_batch=2, chunk_size=8),
                             progress=False)
        assert check_invariants(run, wl, num_slots=2) == 2
        assert run.output_ids() == expected
        assert run.summary()["completed"] == 8


def test_arrivals_are_waited_for_in_real_time(tiny):
    wl = from_prompts([[5, 6, 7], [8, 9, 10, 11]], 3, arrivals_s=[0.0, 0.25], name="late")
    run = run_continuous(wl, tiny, "serial", EngineConfig(max_seq_len=32, num_slots=2, max_batch=2, chunk_size=8),
                         progress=False)
    late = {t.id: t for t in run.traces}[1]
    assert late.prefill_start_s >= 0.25
    assert run.wall_s >= 0.25 and run.wall_s == max(t.token_times_s[-1] for t in run.traces)


def test_chunked_steps_without_a_prompt_chunk_take_the_decode_path(tiny, workload, expected, monkeypatch):
    """In chunked mode a step that carries no prompt chunk is a plain decode step: it goes
    through ``decode_step`` (the CUDA-graph replay on a GPU), never the eager mixed forward."""
    from splitlab.engine.runner import ModelRunner

    calls = []
    real_decode, real_mixed, real_prefill = ModelRunner.decode_step, ModelRunner.mixed_step, ModelRunner.prefill

    def decode_step(self, slots, tokens, positions):
        calls.append(("decode", len(slots)))
        return real_decode(self, slots, tokens, positions)

    def mixed_step(self, decode, chunks):
        chunks = list(chunks)
        calls.append(("mixed", len(chunks)))
        assert chunks, "a mixed step without a prompt chunk"
        return real_mixed(self, decode, chunks)

    def prefill(self, chunks, between_layers=None):
        chunks = list(chunks)
        calls.append(("prefill", len(chunks)))
        return real_prefill(self, chunks, between_layers)

    monkeypatch.setattr(ModelRunner, "decode_step", decode_step)
    monkeypatch.setattr(ModelRunner, "mixed_step", mixed_step)
    monkeypatch.setattr(ModelRunner, "prefill", prefill)
    config = EngineConfig(max_seq_len=96, num_slots=3, max_batch=3, chunk_size=16, warmup=False)
    run = run_continuous(workload, tiny, "chunked", config, progress=False)
    assert run.output_ids() == expected
    kinds = [s.kind for s in run.steps]
    assert kinds.count("decode") == sum(1 for c in calls if c[0] == "decode") > 0
    assert kinds.count("mixed") == sum(1 for c in calls if c[0] == "mixed") > 0
    assert kinds.count("prefill") == sum(1 for c in calls if c[0] == "prefill")


def test_run_record_is_complete_and_round_trips(tiny, workload, tmp_path):
    config = EngineConfig(max_seq_len=96, num_slots=3, max_batch=3, chunk_size=16)
    run = run_continuous(workload, tiny, "chunked", config, progress=False)
    assert run.mode == "chunked" and run.model == "tiny" and run.workload == workload.name
    assert run.env["device"] in ("cpu", "cuda") and "versions" in run.env
    assert run.config.engine.chunk_size == 16 and run.config.effective["num_slots"] == 3
    assert run.config.effective["kernels"] == "torch" and run.config.effective["cuda_graphs"] is False
    assert (run.config.num_requests, run.config.rate) == (len(workload), None)
    assert run.memory["kv_pool_bytes"] == 2 * 2 * 4 * 96 * 2 * 16 * 4  # 2 x layers x (3+1 rows) x len x heads x dim x fp32
    assert run.memory["weight_bytes"] == tiny.facts.weight_bytes and run.memory["peak_bytes"] is None
    assert {s.worker for s in run.steps} == {"chunked"}
    summary = run.summary()
    assert summary["output_tokens"] == workload.total_output_tokens and summary["throughput_tok_s"] > 0
    again = load_run(run.save(tmp_path / "run.json"))
    assert again.output_ids() == run.output_ids() and len(again.steps) == len(run.steps)
    assert again.config == run.config and again.to_dict() == run.to_dict()


def test_bad_input_raises_clear_errors(tiny):
    too_long = from_prompts([[5] * 30], 10, name="long")
    with pytest.raises(WorkloadError, match="max_seq_len"):
        run_continuous(too_long, tiny, "serial", EngineConfig(max_seq_len=32, max_batch=2, chunk_size=8),
                       progress=False)
    beyond = from_prompts([[5] * 500], 20, name="beyond")  # tiny's context is 512 positions
    with pytest.raises(WorkloadError, match="context"):
        run_continuous(beyond, tiny, "serial", EngineConfig(max_batch=2, chunk_size=8), progress=False)
    ok = from_prompts([[5, 6]], 2)
    with pytest.raises(ModeError):
        run_continuous(ok, tiny, "continuous", EngineConfig(max_batch=2, chunk_size=8), progress=False)
    with pytest.raises(ConfigError, match="keyword"):
        run_continuous(ok, tiny, "serial", EngineConfig(max_batch=2, chunk_size=8), progress=False, backend="mps")
    with pytest.raises(ConfigError):
        run_continuous(ok, tiny, "serial", {"max_batch": 2}, progress=False)
    from transformers import OPTConfig, OPTForCausalLM

    from splitlab.models import LoadedModel, model_facts

    opt = OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32)).eval()
    loaded = LoadedModel("test:opt", opt, None, model_facts(opt), torch.device("cpu"), torch.float32)
    with pytest.raises(ModelSpecError, match="hf-generate"):
        run_continuous(ok, loaded, "serial", EngineConfig(max_batch=2, chunk_size=8), progress=False)


def test_prefill_and_decode_workers_hand_off_through_slots(tiny, workload, expected):
    """The split-mode building blocks, driven alternately in one process, give the oracle too."""
    config = EngineConfig(max_seq_len=96, num_slots=3, max_batch=3, token_budget=64)
    handed = []

    def check(h, seq):
        assert h.prompt_len == seq.prompt_len and h.first_token == seq.output[0]
        handed.append(h)

    seqs, pre, dec, parts, clock = drive_split_workers(tiny, config, workload, check)
    handoffs = len(handed)
    assert {rid: s.output for rid, s in seqs.items()} == expected
    assert handoffs == sum(r.max_new_tokens > 1 for r in workload)
    assert {s.kind for s in pre.steps} == {"prefill"} and {s.kind for s in dec.steps} == {"decode"}
    assert parts.allocator.num_free == 3
    # a decode worker in another process would rebuild the trace from the handoff alone
    other = DecodeWorker(parts.runner, parts.allocator, config, clock)
    h = handed[0]
    seq = other.accept(h)
    assert seq.trace.output_ids == [h.first_token] and seq.next_position == h.prompt_len


@pytest.mark.slow
def test_greedy_oracle_smollm2(smollm2):
    prompts = [smollm2.encode(q, chat=True) for q in
               ("What is the capital of France?", "Name a prime number.", "Say hi.")]
    wl = from_prompts(prompts, [6, 4, 5], arrivals_s=[0.0, 0.05, 0.1], name="smollm2-chat")
    expected = {r.id: hf_greedy(smollm2, list(r.prompt_ids), r.max_new_tokens) for r in wl}
    assert smollm2.decode(expected[0]).strip().startswith("The capital of France")
    for mode, cfg in (("serial", {}), ("chunked", {"chunk_size": 16})):
        config = EngineConfig(max_seq_len=64, num_slots=2, max_batch=2, **cfg)
        run = run_continuous(wl, smollm2, mode, config, progress=False)
        assert run.output_ids() == expected, mode
        check_invariants(run, wl, num_slots=2)


def test_eos_is_masked_like_hf_min_new_tokens():
    """When EOS is the model's greedy choice, HF generate(min_new_tokens=n) takes the runner-up;
    the engine must do the same (and never emit EOS), or modes would disagree with the oracle."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from splitlab.models import LoadedModel, model_facts

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                      eos_token_id=2, bos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    prompt = [5, 9, 11, 40, 7]
    with torch.no_grad():
        best = int(model(torch.tensor([prompt])).logits[0, -1].argmax())
        model.lm_head.weight[2] = 3.0 * model.lm_head.weight[best]  # EOS now beats the best token
        assert int(model(torch.tensor([prompt])).logits[0, -1].argmax()) == 2
    loaded = LoadedModel("test:eos", model, None, model_facts(model), torch.device("cpu"), torch.float32)
    wl = from_prompts([prompt, [3, 4, 5, 6]], 8, name="eos")
    expected = {r.id: hf_greedy(loaded, list(r.prompt_ids), 8) for r in wl}
    assert expected[0][0] == best and all(2 not in out for out in expected.values())
    for mode in ("serial", "chunked"):
        run = run_continuous(wl, loaded, mode, EngineConfig(max_seq_len=32, num_slots=2, max_batch=2, chunk_size=4),
                             progress=False)
        assert run.output_ids() == expected


# ---- every EngineConfig field reaches every mode's workers ------------------------------------------
# A setting a mode forgot to pass on (as the split decode runner and the replicas once did with
# decode_variant) would leave that worker on the default: each worker reports what its runner
# and KV pool really hold (RunConfig.effective / .workers), and the steps show its scheduler's
# budgets. Every field is either checked here on CPU or listed with why only a GPU shows it.
RUNNER_FIELDS = ("max_seq_len", "num_slots", "max_batch", "sdpa_backend", "decode_variant", "warmup")
STEP_FIELDS = ("token_budget", "chunk_size")  # scheduler budgets: bounds on every step's tokens
SIZING_FIELDS = ("kv_budget_bytes",)  # the KV pool's slot count when num_slots is None
# a paged KV pool: serial and chunked only (tests/test_paged.py checks them there); split and
# replicas refuse it until their workers take pages
PAGED_FIELDS = ("kv_block_size", "num_pages", "kv_prefix_cache")
GPU_ONLY = {
    "cuda_graphs": "a CPU runner never has graphs (True is refused there, None means False)",
    "kernels": "'auto' is 'torch' on CPU; the Triton kernels run there only in Triton's interpreter",
    "gemv": "needs the Triton kernels on CUDA",
    "kv_memory_fraction": "sizes the pool from free GPU memory; on CPU num_slots defaults instead",
    "decode_combine": "a setting of the Triton split-K decode attention",
}
NON_DEFAULT = EngineConfig(max_seq_len=80, num_slots=4, max_batch=2, token_budget=12, chunk_size=7, warmup=False,
                           sdpa_backend="math", decode_variant="split")
MODE_RUNS = {
    "serial": {"mode": "serial"},
    "chunked": {"mode": "chunked"},
    "split streams": {"mode": "split", "backend": "streams"},
    "split processes": {"mode": "split", "backend": "processes"},
    "replicas": {"mode": "replicas", "num_replicas": 2, "engine": "serial"},
}


def seven_token_prompts() -> Workload:
    """Five 7-token prompts arriving at once: two of them in one prefill step are 14 tokens."""
    rng = random.Random(7)
    return from_prompts([[rng.randrange(4, 260) for _ in range(7)] for _ in range(5)], 3, name="sevens")


def worker_facts_of(run) -> dict:
    return run.config.workers or {run.mode: run.config.effective}


def test_every_engine_config_field_is_checked_or_gpu_only():
    classified = set(RUNNER_FIELDS) | set(STEP_FIELDS) | set(SIZING_FIELDS) | set(GPU_ONLY) | set(PAGED_FIELDS)
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    assert fields - classified == set(), ("a new EngineConfig field: check that it reaches every mode's workers "
                                          "below, or list it in GPU_ONLY with the reason")
    assert classified - fields == set()
    default = EngineConfig()
    assert all(getattr(NON_DEFAULT, name) != getattr(default, name) for name in RUNNER_FIELDS + STEP_FIELDS)


def test_the_step_budgets_bind_on_this_workload(tiny):
    """Controls for the budget checks below: with the default budgets the same workload has a
    prefill step of two prompts (14 tokens) and a chunked step above 7 tokens."""
    wide = NON_DEFAULT.replace(token_budget=8192, chunk_size=512)
    serial = run_continuous(seven_token_prompts(), tiny, "serial", wide, progress=False)
    assert max(s.num_tokens for s in serial.steps if s.kind == "prefill") == 14
    chunked = run_continuous(seven_token_prompts(), tiny, "chunked", wide, progress=False)
    assert max(s.num_tokens for s in chunked.steps) > 7


@pytest.mark.parametrize("name", list(MODE_RUNS))
def test_every_engine_config_field_reaches_every_worker(tiny, name):
    kwargs = dict(MODE_RUNS[name])
    mode = kwargs.pop("mode")
    share = kwargs.get("num_replicas", 1)  # replicas split the KV budget N ways
    wl = seven_token_prompts()
    run = splitlab.run(wl, tiny, mode=mode, config=NON_DEFAULT, progress=False, **kwargs)
    assert run.output_ids() == {r.id: hf_greedy(tiny, list(r.prompt_ids), 3) for r in wl}
    facts = worker_facts_of(run)
    assert len(facts) == {"split": 2, "replicas": share}.get(mode, 1)
    for worker, got in facts.items():
        assert (got["max_seq_len"], got["num_slots"], got["max_batch"]) == (80, 4 // share, 2), worker
        assert got["sdpa_backend"] == "math" and got["sdpa_effective"] == "math", worker
        assert (got["decode_variant"], got["decode_variant_how"]) == ("split", "fixed"), worker
        assert got["warmed_up"] is False, worker
    if mode == "chunked":
        assert max(s.num_tokens for s in run.steps) <= NON_DEFAULT.chunk_size
    else:
        assert max(s.num_tokens for s in run.steps if s.kind == "prefill") <= NON_DEFAULT.token_budget
    # num_slots None: the pool holds as many slots as kv_budget_bytes pays for (one scratch row)
    per_slot = slot_bytes(tiny.facts.num_layers, 80, tiny.facts.num_kv_heads, tiny.facts.head_dim, tiny.dtype)
    sized = NON_DEFAULT.replace(num_slots=None, max_batch=8, chunk_size=16, kv_budget_bytes=6 * per_slot)
    run = splitlab.run(wl, tiny, mode=mode, config=sized, progress=False, **kwargs)
    assert {w: f["num_slots"] for w, f in worker_facts_of(run).items()} == {w: 6 // share - 1 for w in facts}
