"""The analytic cost model against numbers computed by hand from the config values."""

import dataclasses

import pytest

from splitlab.measure import flops
from splitlab.errors import ConfigError
from splitlab.models import ModelFacts, load_model

# tiny: vocab 260, hidden 64, intermediate 128, 2 layers, 4 heads, 2 kv heads, head_dim 16, fp32, untied.
# One block: q 64*64 + k 64*32 + v 64*32 + o 64*64 + MLP 3*64*128 = 4096+2048+2048+4096+24576 = 36864.
TINY_LAYER = 36864
TINY_LM_HEAD = 260 * 64  # 16640
TINY_PARAMS = 2 * TINY_LAYER + 2 * TINY_LM_HEAD + (2 * 2 + 1) * 64  # + embedding + RMSNorm weights = 107328
TINY_KV_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 kv heads, 16 dims, 4 bytes = 512
TINY_WEIGHTS_READ = (TINY_PARAMS - TINY_LM_HEAD) * 4  # the untied input table is gathered, not read: 362752

# Llama-3.1-8B (presets.json): hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 kv heads,
# head_dim 128, vocab 128256, untied, bf16.
L8_LAYER = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096 + 3 * 4096 * 14336  # 218103808
L8_LM_HEAD = 128256 * 4096  # 525336576
L8_PARAMS = 32 * L8_LAYER + 2 * L8_LM_HEAD + (2 * 32 + 1) * 4096  # 8030261248
L8_KV_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # 131072 bytes


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu")


def llama8b_facts():
    return ModelFacts(arch="llama", num_params=L8_PARAMS, weight_bytes=L8_PARAMS * 2, num_layers=32,
                      hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8, head_dim=128,
                      vocab_size=128256, max_positions=131072, dtype_bytes=2, kv_bytes_per_token=L8_KV_PER_TOKEN)


def test_hand_numbers_match_the_real_tiny_model(tiny):
    f = tiny.facts
    assert f.num_params == TINY_PARAMS == 107328
    assert f.kv_bytes_per_token == TINY_KV_PER_TOKEN
    assert flops.layer_matmul_params(f) == TINY_LAYER
    assert not flops.tied_embeddings(f)
    assert flops.weights_read_bytes(f) == TINY_WEIGHTS_READ == 362752


def test_tiny_prefill(tiny):
    c = flops.prefill_cost(tiny.facts, batch=2, prompt_len=8)
    assert c.matmul_flops == 2 * 2 * TINY_LAYER * 16  # 2 FLOPs x 2 layers x params x 16 tokens = 2359296
    assert c.lm_head_flops == 2 * TINY_LM_HEAD * 2  # last position of each of 2 prompts
    # causal pairs per sequence: 8*9/2 = 36; 4 FLOPs x 2 layers x 4 heads x 16 dims x 36 pairs x 2 seqs
    assert c.attention_flops == 4 * 2 * 4 * 16 * 36 * 2 == 36864
    assert c.flops == 2359296 + 66560 + 36864
    assert c.weight_bytes == 362752
    assert c.kv_read_bytes == 0
    assert c.kv_write_bytes == 16 * 512
    assert c.bytes == 362752 + 8192
    assert c.intensity == pytest.approx((2359296 + 66560 + 36864) / (362752 + 8192))
    every = flops.prefill_cost(tiny.facts, batch=2, prompt_len=8, lm_head="all")
    assert every.lm_head_flops == 2 * TINY_LM_HEAD * 16


def test_tiny_prefill_after_a_cached_prefix(tiny):
    c = flops.prefill_cost(tiny.facts, batch=1, prompt_len=4, past=10)
    assert c.attention_flops == 4 * 2 * 4 * 16 * (4 * 10 + 4 * 5 / 2)  # 40 + 10 pairs
    assert c.kv_read_bytes == 10 * 512
    assert c.kv_write_bytes == 4 * 512


def test_tiny_decode(tiny):
    c = flops.decode_cost(tiny.facts, batch=3, context=100)
    assert c.tokens == 3
    assert c.matmul_flops == 2 * 2 * TINY_LAYER * 3
    assert c.lm_head_flops == 2 * TINY_LM_HEAD * 3
    assert c.attention_flops == 4 * 2 * 4 * 16 * 101 * 3  # each new token attends 100 cached + itself
    assert c.kv_read_bytes == 3 * 100 * 512
    assert c.kv_write_bytes == 3 * 512
    assert c.bytes == 362752 + 153600 + 1536


def test_llama_8b_decode_and_prefill():
    f = llama8b_facts()
    assert L8_PARAMS == 8030261248  # the published 8.03 B
    assert flops.layer_matmul_params(f) == L8_LAYER == 218103808
    assert flops.weights_read_bytes(f) == (L8_PARAMS - L8_LM_HEAD) * 2 == 15009849344
    d = flops.decode_cost(f, batch=32, context=1024)
    matmul = 2 * 32 * L8_LAYER * 32 + 2 * L8_LM_HEAD * 32  # 2 x (6979321856 + 525336576) x 32 tokens
    assert d.matmul_flops + d.lm_head_flops == matmul == 480298139648
    assert d.attention_flops == 4 * 32 * 32 * 128 * 1025 * 32
    assert d.kv_read_bytes == 32 * 1024 * 131072  # 4.29 GB
    assert d.bytes == 15009849344 + 4294967296 + 32 * 131072
    assert d.intensity == pytest.approx((matmul + 4 * 32 * 32 * 128 * 1025 * 32) / d.bytes)
    assert 20 < d.intensity < 30  # far below an H200's ridge (~150 FLOP/B): memory-bound
    p = flops.prefill_cost(f, batch=4, prompt_len=1024)
    assert p.matmul_flops == 2 * 32 * L8_LAYER * 4096
    assert p.attention_flops == 4 * 32 * 32 * 128 * (1024 * 1025 / 2) * 4
    assert p.flops == pytest.approx(577e12 * 0.1006, rel=0.01)  # 4x1024 at 577 TFLOP/s is 100.6 ms
    assert p.intensity > 1000  # compute-bound


def test_facts_from_preset_match_hand_counts_and_the_built_model(tiny):
    f = flops.facts_from_preset("dummy:llama-3.1-8b")
    assert f.num_params == L8_PARAMS and f.kv_bytes_per_token == L8_KV_PER_TOKEN
    small = flops.facts_from_preset("llama-3.2-1b")  # tied: embedding counted once
    assert flops.tied_embeddings(small)
    assert flops.weights_read_bytes(small) == small.weight_bytes
    from_cfg = flops.facts_from_config(tiny.model.config, dtype_bytes=4)
    assert dataclasses.replace(from_cfg, max_positions=0) == dataclasses.replace(tiny.facts, max_positions=0)


def test_roofline_helpers_and_bad_input(tiny):
    assert flops.ridge_point(600e12, 4e12) == 150
    assert flops.attainable_flops_s(10, 600e12, 4e12) == 40e12
    assert flops.attainable_flops_s(1000, 600e12, 4e12) == 600e12
    with pytest.raises(ConfigError):
        flops.prefill_cost(tiny.facts, 0, 8)
    with pytest.raises(ConfigError):
        flops.prefill_cost(tiny.facts, 1, 8, lm_head="some")
    with pytest.raises(ConfigError):
        flops.decode_cost(tiny.facts, 1, -1)
