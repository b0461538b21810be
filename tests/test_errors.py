"""Bad input gives one clear splitlab.errors exception, never a hang or a bare traceback."""

from __future__ import annotations

import pytest

import splitlab
from splitlab import api as engine
from splitlab.errors import ConfigError, ModeError, SplitlabError, WorkloadError
from splitlab.workload import Request, Workload, fixed_batch, from_prompts


def test_every_error_is_a_splitlab_error():
    for cls in (ConfigError, ModeError, WorkloadError, splitlab.ModelSpecError, splitlab.DeviceError,
                splitlab.MPSError, splitlab.WorkerError):
        assert issubclass(cls, SplitlabError)


def test_prompt_longer_than_the_context(tiny):
    wl = from_prompts([[5] * 600], 4)
    with pytest.raises(WorkloadError, match=r"needs 604 positions.*context is 512"):
        splitlab.run(wl, tiny, progress=False)
    fits_alone = from_prompts([[5] * 500], 20)  # prompt fits, prompt + output does not
    with pytest.raises(WorkloadError, match="context is 512"):
        splitlab.run(fits_alone, tiny, progress=False)


@pytest.mark.parametrize("n", [0, -3, 2.0, None])
def test_bad_max_new_tokens(n):
    with pytest.raises(WorkloadError, match="max_new_tokens"):
        Request(0, (5, 6), n)


def test_other_bad_requests():
    with pytest.raises(WorkloadError, match="empty prompt"):
        Request(0, (), 3)
    with pytest.raises(WorkloadError, match="arrival_s"):
        Request(0, (5,), 3, arrival_s=-1.0)
    with pytest.raises(WorkloadError, match="duplicate"):
        Workload("dup", (Request(0, (5,), 1), Request(0, (6,), 1)))


def test_empty_workload(tiny):
    with pytest.raises(WorkloadError, match="no requests"):
        Workload("empty", ())
    with pytest.raises(WorkloadError, match="no requests"):
        from_prompts([], 4)
    with pytest.raises(WorkloadError, match="Workload"):
        splitlab.run([], tiny, progress=False)


def test_unknown_mode_lists_the_modes(tiny):
    wl = fixed_batch(1, 4, 2, model=tiny)
    with pytest.raises(ModeError) as info:
        splitlab.run(wl, tiny, mode="turbo", progress=False)
    for mode in engine.MODES:
        assert mode in str(info.value)


def test_every_mode_is_available_here():
    assert engine.available_modes() == engine.MODES == engine.available_modes(gpu=False)


def test_token_ids_outside_the_vocabulary(tiny):
    with pytest.raises(WorkloadError, match="outside the model's vocabulary"):
        splitlab.run(from_prompts([[5, 999]], 2), tiny, progress=False)


def test_bad_run_arguments(tiny):
    wl = fixed_batch(1, 4, 2, model=tiny)
    with pytest.raises(ConfigError, match="batch_size"):
        splitlab.run(wl, tiny, batch_size=0, progress=False)
    with pytest.raises(ConfigError, match="slo"):
        splitlab.run(wl, tiny, slo=(1, 2), progress=False)
    with pytest.raises(ConfigError, match="hf-generate"):
        splitlab.run(wl, tiny, prefill_share=40, progress=False)
    with pytest.raises(splitlab.ModelSpecError, match="accepted"):
        splitlab.run(wl, "dummy:nope", progress=False)
    with pytest.raises(ConfigError, match="SLO.ttft_s"):
        splitlab.SLO(ttft_s=-1)
