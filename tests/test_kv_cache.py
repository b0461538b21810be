"""KV pools (slots and pages): shape, sizing, sharing; the slot and page allocators."""

from __future__ import annotations

import multiprocessing as mp
import random
import types

import pytest
import torch

from splitlab.config import EngineConfig
from splitlab.errors import ConfigError, DeviceError
from splitlab.engine.capacity import MAX_DERIVED_BATCH, decode_batch_limit, reserve_for
from splitlab.engine.kv import (CPU_DEFAULT_SLOTS, KVPool, PageAllocator, PagedKVPool, SlotAllocator, _budget,
                                build_kv, slot_bytes)


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


def _assert_a_child_writes_into(kv) -> None:
    """A forked child rebuilds a pool around ``kv``'s tensors and writes; the writes show here."""
    ctx = mp.get_context("fork")
    proc = ctx.Process(target=_child_writes, args=kv.tensors())
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    assert torch.all(kv.k[0, 0, 1] == 3.0) and torch.all(kv.v[0, 1, 0] == 4.0)


def test_share_memory_crosses_a_process_boundary():
    kv = KVPool.allocate(1, 2, 4, 1, 2, torch.float32, "cpu").share_memory_()
    assert kv.k.is_shared() and kv.v.is_shared()
    _assert_a_child_writes_into(kv)


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


# ---- the paged pool ---------------------------------------------------------------------------

def test_paged_allocate_shape_scratch_page_and_bytes():
    kv = PagedKVPool.allocate(num_layers=3, num_pages=7, block_size=4, max_seq_len=30, num_kv_heads=2, head_dim=8,
                              dtype=torch.float32, device="cpu")
    assert kv.k.shape == (3, 8, 4, 2, 8) and kv.paged and not KVPool.allocate(1, 1, 4, 1, 2, torch.float32, "cpu").paged
    assert (kv.num_pages, kv.pad_page, kv.block_size, kv.max_seq_len, kv.max_blocks) == (7, 7, 4, 30, 8)
    assert kv.nbytes == 2 * 3 * 8 * 4 * 2 * 8 * 4 and kv.bytes_per_token == 2 * 3 * 2 * 8 * 4
    assert kv.num_slots is None and kv.max_sequences == 7 and kv.pages_for(9) == 3 and kv.pages_for(8) == 2
    assert kv.describe()["num_pages"] == 7 and "7 pages x 4 positions" in repr(kv)
    assert isinstance(kv.new_allocator(), PageAllocator) and kv.new_allocator().block_size == 4


def test_paged_layer_flat_rows_and_sequence_gather_through_the_block_table():
    kv = PagedKVPool.allocate(2, 6, 4, 24, 2, 3, torch.float32, "cpu")
    table = [5, 0, 3]  # positions 0-3 in page 5, 4-7 in page 0, 8-11 in page 3
    k_flat, v_flat = kv.layer_flat(1)
    assert k_flat.shape == (7 * 4, 2, 3) and k_flat.data_ptr() == kv.k[1].data_ptr()
    for pos in range(10):
        k_flat[table[pos // 4] * 4 + pos % 4] = float(pos + 1)
        v_flat[table[pos // 4] * 4 + pos % 4] = -float(pos + 1)
    k, v = kv.sequence(1, torch.tensor(table), 10)
    assert k.shape == (10, 2, 3)
    assert [int(x) for x in k[:, 0, 0]] == list(range(1, 11))
    assert [int(x) for x in v[:, 1, 2]] == list(range(-1, -11, -1))
    assert torch.count_nonzero(kv.k[0]) == 0  # the other layer untouched
    assert torch.all(kv.k[1, 5, 2] == 3.0) and torch.all(kv.k[1, 3, 1] == 10.0)
    slot_pool = KVPool.allocate(1, 2, 5, 1, 2, torch.float32, "cpu")
    slot_pool.k[0, 1, :3] = 2.0
    assert torch.all(slot_pool.sequence(0, 1, 3)[0] == 2.0) and slot_pool.block_size == 5


def test_paged_for_model_page_count_rules(tiny):
    facts = tiny.facts
    per_page = slot_bytes(facts.num_layers, 16, facts.num_kv_heads, facts.head_dim, tiny.dtype)
    assert PagedKVPool.for_model(tiny, 64, 16, num_pages=5).num_pages == 5
    # a byte budget: as many pages as fit, the scratch page included; capped at max_batch full sequences
    assert PagedKVPool.for_model(tiny, 64, 16, memory_budget_bytes=11 * per_page).num_pages == 10
    assert PagedKVPool.for_model(tiny, 64, 16, memory_budget_bytes=11 * per_page, max_batch=2).num_pages == 8
    # CPU default: the memory of min(max_batch, 8) full slots
    assert PagedKVPool.for_model(tiny, 64, 16).num_pages == CPU_DEFAULT_SLOTS * 4
    assert PagedKVPool.for_model(tiny, 64, 16, max_batch=3).num_pages == 3 * 4
    with pytest.raises(DeviceError, match="fewer than two"):
        PagedKVPool.for_model(tiny, 64, 16, memory_budget_bytes=2 * per_page)
    with pytest.raises(ConfigError, match="power of two"):
        PagedKVPool.for_model(tiny, 64, 12, num_pages=4)
    with pytest.raises(ConfigError, match="context"):
        PagedKVPool.for_model(tiny, facts.max_positions + 1, 16, num_pages=4)
    with pytest.raises(ConfigError):
        PagedKVPool.for_model(tiny, 64, 16, num_pages=0)
    with pytest.raises(ConfigError):
        PagedKVPool(torch.zeros(2, 3, 4, 1, 2), torch.zeros(2, 3, 4, 1, 2), max_seq_len=0)
    with pytest.raises(ConfigError, match="power of two"):
        PagedKVPool(torch.zeros(2, 3, 6, 1, 2), torch.zeros(2, 3, 6, 1, 2), max_seq_len=12)


def test_build_kv_follows_the_config(tiny):
    kv, alloc = build_kv(tiny, EngineConfig(max_batch=2, chunk_size=8, kv_block_size=16, num_pages=9), 64)
    assert kv.paged and kv.num_pages == 9 and isinstance(alloc, PageAllocator) and alloc.capacity == 9
    _, alloc = build_kv(tiny, EngineConfig(max_batch=2, chunk_size=8, kv_block_size=16, kv_prefix_cache=True), 64)
    assert alloc.prefix_cache and not PageAllocator(2, 16).prefix_cache
    kv, alloc = build_kv(tiny, EngineConfig(max_batch=2, chunk_size=8, num_slots=2), 64)
    assert not kv.paged and kv.num_slots == 2 and isinstance(alloc, SlotAllocator) and alloc.capacity == 2



def test_build_kv_with_a_derived_max_batch(tiny):
    """max_batch None: the pool is capped at what the derivation can use (256 sequences), and
    decode_batch_limit reads the batch off the pool built."""
    per_slot = 64 * tiny.facts.kv_bytes_per_token
    config = EngineConfig(max_batch=None, kv_budget_bytes=301 * per_slot)  # 300 slots fit
    kv, alloc = build_kv(tiny, config, 64)
    assert kv.num_slots == alloc.capacity == MAX_DERIVED_BATCH == decode_batch_limit(kv, config)
    kv, _ = build_kv(tiny, config.replace(chunk_size=40), 64)  # the batch stays below chunk_size
    assert kv.num_slots == decode_batch_limit(kv, config.replace(chunk_size=40)) == 39
    paged = EngineConfig(max_batch=None, kv_block_size=16)  # CPU: 8 full sequences of 4 pages
    kv, _ = build_kv(tiny, paged, 64)
    assert kv.num_pages == CPU_DEFAULT_SLOTS * 4 and decode_batch_limit(kv, paged) == CPU_DEFAULT_SLOTS
    kv, _ = build_kv(tiny, EngineConfig(max_batch=4, chunk_size=8, num_slots=6), 64)
    assert decode_batch_limit(kv, EngineConfig(max_batch=4, chunk_size=8)) == 4


class _Recorder:
    """Stands in for a pool class: records the keywords build_kv sizes it with."""

    calls: list = []

    @classmethod
    def for_model(cls, model, max_seq_len, *args, **kwargs):
        cls.calls.append(kwargs)
        return types.SimpleNamespace(new_allocator=lambda **_: None)


@pytest.mark.parametrize("paged", [False, True])
def test_build_kv_reserves_only_when_it_sizes_from_free_memory(tiny, monkeypatch, paged):
    import splitlab.engine.kv as kv_module

    monkeypatch.setattr(kv_module, "PagedKVPool" if paged else "KVPool", _Recorder)
    gpu_model = types.SimpleNamespace(facts=tiny.facts, device=torch.device("cuda"), dtype=tiny.dtype)
    block = {"kv_block_size": 16} if paged else {}
    count = {"num_pages": 9} if paged else {"num_slots": 9}
    cases = [(gpu_model, EngineConfig(**block), True), (gpu_model, EngineConfig(**block, **count), False),
             (gpu_model, EngineConfig(**block, kv_budget_bytes=10**6), False), (tiny, EngineConfig(**block), False)]
    for model, config, reserved in cases:
        _Recorder.calls.clear()
        build_kv(model, config, 64)
        expected = reserve_for(tiny.facts, config).total_bytes if reserved else 0
        assert _Recorder.calls[0]["reserve_bytes"] == expected and expected >= 0
    build_kv(gpu_model, EngineConfig(**block, max_batch=None), 64)
    assert _Recorder.calls[-1]["max_batch" if paged else "max_slots"] == MAX_DERIVED_BATCH


def test_free_memory_less_the_reserve(tiny, monkeypatch):
    """On CUDA the pool gets memory_fraction of the measured free memory less the reserve
    (mem_get_info faked: no GPU needed); an explicit budget is the pool's alone."""
    free = 100 * 2**20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    gpu_model = types.SimpleNamespace(facts=tiny.facts, device=torch.device("cuda"), dtype=tiny.dtype)
    budget, where = _budget(gpu_model, None, 0.5, 10 * 2**20)
    assert budget == 40 * 2**20 and "less 0.01 GiB reserved for activations and decode graphs" in where
    assert _budget(gpu_model, None, 0.5, 0) == (50 * 2**20, "50% of the 0.1 GiB free on the GPU")
    assert _budget(gpu_model, 2**20, 0.5, 10 * 2**20)[0] == 2**20
    with pytest.raises(DeviceError, match="reserved for activations"):
        KVPool.for_model(gpu_model, 64, memory_fraction=0.5, reserve_bytes=free)  # nothing left, nothing allocated
    with pytest.raises(DeviceError, match="reserved for activations"):
        PagedKVPool.for_model(gpu_model, 64, 16, memory_fraction=0.5, reserve_bytes=free)

def test_engine_config_paging_fields():
    assert EngineConfig().kv_block_size is None and EngineConfig(kv_block_size=32).num_pages is None
    with pytest.raises(ConfigError, match="power of two"):
        EngineConfig(kv_block_size=24)
    with pytest.raises(ConfigError, match="power of two"):
        EngineConfig(kv_block_size=4096)
    with pytest.raises(ConfigError, match="kv_block_size"):
        EngineConfig(num_pages=10)
    with pytest.raises(ConfigError, match="num_pages instead"):
        EngineConfig(kv_block_size=16, num_slots=4)
    with pytest.raises(ConfigError):
        EngineConfig(kv_block_size=16, num_pages=0)
    with pytest.raises(ConfigError, match="kv_block_size"):
        EngineConfig(kv_prefix_cache=True)
    with pytest.raises(ConfigError, match="True or False"):
        EngineConfig(kv_block_size=16, kv_prefix_cache=1)
    cfg = EngineConfig(kv_block_size=16, num_pages=100)
    assert EngineConfig.from_dict(cfg.to_dict()) == cfg


def test_paged_share_memory_crosses_a_process_boundary():
    kv = PagedKVPool.allocate(1, 2, 4, 8, 1, 2, torch.float32, "cpu").share_memory_()
    assert kv.k.is_shared() and kv.v.is_shared()
    other = PagedKVPool.from_tensors(*kv.tensors(), max_seq_len=8)
    assert other.describe() == kv.describe()
    _assert_a_child_writes_into(kv)


def test_page_allocator_lowest_first_all_or_nothing_and_refuses_double_frees():
    alloc = PageAllocator(5, 16)
    assert alloc.alloc(2) == [0, 1] and alloc.alloc(3) == [2, 3, 4] and alloc.num_free == 0
    assert alloc.alloc(1) is None and alloc.alloc(0) == []  # full: not an error
    alloc.free([3, 1])
    assert alloc.alloc(3) is None and alloc.num_free == 2  # all or nothing: nothing taken
    alloc.free(4)
    assert alloc.alloc(3) == [1, 3, 4]  # the lowest free first
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free([0, 0])  # the same page twice in one call
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free(7)
    alloc.free(2)
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free([1, 2])  # 2 is free already: nothing of the call is freed
    assert alloc.num_used == 4 and alloc.pages_for(33) == 3
    with pytest.raises(ConfigError):
        PageAllocator(0, 16)
    with pytest.raises(ConfigError):
        PageAllocator(4, 0)


def test_page_allocator_invariants_under_random_use():
    """Against a model of who owns what: no page is handed out while owned, every page freed
    comes back, counts always add up, and all are free at the end."""
    rng = random.Random(0)
    alloc = PageAllocator(40, 8)
    owners: dict[int, list[int]] = {}
    for step in range(2000):
        if owners and (rng.random() < 0.45 or alloc.num_free == 0):
            alloc.free(owners.pop(rng.choice(sorted(owners))))
        else:
            want = rng.randrange(0, 6)
            got = alloc.alloc(want)
            if got is None:
                assert want > alloc.num_free
                continue
            held = {p for pages in owners.values() for p in pages}
            assert len(got) == want and not held & set(got) and len(set(got)) == want
            assert all(0 <= p < 40 for p in got)
            owners[step] = got
        assert alloc.num_used == sum(map(len, owners.values())) == 40 - alloc.num_free
    for pages in owners.values():
        alloc.free(pages)
    assert alloc.num_free == 40 and alloc.num_used == 0
