"""fp32 on the GPU: every mode and every split backend gives HF generate()'s exact greedy tokens.

Ragged prompts (3..120 tokens) and outputs (1..16 tokens; one request asks for a single
token), arriving over 0.2 s, more requests than KV slots: the engine's graphs, both decode
attention variants and both split-K combines, the split handoff through each backend (CUDA
IPC of weights and KV for processes and MPS, graphs on a green context's stream, MPS client
environments) and the replicas all meet the oracle, and the co-location mechanics hold
(the decode process maps the prefill process's weights and KV; MPS lists both workers as its
clients; green contexts get disjoint SM groups).
"""

from __future__ import annotations

import pytest

import splitlab
from splitlab.config import EngineConfig
from splitlab.measure.analysis import config_fields
from splitlab.workload import Workload

from _gpu_helpers import assert_exact, hf_outputs, ragged_workload

pytestmark = pytest.mark.gpu

CONFIG = EngineConfig(max_seq_len=256, num_slots=4, max_batch=4, token_budget=256, chunk_size=48)


@pytest.fixture(scope="module")
def workload(fp32_model) -> Workload:
    return ragged_workload(fp32_model, "fp32-check")


@pytest.fixture(scope="module")
def expected(fp32_model, workload) -> dict[int, list[int]]:
    return hf_outputs(fp32_model, workload)


@pytest.mark.parametrize("mode, engine", [
    ("serial", {}),
    ("chunked", {}),
    ("serial", {"decode_variant": "fused"}),
    ("chunked", {"decode_variant": "split"}),
    ("serial", {"decode_combine": "kernel"}),
], ids=["serial", "chunked", "serial-fused", "chunked-split", "serial-combine-kernel"])
def test_the_engine_modes_are_exact(fp32_model, workload, expected, mode, engine):
    run = splitlab.run(workload, fp32_model, mode=mode, config=CONFIG.replace(**engine), progress=False)
    assert_exact(run, expected)


def test_hf_generate_mode_is_exact(fp32_model, workload, expected):
    assert_exact(splitlab.run(workload, fp32_model, mode="hf-generate", batch_size=4, progress=False), expected)


@pytest.mark.parametrize("policy", ["table", "slo"])
def test_the_adaptive_green_split_is_exact(fp32_model, workload, expected, policy):
    """Every step on the lane its policy picked (graphs captured per partition), the oracle kept."""
    from pathlib import Path

    profile = str(Path(__file__).resolve().parents[2] / "results" / "sm_profile_h200.json")
    run = splitlab.run(workload, fp32_model, mode="split", config=CONFIG, backend="green", sm_policy=policy,
                       sm_profile=profile, gap_s=0.03, progress=False)
    assert_exact(run, expected)
    facts = run.config.green
    # one decision per step, and one more per prefill step at each layer group's start after the first
    layers = len(fp32_model.model.model.layers)
    regroups = (layers - 1) // facts["prefill_layer_group"]
    prefill_steps = sum(1 for s in run.steps if s.worker == "prefill")
    assert facts["simulated"] is False and facts["decisions"] == len(run.steps) + prefill_steps * regroups
    assert 0 <= facts["prefill_moves"] <= prefill_steps * regroups
    assert {s.sms for s in run.steps} - {None} and all(s.sms for s in run.steps)


@pytest.mark.parametrize("backend", ["streams", "processes", "green", "mps"])
def test_every_split_backend_is_exact(fp32_model, workload, expected, backend):
    run = splitlab.run(workload, fp32_model, mode="split", config=CONFIG, backend=backend, progress=False)
    assert_exact(run, expected)
    fields = config_fields(run)
    if backend in ("processes", "mps"):  # the decode process maps the weights and KV, holds no copy
        assert (fields["effective"] or {}).get("decode_weights_shared") is True, fields["effective"]
    if backend == "mps":
        clients = (fields["mps_daemon"] or {}).get("workers_are_clients")
        assert clients and all(clients.values()), f"MPS did not list every worker as a client: {clients}"
    if backend == "green":
        g = fields["green"]
        assert g and min(g["sm_counts"]) > 0 and sum(g["sm_counts"]) <= g["total_sms"], g


@pytest.mark.parametrize("mps", [False, True], ids=["replicas-2", "replicas-2-mps"])
def test_replicas_are_exact(fp32_model, workload, expected, mps):
    run = splitlab.run(workload, fp32_model, mode="replicas", config=CONFIG, num_replicas=2, engine="serial",
                       mps=mps, progress=False)
    assert_exact(run, expected)
    shared = [rep.get("weights_shared") for rep in (config_fields(run)["per_replica"] or [])[1:]]
    assert shared and all(shared), f"a replica holds its own copy of the weights: {shared}"


@pytest.mark.parametrize("policy", ["static", "table"])
def test_the_online_green_split_is_exact(fp32_model, workload, expected, policy):
    """What ``splitlab serve --mode split --backend green`` runs: requests submitted while it
    runs, each step on its green lane, generate()'s tokens."""
    from pathlib import Path

    from splitlab import online_engine
    from splitlab.config import SplitConfig

    profile = str(Path(__file__).resolve().parents[2] / "results" / "sm_profile_h200.json")
    extra = {} if policy == "static" else {"sm_policy": policy, "sm_profile": profile}
    with online_engine(fp32_model, "split", CONFIG, split=SplitConfig(backend="green", **extra)) as engine:
        handles = {r.id: engine.submit(list(r.prompt_ids), r.max_new_tokens, ignore_eos=True,
                                       arrival_s=engine.clock() + r.arrival_s) for r in workload}
        got = {rid: h.result(120) for rid, h in handles.items()}
        facts = engine.facts()
    assert got == expected
    if policy == "static":
        assert facts["green"]["decode_sms"] > 0 and facts["green"]["prefill_sms"] > 0
    else:
        assert facts["green"]["simulated"] is False and facts["green"]["decisions"] > 0
        assert all(s.sms for s in engine.steps)
