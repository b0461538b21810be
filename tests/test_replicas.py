"""The ``replicas`` mode on CPU: N spawned full engines (or generate() loops) side by side.

Each replica serves its round-robin share of the requests from one t0; replica 0 loads the
weights and shares them (shared memory on CPU, CUDA IPC on GPU); each engine replica has
its own KV pool with 1/N of the slots. Outputs equal HF greedy ``generate()`` exactly.
"""

from __future__ import annotations

import pytest

import splitlab
from splitlab.config import EngineConfig
from splitlab.errors import ConfigError, ModeError

from _colocation import assert_clean, expected_tokens, ragged_workload, snapshot

CONFIG = EngineConfig(max_seq_len=96, num_slots=4, max_batch=4, token_budget=64)


def run_replicas(workload, model, **kwargs):
    """A one-off replicas run, through the one entry point."""
    return splitlab.run(workload, model, mode="replicas", **kwargs)


@pytest.fixture(scope="module")
def workload():
    return ragged_workload(seed=2)


@pytest.fixture(scope="module")
def expected(tiny, workload):
    return expected_tokens(tiny, workload)


def _check_replica_run(run, workload, n):
    by_id = {t.id: t for t in run.traces}
    ordered = sorted(workload.requests, key=lambda r: (r.arrival_s, r.id))
    for i, r in enumerate(ordered):  # dealt round-robin in arrival order
        t = by_id[r.id]
        assert t.worker == f"replica-{i % n}"
        assert t.finished and t.prefill_start_s >= r.arrival_s and t.token_times_s[0] == t.prefill_end_s
    assert {s.worker for s in run.steps} == {f"replica-{i}" for i in range(n)}
    for i in range(n):  # one replica's own steps never overlap
        own = sorted((s for s in run.steps if s.worker == f"replica-{i}"), key=lambda s: s.start_s)
        assert all(b.start_s >= a.end_s for a, b in zip(own, own[1:]))
    assert set(run.memory["per_worker"]) == {f"replica-{i}" for i in range(n)}
    assert run.config.replicas == n and run.config.mode == "replicas"
    assert set(run.config.workers) == {f"replica-{i}" for i in range(n)}


def test_engine_replicas_match_generate(tiny, workload, expected):
    before = snapshot()
    run = splitlab.run(workload, tiny, mode="replicas", config=CONFIG, num_replicas=2, engine="serial",
                       stall_timeout_s=120.0, progress=False)
    assert run.output_ids() == expected
    _check_replica_run(run, workload, 2)
    # each replica has its OWN pool with half the slots: two pools of 2 slots (+1 scratch row each)
    assert [run.config.workers[f"replica-{i}"]["num_slots"] for i in range(2)] == [2, 2]
    assert run.memory["kv_pools"] == 2
    assert run.memory["kv_pool_bytes"] == 2 * (2 * 2 * 3 * 96 * 2 * 16 * 4)
    assert run.memory["weight_bytes"] == tiny.facts.weight_bytes
    assert run.config.backend == "serial" and run.config.mps is False and run.config.engine == CONFIG
    # the second replica runs on replica 0's weights, mapped from shared memory (no copy)
    assert run.config.workers["replica-1"]["weights_shared"] is True
    assert_clean(before)


def test_generate_replicas_match_generate(tiny, workload, expected):
    run = run_replicas(workload, tiny, batch_size=3, num_replicas=2, engine="generate", progress=False)
    assert run.output_ids() == expected
    _check_replica_run(run, workload, 2)
    assert run.config.replica_engine == "generate" and run.config.batch_size == 3 and run.config.engine is None
    assert run.memory["kv_pools"] == 0
    assert run.config.workers["replica-1"]["weights_shared"] is True
    # static batching per replica: every step holds at most batch_size requests of that replica
    assert all(len(s.request_ids) <= 3 for s in run.steps)


def test_replicas_arguments_are_checked(tiny, workload):
    with pytest.raises(ConfigError, match="unknown keyword"):
        run_replicas(workload, tiny, progress=False, replicas=2)
    with pytest.raises(ConfigError, match="engine must be one of"):
        run_replicas(workload, tiny, progress=False, engine="vllm")
    with pytest.raises(ConfigError, match="num_replicas"):
        run_replicas(workload, tiny, progress=False, num_replicas=0)
    with pytest.raises(ConfigError, match="stall_timeout_s"):
        run_replicas(workload, tiny, progress=False, stall_timeout_s=0)
    with pytest.raises(ModeError, match="mps=True needs an NVIDIA GPU"):
        run_replicas(workload, tiny, progress=False, mps=True)
    with pytest.raises(splitlab.WorkloadError, match="max_seq_len"):
        run_replicas(workload, tiny, config=EngineConfig(max_seq_len=32, max_batch=2, chunk_size=8), progress=False)


def test_each_replica_gets_its_share_of_the_slots_or_pages(tiny, monkeypatch):
    """``_kv_plan``: the EngineConfig fields each of N replicas builds its pool from."""
    import functools

    import torch

    import splitlab.modes.replicas as replicas
    from splitlab.engine.capacity import reserve_for

    _kv_plan = functools.partial(replicas._kv_plan, facts=tiny.facts)
    cpu = torch.device("cpu")
    assert _kv_plan(EngineConfig(num_slots=5, max_batch=4), 2, cpu, 96) == {"num_slots": 2}
    paged = EngineConfig(max_batch=4, kv_block_size=16)
    assert _kv_plan(paged.replace(num_pages=33), 2, cpu, 96) == {"num_pages": 16}
    assert _kv_plan(paged.replace(num_pages=1), 2, cpu, 96) == {"num_pages": 1}  # never none
    assert _kv_plan(paged.replace(kv_budget_bytes=1000), 4, cpu, 96) == {"num_pages": None, "kv_budget_bytes": 250}
    assert _kv_plan(EngineConfig(max_batch=4, kv_budget_bytes=1000), 4, cpu, 96) == {
        "num_slots": None, "kv_budget_bytes": 250}
    # the CPU default of one engine (min(max_batch, 8) sequences) split N ways; pages: theirs at full length
    assert _kv_plan(EngineConfig(max_batch=4), 2, cpu, 96) == {"num_slots": 2}
    assert _kv_plan(paged, 2, cpu, 96) == {"num_pages": 2 * 6}
    # on a GPU (its free memory faked): the fraction of the free memory, less one engine's reserve
    # (activations, decode graphs) for EACH replica, split N ways
    cuda, config = torch.device("cuda"), EngineConfig(max_batch=4, token_budget=64)
    reserve = reserve_for(tiny.facts, config).total_bytes
    monkeypatch.setattr(replicas, "measured_free_bytes", lambda device: 100 * reserve)
    assert _kv_plan(config, 4, cuda, 96) == {"num_slots": None, "kv_budget_bytes": (90 * reserve - 4 * reserve) // 4}
    monkeypatch.setattr(replicas, "measured_free_bytes", lambda device: 4 * reserve)
    with pytest.raises(splitlab.ConfigError, match="4 replicas leave no memory for KV"):
        _kv_plan(config, 4, cuda, 96)  # 0.9 x 4 reserves cannot hold 4 reserves
