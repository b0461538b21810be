"""SM-split policies as pure functions of the state, on a synthetic profile and the recorded one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitlab.errors import ConfigError
from splitlab.modes.split.policy import (SLOPolicy, SMChoice, SMProfile, SplitState, StaticPolicy, TablePolicy,
                                         make_policy)

ROOT = Path(__file__).resolve().parents[1]
TOTAL = 132
CHOICES = (16, 32, 64, 96)


def synthetic_profile() -> SMProfile:
    """Decode = weight reads (bandwidth saturates at ~64 SMs) + attention over the batch's KV
    (scales with SMs, so big batches want more of them); co-running 20% slower."""
    weights = {16: 2.2, 32: 1.4, 64: 1.05, 96: 1.02, TOTAL: 1.0}
    decode, corun = {}, {}
    for sms, w in weights.items():
        for batch in (1, 8, 32, 64, 128):
            for context in (512, 2048):
                t = (4.0 * w + batch * context * 4e-5 * TOTAL / sms) * 1e-3
                decode[(sms, batch, context)] = t
                if sms != TOTAL:
                    corun[(sms, batch, context)] = 1.2 * t
    prefill = {(TOTAL - s if s != TOTAL else TOTAL, n): n / 40_000 * TOTAL / (TOTAL - s if s != TOTAL else TOTAL)
               for s in weights for n in (1024, 4096)}
    return SMProfile(TOTAL, decode, prefill, corun)


@pytest.fixture(scope="module")
def profile() -> SMProfile:
    return synthetic_profile()


def state(batch: int, context: int = 1024, prefill: int = 2048) -> SplitState:
    return SplitState(decode_batch=batch, decode_context=context, prefill_tokens=prefill)


@pytest.mark.parametrize("name", ["table", "slo"])
def test_idle_side_gives_the_whole_gpu(profile, name):
    policy = make_policy(name, total_sms=TOTAL, choices=CHOICES, static_decode_sms=64, profile=profile, gap_s=0.03)
    assert policy.choose(state(32, prefill=0)) == SMChoice(TOTAL, 0)  # no prompt waits: decode gets all
    assert policy.choose(state(0, prefill=4096)) == SMChoice(0, TOTAL)  # nothing decodes: prefill gets all
    busy = policy.choose(state(32))
    assert busy.decode_sms in CHOICES and busy.decode_sms + busy.prefill_sms == TOTAL


@pytest.mark.parametrize("name", ["table", "slo"])
def test_decode_sms_grow_with_the_batch(profile, name):
    policy = make_policy(name, total_sms=TOTAL, choices=CHOICES, static_decode_sms=64, profile=profile, gap_s=0.012)
    picks = [policy.choose(state(b, context=2048)).decode_sms for b in (1, 2, 4, 8, 16, 32, 64, 96, 128)]
    assert picks == sorted(picks)
    assert picks[0] < picks[-1], f"{name} never gave decode more SMs: {picks}"


def test_static_is_one_split_always(profile):
    policy = make_policy("static", total_sms=TOTAL, choices=CHOICES, static_decode_sms=64)
    assert {policy.choose(s) for s in (state(1), state(128), state(0), state(64, prefill=0))} == {SMChoice(64, 68)}


def test_slo_picks_the_fewest_sms_that_meet_the_gap(profile):
    policy = SLOPolicy(profile, CHOICES, gap_s=0.02, headroom=1.0)
    for batch in (1, 8, 32, 64, 128):
        pick = policy.choose(state(batch, context=2048)).decode_sms
        meets = [s for s in CHOICES if profile.predict_decode(s, batch, 2048) <= 0.02]
        assert pick == (meets[0] if meets else CHOICES[-1])
    # a looser bound never asks for more SMs
    loose = SLOPolicy(profile, CHOICES, gap_s=0.2, headroom=1.0)
    assert all(loose.choose(state(b)).decode_sms <= policy.choose(state(b)).decode_sms for b in (1, 32, 128))


def test_prediction_interpolates_between_measured_points(profile):
    lo, hi = profile.predict_decode(32, 8, 512), profile.predict_decode(32, 32, 512)
    mid = profile.predict_decode(32, 20, 512)
    assert lo < mid < hi
    assert mid == pytest.approx(lo + (hi - lo) * 12 / 24)
    assert profile.predict_decode(32, 1000, 512) == profile.predict_decode(32, 128, 512)  # clamped
    assert profile.predict_decode(32, 8, 512, corun=True) == pytest.approx(1.2 * profile.predict_decode(32, 8, 512, corun=False))


def test_table_policy_refuses_shrinking_rows():
    with pytest.raises(ConfigError, match="must not shrink"):
        TablePolicy(((1, 64), (32, 32)), TOTAL)
    with pytest.raises(ConfigError, match="batch 1"):
        TablePolicy(((8, 32),), TOTAL)


def test_policies_need_what_they_predict_from(profile):
    with pytest.raises(ConfigError, match="SM profile"):
        make_policy("slo", total_sms=TOTAL, choices=CHOICES, static_decode_sms=64, gap_s=0.03)
    with pytest.raises(ConfigError, match="gap bound"):
        make_policy("slo", total_sms=TOTAL, choices=CHOICES, static_decode_sms=64, profile=profile)
    with pytest.raises(ConfigError, match="132-SM"):
        make_policy("table", total_sms=108, choices=CHOICES, static_decode_sms=64, profile=profile)
    with pytest.raises(ConfigError, match="unknown SM policy"):
        make_policy("fastest", total_sms=TOTAL, choices=CHOICES, static_decode_sms=64, profile=profile)
    with pytest.raises(ConfigError, match="positive"):
        SMProfile(TOTAL, {(16, 1, 512): float("nan")}, {(116, 1024): 0.1})


def test_profile_round_trips_and_the_recorded_one_loads(profile, tmp_path):
    again = SMProfile.from_dict(json.loads(json.dumps(profile.to_dict())))
    assert again.predict_decode(64, 20, 1500) == profile.predict_decode(64, 20, 1500)
    recorded = SMProfile.load(ROOT / "results" / "sm_profile_h200.json")
    assert recorded.total_sms == 132 and 16 in recorded.decode_sms
    # what the recorded H200 profile says, as the policies use it: fewer SMs decode slower
    assert recorded.predict_decode(16, 32, 2048) > recorded.predict_decode(64, 32, 2048)
    bad = tmp_path / "bad.json"
    bad.write_text("{\"decode\": 1}")
    with pytest.raises(ConfigError, match="not an SM profile"):
        SMProfile.load(bad)


# ---- the policy inside a split run: streams backend, decisions without partitions (CPU) ----------

def test_adaptive_policy_decides_every_step_and_keeps_the_oracle(tiny):
    """``sm_policy="slo"`` under ``backend="streams"``: the same tokens as HF generate(), every
    step asked the policy (its SMs recorded), a decision well under a millisecond, and decode
    given the whole GPU exactly when no prompt was waiting."""
    import splitlab
    from splitlab.config import EngineConfig

    from _colocation import check_split_run, expected_tokens, ragged_workload

    workload = ragged_workload(seed=3)
    config = EngineConfig(max_seq_len=96, num_slots=3, max_batch=3, token_budget=64)
    run = splitlab.run(workload, tiny, mode="split", config=config, backend="streams", sm_policy="slo",
                       sm_profile=str(ROOT / "results" / "sm_profile_h200.json"), gap_s=0.03, progress=False)
    assert run.output_ids() == expected_tokens(tiny, workload)
    check_split_run(run, workload, num_slots=3)
    facts = run.config.green
    assert facts["sm_policy"] == "slo" and facts["simulated"] is True
    assert facts["decisions"] == len(run.steps)  # every step asked where it runs
    assert facts["decide_max_s"] < 1e-3
    choices = set(facts["decode_sms_choices"])
    decode_sms = {s.sms for s in run.steps if s.worker == "decode"}
    prefill_sms = {s.sms for s in run.steps if s.worker == "prefill"}
    assert decode_sms <= choices | {TOTAL} and decode_sms & choices  # some steps beside a prefill
    assert prefill_sms <= {TOTAL - c for c in choices} | {TOTAL} and prefill_sms
    # a decode step after the last prefill step ended saw no prompt waiting: the whole GPU
    last_prefill = max(s.end_s for s in run.steps if s.worker == "prefill")
    tail = [s for s in run.steps if s.worker == "decode" and s.start_s > last_prefill + 1e-3]
    assert tail and all(s.sms == TOTAL for s in tail)


def test_a_prefill_asks_the_policy_again_between_layer_groups(tiny):
    """``prefill_layer_group=1`` on the 2-layer model: every prefill step asks once more, before
    its second layer (the split may change inside a prompt), and the tokens stay the oracle's."""
    import splitlab
    from splitlab.config import EngineConfig

    from _colocation import expected_tokens, ragged_workload

    workload = ragged_workload(seed=5)
    config = EngineConfig(max_seq_len=96, num_slots=3, max_batch=3, token_budget=64)
    run = splitlab.run(workload, tiny, mode="split", config=config, backend="streams", sm_policy="table",
                       sm_profile=str(ROOT / "results" / "sm_profile_h200.json"), prefill_layer_group=1,
                       progress=False)
    assert run.output_ids() == expected_tokens(tiny, workload)
    facts = run.config.green
    prefill_steps = sum(1 for s in run.steps if s.worker == "prefill")
    layers = len(tiny.model.model.layers)
    assert facts["prefill_layer_group"] == 1
    assert facts["decisions"] == len(run.steps) + prefill_steps * (layers - 1)
    assert 0 <= facts["prefill_moves"] <= prefill_steps * (layers - 1)


def test_between_layers_is_called_before_every_layer_after_the_first(tiny):
    from splitlab.config import EngineConfig
    from splitlab.engine.loop import build_engine

    parts = build_engine(tiny, EngineConfig(max_seq_len=64, num_slots=2, max_batch=2, warmup=False))
    plain = parts.runner.prefill([(0, [5, 6, 7, 8], 0)])
    seen: list[int] = []
    hooked = parts.runner.prefill([(1, [5, 6, 7, 8], 0)], between_layers=lambda i: seen.append(i))
    assert hooked == plain
    assert seen == list(range(1, len(tiny.model.model.layers)))


def test_prefill_layer_group_is_checked():
    from splitlab.config import SplitConfig

    with pytest.raises(ConfigError, match="prefill_layer_group"):
        SplitConfig(prefill_layer_group=0)
    with pytest.raises(ConfigError, match="prefill_layer_group"):
        SplitConfig(prefill_layer_group=2.5)
    assert SplitConfig(prefill_layer_group=None).prefill_layer_group is None
