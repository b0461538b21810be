"""benchmarks/engine_floor.py on a CPU with the tiny model: every section's code path (decode on
the slot pool, the long context, paged pools of two page sizes against the slot steps, the
profiled kernel breakdown of CPU ops), the result file's provenance, and the sections selected by
flag and joined across two calls (--merge-from)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = [sys.executable, str(REPO / "benchmarks" / "engine_floor.py"), "--model", "tiny", "--device", "cpu",
         "--quick", "--no-progress"]


def bench(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert (done.returncode == 0) == ok, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ef") / "full.json"
    bench("--out", str(out))
    return json.loads(out.read_text())


def test_the_quick_cpu_run_covers_every_section(full):
    cells = [r["cell"] for r in full["runs"]]
    assert [r["batch"] for r in full["decode"]] == [1, 4] and all(r["context"] == 48 for r in full["decode"])
    assert [(r["batch"], r["context"]) for r in full["decode_long"]] == [(2, 160)]
    assert {(r["pool"], r["batch"], r["context"]) for r in full["paged"]} == {
        (f"paged{bs}", b, c) for bs in (16, 32) for b, c in [(1, 48), (4, 48), (2, 160)]}
    for r in [*full["decode"], *full["decode_long"], *full["paged"]]:
        assert r["floor_ms"] > 0 and r["vs_floor"] == pytest.approx(r["step_ms"] / r["floor_ms"])
    assert full["skipped"] == [{"cell": "gemv", "why": "needs CUDA and the Triton kernels",
                                "at_s": full["skipped"][0]["at_s"]}] and not full["failed"] and not full["left"]
    assert {"prefill-auto", "hf", "workload-serial", "workload-hf-generate", "ceilings-end"} <= set(cells)


def test_paged_steps_are_set_beside_the_slot_steps(full):
    slot = {(r["batch"], r["context"]): r["step_ms"] for r in [*full["decode"], *full["decode_long"]]}
    cmp = full["paged_vs_slot"]
    assert sorted(cmp["by_block_size"]) == ["16", "32"] and cmp["target_ratio"] == 1.05
    for bs, entries in cmp["by_block_size"].items():
        paged = {(r["batch"], r["context"]): r["step_ms"] for r in full["paged"] if r["block_size"] == int(bs)}
        assert len(entries) == 3
        for e in entries:
            key = (e["batch"], e["context"])
            assert e["ratio"] == pytest.approx(paged[key] / slot[key]) and e["within_target"] == (e["ratio"] <= 1.05)
        assert cmp["worst_ratio"][bs] == max(e["ratio"] for e in entries)
    assert full["summary"]["target_paged_within_5pct"] == cmp["target_met"]


def test_the_kernel_breakdown_groups_the_cpu_ops(full):
    assert [k["batch"] for k in full["kernels"]] == [1, 4] and "kernels" in [r["cell"] for r in full["runs"]]
    for k in full["kernels"]:
        g = k["groups"]
        assert k["events"].startswith("CPU ops") and k["steps"] == 3 and k["cuda_graph"] is False
        assert g["gemm"]["count"] > 0 and g["attention"]["us"] > 0 and g["norm"]["us"] > 0
        assert k["host_us"] == pytest.approx(k["wall_us"] - k["kernel_us"])
        assert sum(v["share"] for v in g.values()) + k["host_share"] == pytest.approx(1.0)
    assert set(full["summary"]["kernel_share"]) == {"b1", "b4"}


def test_the_file_records_its_provenance(full):
    assert full["command"].startswith("engine_floor.py --model tiny") and full["date"]
    assert full["environment"]["versions"]["torch"] and full["plan"]["block_sizes"] == [16, 32]
    assert full["plan"]["sections"] == ["decode", "gemv", "long", "prefill", "paged", "hf", "workload", "kernels"]


def test_sections_by_flag_and_joined_across_calls(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    bench("--sections", "decode,long", "--out", str(first))
    a = json.loads(first.read_text())
    assert not a["paged"] and not a["kernels"] and "workload" not in a and a["decode_long"]
    bench("--sections", "paged", "--block-sizes", "64", "--merge-from", str(first), "--out", str(second))
    b = json.loads(second.read_text())
    assert b["decode"] == a["decode"] and {r["pool"] for r in b["paged"]} == {"paged64"}
    assert len(b["paged_vs_slot"]["by_block_size"]["64"]) == 3  # against the first call's slot steps
    bad = bench("--sections", "decode,nope", ok=False)
    assert bad.returncode == 2 and "unknown ['nope']" in bad.stderr
