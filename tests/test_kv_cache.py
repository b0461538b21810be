"""KV pool shape, sizing, sharing, and the slot allocator."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from splitlab.errors import ConfigError, DeviceError
from splitlab.engine.kv import CPU_DEFAULT_SLOTS, KVPool, SlotAllocator, slot_bytes


def test_allocate_shape_scratch_row_and_bytes():
    kv = KVPool.allocate(num_layers=3, num_slots=5, max_seq_len=16, num_kv_heads=2, head_dim=8,
                         dtype=torch.float32, device="cpu")
    assert kv.k.shape == (3, 6, 16, 2, 8) and kv.v.shape == (3, 6, 16, 2, 8)
    assert (kv.num_slots, kv.pad_slot, kv.max_seq_len) == (5, 5, 16)
    assert kv.nbytes == 2 * 3 * 6 * 16 * 2 * 8 * 4
    assert kv.bytes_per_token == 2 * 3 * 2 * 8 * 4
    assert torch.count_nonzero(kv.k) == 0 and torch.count_nonzero(kv.v) == 0


def test_layer_flat_rows_are_slot_times_len_plus_pos():
    kv = KVPool.allocate(2, 3, 10, 2, 4, torch.float32, "cpu")
    k_flat, v_flat = kv.layer_flat(1)
    assert k_flat.shape == (4 * 10, 2, 4)
    k_flat[2 * 10 + 7] = 1.5
    v_flat[0 * 10 + 3] = -2.0
    assert torch.all(kv.k[1, 2, 7] == 1.5) and torch.count_nonzero(kv.k) == 8
    assert torch.all(kv.v[1, 0, 3] == -2.0) and torch.count_nonzero(kv.v) == 8
    assert k_flat.data_ptr() == kv.k[1].data_ptr()  # a view, not a copy


def test_for_model_slot_count_rules(tiny):
    facts = tiny.facts
    per_slot = slot_bytes(facts.num_layers, 64, facts.num_kv_heads, facts.head_dim, tiny.dtype)
    assert per_slot == 64 * facts.kv_bytes_per_token
    assert KVPool.for_model(tiny, 64, num_slots=3).num_slots == 3
    # a byte budget: as many slots as fit, the scratch row included
    assert KVPool.for_model(tiny, 64, memory_budget_bytes=10 * per_slot).num_slots == 9
    assert KVPool.for_model(tiny, 64, memory_budget_bytes=10 * per_slot, max_slots=4).num_slots == 4
    assert KVPool.for_model(tiny, 64).num_slots == CPU_DEFAULT_SLOTS
    kv = KVPool.for_model(tiny, 64, num_slots=2)
    assert kv.dtype == tiny.dtype and kv.device.type == "cpu"
    assert (kv.num_layers, kv.num_kv_heads, kv.head_dim) == (facts.num_layers, facts.num_kv_heads, facts.head_dim)


def test_for_model_refuses_what_cannot_work(tiny):
    per_slot = slot_bytes(tiny.facts.num_layers, 64, tiny.facts.num_kv_heads, tiny.facts.head_dim, tiny.dtype)
    with pytest.raises(DeviceError, match="lower max_seq_len"):
        KVPool.for_model(tiny, 64, memory_budget_bytes=per_slot)  # only the scratch row fits
    with pytest.raises(ConfigError, match="context"):
        KVPool.for_model(tiny, tiny.facts.max_positions + 1, num_slots=1)
    with pytest.raises(ConfigError):
        KVPool.for_model(tiny, 64, num_slots=0)
    with pytest.raises(ConfigError):
        KVPool(torch.zeros(2, 3, 4, 1, 2), torch.zeros(2, 3, 4, 1, 3))
    with pytest.raises(ConfigError):
        KVPool(torch.zeros(2, 1, 4, 1, 2), torch.zeros(2, 1, 4, 1, 2))  # no usable slot


def test_from_tensors_shares_storage():
    kv = KVPool.allocate(1, 2, 4, 1, 2, torch.float32, "cpu")
    other = KVPool.from_tensors(*kv.tensors())
    other.k[0, 1, 2] = 7.0
    assert kv.k[0, 1, 2, 0, 0].item() == 7.0
    assert other.describe() == kv.describe()


def _child_writes(k, v):
    pool = KVPool.from_tensors(k, v)
    pool.k[0, 0, 1] = 3.0
    pool.v[0, 1, 0] = 4.0


def test_share_memory_crosses_a_process_boundary():
    kv = KVPool.allocate(1, 2, 4, 1, 2, torch.float32, "cpu").share_memory_()
    assert kv.k.is_shared() and kv.v.is_shared()
    ctx = mp.get_context("fork")
    proc = ctx.Process(target=_child_writes, args=kv.tensors())
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    assert torch.all(kv.k[0, 0, 1] == 3.0) and torch.all(kv.v[0, 1, 0] == 4.0)


def test_slot_allocator_alloc_free_reuse_exhaustion():
    alloc = SlotAllocator(3)
    assert [alloc.alloc(), alloc.alloc(), alloc.alloc()] == [0, 1, 2]
    assert alloc.num_free == 0 and alloc.num_used == 3
    assert alloc.alloc() is None  # full: not an error
    alloc.free(1)
    assert alloc.num_free == 1
    assert alloc.alloc() == 1  # reused
    alloc.free(2)
    alloc.free(0)
    assert alloc.alloc() == 0  # lowest free first
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free(2)
    with pytest.raises(ValueError):
        alloc.free(7)
    with pytest.raises(ConfigError):
        SlotAllocator(0)
