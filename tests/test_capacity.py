"""KV capacity: the arithmetic on hand-computed numbers, the derived max_batch, bad input, `splitlab env --model`."""

from __future__ import annotations

import json
import types

import pytest
import torch

from splitlab.cli import main
from splitlab.config import EngineConfig
from splitlab.engine.capacity import (MAX_DERIVED_BATCH, decode_batch_limit, kv_capacity, reserve_for)
from splitlab.engine.kv import KVPool, PagedKVPool
from splitlab.errors import ConfigError, DeviceError
from splitlab.models import load_model

GIB = 2**30
# Llama-3.1-8B's shapes (its public config), bf16
LLAMA_8B = types.SimpleNamespace(num_layers=32, num_kv_heads=8, head_dim=128, dtype_bytes=2, num_heads=32,
                                 hidden_size=4096, intermediate_size=14336, vocab_size=128256, max_positions=131072)


@pytest.fixture(scope="module")
def llama8b():
    return load_model("dummy:llama-3.1-8b", device="meta", dtype="bfloat16")


def test_the_dummy_model_has_the_shapes_the_numbers_below_assume(llama8b):
    for name, value in vars(LLAMA_8B).items():
        assert getattr(llama8b.facts, name) == value, name
    assert llama8b.facts.kv_bytes_per_token == 131072  # 2 (K, V) * 32 layers * 8 heads * 128 * 2 bytes


def test_reserve_on_hand_computed_numbers():
    r = reserve_for(LLAMA_8B, EngineConfig())  # token_budget 8192, chunk 512, max_batch 64, graphs on
    # 4 * 4096 + 2 * (4096 + 2 * 1024) + 2 * 4096 + 3 * 14336 = 16384 + 12288 + 8192 + 43008
    assert r.row_width == 79872
    assert r.prefill_tokens == 8192 and r.activation_bytes == 8192 * 2 * 79872 == 1_308_622_848
    assert r.logits_rows == 64 and r.logits_bytes == 64 * 128256 * 4 == 32_833_536
    assert r.graph_buckets == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert r.graph_bytes == 64 * 2 * (79872 + 128256) + 11 * 32 * 2**20 == 395_739_136
    assert r.total_bytes == 1_737_195_520
    assert "8192 tokens" in r.describe() and "11 decode graph buckets up to 64" in r.describe()
    no_graphs = reserve_for(LLAMA_8B, EngineConfig(cuda_graphs=False))
    assert no_graphs.graph_bytes == 0 and no_graphs.graph_buckets == () and "no decode graphs" in no_graphs.describe()
    # max_batch None reserves for the largest batch it may derive
    derived = reserve_for(LLAMA_8B, EngineConfig(max_batch=None))
    assert derived.graph_buckets[-1] == MAX_DERIVED_BATCH and derived.logits_rows == 256
    assert reserve_for(LLAMA_8B, EngineConfig(token_budget=256, chunk_size=1024)).prefill_tokens == 1024
    assert reserve_for(LLAMA_8B, EngineConfig(max_batch=None, chunk_size=100)).graph_buckets[-1] == 99  # < chunk


def test_capacity_on_hand_computed_numbers():
    config = EngineConfig(kv_memory_fraction=0.5, kv_block_size=16)  # 0.5: exact in binary
    cap = kv_capacity(LLAMA_8B, 80 * GIB, config, context_len=1000)
    assert cap.bytes_per_position == 131072
    assert cap.kv_bytes == 40 * GIB - 1_737_195_520 == 41_212_477_440
    assert cap.kv_positions == 314_426  # 131072 * 314426 = 41_212_444_672, 32_768 bytes left
    assert cap.num_slots == 152  # 153 slots of 256 MiB fit, one is the scratch row
    assert cap.num_pages == 19_650  # 19651 pages of 2 MiB fit, one is the scratch page
    assert cap.max_sequences == 311  # 63 pages per 1000-position sequence: 19650 // 63
    assert cap.max_batch == 64  # the config's max_batch, which the pool can hold
    assert kv_capacity(LLAMA_8B, 80 * GIB, config).max_sequences == 153  # 128 pages each at max_seq_len 2048
    slots = kv_capacity(LLAMA_8B, 80 * GIB, config.replace(kv_block_size=None), context_len=1000)
    assert slots.num_pages is None and slots.max_sequences == 152  # a slot holds any length up to 2048
    assert json.loads(json.dumps(cap.to_dict()))["reserve"]["total_bytes"] == 1_737_195_520


def test_nothing_fits_is_zero_not_negative():
    cap = kv_capacity(LLAMA_8B, GIB, EngineConfig(kv_block_size=16))  # less than the reserve
    assert (cap.kv_bytes, cap.kv_positions, cap.num_slots, cap.num_pages, cap.max_sequences) == (0, 0, 0, 0, 0)


def test_capacity_counts_match_the_pools_built_from_the_same_bytes(tiny):
    # no graphs: their per-graph workspace alone would dwarf the tiny model's pool
    config = EngineConfig(max_seq_len=64, kv_block_size=16, max_batch=None, token_budget=64, chunk_size=32,
                          cuda_graphs=False)
    cap = kv_capacity(tiny.facts, 10 * 2**20, config)
    assert 0 < cap.reserve.total_bytes < cap.kv_bytes and cap.num_pages > 100
    assert cap.num_slots == KVPool.for_model(tiny, 64, memory_budget_bytes=cap.kv_bytes).num_slots
    assert cap.num_pages == PagedKVPool.for_model(tiny, 64, 16, memory_budget_bytes=cap.kv_bytes).num_pages


def _slots(n):
    return types.SimpleNamespace(paged=False, num_slots=n, max_sequences=n)


def _pages(n, block=16, max_seq_len=4096):
    return types.SimpleNamespace(paged=True, num_pages=n, block_size=block, max_seq_len=max_seq_len, max_sequences=n)


@pytest.mark.parametrize("pool, expected", [
    (_slots(300), 256),  # capped
    (_slots(5), 5),
    (_pages(1000), 7),  # 128 pages per sequence at min(4096, 2048) positions
    (_pages(1000, max_seq_len=512), 31),  # 32 pages per 512-position sequence
    (_pages(100), 1),  # not one 2048-position sequence: still a batch of one
    (_pages(10**6), 256),
])
def test_derived_max_batch_policy(pool, expected):
    assert decode_batch_limit(pool, EngineConfig(max_batch=None)) == expected


def test_derived_max_batch_stays_below_chunk_size_and_a_given_one_is_kept():
    assert decode_batch_limit(_slots(300), EngineConfig(max_batch=None, chunk_size=100)) == 99
    assert decode_batch_limit(_slots(300), EngineConfig(max_batch=32)) == 32
    assert decode_batch_limit(_slots(5), EngineConfig(max_batch=32)) == 5  # what the runner's default was
    assert decode_batch_limit(_pages(20), EngineConfig(max_batch=32)) == 20


def test_engine_config_accepts_a_derived_max_batch_and_still_refuses_bad_ones():
    assert EngineConfig(max_batch=None).max_batch is None
    assert EngineConfig(max_batch=None, chunk_size=8).chunk_size == 8  # checked against the derived batch instead
    for bad in (0, -1, 2.0, "64", True):
        with pytest.raises(ConfigError, match="max_batch must be a positive integer"):
            EngineConfig(max_batch=bad)
    with pytest.raises(ConfigError, match="chunk_size"):
        EngineConfig(max_batch=64, chunk_size=64)


@pytest.mark.parametrize("kwargs, message", [
    ({"free_bytes": 0}, "free_bytes must be a positive integer"),
    ({"free_bytes": -5}, "free_bytes"),
    ({"free_bytes": 1.5}, "free_bytes"),
    ({"free_bytes": True}, "free_bytes"),
    ({"context_len": 4096}, "up to max_seq_len"),
    ({"context_len": 0}, "context_len"),
    ({"config": EngineConfig(max_seq_len=200_000)}, "beyond the model's context"),
    ({"config": {"max_seq_len": 64}}, "needs an EngineConfig"),
    ({"facts": types.SimpleNamespace(**{**vars(LLAMA_8B), "head_dim": 0})}, "positive integer head_dim"),
    ({"facts": object()}, "pass a ModelFacts"),
])
def test_bad_capacity_input_is_refused(kwargs, message):
    args = {"facts": LLAMA_8B, "free_bytes": 80 * GIB, **kwargs}
    with pytest.raises(ConfigError, match=message):
        kv_capacity(**args)


# ---- splitlab env --model ----------------------------------------------------------------------

def _last_json(text):
    return json.loads(text.strip().splitlines()[-1])


def test_env_prints_the_capacity_for_a_stated_card(capsys, llama8b):
    assert main(["env", "--model", "dummy:llama-3.1-8b", "--gpu-memory-gib", "24", "--kv-block-size", "16"]) == 0
    out = capsys.readouterr().out
    cap = _last_json(out)["kv_capacity"]
    free = 24 * GIB - llama8b.facts.weight_bytes
    expected = kv_capacity(llama8b.facts, free, EngineConfig(kv_block_size=16, max_batch=None))
    assert {k: v for k, v in cap.items() if k in expected.to_dict()} == json.loads(json.dumps(expected.to_dict()))
    assert cap["bytes_per_position"] == 131072 and cap["free_bytes"] == free and cap["context_len"] == 2048
    assert cap["memory_bytes"] == 24 * GIB and cap["memory_source"].startswith("stated")
    for label in ("KV tokens", "pages", "concurrent sequences", "reserved", "derived max_batch"):
        assert label in out
    assert f"{expected.kv_positions:,}" in out and f"{expected.num_pages:,} of 16 positions" in out
    if not torch.cuda.is_available():
        assert "no GPU on this machine" in out


def test_env_json_prints_the_json_alone(capsys):
    assert main(["env", "--model", "dummy:llama-3.2-1b", "--gpu-memory-gib", "24", "--max-seq-len", "8192",
                 "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    cap = json.loads(lines[0])["kv_capacity"]
    assert cap["max_seq_len"] == cap["context_len"] == 8192 and cap["block_size"] is None
    assert cap["max_sequences"] == cap["num_slots"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is measured, not refused")
def test_env_without_a_gpu_asks_for_the_memory(capsys):
    assert main(["env", "--model", "dummy:llama-3.2-1b"]) == 2
    assert "no GPU on this machine to measure; give --gpu-memory-gib" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--model", "dummy:lama-3.1-8b", "--gpu-memory-gib", "24"], "accepted"),
    (["--model", "dummy:llama-3.2-1b", "--gpu-memory-gib", "-1"], "positive number of GiB"),
    (["--model", "dummy:llama-3.2-1b", "--gpu-memory-gib", "nan"], "positive number of GiB"),
    (["--model", "dummy:llama-3.2-1b", "--gpu-memory-gib", "24", "--max-seq-len", "0"], "max_seq_len must be"),
    (["--model", "dummy:llama-3.2-1b", "--gpu-memory-gib", "24", "--kv-block-size", "12"], "power of two"),
    (["--model", "dummy:llama-3.2-1b", "--gpu-memory-gib", "24", "--max-seq-len", "999999"], "context"),
    (["--model", "dummy:llama-3.1-8b", "--gpu-memory-gib", "8"], "more than the 8.00 GiB"),
    (["--max-seq-len", "4096"], "give --model M too"),
])
def test_env_bad_input_exits_2_with_what_to_do(capsys, args, message):
    assert main(["env", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("splitlab: error: ") and message in err and "Traceback" not in err


def test_a_stated_card_too_small_for_the_weights_is_a_device_error():
    from splitlab.system.env import model_capacity

    with pytest.raises(DeviceError, match="weights of dummy:llama-3.1-8b take 14.96 GiB"):
        model_capacity("dummy:llama-3.1-8b", gpu_memory_gib=8)
