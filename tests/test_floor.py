"""splitlab.measure.kernel_breakdown, floor and engine_timing on a CPU: the kernel grouping on a
hand-made list of events, the paged/slot comparison and the floors on synthetic rows, the
recorded H200 floor bytes, and a timing runner over both pool layouts of the tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from splitlab.errors import ConfigError
from splitlab.measure import engine_timing as et
from splitlab.measure import floor
from splitlab.measure import kernel_breakdown as kb
from splitlab.measure.flops import facts_from_preset

RESULTS = Path(__file__).resolve().parents[1] / "results"

# one CUDA-graph decode step as an H200 profile names its kernels (µs), two steps of it
STEP = [("add_rmsnorm_kernel", 3.0), ("nvjet_tst_64x8_64x16_4x1_v_bz_TNT", 40.0), ("decode_attn_stage1", 12.0),
        ("decode_attn_stage2", 2.0), ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 30.0), ("add_rmsnorm_kernel", 3.0),
        ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>", 50.0),
        ("silu_mul_kernel", 4.0), ("gemv2T_kernel_val<int, int, __nv_bfloat16>", 20.0), ("rope_kv_write_kernel", 1.0),
        ("Memcpy HtoD (Pinned -> Device)", 2.0), ("void at::native::reduce_kernel<ArgMaxOps>", 5.0),
        ("aten::embedding", 1.0), ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", 6.0)]


def test_kernel_names_fall_into_their_groups():
    got = {name: kb.kernel_group(name) for name, _ in STEP}
    assert got["decode_attn_stage1"] == got["decode_attn_stage2"] == "attention"
    assert got["fmha_cutlassF_bf16_aligned_64x64_rf_sm80"] == "attention"  # attention is tried before GEMM
    assert {got[n] for n, _ in STEP if "gemm" in n or "nvjet" in n or "gemv" in n} == {"gemm"}
    assert got["add_rmsnorm_kernel"] == "norm" and got["silu_mul_kernel"] == "silu-mul"
    assert got["rope_kv_write_kernel"] == "rope+kv-write" and kb.kernel_group("aten::index_copy_") == "rope+kv-write"
    assert got["Memcpy HtoD (Pinned -> Device)"] == "copy" and got["aten::embedding"] == "embedding"
    assert got["void at::native::reduce_kernel<ArgMaxOps>"] == "other"
    assert set(kb.GROUP_NAMES) == {"gemm", "attention", "norm", "rope+kv-write", "silu-mul", "embedding", "copy",
                                   "other"}


def test_group_events_sums_per_step_with_shares_and_host_time():
    kernel_us = sum(t for _, t in STEP)  # 179 µs of kernels a step
    out = kb.group_events(STEP * 2, steps=2, wall_us=200.0)
    g = out["groups"]
    assert out["kernel_us"] == pytest.approx(kernel_us)
    assert g["gemm"]["us"] == pytest.approx(140.0) and g["gemm"]["count"] == 4
    assert g["attention"]["us"] == pytest.approx(20.0) and g["attention"]["count"] == 3
    assert g["norm"] == {"us": 6.0, "count": 2.0, "share": pytest.approx(0.03), "top": [["add_rmsnorm_kernel", 6.0]]}
    assert g["gemm"]["top"][0] == [STEP[6][0][:120], 50.0] and len(g["gemm"]["top"]) == 3
    assert out["host_us"] == pytest.approx(200.0 - kernel_us)
    assert sum(v["share"] for v in g.values()) + out["host_share"] == pytest.approx(1.0)
    alone = kb.group_events(STEP)  # no wall time: shares of the kernel time, no host time
    assert alone["host_us"] is None and sum(v["share"] for v in alone["groups"].values()) == pytest.approx(1.0)
    assert kb.group_events([])["kernel_us"] == 0.0


@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(steps=1.5), dict(wall_us=0.0), dict(wall_us=float("nan")),
                                    dict(events=[("x", -1.0)]), dict(events=[("x",)]), dict(events=[(3, 1.0)])])
def test_group_events_refuses_bad_input(kwargs):
    events = kwargs.pop("events", STEP)
    with pytest.raises(ConfigError):
        kb.group_events(events, **kwargs)


def test_profile_events_on_a_cpu_sees_the_matmuls():
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    events = kb.profile_events(lambda: torch.relu(a @ b), steps=3, device="cpu")
    out = kb.group_events(events, steps=3)
    gemm = out["groups"]["gemm"]
    assert gemm["count"] == 2 and gemm["us"] > 0 and {n for n, _ in gemm["top"]} == {"aten::matmul", "aten::mm"}
    assert "aten::relu" in {n for n, _ in events} and out["groups"]["attention"]["count"] == 0
    assert not any(name.startswith("ProfilerStep") for name, _ in events)
    with pytest.raises(ConfigError):
        kb.profile_events(lambda: None, steps=0, device="cpu")


def rows(pool: str, block, times: dict) -> list[dict]:
    return [{"batch": b, "context": c, "pool": pool, "block_size": block, "step_ms": ms, "gpu_ms": ms * 0.9,
             "floor_bytes": 1e9 * b} for (b, c), ms in times.items()]


def test_paged_vs_slot_ratios_per_page_size():
    slot = rows("slot", None, {(1, 1024): 5.0, (32, 1024): 6.0, (32, 8192): 12.0})
    paged = rows("paged16", 16, {(1, 1024): 5.1, (32, 1024): 6.6, (32, 8192): 12.0}) + \
        rows("paged64", 64, {(1, 1024): 5.0, (32, 1024): 6.0, (8, 1024): 9.0})  # no slot row at batch 8
    out = floor.paged_vs_slot(slot, paged)
    p16 = {(e["batch"], e["context"]): e for e in out["by_block_size"]["16"]}
    assert p16[(1, 1024)]["ratio"] == pytest.approx(1.02) and p16[(1, 1024)]["within_target"]
    assert p16[(32, 1024)]["ratio"] == pytest.approx(1.1) and not p16[(32, 1024)]["within_target"]
    assert p16[(32, 1024)]["gpu_ratio"] == pytest.approx(1.1)
    assert len(out["by_block_size"]["64"]) == 2  # the unmatched batch-8 row left out
    assert out["worst_ratio"] == {"16": pytest.approx(1.1), "64": pytest.approx(1.0)}
    assert out["target_met"] == {"16": False, "64": True} and out["best_block_size"] == "64"
    assert floor.paged_vs_slot(slot, [])["best_block_size"] is None
    with pytest.raises(ConfigError, match="block_size"):
        floor.paged_vs_slot(slot, [{"batch": 1, "context": 1024, "step_ms": 1.0}])


def test_floors_and_the_recorded_h200_floor_bytes():
    recorded = json.loads((RESULTS / "engine_floor_h200.json").read_text())
    facts = facts_from_preset("llama-3.1-8b")
    for row in recorded["decode"]:
        assert floor.decode_floor_bytes(facts, row["batch"], row["context"]) == row["floor_bytes"]
    r = rows("slot", None, {(2, 1024): 8.0})
    ceil = {"copy_GBps": 4000.0, "copy_GBps_median": 3900.0, "matmul_TFLOPs": 700.0, "matmul_TFLOPs_median": 650.0}
    floor.add_floors(r, ceil)
    assert r[0]["floor_ms"] == pytest.approx(2e9 / 4e12 * 1e3) and r[0]["vs_floor"] == pytest.approx(16.0)
    assert r[0]["gpu_vs_floor"] == pytest.approx(14.4)
    with pytest.raises(ConfigError, match="floor_bytes"):
        floor.add_floors([{"step_ms": 1.0}], ceil)
    with pytest.raises(ConfigError, match="copy_GBps"):
        floor.add_floors(r, {"matmul_TFLOPs": 700.0})


def test_parse_sizes_and_cases():
    assert floor.parse_sizes("1, 8,32", "--batches") == [1, 8, 32]
    assert floor.parse_cases("32x8192,8X4096", "--long") == [(32, 8192), (8, 4096)]
    for bad in ("", "1,,2", "0", "-1", "a"):
        with pytest.raises(ConfigError, match="--batches"):
            floor.parse_sizes(bad, "--batches")
    for bad in ("32", "32x", "x8", "0x8", "32x8x2"):
        with pytest.raises(ConfigError, match="--long"):
            floor.parse_cases(bad, "--long")


def test_prefill_sections_take_another_backend_only_when_3pct_faster():
    case = lambda b, ms: {"batch": 1, "length": 4096, "tokens": 4096, "ms": ms, "sdpa_backend": b}  # noqa: E731
    out = floor.prefill_sections({"auto": [case("auto", 100.0)], "flash": [case("flash", 98.0)]})
    assert "prefill_alt" not in out and out["prefill_by_sdpa_backend"]["best"] == "auto"
    out = floor.prefill_sections({"auto": [case("auto", 100.0)], "flash": [case("flash", 96.0)]})
    assert out["prefill_alt"][0]["sdpa_backend"] == "flash" and out["prefill"][0]["ms"] == 100.0


def test_result_sections_from_sweep_rows():
    ceil = {"copy_GBps": 4000.0, "copy_GBps_median": 3900.0, "matmul_TFLOPs": 700.0, "matmul_TFLOPs_median": 650.0}
    slot = rows("slot", None, {(1, 1024): 5.0, (32, 1024): 6.0})
    sweep_rows = [{"cell": "ceilings-start", **ceil, "ceilings": {}},
                  *[{"cell": f"decode-b{r['batch']}", **r} for r in slot],
                  *[{"cell": f"paged16-b{r['batch']}", **r} for r in rows("paged16", 16, {(1, 1024): 5.5})],
                  {"cell": "kernels", "breakdowns": [{"batch": 1, **kb.group_events(STEP, 1, 200.0)}]}]
    out = floor.result_sections(sweep_rows, {"model": "m"}, checks_passed=True)
    assert out["model"] == "m" and "ceilings" not in out["ceilings_start"]
    assert [r["batch"] for r in out["decode"]] == [1, 32] and out["decode_long"] == []
    assert out["paged"][0]["vs_floor"] == pytest.approx(5.5 / (1e9 / 4e12 * 1e3))
    assert out["paged_vs_slot"]["worst_ratio"] == {"16": pytest.approx(1.1)}
    s = out["summary"]
    assert s["checks_passed"] is True and s["decode_vs_floor"] == {1: 20.0, 32: 0.75}
    assert s["decode_vs_floor_by_pool"]["paged16"] == {"1x1024": 22.0}
    assert s["target_paged_within_5pct"] == {"16": False}
    assert s["kernel_share"]["b1"]["gemm"] == pytest.approx(0.7) and s["kernel_share"]["b1"]["host"] == 0.105
    assert "cell" in sweep_rows[1] and "floor_ms" not in sweep_rows[1]  # the rows themselves untouched
    assert [list(t.columns)[:2] for t in floor.tables(out)] == [["pool", "batch"], ["block_size", "batch"],
                                                                ["batch", "group"]]


def test_shuffled_tables_cover_the_pool_once():
    tables = et.shuffled_tables(4, 3, seed=1)
    assert sorted(p for t in tables for p in t) == list(range(12)) and all(len(t) == 3 for t in tables)
    assert tables == et.shuffled_tables(4, 3, seed=1) != et.shuffled_tables(4, 3, seed=2)
    with pytest.raises(ConfigError):
        et.shuffled_tables(0, 3)


@pytest.mark.parametrize("block", [None, 16])
def test_timing_runner_and_decode_rows_on_both_pools(tiny, block):
    space = et.timing_runner(tiny, 40, 3, block_size=block)
    runner, tables = space["runner"], space["tables"]
    assert runner.kv.paged == (block is not None) and runner.kv.k.abs().sum() > 0  # random, not zeros
    assert (tables is None) == (block is None) and (block is None or len(tables) == 3)
    row = et.time_decode(runner, tiny.facts, 2, 32, iters=2, tables=tables, gen=random.Random(0))
    assert row["batch"] == 2 and row["context"] == 32 and row["step_ms"] > 0 and "gpu_ms" not in row
    assert row["floor_bytes"] == floor.decode_floor_bytes(tiny.facts, 2, 32)
    with pytest.raises(ConfigError, match="block tables"):
        et.decode_stepper(runner, 4, 32, tables or [[0]])


def test_decode_step_breakdown_on_a_cpu(tiny):
    runner = et.timing_runner(tiny, 40, 2)["runner"]
    rows = kb.decode_step_breakdown(runner, [1, 2], 32, steps=2, iters=2)
    assert [r["batch"] for r in rows] == [1, 2]
    for out in rows:
        assert out["events"].startswith("CPU ops") and out["graph_replay_us"] is None and out["steps"] == 2
        assert out["groups"]["gemm"]["count"] > 0 and out["groups"]["attention"]["us"] > 0
        assert out["host_us"] == pytest.approx(out["wall_us"] - out["kernel_us"])
