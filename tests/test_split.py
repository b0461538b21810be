"""The ``split`` mode on CPU: a prefill worker and a decode worker at the same time.

The oracle: for ragged prompts arriving over time, more requests than KV slots, every
backend that runs on CPU (``streams``: two threads; ``processes``: two spawned processes
sharing the weights and the KV pool through shared memory) gives exactly HF
``generate(do_sample=False, min_new_tokens=n, max_new_tokens=n)``'s tokens, fp32.
``mps`` and ``green`` refuse on CPU with a clear error, before starting anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import multiprocessing

import pytest

import splitlab
from splitlab.modes.split import SplitSession
from splitlab.measure.analysis import decode_interference
from splitlab.config import EngineConfig, SplitConfig
from splitlab.errors import ConfigError, ModeError
from splitlab.measure.metrics import Run, StepTrace

from _colocation import check_split_run, expected_tokens, ragged_workload, snapshot, assert_clean

CONFIG = EngineConfig(max_seq_len=96, num_slots=3, max_batch=3, token_budget=64)


def run_split(workload, model, config=None, **kwargs):
    """A one-off split run, through the one entry point."""
    return splitlab.run(workload, model, mode="split", config=config, **kwargs)


@pytest.fixture(scope="module")
def workload():
    return ragged_workload()


@pytest.fixture(scope="module")
def expected(tiny, workload):
    return expected_tokens(tiny, workload)


def test_streams_backend_matches_generate(tiny, workload, expected):
    run = splitlab.run(workload, tiny, mode="split", config=CONFIG, backend="streams", progress=False)
    assert run.output_ids() == expected
    check_split_run(run, workload, num_slots=3)
    assert run.mode == "split" and run.config.backend == "streams"
    assert run.config.effective["num_slots"] == 3 and run.config.prefill_share is None
    assert run.config.workers["decode"]["num_slots"] == 3 and run.config.engine == CONFIG
    assert {s.worker for s in run.steps} == {"prefill", "decode"}
    assert run.memory["kv_pool_bytes"] == 2 * 2 * 4 * 96 * 2 * 16 * 4  # 2 x layers x (3+1) x len x heads x dim x fp32
    assert run.memory["weight_bytes"] == tiny.facts.weight_bytes
    # the one-token request never reached the decode worker
    one = [r.id for r in workload if r.max_new_tokens == 1]
    assert one and not any(set(one) & set(s.request_ids) for s in run.steps if s.worker == "decode")


def test_processes_backend_matches_generate(tiny, workload, expected):
    before = snapshot()
    run = splitlab.run(workload, tiny, mode="split", config=CONFIG, backend="processes", progress=False)
    assert run.output_ids() == expected
    check_split_run(run, workload, num_slots=3)
    assert run.config.backend == "processes" and run.config.split.backend == "processes"
    assert run.memory["per_worker"] == {"prefill": None, "decode": None}  # CPU: no device peaks
    assert run.memory["kv_pool_bytes"] == 2 * 2 * 4 * 96 * 2 * 16 * 4
    assert run.env["device"] == "cpu"
    # the decode process runs on the prefill process's weights and KV, mapped (shared memory), not copied
    assert run.config.effective["decode_weights_shared"] is True
    assert run.config.workers["decode"]["weights_shared"] is True
    assert_clean(before)


def test_one_thread_session_serves_several_runs(tiny, workload, expected):
    other = ragged_workload(seed=1, n=7, name="ragged-1")
    with SplitSession(tiny, CONFIG, backend="streams") as session:
        a = session.run(workload, progress=False)
        b = session.run(other, progress=False)
    assert a.output_ids() == expected
    assert b.output_ids() == expected_tokens(tiny, other)
    assert (a.config.session_run, b.config.session_run) == (1, 2)
    with pytest.raises(splitlab.WorkerError, match="closed"):
        session.run(workload, progress=False)


def test_mps_and_green_refuse_on_cpu_before_starting_anything(tiny, workload):
    before = set(multiprocessing.active_children())
    with pytest.raises(ModeError, match="mps needs an NVIDIA GPU with nvidia-cuda-mps-control; use backend='processes'"):
        run_split(workload, tiny, CONFIG, backend="mps", progress=False)
    with pytest.raises(ModeError, match="mps needs an NVIDIA GPU"):
        splitlab.run(workload, tiny, mode="split", backend="mps", prefill_share=70, decode_share=30, progress=False)
    with pytest.raises(ModeError, match="green.*NVIDIA GPU.*use backend='processes' or 'streams'"):
        run_split(workload, tiny, CONFIG, backend="green", progress=False)
    assert set(multiprocessing.active_children()) == before


def test_split_and_replicas_are_available_on_cpu():
    assert {"split", "replicas"} <= set(splitlab.available_modes(gpu=False))


def test_split_keywords_are_checked(tiny, workload):
    with pytest.raises(ConfigError, match="unknown keyword"):
        run_split(workload, tiny, CONFIG, backend="streams", progress=False, prefill_pct=30)
    with pytest.raises(ConfigError, match="backend='mps' only"):
        run_split(workload, tiny, CONFIG, backend="streams", prefill_share=40, progress=False)
    with pytest.raises(ConfigError, match="backend='green' only"):
        run_split(workload, tiny, CONFIG, backend="processes", prefill_sms=64, progress=False)
    with pytest.raises(ConfigError, match="backend must be one of"):
        run_split(workload, tiny, CONFIG, backend="threads", progress=False)
    with pytest.raises(ConfigError, match="EngineConfig"):
        run_split(workload, tiny, {"max_batch": 2}, progress=False)
    with pytest.raises(splitlab.WorkloadError, match="max_seq_len"):  # before any process starts
        run_split(workload, tiny, EngineConfig(max_seq_len=32, max_batch=2, chunk_size=8), backend="processes",
                  progress=False)


def test_a_split_config_object_and_keywords_combine(tiny, workload, expected):
    cfg = SplitConfig(backend="mps", prefill_share=70, decode_share=30)
    with pytest.raises(ModeError, match="mps needs an NVIDIA GPU"):  # the object's backend is kept
        run_split(workload, tiny, CONFIG, split=cfg, progress=False)
    # a keyword backend replaces the object's, and its MPS shares with it
    run = run_split(workload, tiny, CONFIG, split=cfg, backend="streams", progress=False)
    assert run.config.backend == "streams" and run.config.prefill_share is None
    assert run.output_ids() == expected


def test_split_config_defaults_and_validation():
    mps = SplitConfig(backend="mps")
    # the default shares are the ones the recorded H200 sweep chose (benchmarks/colocation.py)
    recorded = json.loads((Path(__file__).resolve().parents[1] / "results" / "colocation_h200.json").read_text())
    chosen = recorded["analysis"]["sm_share_sweep"]["chosen"]
    assert (mps.prefill_share, mps.decode_share) == (SplitConfig.DEFAULT_PREFILL_SHARE,
                                                      SplitConfig.DEFAULT_DECODE_SHARE) == (
        chosen["prefill_share"], chosen["decode_share"])
    assert SplitConfig(backend="mps", decode_share=30, prefill_share=70).to_dict()["decode_share"] == 30
    assert SplitConfig().backend == "streams" and SplitConfig().prefill_share is None
    for bad in (dict(backend="mps", prefill_share=0), dict(backend="mps", decode_share=101),
                dict(backend="mps", decode_share=True), dict(backend="green", prefill_sms=0),
                dict(poll_s=0), dict(high_priority_decode=1)):
        with pytest.raises(ConfigError):
            SplitConfig(**bad)
    with pytest.raises(ConfigError, match="unknown key"):
        SplitConfig.from_dict({"backend": "mps", "share": 3})


def test_decode_interference_from_steps():
    steps = [
        StepTrace("decode", "decode", 0.00, 0.01, [1, 2], 2),  # alone
        StepTrace("decode", "decode", 0.01, 0.02, [1, 2], 2),  # alone
        StepTrace("prefill", "prefill", 0.02, 0.10, [3], 50),
        StepTrace("decode", "decode", 0.02, 0.05, [1, 2], 2),  # fully under the prefill: 3x slower
        StepTrace("decode", "decode", 0.05, 0.08, [1, 2], 2),
        StepTrace("decode", "decode", 0.095, 0.115, [1, 2], 2),  # 25% covered: neither group
        StepTrace("decode", "decode", 0.12, 0.14, [1, 2, 3], 3),  # alone, another batch size
    ]
    run = Run("split", "tiny", "w", {}, {}, [], steps=steps)
    got = decode_interference(run)
    assert got["decode_steps"] == 6 and got["alone_steps"] == 3 and got["overlapped_steps"] == 2
    assert got["decode_step_alone_p50_s"] == pytest.approx(0.01)
    assert got["decode_step_overlapped_p50_s"] == pytest.approx(0.03)
    assert got["slowdown_p50"] == pytest.approx(3.0)
    assert got["slowdown_batch_matched"] == pytest.approx(3.0)
    assert got["overlap_fraction"] == pytest.approx(2 / 6)


@pytest.mark.slow
def test_split_backends_match_generate_on_smollm2(smollm2):
    prompts = [smollm2.encode(q, chat=True) for q in
               ("What is the capital of France?", "Name a prime number.", "Say hi.", "Count to three.")]
    wl = splitlab.from_prompts(prompts, [6, 4, 5, 3], arrivals_s=[0.0, 0.0, 0.05, 0.3], name="smollm2-chat")
    expected = expected_tokens(smollm2, wl)
    assert smollm2.decode(expected[0]).strip().startswith("The capital of France")
    config = EngineConfig(max_seq_len=64, num_slots=2, max_batch=2)
    for backend in ("streams", "processes"):
        run = run_split(wl, smollm2, config, backend=backend, progress=False)
        assert run.output_ids() == expected, backend
        check_split_run(run, wl, num_slots=2)
