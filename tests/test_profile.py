"""Device ceilings, datasheet lookup, and prefill/decode profiling on the tiny model (CPU)."""

import math
import time

import pytest
import torch

from splitlab.measure import flops
from splitlab.measure import profile
from splitlab.errors import ModeError
from splitlab.models import load_model
from splitlab.measure.profile import Ceilings, ceilings_table, datasheet_for, measure_ceilings, profile_phases

# A fixed machine for deterministic roofline judgements: ridge = 1e11 / 2e10 = 5 FLOP/byte.
FAKE = Ceilings(device="cpu", device_name="test cpu", dtype="float32", matmul_flops_s=1e11, copy_bytes_s=2e10,
                matmul_n=64, copy_buffer_bytes=1 << 20, repeats=1)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu")


def test_measure_ceilings_cpu_is_plausible_and_cached():
    c = measure_ceilings("cpu", matmul_n=256, copy_bytes=8 << 20, repeats=3)
    assert c.device == "cpu" and c.dtype == "float32" and c.matmul_n == 256
    assert 1e8 < c.matmul_flops_s < 1e14  # a CPU: between 0.1 GFLOP/s and 100 TFLOP/s
    assert 1e8 < c.copy_bytes_s < 1e13
    assert c.copy_buffer_bytes == 8 << 20
    assert c.ridge == pytest.approx(c.matmul_flops_s / c.copy_bytes_s)
    # a ceiling is the best rate of the repeats; the medians are kept beside it
    assert c.matmul_flops_s >= c.matmul_flops_s_median > 0 and c.copy_bytes_s >= c.copy_bytes_s_median > 0
    assert measure_ceilings("cpu", matmul_n=256, copy_bytes=8 << 20, repeats=3) is c  # cached
    again = measure_ceilings("cpu", matmul_n=256, copy_bytes=8 << 20, repeats=3, refresh=True)
    assert again is not c
    assert Ceilings.from_dict(c.to_dict()) == c
    assert c.to_dict()["ridge_flop_per_byte"] == pytest.approx(c.ridge)


def test_median_time_excludes_reset_and_warmup():
    calls = []

    def step():
        calls.append("step")
        time.sleep(0.01)

    def reset():
        time.sleep(0.06)  # untimed set-up must not count

    t = profile._median_time(step, lambda: None, warmup=2, repeats=3, reset=reset)
    assert len(calls) == 5
    assert 0.009 < t < 0.05  # a leaked reset would make it >= 0.07


@pytest.mark.parametrize("name,expected", [
    ("NVIDIA H200", "H200"), ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"), ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
    ("NVIDIA A100-PCIE-40GB", "A100 40GB"), ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"), ("Tesla T4", "T4"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("NVIDIA GeForce RTX 3090", "RTX 3090"), ("NVIDIA A10G", "A10G"),
    ("Tesla V100-SXM2-16GB", "V100"),
])
def test_datasheet_for(name, expected):
    assert datasheet_for(name).name == expected


def test_datasheet_table_values():
    assert datasheet_for("CPU x86_64") is None and datasheet_for(None) is None
    h200 = profile.DATASHEET["H200"]
    assert (h200.bf16_tflops, h200.mem_tb_s) == (989.4, 4.8)
    assert len(profile.DATASHEET) == 12
    measured = Ceilings(device="cuda:0", device_name="NVIDIA H200", dtype="bfloat16", matmul_flops_s=663e12,
                        copy_bytes_s=4.2e12, matmul_n=8192, copy_buffer_bytes=1 << 30, repeats=7)
    table = ceilings_table(measured)
    assert table.attrs["datasheet"] == "H200"
    row = table.set_index("ceiling")
    assert row.loc["matmul", "measured_over_datasheet"] == pytest.approx(663 / 989.4)
    assert row.loc["copy", "measured_over_datasheet"] == pytest.approx(4.2 / 4.8)
    assert row.loc["ridge", "measured"] == pytest.approx(663e12 / 4.2e12)
    assert math.isnan(ceilings_table(FAKE).loc[0, "datasheet"])


def test_profile_phases_hf_tiny(tiny):
    df = profile_phases(tiny, batch_sizes=(1, 2), prompt_lens=(16, 32), context_lens=(10,), repeats=2, warmup=1,
                        backend="hf", ceilings=FAKE, progress=False)
    assert list(df.columns)[:len(profile.PROFILE_COLUMNS)] == list(profile.PROFILE_COLUMNS)
    assert len(df) == 2 * 2 + 2 * 1
    assert list(df["phase"]) == ["prefill"] * 4 + ["decode"] * 2
    assert set(df["backend"]) == {"hf"}
    assert (df["time_s"] > 0).all()
    for row in df.itertuples():
        cost = (flops.prefill_cost(tiny.facts, row.batch, row.tokens) if row.phase == "prefill"
                else flops.decode_cost(tiny.facts, row.batch, row.tokens))
        assert row.flops == cost.flops and row.bytes == cost.bytes
        n_tokens = row.batch * row.tokens if row.phase == "prefill" else row.batch
        assert row.tokens_per_s == pytest.approx(n_tokens / row.time_s)
        assert row.achieved_flops_s == pytest.approx(cost.flops / row.time_s)
        assert row.achieved_bytes_s == pytest.approx(cost.bytes / row.time_s)
        assert row.intensity == pytest.approx(cost.intensity)
        assert row.bound == ("compute" if cost.intensity >= 5.0 else "memory")
        roof = max(cost.flops / 1e11, cost.bytes / 2e10)
        assert row.roof_time_s == pytest.approx(roof)
        assert row.frac_of_roof == pytest.approx(roof / row.time_s)
    # tiny's prefills are above the fake ridge of 5 FLOP/B, its decode steps below
    assert set(df[df.phase == "prefill"]["bound"]) == {"compute"}
    assert set(df[df.phase == "decode"]["bound"]) == {"memory"}


def test_hf_backend_decode_really_reads_a_cache_of_context_tokens(tiny):
    be = profile._HFBackend(tiny, lm_head="last", seed=0)
    step, reset = be.decode(3, 10)
    cache = be._held[1]
    assert cache.get_seq_length() == 10
    logits = step()
    assert tuple(logits.shape) == (3, 1, tiny.facts.vocab_size)
    assert cache.get_seq_length() == 11
    reset()
    assert cache.get_seq_length() == 10
    pstep, _ = be.prefill(2, 7)
    assert tuple(pstep().shape) == (2, 1, tiny.facts.vocab_size)  # logits of the last position only
    every = profile._HFBackend(tiny, lm_head="all", seed=0)
    assert tuple(every.prefill(2, 7)[0]().shape) == (2, 7, tiny.facts.vocab_size)


def test_backend_choice(tiny):
    with pytest.raises(ModeError):
        profile.resolve_backend(tiny, "vllm")
    auto = profile.resolve_backend(tiny, "auto")
    assert auto == ("engine" if profile._engine_importable() else "hf")
    if not profile._engine_importable():
        with pytest.raises(ModeError):
            profile.resolve_backend(tiny, "engine")


@pytest.mark.skipif(not profile._engine_importable(), reason="splitlab.engine.runner not built yet")
def test_profile_phases_engine_tiny(tiny):
    df = profile_phases(tiny, batch_sizes=(1, 2), prompt_lens=(8,), context_lens=(12,), repeats=2, warmup=1,
                        backend="engine", ceilings=FAKE, progress=False)
    assert set(df["backend"]) == {"engine"} and len(df) == 4
    assert (df["time_s"] > 0).all()
    assert list(df["flops"]) == [flops.prefill_cost(tiny.facts, 1, 8).flops, flops.prefill_cost(tiny.facts, 2, 8).flops,
                                 flops.decode_cost(tiny.facts, 1, 12).flops, flops.decode_cost(tiny.facts, 2, 12).flops]


def test_profile_accepts_a_spec_string_and_default_ceilings():
    df = profile_phases("tiny", batch_sizes=(1,), prompt_lens=(4,), context_lens=(4,), repeats=1, warmup=0,
                        backend="hf", progress=False)
    assert len(df) == 2 and df["device"].iloc[0] == "cpu" and torch.isfinite(torch.tensor(df["time_s"].values)).all()


def test_sweep_longer_than_the_context_is_refused(tiny):
    from splitlab.errors import ConfigError

    with pytest.raises(ConfigError, match="context of 512"):
        profile_phases(tiny, batch_sizes=(1,), prompt_lens=(8,), context_lens=(512,), backend="hf", ceilings=FAKE,
                       progress=False)


def test_profile_sweep_benchmark_quick_on_cpu(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    from splitlab.present.results import load_profile

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_sweep.py"
    spec = importlib.util.spec_from_file_location("profile_sweep", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "profile_cpu.json"
    assert mod.main(["--model", "tiny", "--quick", "--backends", "hf", "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    assert summary["out"] == str(out) and summary["cases"] == 6 and summary["skipped"] == 0
    assert set(summary["summary"]) == {"tiny (hf)"}
    prof = load_profile(out)
    assert len(prof.table) == 6 and set(prof.table["phase"]) == {"prefill", "decode"}
    assert prof.meta["command"].startswith("python benchmarks/profile_sweep.py --model tiny --quick")
    assert prof.meta["models"]["tiny"]["num_params"] == 107328
    assert prof.ceilings.matmul_flops_s > 0 and prof.datasheet is None
    assert mod.gpu_slug("NVIDIA H200") == "h200" and mod.gpu_slug("NVIDIA A100-SXM4-80GB") == "a100"
