"""ModelRunner against Huggingface's own forward: logits (fp32 allclose) and greedy tokens.

Covers the Llama family's variants the runner claims: Llama (GQA, untied and tied
embeddings, llama3 rope scaling), Qwen2 (q/k/v bias), Mistral; packed ragged prefill,
chunked prefill (start_pos > 0), decode and mixed steps; rebuilding from exported tensors;
reading the weights with and without sharing the HF model's storage; the engine warm-up.
"""

from __future__ import annotations

import json

import pytest
import torch

from splitlab.config import SDPA_BACKENDS, EngineConfig
from splitlab.errors import ConfigError, ModelSpecError, WorkloadError
from splitlab.engine.graphs import graph_buckets
from splitlab.engine.kv import KVPool
from splitlab.engine.plan import DecodeBatch, PrefillChunk, count_bucket, index_tensors
from splitlab.engine.runner import ModelRunner
from splitlab.engine.warmup import warm_up
from splitlab.engine.weights import extract_arch, extract_weights
from splitlab.models import LoadedModel, model_facts

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
VARIANTS = {
    "llama": ("llama", dict(head_dim=16)),
    "llama-tied": ("llama", dict(head_dim=16, tie_word_embeddings=True)),
    "llama3-rope": ("llama", dict(head_dim=16, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "qwen2-bias": ("qwen2", dict()),
    "mistral": ("mistral", dict(head_dim=16, sliding_window=None)),
    "mha": ("llama", dict(head_dim=16, num_key_value_heads=4)),
}


def make_model(model_type: str, seed: int = 0, **overrides) -> LoadedModel:
    """A random fp32 model of ``model_type`` with non-trivial norms and biases."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{**BASE, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.08)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval().requires_grad_(False)
    return LoadedModel(spec=f"test:{model_type}", model=model, tokenizer=None, facts=model_facts(model),
                       device=torch.device("cpu"), dtype=torch.float32)


def runner_for(loaded: LoadedModel, kv: KVPool, *, runner_cls: type[ModelRunner] = ModelRunner,
               max_batch: int | None = None, share_storage: bool = False, **engine) -> ModelRunner:
    """``runner_cls.for_config`` over ``loaded``'s weights with ``EngineConfig(**engine)``; by
    default the HF model is left untouched (the fused tensors are copies)."""
    m = loaded.model
    return runner_cls.for_config(extract_arch(m), extract_weights(m, share_storage=share_storage), kv,
                                 EngineConfig(**engine), max_batch=max_batch)


def hf_generate(loaded: LoadedModel, ids: list[int], n: int) -> list[int]:
    """HF greedy ``generate`` of exactly ``n`` new tokens (EOS suppressed, as the engine does)."""
    t = torch.tensor([ids])
    out = loaded.model.generate(t, attention_mask=torch.ones_like(t), do_sample=False, max_new_tokens=n,
                                min_new_tokens=n, pad_token_id=0)
    return out[0, len(ids):].tolist()


def hf_logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(torch.tensor([ids])).logits[0].float()


def record_sdpa_shapes(monkeypatch) -> list[tuple[int, ...]]:
    """The query shape of every SDPA call the runner makes from now on, in order."""
    calls: list[tuple[int, ...]] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(q, *a, **k):
        calls.append(tuple(q.shape))
        return real(q, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


PROMPTS = [[5, 17, 33, 120, 7, 9, 250, 11, 64, 3, 19], [44, 45, 46], [201] * 6 + [9, 8, 7]]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_packed_prefill_logits_match_hf(variant):
    model_type, overrides = VARIANTS[variant]
    loaded = make_model(model_type, **overrides)
    refs = [hf_logits(loaded, p) for p in PROMPTS]
    runner = runner_for(loaded, KVPool.for_model(loaded, 64, num_slots=4), share_storage=True)
    got = runner.forward_logits([(slot, p, 0) for slot, p in enumerate(PROMPTS)])
    assert got.shape == (sum(map(len, PROMPTS)), BASE["vocab_size"])
    row = 0
    for p, ref in zip(PROMPTS, refs):
        torch.testing.assert_close(got[row:row + len(p)], ref, rtol=1e-5, atol=1e-5)
        row += len(p)
    # the HF model still works on the fused weights (views) and gives the same answer
    assert loaded.model.model.layers[0].self_attn.q_proj.weight.data_ptr() == runner.layers[0].qkv.data_ptr()
    torch.testing.assert_close(hf_logits(loaded, PROMPTS[0]), refs[0], rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["llama", "qwen2-bias", "llama3-rope"])
def test_chunked_prefill_then_decode_logits_match_hf(variant):
    model_type, overrides = VARIANTS[variant]
    loaded = make_model(model_type, **overrides)
    full = PROMPTS[0] + [77, 78, 79, 80]
    ref = hf_logits(loaded, full)
    runner = runner_for(loaded, KVPool.for_model(loaded, 64, num_slots=3))
    parts = [
        runner.forward_logits([PrefillChunk(2, full[:4], 0, last=False)]),
        runner.forward_logits([PrefillChunk(2, full[4:9], 4, last=False)]),
        runner.forward_logits([PrefillChunk(2, full[9:11], 9)]),
    ]
    for pos in range(11, len(full)):  # decode-shaped rows: one token attending to the slot's KV
        parts.append(runner.forward_logits([(2, [full[pos]], pos)]))
    torch.testing.assert_close(torch.cat(parts), ref, rtol=1e-5, atol=1e-5)


def test_decode_and_mixed_steps_return_hf_argmax():
    loaded = make_model("llama", head_dim=16)
    runner = runner_for(loaded, KVPool.for_model(loaded, 64, num_slots=4))
    a, b = PROMPTS[0], PROMPTS[1]
    first = runner.prefill([(0, a, 0), (1, b, 0)])
    assert first == [int(hf_logits(loaded, a)[-1].argmax()), int(hf_logits(loaded, b)[-1].argmax())]
    seqs = {0: a + [first[0]], 1: b + [first[1]]}
    nxt = runner.decode_step([0, 1], [seqs[0][-1], seqs[1][-1]], [len(a), len(b)])
    assert nxt == [int(hf_logits(loaded, seqs[s])[-1].argmax()) for s in (0, 1)]
    seqs[0].append(nxt[0])
    seqs[1].append(nxt[1])
    # mixed: two decode rows plus a partial and a completing chunk of a third prompt
    c = PROMPTS[2]
    dec, ch = runner.mixed_step(DecodeBatch([0, 1], [seqs[0][-1], seqs[1][-1]], [len(seqs[0]) - 1, len(seqs[1]) - 1]),
                                [PrefillChunk(3, c[:4], 0, last=False)])
    assert ch == [None]
    assert dec == [int(hf_logits(loaded, seqs[s])[-1].argmax()) for s in (0, 1)]
    dec2, ch2 = runner.mixed_step(None, [PrefillChunk(3, c[4:], 4)])
    assert dec2 == [] and ch2 == [int(hf_logits(loaded, c)[-1].argmax())]


def test_export_rebuilds_an_identical_runner_without_the_hf_model():
    loaded = make_model("qwen2")
    kv = KVPool.for_model(loaded, 32, num_slots=2)
    runner = runner_for(loaded, kv)
    arch, weights = runner.export()
    arch = json.loads(json.dumps(arch))  # JSON-able: it can cross a process boundary as text
    assert arch["model_type"] == "qwen2" and arch["qkv_bias"] is True
    assert all(isinstance(t, torch.Tensor) for t in weights.values())
    assert runner.weight_bytes == loaded.facts.weight_bytes
    kv2 = KVPool.from_tensors(torch.zeros_like(kv.k), torch.zeros_like(kv.v))
    rebuilt = ModelRunner.for_config(arch, weights, kv2, EngineConfig())
    p = PROMPTS[0][:8]
    torch.testing.assert_close(rebuilt.forward_logits([(1, p, 0)]), runner.forward_logits([(0, p, 0)]),
                               rtol=0, atol=0)


def _snapshot(model) -> dict[str, tuple[int, torch.Tensor]]:
    return {name: (p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}


def test_extract_weights_leaves_the_hf_model_untouched_by_default():
    loaded = make_model("qwen2")  # q/k/v biases: fused too
    before = _snapshot(loaded.model)
    weights = extract_weights(loaded.model)
    after = dict(loaded.model.named_parameters())
    for name, (ptr, value) in before.items():
        assert after[name].data_ptr() == ptr, name
        torch.testing.assert_close(after[name].detach(), value, rtol=0, atol=0, msg=name)
    assert not hasattr(loaded.model, "_splitlab_weights")  # nothing cached on the model either
    attn, mlp = loaded.model.model.layers[1].self_attn, loaded.model.model.layers[1].mlp
    qkv = weights["layers.1.qkv"]
    assert qkv.untyped_storage().data_ptr() != attn.q_proj.weight.untyped_storage().data_ptr()  # a copy
    torch.testing.assert_close(qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                               rtol=0, atol=0)
    torch.testing.assert_close(weights["layers.1.qkv_bias"],
                               torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]), rtol=0, atol=0)
    torch.testing.assert_close(weights["layers.1.gate_up"], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                               rtol=0, atol=0)
    # a second call makes new copies: the first caller's tensors are its own
    assert extract_weights(loaded.model)["layers.1.qkv"].data_ptr() != qkv.data_ptr()


def test_share_storage_makes_the_hf_model_hold_views_and_generate_is_unchanged():
    loaded = make_model("qwen2")
    prompt = PROMPTS[0]
    expected = hf_generate(loaded, prompt, 6)
    before = _snapshot(loaded.model)
    weights = extract_weights(loaded.model, share_storage=True)
    attn, mlp = loaded.model.model.layers[0].self_attn, loaded.model.model.layers[0].mlp
    qkv, gate_up = weights["layers.0.qkv"], weights["layers.0.gate_up"]
    # q/k/v and gate/up exist once: the HF modules now hold views of the fused tensors
    assert attn.q_proj.weight.data_ptr() == qkv.data_ptr()
    for lin in (attn.k_proj, attn.v_proj):
        assert lin.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    assert attn.v_proj.bias.untyped_storage().data_ptr() == weights["layers.0.qkv_bias"].untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == gate_up.untyped_storage().data_ptr()
    # unfused tensors are the model's own; every value is what it was
    assert weights["layers.0.o"].data_ptr() == before["model.layers.0.self_attn.o_proj.weight"][0]
    for name, p in loaded.model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name][1], rtol=0, atol=0, msg=name)
    assert hf_generate(loaded, prompt, 6) == expected
    # later shared reads reuse the same tensors (no second copy), and serve the same tokens
    again = extract_weights(loaded.model, share_storage=True)
    assert all(again[k].data_ptr() == t.data_ptr() for k, t in weights.items())
    runner = runner_for(loaded, KVPool.for_model(loaded, 32, num_slots=2), share_storage=True)
    out = runner.prefill([(0, prompt, 0)])
    for i in range(5):
        out += runner.decode_step([0], [out[-1]], [len(prompt) + i])
    assert out == expected


def test_unsupported_architecture_is_refused():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                    max_position_embeddings=64, word_embed_proj_dim=32)
    model = OPTForCausalLM(cfg).eval()
    loaded = LoadedModel(spec="test:opt", model=model, tokenizer=None, facts=model_facts(model),
                         device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ModelSpecError, match="hf-generate"):
        loaded.require_engine_support("serial")
    with pytest.raises(ModelSpecError, match="Llama-family"):
        extract_arch(model)


def test_bad_rows_and_mismatched_pools_raise_clear_errors(tiny):
    kv = KVPool.for_model(tiny, 16, num_slots=2)
    runner = runner_for(tiny, kv)
    with pytest.raises(ConfigError, match="outside"):
        runner.prefill([(2, [1, 2], 0)])  # slot 2 is the scratch row, not a usable slot
    with pytest.raises(WorkloadError, match="max_seq_len"):
        runner.prefill([(0, [1] * 10, 10)])
    with pytest.raises(WorkloadError):
        runner.decode_step([0], [1], [16])
    with pytest.raises(ConfigError, match="empty"):
        runner.prefill([(0, [], 0)])
    with pytest.raises(ConfigError):
        runner.decode_step([0, 1], [1], [0, 0])
    with pytest.raises(ConfigError, match="does not match"):
        runner_for(tiny, KVPool.allocate(3, 2, 16, 2, 16, torch.float32, "cpu"))
    with pytest.raises(ConfigError, match="CUDA"):
        runner_for(tiny, kv, cuda_graphs=True)
    with pytest.raises(ConfigError, match="Triton"):
        runner_for(tiny, kv, kernels="torch", gemv=True)
    with pytest.raises(ConfigError, match="EngineConfig"):
        ModelRunner.for_config(*runner.export(), kv, {"kernels": "torch"})
    assert runner.decode_step([], [], []) == [] and runner.prefill([]) == []


def test_sliding_window_models_need_short_slots():
    loaded = make_model("mistral", head_dim=16, sliding_window=32)
    with pytest.raises(ModelSpecError, match="sliding"):
        runner_for(loaded, KVPool.for_model(loaded, 64, num_slots=1))
    runner_for(loaded, KVPool.for_model(loaded, 32, num_slots=1))  # within the window: fine


def test_graph_buckets():
    assert graph_buckets(1) == [1]
    assert graph_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert graph_buckets(20) == [1, 2, 4, 8, 16, 20]


class EmulatedGraphRunner(ModelRunner):
    """The CUDA-graph decode path on CPU: 'capture' records the bucket, 'replay' runs the graph
    body eagerly on the static input buffers. Everything but the CUDA graph itself is the real
    code: staging, padding to the bucket, the scratch row, the batched decode attention."""

    def __init__(self, arch, weights, kv, config, max_batch=None):
        super().__init__(arch, weights, kv, config.replace(cuda_graphs=False), max_batch)
        self.cuda_graphs = True
        self._init_static_inputs()
        self.captured: list[tuple[int, int | None]] = []

    def _capture(self, bucket, ctx=None):
        out = torch.zeros(bucket, dtype=torch.int64)
        body = lambda: out.copy_(self._graph_body(bucket, ctx))  # noqa: E731

        class Replay:
            def replay(self):
                body()

        self._graphs[(bucket, ctx)] = (Replay(), out)
        self.captured.append((bucket, ctx))
        return self._graphs[(bucket, ctx)]


def test_graph_decode_path_pads_to_buckets_and_keeps_live_slots_intact():
    loaded = make_model("llama", head_dim=16)
    prompts = [[7 + i, 30 + 2 * i, 99, 4 + i, 250 - i][: 2 + i % 4] for i in range(6)]
    n_new = 6
    expected = [hf_generate(loaded, p, n_new) for p in prompts]
    kv = KVPool.for_model(loaded, 256, num_slots=7)
    runner = runner_for(loaded, kv, runner_cls=EmulatedGraphRunner, max_batch=6)
    assert runner.buckets == [1, 2, 4, 6]
    slots = [6, 0, 3, 1, 5, 2]  # arbitrary slot order
    toks = runner.prefill([(s, p, 0) for s, p in zip(slots, prompts)])
    outs = [[t] for t in toks]
    kv.k[:, 4].fill_(123.0)  # slot 4 holds no sequence: padding must not touch it either
    for step in range(n_new - 1):
        live = [i for i in range(6) if i < 6 - step]  # the batch shrinks: 6, 5 (pads to 6), 4, 3 (pads to 4), 2
        got = runner.decode_step([slots[i] for i in live], [outs[i][-1] for i in live],
                                 [len(prompts[i]) + len(outs[i]) - 1 for i in live])
        for i, t in zip(live, got):
            outs[i].append(t)
    for i in range(6):
        assert outs[i] == expected[i][:len(outs[i])], i
    assert torch.all(kv.k[:, 4] == 123.0)
    assert {b for b, _ in runner.captured} == {6, 4, 2}
    assert all(ctx == 256 for _, ctx in runner.captured)  # torch kernels: context-bucketed graphs
    assert torch.count_nonzero(kv.k[:, kv.pad_slot]) > 0  # padded rows wrote the scratch row


def test_whole_prompts_share_one_batched_attention_call(monkeypatch):
    """Whole prompts (start_pos 0) of ANY lengths run as ONE causal SDPA call per layer, right-
    padded to the longest (views of the qkv rows, no copy, when the lengths are equal); the
    logits stay HF's. Covers whole prompts only, and whole prompts beside decode rows and a
    later chunk (start_pos > 0, its own call)."""
    loaded = make_model("llama", head_dim=16)
    prompts = [[5, 9, 11, 40, 7], [8, 8, 3, 99, 1], [250, 2, 3, 4, 5], [60, 61, 62], [70, 71, 72], [44]]
    refs = [hf_logits(loaded, p) for p in prompts]
    runner = runner_for(loaded, KVPool.for_model(loaded, 64, num_slots=8))
    calls = record_sdpa_shapes(monkeypatch)
    got = runner.forward_logits([(s, p, 0) for s, p in enumerate(prompts[:3])])  # equal lengths: views
    assert calls == [(3, 4, 5, 16)] * 2  # [prompts, heads, rows, dim], once per layer
    torch.testing.assert_close(got, torch.cat(refs[:3]), rtol=1e-5, atol=1e-5)
    calls.clear()
    got = runner.forward_logits([(s, p, 0) for s, p in enumerate(prompts)])  # lengths 5, 5, 5, 3, 3, 1
    assert calls == [(6, 4, 5, 16)] * 2  # one call, padded to 5 rows each
    torch.testing.assert_close(got, torch.cat(refs), rtol=1e-5, atol=1e-5)
    # the greedy tokens of a prefill through the same path
    assert runner.prefill([(s, p, 0) for s, p in enumerate(prompts)]) == [int(r[-1].argmax()) for r in refs]
    # a mixed step: decode rows, a later chunk of slot 6 (its own call), two whole prompts
    calls.clear()
    long = [3, 1, 4, 1, 5, 9, 2, 6]
    runner.prefill([(6, long[:5], 0, False)])
    calls.clear()
    dec, out = runner.mixed_step(DecodeBatch([0, 3], [7, 9], [5, 3]), [(6, long[5:], 5), (7, prompts[3], 0),
                                                                        (1, prompts[1], 0)])
    # per layer: each decode row alone (the torch reference path), the later chunk, the 2 prompts
    assert sorted(calls) == sorted([(1, 4, 1, 16), (1, 4, 1, 16), (1, 4, 3, 16), (2, 4, 5, 16)] * 2)
    assert out[1:] == [int(refs[3][-1].argmax()), int(refs[1][-1].argmax())]
    assert out[0] == int(hf_logits(loaded, long)[-1].argmax())


def test_ragged_batched_prefill_equals_per_sequence_prefill():
    """The padded batched attention of ragged whole prompts gives the per-sequence prefill's
    logits (fp32, to 1e-6: the padded rows never reach a real row; what differs is only which
    rows share a GEMM, whose summation order may change in the last bit) and HF's."""
    loaded = make_model("llama", head_dim=16)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 300, (n,), generator=gen).tolist() for n in (17, 3, 40, 1, 29, 8)]
    refs = [hf_logits(loaded, p) for p in prompts]
    kv = KVPool.for_model(loaded, 64, num_slots=len(prompts))
    runner = runner_for(loaded, kv)
    alone = [runner.forward_logits([(s, p, 0)]) for s, p in enumerate(prompts)]
    k_alone, v_alone = kv.k.clone(), kv.v.clone()
    kv.k.zero_()
    kv.v.zero_()
    batched = runner.forward_logits([(s, p, 0) for s, p in enumerate(prompts)])
    torch.testing.assert_close(batched, torch.cat(alone), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(batched, torch.cat(refs), rtol=1e-5, atol=1e-5)
    # the same KV written (to fp32 rounding: a GEMM of more rows may sum in another order)
    torch.testing.assert_close(kv.k, k_alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kv.v, v_alone, rtol=1e-5, atol=1e-6)
    # and in another order, not adjacent to each other (decode rows in front)
    order = [4, 0, 5, 2]
    kv2 = KVPool.for_model(loaded, 64, num_slots=len(prompts))
    r2 = runner_for(loaded, kv2)
    r2.prefill([(1, prompts[1], 0)])
    dec, out = r2.mixed_step(DecodeBatch([1], [7], [3]), [(s, prompts[s], 0) for s in order])
    assert out == [int(refs[s][-1].argmax()) for s in order]
    assert dec == [int(hf_logits(loaded, prompts[1] + [7])[-1].argmax())]


def test_prompts_padded_to_length_and_count_buckets_keep_hf_logits(monkeypatch):
    """The CUDA path (forced here on the CPU): whole prompts right-padded to a multiple of the
    pad AND their count padded to the next power of two, so a plan-per-shape SDPA backend
    meets few shapes; the padding prompts never reach a real row's logits."""
    loaded = make_model("llama", head_dim=16)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(4, 300, (n,), generator=gen).tolist() for n in (9, 3, 14, 6, 1)]
    refs = [hf_logits(loaded, p) for p in prompts]
    runner = runner_for(loaded, KVPool.for_model(loaded, 64, num_slots=8))
    monkeypatch.setattr(runner, "_prefill_pad", lambda: 8)
    calls = record_sdpa_shapes(monkeypatch)
    got = runner.forward_logits([(s, p, 0) for s, p in enumerate(prompts)])  # 5 prompts -> 8, 14 rows -> 16
    assert calls == [(8, 4, 16, 16)] * 2
    torch.testing.assert_close(got, torch.cat(refs), rtol=1e-5, atol=1e-5)
    calls.clear()
    got = runner.forward_logits([(s, p, 0) for s, p in enumerate(prompts[:3])])  # 3 prompts -> 4
    assert calls == [(4, 4, 16, 16)] * 2
    torch.testing.assert_close(got, torch.cat(refs[:3]), rtol=1e-5, atol=1e-5)
    assert [count_bucket(n) for n in (1, 2, 3, 4, 5, 9, 64)] == [1, 2, 4, 4, 8, 16, 64]


def test_index_lists_go_over_in_one_copy_each_on_a_16_byte_boundary():
    """A forward's index lists share one device tensor; each starts 16-byte aligned, because
    Triton compiles a kernel variant per pointer alignment (an odd offset would mean a compile
    mid-run, the first time a step had that parity)."""
    parts = [[1, 2, 3], [4], [], [5, 6], [7, 8, 9, 10, 11]]
    views = index_tensors(torch.device("cpu"), parts)
    assert [v.tolist() for v in views] == parts
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1  # one tensor, one copy
    assert all(v.data_ptr() % 16 == 0 for v in views)


def test_sdpa_backend_choice(tiny):
    assert SDPA_BACKENDS[0] == "auto"
    kv = KVPool.for_model(tiny, 32, num_slots=2)
    p = [5, 6, 7, 8, 9, 10]
    want = runner_for(tiny, kv).forward_logits([(0, p, 0), (1, p[:4], 0)])
    forced = runner_for(tiny, kv, sdpa_backend="math")
    torch.testing.assert_close(forced.forward_logits([(0, p, 0), (1, p[:4], 0)]), want, rtol=1e-5, atol=1e-5)
    forced._gqa = False  # the cuDNN layout: K/V copied up to the query-head count
    torch.testing.assert_close(forced.forward_logits([(0, p, 0), (1, p[:4], 0)]), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="sdpa_backend"):
        runner_for(tiny, kv, sdpa_backend="fast")
    with pytest.raises(ConfigError, match="sdpa_backend"):
        forced.set_sdpa_backend("fast")


def _written_slots(kv: KVPool) -> set[int]:
    """The usable slots (the scratch row left out) whose K holds anything."""
    return {s for s in range(kv.num_slots) if torch.count_nonzero(kv.k[:, s])}


@pytest.mark.parametrize("prefill,decode,slots", [(True, True, {0, 1}), (True, False, {0}), (False, True, {0})])
def test_warm_up_warms_the_paths_asked_for_and_writes_only_the_first_slots(prefill, decode, slots):
    """The one engine warm-up: a whole-request runner (both paths), a split prefill worker
    (prefill only: no graphs) and a split decode worker (decode only: every graph bucket).
    Slots 0 and 1 are the only ones written, and a request served after it is still exact."""
    loaded = make_model("llama", head_dim=16)
    kv = KVPool.for_model(loaded, 64, num_slots=4)
    runner = runner_for(loaded, kv, runner_cls=EmulatedGraphRunner)
    buckets = warm_up(runner, prefill=prefill, decode=decode)
    assert _written_slots(kv) == slots
    if decode:
        assert buckets == [4, 2, 1] and sorted(b for b, _ in runner.captured) == [1, 2, 4]
    else:
        assert buckets == [] and runner.captured == []
    p = PROMPTS[0]
    out = runner.prefill([(0, p, 0)])
    for i in range(3):
        out += runner.decode_step([0], [out[-1]], [len(p) + i])
    assert out == hf_generate(loaded, p, 4)


def test_warm_up_needs_a_path(tiny):
    with pytest.raises(ConfigError, match="nothing to warm"):
        warm_up(runner_for(tiny, KVPool.for_model(tiny, 16, num_slots=1)), prefill=False, decode=False)


# ---- the paged pool --------------------------------------------------------------------------------

def paged_pool(loaded: LoadedModel, num_pages: int, block_size: int, max_seq_len: int = 64):
    from splitlab.engine.kv import PagedKVPool

    return PagedKVPool.for_model(loaded, max_seq_len, block_size, num_pages=num_pages)


def test_paged_chunked_prefill_and_decode_logits_match_hf_and_the_slot_pool():
    """Block size 4, pages in a scrambled order: chunks that start and end mid-page, decode
    rows that open a new page; HF's logits, and the same KV the slot pool holds, position
    for position."""
    loaded = make_model("llama", head_dim=16)
    full = PROMPTS[0] + [77, 78, 79, 80, 81, 82]  # 17 positions: 5 pages
    ref = hf_logits(loaded, full)
    kv = paged_pool(loaded, num_pages=9, block_size=4)
    table = [7, 2, 8, 0, 5]
    runner = runner_for(loaded, kv)
    parts = [runner.forward_logits([PrefillChunk(None, full[:3], 0, last=False, blocks=table)]),
             runner.forward_logits([PrefillChunk(None, full[3:10], 3, last=False, blocks=table[:3])]),
             runner.forward_logits([(None, full[10:12], 10, True, table[:3])])]
    for pos in range(12, len(full)):
        parts.append(runner.decode_logits([None], [full[pos]], [pos], [table]))
    torch.testing.assert_close(torch.cat(parts), ref, rtol=1e-5, atol=1e-5)
    slots = KVPool.for_model(loaded, 64, num_slots=1)
    runner_for(loaded, slots).forward_logits([(0, full, 0)])
    for layer in range(kv.num_layers):
        k, v = kv.sequence(layer, torch.tensor(table), len(full))
        torch.testing.assert_close(k, slots.k[layer, 0, :len(full)], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, slots.v[layer, 0, :len(full)], rtol=1e-5, atol=1e-6)
    untouched = [p for p in range(kv.num_pages + 1) if p not in table]
    assert torch.count_nonzero(kv.k[:, untouched]) == 0  # nothing written outside the table


def test_paged_mixed_steps_and_reused_pages_give_hf_tokens():
    """Several sequences' decode rows and chunks in one forward through their block tables;
    then pages freed by one sequence serve another (their stale KV is overwritten before it
    is read)."""
    loaded = make_model("qwen2")
    kv = paged_pool(loaded, num_pages=12, block_size=4)
    runner = runner_for(loaded, kv)
    a, b, c = PROMPTS[0], PROMPTS[1], PROMPTS[2]
    tables = {0: [3, 9, 1, 4], 1: [0, 6], 2: [10, 2, 5]}
    first = runner.prefill([PrefillChunk(None, a, 0, blocks=tables[0]), PrefillChunk(None, b, 0, blocks=tables[1])])
    assert first == [int(hf_logits(loaded, a)[-1].argmax()), int(hf_logits(loaded, b)[-1].argmax())]
    seqs = {0: a + [first[0]], 1: b + [first[1]]}
    dec, ch = runner.mixed_step(DecodeBatch([None, None], [seqs[0][-1], seqs[1][-1]], [len(a), len(b)],
                                            [tables[0], tables[1]]),
                                [PrefillChunk(None, c[:5], 0, last=False, blocks=tables[2])])
    assert ch == [None] and dec == [int(hf_logits(loaded, seqs[s])[-1].argmax()) for s in (0, 1)]
    dec, ch = runner.mixed_step(DecodeBatch([None], [dec[1]], [len(b) + 1], [tables[1]]),
                                [PrefillChunk(None, c[5:], 5, blocks=tables[2])])
    assert ch == [int(hf_logits(loaded, c)[-1].argmax())]
    assert dec == [int(hf_logits(loaded, seqs[1] + [int(hf_logits(loaded, seqs[1])[-1].argmax())])[-1].argmax())]
    # sequence 0 is done; its pages (full of its KV) go to a new prompt, in another order
    reused = [4, 1, 9, 3]
    p = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]
    out = runner.prefill([PrefillChunk(None, p, 0, blocks=reused)])
    for i in range(3):
        out += runner.decode_step([None], [out[-1]], [len(p) + i], [reused])
    assert out == hf_generate(loaded, p, 4)


def test_paged_graph_decode_path_pads_to_buckets_with_static_block_tables():
    """The CUDA-graph decode step over a paged pool, emulated on CPU: block tables are static
    inputs ``max_blocks`` wide, padded rows write the scratch page only, a batch shrinking
    through the buckets stays exact, and pages of no sequence are never touched."""
    loaded = make_model("llama", head_dim=16)
    prompts = [[7 + i, 30 + 2 * i, 99, 4 + i, 250 - i, 8, 9][: 2 + i % 6] for i in range(5)]
    n_new = 7
    expected = [hf_generate(loaded, p, n_new) for p in prompts]
    kv = paged_pool(loaded, num_pages=40, block_size=2, max_seq_len=16)
    runner = runner_for(loaded, kv, runner_cls=EmulatedGraphRunner, max_batch=6)
    assert runner.buckets == [1, 2, 4, 6] and runner._static_where(4).shape == (4, kv.max_blocks)
    shuffled = torch.randperm(40, generator=torch.Generator().manual_seed(4)).tolist()
    tables = []
    for p in prompts:  # scattered pages, each sequence's in no particular order
        need = kv.pages_for(len(p) + n_new)
        tables.append(shuffled[:need])
        shuffled = shuffled[need:]
    owned = {x for t in tables for x in t}
    free = [x for x in range(kv.num_pages) if x not in owned]
    kv.k[:, free] = 123.0
    outs = [[t] for t in runner.prefill([PrefillChunk(None, p, 0, blocks=t) for p, t in zip(prompts, tables)])]
    for step in range(n_new - 1):
        live = list(range(5 - min(step, 3)))  # 5 (pads to 6), 4, 3 (pads to 4), 2
        got = runner.decode_step([None] * len(live), [outs[i][-1] for i in live],
                                 [len(prompts[i]) + len(outs[i]) - 1 for i in live], [tables[i] for i in live])
        for i, t in zip(live, got):
            outs[i].append(t)
    for i in range(5):
        assert outs[i] == expected[i][:len(outs[i])], i
    assert torch.all(kv.k[:, free] == 123.0)
    assert {b for b, _ in runner.captured} == {6, 4, 2}
    assert torch.count_nonzero(kv.k[:, kv.pad_page]) > 0  # padded rows wrote the scratch page
    with pytest.raises(ConfigError, match="block table holds"):
        runner.decode_step([None], [1], [4], [[0, 1]])  # position 4 needs a third page of 2
    with pytest.raises(ConfigError, match="outside"):
        runner.decode_step([None], [1], [0], [[kv.pad_page]])  # the scratch page is no sequence's


def test_paged_rows_are_checked(tiny):
    kv = paged_pool(tiny, num_pages=4, block_size=4, max_seq_len=16)
    runner = runner_for(tiny, kv)
    assert runner.max_batch == 4  # the pages bound the sequences
    with pytest.raises(ConfigError, match="block table"):
        runner.prefill([(0, [1, 2], 0)])  # a slot where a block table is needed
    with pytest.raises(ConfigError, match="need 2 pages"):
        runner.prefill([(None, [1] * 5, 0, True, [0])])
    with pytest.raises(ConfigError, match="outside"):
        runner.prefill([(None, [1, 2], 0, True, [4])])
    with pytest.raises(WorkloadError, match="max_seq_len"):
        runner.decode_step([None], [1], [16], [[0, 1, 2, 3]])
    with pytest.raises(ConfigError, match="same length"):
        runner.decode_step([None, None], [1, 2], [0, 0], [[0]])
    slots = runner_for(tiny, KVPool.for_model(tiny, 16, num_slots=2))
    with pytest.raises(ConfigError, match="slot pool"):
        slots.prefill([(0, [1, 2], 0, True, [0])])


def test_paged_warm_up_then_exact():
    loaded = make_model("llama", head_dim=16)
    kv = paged_pool(loaded, num_pages=10, block_size=4, max_seq_len=32)
    runner = runner_for(loaded, kv, runner_cls=EmulatedGraphRunner)
    assert warm_up(runner) == [10, 8, 4, 2, 1]  # max_batch: the 10 pages
    p = PROMPTS[0]
    table = [9, 8, 7, 6]
    out = runner.prefill([PrefillChunk(None, p, 0, blocks=table)])
    for i in range(4):
        out += runner.decode_step([None], [out[-1]], [len(p) + i], [table])
    assert out == hf_generate(loaded, p, 5)


def test_graph_capture_facts_are_none_without_graphs(tiny):
    """On a CPU no decode graph is captured: the run facts say so, and claim no capture time or
    graph memory (on CUDA ``graph_capture_s`` / ``graph_pool_bytes`` hold what capture took)."""
    import splitlab
    from splitlab.config import EngineConfig
    from splitlab.workload import fixed_batch

    run = splitlab.run(fixed_batch(2, 6, 3, model=tiny), tiny, mode="serial",
                       config=EngineConfig(max_seq_len=32, num_slots=2, max_batch=2), progress=False)
    facts = run.config.effective
    assert facts["graphs_captured"] == 0 and facts["graph_capture_s"] is None and facts["graph_pool_bytes"] is None
