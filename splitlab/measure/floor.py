"""The engine against its bandwidth floor at serving sizes, on slot and paged KV pools.

A decode step reads every weight once and each sequence's valid KV once; at the best measured
copy rate that is its floor. ``decode_floor_bytes`` counts the bytes (``splitlab.measure.flops``)
and ``add_floors`` turns them into ``floor_ms`` and ``vs_floor`` with the arithmetic of
``analysis.recompute_floors``. ``paged_vs_slot`` sets each paged-pool step beside the slot-pool
step of the same batch and context (the target: paged no more than 5% slower), and
``capacity_summary`` gives the few numbers of those sections. ``result_sections`` lays out
``benchmarks/engine_floor.py``'s whole result from its sweep's rows (cells named ``decode-b*``,
``long-*``, ``paged*``, ``kernels``, ``prefill-<backend>``, ``workload-*``, and ``runner``,
``gemv``, ``hf``, ``ceilings-start`` / ``-end``), and ``tables`` gives its tables as DataFrames.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping, Sequence

from splitlab.config import SLO
from splitlab.errors import ConfigError
from splitlab.measure import analysis, flops

PAGED_TARGET = 1.05  # a paged step may take at most this many times the slot step's time
SDPA_RULE = 0.97  # another SDPA backend than PyTorch's choice only when 3% faster on >= 4k prompts


def decode_floor_bytes(facts, batch: int, context: int) -> float:
    """Bytes a decode step of ``batch`` sequences at ``context`` cached tokens must read: the
    weights (``flops.weights_read_bytes``) and the valid KV."""
    return flops.weights_read_bytes(facts) + flops.decode_cost(facts, batch, context).kv_read_bytes


def parse_sizes(text: str, what: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]``: positive integers, comma-separated (``what`` names the flag)."""
    parts = [t.strip() for t in str(text).split(",")]
    if not all(t.isdigit() and int(t) > 0 for t in parts):
        raise ConfigError(f"{what} takes positive integers separated by commas, e.g. 1,8,32; got {text!r}")
    return [int(t) for t in parts]


def parse_cases(text: str, what: str) -> list[tuple[int, int]]:
    """``"32x8192,8x4096"`` -> ``[(32, 8192), (8, 4096)]``: BATCHxCONTEXT pairs, comma-separated."""
    out = []
    for part in str(text).split(","):
        pieces = part.strip().lower().split("x")
        if len(pieces) != 2 or not all(p.isdigit() and int(p) > 0 for p in pieces):
            raise ConfigError(f"{what} takes BATCHxCONTEXT pairs separated by commas, e.g. 32x8192; got {part!r}")
        out.append((int(pieces[0]), int(pieces[1])))
    return out


def add_floors(rows: Sequence[dict[str, Any]], ceilings: Mapping[str, Any]) -> Sequence[dict[str, Any]]:
    """``floor_ms``, ``vs_floor`` (and ``gpu_vs_floor``) of decode ``rows`` (each with
    ``floor_bytes`` and ``step_ms``) against ``ceilings`` (a run's combined ceilings), in place."""
    _need(ceilings, ("copy_GBps", "copy_GBps_median", "matmul_TFLOPs", "matmul_TFLOPs_median"), "the ceilings")
    for row in rows:
        _need(row, ("floor_bytes", "step_ms"), "a decode row")
    analysis.recompute_floors({"ceilings_start": dict(ceilings), "decode": list(rows)})
    return rows


def paged_vs_slot(slot_rows: Iterable[Mapping[str, Any]], paged_rows: Iterable[Mapping[str, Any]],
                  target: float = PAGED_TARGET) -> dict[str, Any]:
    """Per page size, each paged decode step beside the slot step of the same batch and
    context: ``ratio`` = paged / slot wall time (``gpu_ratio``: CUDA-event time of the graph
    replays) and whether it is within ``target``; the worst ratio per page size and the page
    size whose worst ratio is lowest. Paged rows without a slot row to match are left out."""
    slot = {}
    for r in slot_rows:
        _need(r, ("batch", "context", "step_ms"), "a slot decode row")
        slot[(r["batch"], r["context"])] = r
    by_block: dict[str, list[dict[str, Any]]] = {}
    for r in paged_rows:
        _need(r, ("batch", "context", "step_ms", "block_size"), "a paged decode row")
        s = slot.get((r["batch"], r["context"]))
        if s is None:
            continue
        entry = {"batch": r["batch"], "context": r["context"], "slot_ms": s["step_ms"], "paged_ms": r["step_ms"],
                 "ratio": r["step_ms"] / s["step_ms"]}
        if "gpu_ms" in r and "gpu_ms" in s:
            entry["gpu_ratio"] = r["gpu_ms"] / s["gpu_ms"]
        entry["within_target"] = entry["ratio"] <= target
        by_block.setdefault(str(r["block_size"]), []).append(entry)
    worst = {bs: max(e["ratio"] for e in rows) for bs, rows in by_block.items()}
    return {"target_ratio": target, "statistic": "paged step_ms / slot step_ms (medians, same batch and context)",
            "by_block_size": by_block, "worst_ratio": worst, "target_met": {bs: w <= target for bs, w in worst.items()},
            "best_block_size": min(worst, key=worst.get) if worst else None}


def capacity_summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """The capacity sections in a few numbers: ``vs_floor`` per pool and ``BATCHxCONTEXT``, the
    worst paged/slot ratio per page size with its verdict, each kernel group's share of a step."""
    grid: dict[str, dict[str, float]] = {}
    for r in [*result.get("decode", []), *result.get("decode_long", []), *result.get("paged", [])]:
        if "vs_floor" in r:
            grid.setdefault(r.get("pool", "slot"), {})[f"{r['batch']}x{r['context']}"] = round(r["vs_floor"], 3)
    out: dict[str, Any] = {"decode_vs_floor_by_pool": grid}
    cmp = result.get("paged_vs_slot") or {}
    if cmp.get("worst_ratio"):
        out["paged_vs_slot_worst"] = {bs: round(v, 3) for bs, v in cmp["worst_ratio"].items()}
        out["target_paged_within_5pct"] = cmp["target_met"]
    for k in result.get("kernels", []):
        shares = {g: round(v["share"], 3) for g, v in k["groups"].items() if v["us"]}
        if k.get("host_share") is not None:
            shares["host"] = round(k["host_share"], 3)
        out.setdefault("kernel_share", {})[f"b{k['batch']}"] = shares
    return out


def prefill_sections(by_backend: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """``prefill`` (PyTorch's SDPA choice), ``prefill_alt`` (the backend fastest on the >= 4k
    cases, when ``SDPA_RULE`` faster than auto) and ``prefill_by_sdpa_backend`` (the totals)."""
    out: dict[str, Any] = {"prefill": list(by_backend.get("auto", []))}
    big = {b: sum(c["ms"] for c in cases if c["tokens"] >= 4096) for b, cases in by_backend.items()}
    fastest = min(big, key=big.get) if big else "auto"
    if fastest != "auto" and "auto" in big and big[fastest] < SDPA_RULE * big["auto"] and by_backend[fastest]:
        out["prefill_alt"] = by_backend[fastest]
    out["prefill_by_sdpa_backend"] = {
        "total_ms_ge4k": big, "best": out["prefill_alt"][0].get("sdpa_backend", fastest) if "prefill_alt" in out
        else "auto", "rule": "another backend only when 3% faster than auto on the >= 4k cases"}
    return out


def workload_section(runs: Mapping[str, dict[str, Any]], slo: Mapping[str, Any]) -> dict[str, Any]:
    """The workload runs (``{cell: row}``, hf-generate apart) with the chunked budget of the
    best goodput (throughput breaking ties)."""
    if not runs:
        raise ConfigError("workload_section needs at least one workload run")
    first = next(iter(runs.values()))
    chunked = {k: v for k, v in runs.items() if v["mode"] == "chunked"}
    best = max(chunked, key=lambda k: (chunked[k]["goodput_req_s"] or 0, chunked[k]["throughput_tok_s"] or 0)) \
        if chunked else None
    return {"name": first.get("workload"), "rate_rps": first.get("rate_rps"), "requests": first.get("requests"),
            "slo": dict(slo), "runs": {k: v for k, v in runs.items() if v["mode"] != "hf-generate"},
            "best_chunked": best, **({"hf-generate": runs["hf-generate"]} if "hf-generate" in runs else {})}


def result_sections(rows: Sequence[Mapping[str, Any]], base: Mapping[str, Any] | None = None,
                    checks_passed: bool | None = None) -> dict[str, Any]:
    """The engine-floor result from a sweep's rows (``{"cell": name, **row}``), after ``base``
    (model, dtype, gpu): each section, the floors against the run's best ceilings, the paged
    comparison and the summary (``analysis.floor_summary`` and ``capacity_summary``). The rows
    are copied, not changed."""
    def pick(prefix: str) -> list[dict[str, Any]]:
        return [copy.deepcopy({k: v for k, v in r.items() if k != "cell"}) for r in rows
                if str(r.get("cell", "")).startswith(prefix)]

    out: dict[str, Any] = dict(base or {})
    for name in ("ceilings-start", "ceilings-end", "runner", "gemv", "hf"):
        found = pick(name)
        if found:
            out[name.replace("-", "_")] = {k: v for k, v in found[0].items() if k != "ceilings"}
    out.update(decode=pick("decode-b"), decode_long=pick("long-"), paged=pick("paged"),
               kernels=[k for r in pick("kernels") for k in r.get("breakdowns", [])])
    out.update(prefill_sections({r["backend"]: r["cases"] for r in pick("prefill-")}))
    runs = {str(r["cell"]).removeprefix("workload-"): {k: v for k, v in copy.deepcopy(r).items() if k != "cell"}
            for r in rows if str(r.get("cell", "")).startswith("workload-")}
    if runs:
        out["workload"] = workload_section(runs, SLO().to_dict())
    if "ceilings_start" in out:
        out["ceilings"] = analysis.recompute_floors(out)
        add_floors([*out["decode_long"], *out["paged"]], out["ceilings"])
        out["paged_vs_slot"] = paged_vs_slot([*out["decode"], *out["decode_long"]], out["paged"])
        out["summary"] = {**analysis.floor_summary(out), **capacity_summary(out), "checks_passed": checks_passed}
    return out


def tables(result: Mapping[str, Any]) -> list:
    """The result's tables for people, as pandas DataFrames: decode steps against their floor
    (every pool), prefill against the matmul rate, paged against slot, the kernel groups."""
    import pandas as pd

    by_block = (result.get("paged_vs_slot") or {}).get("by_block_size", {})
    paged = [{"block_size": bs, **e} for bs, rows in by_block.items() for e in rows]
    kernels = [{"batch": k["batch"], "group": g, **v} for k in result.get("kernels", []) for g, v in
               [*k["groups"].items(), ("host", {"us": k["host_us"], "share": k["host_share"]})] if v["us"]]
    frames = [([*result.get("decode", []), *result.get("decode_long", []), *result.get("paged", [])],
               ["pool", "batch", "context", "step_ms", "gpu_ms", "host_ms", "floor_ms", "vs_floor", "gemm_only_ms"]),
              (result.get("prefill", []),
               ["batch", "length", "ms", "TFLOPs", "frac_of_matmul_median", "frac_of_matmul"]),
              (paged, ["block_size", "batch", "context", "slot_ms", "paged_ms", "ratio", "gpu_ratio"]),
              (kernels, ["batch", "group", "us", "count", "share"])]
    return [pd.DataFrame(rows).reindex(columns=cols) for rows, cols in frames if rows]


def _need(row: Mapping[str, Any], keys: Sequence[str], what: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ConfigError(f"{what} lacks {missing}: give rows as benchmarks/engine_floor.py writes them "
                          f"(it has {sorted(row)[:10]})")
