"""The paged-vs-slot capacity benchmark's rows and analysis (``benchmarks/paged_capacity.py``).

``row_of`` turns one run into its row; ``analyse`` judges the rows: concurrent sequences on the
burst (target 3x the slot pool), burst capacity (the highest rate at 90% attainment; target 2x)
with ``ratio`` saying whether a ratio is exact or only a bound, and the co-location rates.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from splitlab.config import SLO, EngineConfig
from splitlab.engine.kv import pages_written
from splitlab.measure.slo import interpolate_max_rate


def row_of(run, cell, meta: dict[str, Any], cfg: EngineConfig, slo: SLO) -> dict[str, Any]:
    """One cell's row: peak decode batch, the sequences the pool holds, decode step times, peak
    KV use and the summary under ``slo``."""
    s, bs = run.summary(slo), cfg.kv_block_size
    peak = max((len(st.request_ids) for st in run.steps if st.kind in ("decode", "mixed")), default=0)
    ms = [((st.end_s - st.start_s) * 1e3, len(st.request_ids)) for st in run.steps if st.kind == "decode"]
    top = max((b for _, b in ms), default=0)  # the largest decode-only step (a mixed one carries chunks too)
    kv = [st.kv_used / st.kv_total for st in run.steps if st.kv_used is not None and st.kv_total]
    # sequences the pool holds: its slots, or its pages over the mean request's (every position written)
    capacity = cfg.num_slots if bs is None else cfg.num_pages / statistics.mean(pages_written(r, bs) for r in run.traces)
    return {"step": cell.step, "pool": cell.pool, "page_size": bs, "workload_key": cell.workload,
            "workload": run.workload, **meta, "requests": len(run.traces), "file": f"{cell.name}.json.gz",
            "peak_decode_batch": peak, "capacity_sequences": capacity, "max_batch": cfg.max_batch,
            "decode_step_p50_ms": statistics.median([m for m, _ in ms]) if ms else None,
            "decode_step_at_peak_ms": statistics.median([m for m, b in ms if b >= 0.9 * top]) if ms else None,
            "kv_peak_pct": 100 * max(kv) if kv else None, "kv_pool_bytes": (run.memory or {}).get("kv_pool_bytes"),
            **{k: s[k] for k in ("goodput_req_s", "slo_attainment", "ttft_p50_s", "ttft_p99_s", "tpot_p99_s",
                                 "itl_p99_s", "throughput_tok_s", "wall_s", "completed", "preemptions")}}


def ratio(top: dict[str, Any], bottom: dict[str, Any]) -> dict[str, Any]:
    """paged / slots of two max rates (``value``: the rate, or the lowest rate measured where even
    that missed) and its bound: ``lower`` (the true ratio is at least this: paged met the target at
    its highest rate, or the slots missed it at their lowest), ``upper`` (the reverse), ``exact``;
    None where undecided (both met it everywhere, or both missed it everywhere)."""
    way = {"interpolated": 0, "at_least": 1, "below_lowest": -1}
    try:
        dirs, value = {way[top["status"]], -way[bottom["status"]]} - {0}, top["value"] / bottom["value"]
    except (KeyError, TypeError, ZeroDivisionError):
        return {"ratio": None, "bound": None}
    if len(dirs) > 1:
        return {"ratio": None, "bound": None}
    return {"ratio": value, "bound": {1: "lower", -1: "upper"}.get(next(iter(dirs), 0), "exact")}


def analyse(rows: list[dict[str, Any]], plan) -> dict[str, Any]:
    """Capacity (peak sequences on the burst), burst capacity per workload and pool with the paged /
    slots ratio, the co-location rates' rows, and whether both pools held the same bytes."""
    main, serial = f"paged{plan['page_sizes'][0]}", [r for r in rows if r["step"] == "serial"]
    cap = {r["pool"]: {k: r[k] for k in ("peak_decode_batch", "capacity_sequences", "decode_step_at_peak_ms",
                                         "preemptions", "kv_pool_bytes")} for r in serial if r["kind"] == "burst"}
    peak = cap.get("slots", {}).get("peak_decode_batch")
    out: dict[str, Any] = {"capacity": cap, "capacity_ratio": cap[main]["peak_decode_batch"] / peak
                           if peak and main in cap else None, "targets": {"capacity_ratio": 3.0, "burst_ratio": 2.0}}
    out["burst_capacity"] = {}
    for kind in ("poisson", "azure"):
        rates = out["burst_capacity"][kind] = {}
        for pool in ("slots", main):
            pts = [(r["rate"], r["slo_attainment"]) for r in serial if r["pool"] == pool and r["kind"] == kind]
            if pts:
                mr = interpolate_max_rate(*zip(*pts), target=0.9)
                rates[pool] = {"rate": mr.rate, "status": mr.status, "text": str(mr), "reason": mr.reason,
                               "value": mr.rate if math.isfinite(mr.rate) else min(r for r, _ in pts)}
        rates["paged_over_slots"] = ratio(rates.get(main, {}), rates.get("slots", {}))
    coloc = {f"poisson-r{plan['coloc_poisson']:g}", f"azure-r{plan['coloc_azure']:g}"}
    out["colocation_rates"] = [{k: r[k] for k in ("step", "pool", "workload_key", "rate", "goodput_req_s",
                                                  "ttft_p99_s", "slo_attainment", "preemptions")}
                               for r in rows if r["workload_key"] in coloc]
    sizes = {r["pool"]: r["kv_pool_bytes"] for r in serial if r["kv_pool_bytes"]}
    out["equal_memory"] = {"kv_pool_bytes": sizes, "equal": len(set(sizes.values())) <= 1}
    return out
