"""Analysis of runs and benchmark rows: what co-location cost decode, and where splitting pays.

Functions of runs (``splitlab.measure.metrics.Run``): ``decode_interference``, ``step_stalls``,
``step_breakdown``, ``run_row`` (one run as a flat row). Functions of rows (``run_row`` plus a
``step`` and a ``workload_key``, as ``benchmarks/colocation.py`` records them): the SM-share
sweep, the targets, goodput over load, the paper's figures beside ours (``paper_comparison``),
the co-location mechanics (``gpu_paths``), and ``colocation_analysis`` with all of them. The
engine-floor benchmark's numbers: ``recompute_floors``, ``floor_summary``, ``saturation_rate``.
Calibration: ``calibrated_rates``, ``rate_labels``, ``relabel``. Plain numpy: no plotting.
"""

from __future__ import annotations

import collections
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from splitlab.config import SLO
from splitlab.errors import ConfigError
from splitlab.measure.metrics import Run


def decode_interference(run: Run, min_coverage: float = 0.5) -> dict[str, Any]:
    """Decode step times while a prefill step runs beside them vs alone, from ``run.steps``.

    A decode step is *overlapped* when prefill steps cover at least ``min_coverage`` of its
    duration, *alone* when none overlaps it at all. ``slowdown_p50`` is the ratio of the
    median step times; ``slowdown_batch_matched`` compares medians within each decode batch
    size seen both ways (weighted by the overlapped steps), so a bigger batch while
    prefill runs does not pass for interference. NaN where a group is empty.
    """
    pre = sorted((s.start_s, s.end_s) for s in run.steps if s.worker == "prefill")
    dec = sorted((s for s in run.steps if s.worker == "decode" and s.kind == "decode"), key=lambda s: s.start_s)
    alone: dict[int, list[float]] = collections.defaultdict(list)
    over: dict[int, list[float]] = collections.defaultdict(list)
    j = 0
    for d in dec:
        dur = d.end_s - d.start_s
        while j < len(pre) and pre[j][1] <= d.start_s:
            j += 1
        covered = 0.0
        k = j
        while k < len(pre) and pre[k][0] < d.end_s:
            covered += max(0.0, min(d.end_s, pre[k][1]) - max(d.start_s, pre[k][0]))
            k += 1
        if covered <= 0.0:
            alone[d.num_tokens].append(dur)
        elif dur > 0 and covered / dur >= min_coverage:
            over[d.num_tokens].append(dur)
    all_alone = [x for v in alone.values() for x in v]
    all_over = [x for v in over.values() for x in v]
    med_alone = float(np.median(all_alone)) if all_alone else float("nan")
    med_over = float(np.median(all_over)) if all_over else float("nan")
    num = den = 0.0
    for batch, times in over.items():
        if alone.get(batch):
            num += len(times) * float(np.median(times)) / float(np.median(alone[batch]))
            den += len(times)
    return {
        "decode_steps": len(dec),
        "alone_steps": len(all_alone),
        "overlapped_steps": len(all_over),
        "overlap_fraction": len(all_over) / len(dec) if dec else float("nan"),
        "decode_step_alone_p50_s": med_alone,
        "decode_step_overlapped_p50_s": med_over,
        "slowdown_p50": med_over / med_alone if all_alone and all_over else float("nan"),
        "slowdown_batch_matched": num / den if den else float("nan"),
    }


# ---- runs as table rows ----------------------------------------------------------------------

STALL_FACTOR = 5.0  # a step this many times its kind's median is a stall (a cold shape, a compile)
SWEEP_TIE = 0.05  # goodputs within 5% of a sweep's best are treated as equal (single runs)
TPOT_GRID = (0.015, 0.02, 0.03, 0.05, 0.1)  # seconds: goodput under other TPOT bounds
TTFT_GRID = (0.25, 0.5, 1.0, 2.0)  # seconds: goodput under other TTFT bounds
# the co-location targets a run is judged by (ratios; memory: at most)
COLOCATION_TARGETS = {"goodput_vs_serial": 1.3, "goodput_vs_chunked": 1.1, "mps_memory_vs_serial": 1.10,
                      "throughput_vs_hf_generate": 10.0}
# what the Splitwiser paper reports (arXiv 2505.03763): fractions and speedups over its baseline
PAPER = {"latency_reduction_hf_pipeline": 0.176, "throughput_4_processes": 1.1, "best_throughput": 1.42,
         "best_latency_reduction": 0.182}
PAPER_NOTE = ("paper: HF pipeline vs sequential HF on an A100 (conditions mostly unstated); ours: against "
              "splitlab's serial engine at the near-saturation Poisson rate on this GPU")
_SUMMARY_KEYS = ("completed", "num_requests", "wall_s", "throughput_tok_s", "request_rate_s", "ttft_p50_s",
                 "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "itl_p50_s", "itl_p99_s")


def _num(x: Any, default: float = -math.inf) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else default


def _ratio(a: Any, b: Any) -> float:
    a, b = _num(a, math.nan), _num(b, math.nan)
    return a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan


def token_match(got: Mapping[int, Sequence[int]], ref: Mapping[int, Sequence[int]]) -> dict[str, Any]:
    """Fraction of token positions equal to ``ref``'s, of whole sequences equal, and whether all are."""
    same = total = exact = 0
    for rid, want in ref.items():
        have = list(got.get(rid, []))
        same += sum(a == b for a, b in zip(have, want))
        total += len(want)
        exact += have == list(want)
    return {"token_match_rate": same / total if total else math.nan, "sequences_exact": exact / max(1, len(ref)),
            "exact": exact == len(ref)}


def config_fields(run: Run) -> dict[str, Any]:
    """The configuration a row shows, from a run's ``RunConfig`` or the dict older runs held:
    backend, MPS shares, replica count, ``mps`` (split: the MPS daemon's report or None;
    replicas: whether MPS was on; None otherwise), and the mode's own facts (split: what the
    engine ran with, the green partition; replicas: each replica's facts)."""
    cfg = run.config
    if isinstance(cfg, Mapping):  # an untyped record
        get = cfg.get
        daemon = cfg.get("mps") if run.mode == "split" and isinstance(cfg.get("mps"), Mapping) else cfg.get("mps_daemon")
        replicas = cfg.get("per_replica")
    else:
        def get(key, default=None):
            return getattr(cfg, key, default)

        daemon = get("mps_daemon")
        replicas = list((get("workers") or {}).values()) or None
    out = {"backend": get("backend"), "prefill_share": get("prefill_share"), "decode_share": get("decode_share"),
           "replicas": get("replicas"),
           "mps": daemon if run.mode == "split" else (bool(get("mps")) if run.mode == "replicas" else None)}
    if run.mode == "split":
        out.update(effective=get("effective"), green=get("green"), mps_daemon=daemon)
    if run.mode == "replicas":
        out.update(per_replica=replicas, mps_daemon=daemon)
    return out


def run_row(run: Run, slo: SLO, tpot_grid: Sequence[float] = TPOT_GRID,
            ttft_grid: Sequence[float] = TTFT_GRID) -> dict[str, Any]:
    """One run as a flat row: its configuration (``config_fields``), ``summary(slo)``'s
    latencies and goodput, mean E2E, peak memory, goodput under tighter and looser bounds (one
    bound varied, the other as in ``slo``), and for split runs ``decode_interference``."""
    s = run.summary(slo)
    fields = config_fields(run)
    row: dict[str, Any] = {"mode": run.mode, **{k: fields.pop(k) for k in ("backend", "prefill_share",
                                                                           "decode_share", "replicas", "mps")}}
    row.update({k: s[k] for k in _SUMMARY_KEYS})
    row.update(e2e_mean_s=float(run.requests["e2e_s"].mean()), e2e_p50_s=s["e2e_p50_s"],
               goodput_req_s=s["goodput_req_s"], slo_attainment=s["slo_attainment"],
               peak_memory_bytes=(run.memory or {}).get("peak_bytes"), memory=run.memory,
               goodput_by_tpot_slo={str(t): run.summary(SLO(ttft_s=slo.ttft_s, tpot_s=t))["goodput_req_s"]
                                    for t in tpot_grid},
               goodput_by_ttft_slo={str(t): run.summary(SLO(ttft_s=t, tpot_s=slo.tpot_s))["goodput_req_s"]
                                    for t in ttft_grid})
    if run.mode == "split":
        row["decode_interference"] = decode_interference(run)
    row.update({k: v for k, v in fields.items() if v is not None or k == "effective"})
    return row


def step_stalls(run: Run, factor: float = STALL_FACTOR) -> dict[str, Any]:
    """Steps that took over ``factor`` x the median step of their kind (decode / prefill /
    mixed): how many, and their seconds. One-off stalls (a cold shape, a compile) show here."""
    out = {"steps": 0, "stall_s": 0.0}
    for kind in {s.kind for s in run.steps}:
        durations = sorted(s.end_s - s.start_s for s in run.steps if s.kind == kind)
        median = durations[len(durations) // 2]
        slow = [d for d in durations if d > factor * median]
        out["steps"] += len(slow)
        out["stall_s"] += sum(slow)
    return out


def stalls_of_saved_runs(folder: str | Path, names: Iterable[str],
                         factor: float = STALL_FACTOR) -> dict[str, dict[str, Any] | None]:
    """``step_stalls`` of each run saved as ``<folder>/<name>.json[.gz]``; None where no file is."""
    from splitlab.measure.metrics import load_run

    out: dict[str, dict[str, Any] | None] = {}
    for name in names:
        path = next((p for p in (Path(folder) / f"{name}.json.gz", Path(folder) / f"{name}.json") if p.is_file()),
                    None)
        out[name] = None if path is None else step_stalls(load_run(path), factor)
    return out


def step_breakdown(run: Run, micro: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Where a run's wall time went: per step kind, count, total and per-step times, tokens per
    step, and (given microbenchmarks) the measured step time over what they predict for the same
    shape (decode: ``micro["decode"]`` rows of batch -> step_ms, interpolated; prefill/mixed:
    tokens x the per-token time of the ``micro["prefill"]`` row). ``host_gap_s`` = wall - time
    in steps: the scheduler, the Python loop and idle waits for arrivals."""
    out: dict[str, Any] = {"wall_s": run.wall_s}
    busy = 0.0
    for kind in ("decode", "prefill", "mixed"):
        steps = [st for st in run.steps if st.kind == kind]
        if not steps:
            continue
        dur = [st.end_s - st.start_s for st in steps]
        toks = [st.num_tokens for st in steps]
        busy += sum(dur)
        row = {"steps": len(steps), "total_s": sum(dur), "mean_ms": statistics.mean(dur) * 1e3,
               "p50_ms": statistics.median(dur) * 1e3, "p90_ms": sorted(dur)[int(0.9 * (len(dur) - 1))] * 1e3,
               "mean_tokens": statistics.mean(toks)}
        pred = None
        if micro and kind == "decode" and micro.get("decode"):
            pts = sorted((r["batch"], r["step_ms"]) for r in micro["decode"])
            pred = [float(np.interp(len(st.request_ids), *zip(*pts))) for st in steps]
        elif micro and kind != "decode" and micro.get("prefill"):
            pred = [micro["prefill"]["ms"] / micro["prefill"]["tokens"] * t for t in toks]
        if pred:
            row["vs_microbench"] = sum(dur) * 1e3 / sum(pred)
        out[kind] = row
    out["busy_s"] = busy
    out["host_gap_s"] = (run.wall_s or 0.0) - busy
    return out


# ---- calibration ------------------------------------------------------------------------------

def calibrated_rates(capacity_req_s: float, multiples: Sequence[float]) -> list[float]:
    """Arrival rates as multiples of a measured capacity (requests/s), lowest first."""
    if not _num(capacity_req_s, 0.0) > 0:
        raise ConfigError(f"a capacity must be a positive rate in requests/s, got {capacity_req_s!r}")
    return sorted(float(m) * capacity_req_s for m in multiples)


def rate_labels(rates: Sequence[float]) -> dict[str, float]:
    """``poisson-<label>`` -> rate for 1 to 3 rates: mid; low, mid; low, mid, high (the highest
    three when more are given)."""
    rates = sorted(float(r) for r in rates)[-3:]
    if not rates:
        raise ConfigError("give at least one arrival rate")
    labels = {1: ["mid"], 2: ["low", "mid"], 3: ["low", "mid", "high"]}[len(rates)]
    return {f"poisson-{label}": rate for label, rate in zip(labels, rates)}


def relabel(rows: Iterable[Mapping[str, Any]], workloads: Mapping[str, str]) -> list[dict[str, Any]]:
    """Rows with their ``workload_key`` renamed by ``workloads`` (old -> new), e.g. when a call's
    near-saturation rate proved to be below saturation and its runs become ``poisson-low``."""
    return [{**r, "workload_key": workloads.get(r["workload_key"], r["workload_key"])} for r in rows]


# ---- the co-location comparison (rows as ``run_row`` makes them, plus step / workload_key) ----

def _compared(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r["workload_key"] != "check"]


def _get(rows: Sequence[Mapping[str, Any]], step: str, key: str) -> Mapping[str, Any] | None:
    return next((r for r in rows if r["step"] == step and r["workload_key"] == key), None)


def sm_share_sweep(rows: Iterable[Mapping[str, Any]], workload: str = "poisson-mid",
                   tie: float = SWEEP_TIE) -> dict[str, Any] | None:
    """The MPS SM-share sweep at one workload: every share's goodput, throughput, tails and
    decode slowdown, and the chosen shares: among the shares whose goodput is within ``tie`` of
    the best (single runs: smaller differences are not taken as real), the lowest p99 ITL."""
    from splitlab.config import SplitConfig

    sweep = [r for r in _compared(rows) if r["step"].startswith("split-mps") and r["workload_key"] == workload]
    if not sweep:
        return None
    top = max(_num(r["goodput_req_s"]) for r in sweep)
    near = [r for r in sweep if _num(r["goodput_req_s"]) >= (1 - tie) * top]
    best = min(near, key=lambda r: _num(r["itl_p99_s"], math.inf))
    return {
        "workload": workload,
        "points": [{"prefill_share": r["prefill_share"], "decode_share": r["decode_share"],
                    "goodput_req_s": r["goodput_req_s"], "throughput_tok_s": r["throughput_tok_s"],
                    "itl_p99_s": r["itl_p99_s"], "tpot_p99_s": r["tpot_p99_s"],
                    "decode_slowdown": (r.get("decode_interference") or {}).get("slowdown_batch_matched")}
                   for r in sorted(sweep, key=lambda r: r["decode_share"])],
        "chosen": {"prefill_share": best["prefill_share"], "decode_share": best["decode_share"]},
        "rule": f"at the near-saturation Poisson rate, the lowest p99 ITL among the shares whose goodput "
                f"is within {tie:.0%} of the best (single runs: smaller differences are not taken as real)",
        "highest_goodput": max(sweep, key=lambda r: _num(r["goodput_req_s"]))["step"],
        "current_default": {"prefill_share": SplitConfig.DEFAULT_PREFILL_SHARE,
                            "decode_share": SplitConfig.DEFAULT_DECODE_SHARE},
    }


def split_vs_baselines(rows: Sequence[Mapping[str, Any]], key: str, stalls: Mapping[str, Any] | None = None,
                       factor: float = STALL_FACTOR) -> dict[str, Any] | None:
    """The best split run (by goodput) on workload ``key`` against serial and chunked there.
    ``stalls``: ``step_stalls`` by run name ``<step>--<key>`` (None: not counted); a chunked
    baseline that lost over a tenth of its wall time to stalls is flagged, not beaten."""
    rows = _compared(rows)
    serial, chunked = _get(rows, "serial", key), _get(rows, "chunked", key)
    splits = [r for r in rows if r["mode"] == "split" and r["workload_key"] == key]
    if not (serial and splits):
        return None
    best = max(splits, key=lambda r: _num(r["goodput_req_s"]))
    t: dict[str, Any] = {"best_split": best["step"], "goodput": best["goodput_req_s"],
                         "goodput_vs_serial": _ratio(best["goodput_req_s"], serial["goodput_req_s"]),
                         "throughput_vs_serial": _ratio(best["throughput_tok_s"], serial["throughput_tok_s"]),
                         "e2e_mean_reduction_vs_serial": 1 - _ratio(best["e2e_mean_s"], serial["e2e_mean_s"])}
    if stalls is not None:
        t["serial_step_stalls"] = stalls.get(f"serial--{key}")
        t["best_split_step_stalls"] = stalls.get(f"{best['step']}--{key}")
    if chunked:
        t["goodput_vs_chunked"] = _ratio(best["goodput_req_s"], chunked["goodput_req_s"])
        stall = (stalls or {}).get(f"chunked--{key}")
        if stall:
            t["chunked_step_stalls"] = stall
            if stall["stall_s"] > 0.1 * chunked["wall_s"]:
                t["goodput_vs_chunked_caveat"] = (
                    f"{stall['steps']} chunked steps ran over {factor:g}x their kind's median "
                    f"({stall['stall_s']:.1f} s of a {chunked['wall_s']:.1f} s run), each a one-off beside steps "
                    "of the same kind and size: a warm-up gap by the look of it, not the policy; not a fair baseline")
    return t


def colocation_targets(rows: Iterable[Mapping[str, Any]], stalls: Mapping[str, Any] | None = None,
                       workloads: Sequence[str] = ("poisson-low", "poisson-mid", "poisson-high", "azure-a",
                                                   "azure-b")) -> dict[str, Any]:
    """The verdicts of ``COLOCATION_TARGETS``: split against serial and chunked per workload,
    split-mps peak memory against serial, split throughput against hf-generate near saturation."""
    rows = _compared(rows)
    targets: dict[str, Any] = {}
    for key in workloads:
        verdict = split_vs_baselines(rows, key, stalls)
        if verdict is not None:
            targets[key] = verdict
    mps_mem = [r["peak_memory_bytes"] for r in rows if r["step"].startswith("split-mps") and r.get("peak_memory_bytes")]
    serial_mem = [r["peak_memory_bytes"] for r in rows if r["step"] == "serial" and r.get("peak_memory_bytes")]
    if mps_mem and serial_mem:
        targets["mps_peak_memory_vs_serial"] = max(mps_mem) / max(serial_mem)
    hf = _get(rows, "hf-generate", "hf-prefix")
    split_mid = [r for r in rows if r["mode"] == "split" and r["workload_key"] == "poisson-mid"]
    if hf and split_mid:
        targets["split_throughput_vs_hf_generate"] = _ratio(max(_num(r["throughput_tok_s"]) for r in split_mid),
                                                            hf["throughput_tok_s"])
    targets["thresholds"] = dict(COLOCATION_TARGETS)
    return targets


def goodput_vs_rate(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per step, goodput, throughput, attainment and tails at each Poisson rate, by rate."""
    curves: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("kind") == "poisson":
            curves.setdefault(r["step"], []).append(
                {"rate": r["rate"], "goodput_req_s": r["goodput_req_s"], "throughput_tok_s": r["throughput_tok_s"],
                 "slo_attainment": r["slo_attainment"], "ttft_p99_s": r["ttft_p99_s"], "tpot_p99_s": r["tpot_p99_s"]})
    return {k: sorted(v, key=lambda p: p["rate"]) for k, v in curves.items()}


def paper_comparison(rows: Iterable[Mapping[str, Any]], targets: Mapping[str, Any] | None = None,
                     workload: str = "poisson-mid") -> dict[str, Any]:
    """The paper's figures (``PAPER``) beside ours at ``workload``: the replicas (the paper's own
    scheme) and the best split, each as throughput and mean E2E reduction against serial."""
    rows = _compared(rows)
    serial = _get(rows, "serial", workload)
    ours = []
    for step in ("replicas-2-mps", "replicas-4-mps", "replicas-2", "replicas-4"):
        r = _get(rows, step, workload)
        if r and serial:
            ours.append({"ours": step, "throughput_vs_serial": _ratio(r["throughput_tok_s"], serial["throughput_tok_s"]),
                         "e2e_mean_reduction_vs_serial": 1 - _ratio(r["e2e_mean_s"], serial["e2e_mean_s"]),
                         "peak_memory_bytes": r["peak_memory_bytes"]})
    best = (targets if targets is not None else colocation_targets(rows)).get(workload)
    if best:
        ours.append({"ours": best["best_split"], "throughput_vs_serial": best["throughput_vs_serial"],
                     "e2e_mean_reduction_vs_serial": best["e2e_mean_reduction_vs_serial"]})
    return {"paper": dict(PAPER), "ours": ours, "note": PAPER_NOTE}


def colocation_analysis(rows: Sequence[Mapping[str, Any]], stalls: Mapping[str, Any] | None = None
                        ) -> dict[str, Any]:
    """Everything ``benchmarks/colocation.py`` concludes from its rows: the SM-share sweep,
    the targets, goodput over load, the paper's figures beside ours, and each session's bf16
    check run against serial's tokens."""
    out: dict[str, Any] = {}
    sweep = sm_share_sweep(rows)
    if sweep:
        out["sm_share_sweep"] = sweep
    out["targets"] = colocation_targets(rows, stalls)
    out["goodput_vs_rate"] = goodput_vs_rate(_compared(rows))
    out["paper_comparison"] = paper_comparison(rows, out["targets"])
    out["bf16_check_vs_serial"] = {r["step"]: r["check_vs_serial"] for r in rows if r["workload_key"] == "check"
                                   and "check_vs_serial" in r and not r["check_vs_serial"].get("reference")}
    return out


def gpu_paths(rows: Iterable[Mapping[str, Any]], fp32: Mapping[str, Any] | None = None,
              probe: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What runs say about the co-location mechanics (None where nothing ran): MPS daemons list
    every worker as a client; a decode process or non-owner replica maps the weights and KV
    instead of holding a copy; green contexts got disjoint SM counts and ran in proportion."""
    clients, mapped, green = [], [], []
    for r in [*rows, *[v for v in (fp32 or {}).values() if isinstance(v, dict)]]:
        daemon = r.get("mps_daemon") or {}
        for found in (daemon.get("workers_are_clients"), r.get("mps_workers_are_clients")):
            if isinstance(found, dict):
                clients.append(all(found.values()))
        for shared in ((r.get("effective") or {}).get("decode_weights_shared"), r.get("decode_weights_shared")):
            if shared is not None:
                mapped.append(bool(shared))
        shares = [rep.get("weights_shared") for rep in (r.get("per_replica") or [])[1:]]
        if isinstance(r.get("weights_shared"), list):
            shares += r["weights_shared"][1:]
        mapped += [bool(s) for s in shares if s is not None]
        g = r.get("green")
        if g:
            green.append(g["sm_counts"][0] + g["sm_counts"][1] <= g["total_sms"] and min(g["sm_counts"]) > 0)
    return {"mps_workers_are_clients": all(clients) if clients else None,
            "green_partition_in_force": None if probe is None else probe.get("partition_in_force"),
            "weights_and_kv_mapped_not_copied": all(mapped) if mapped else None,
            "green_sm_split_disjoint": all(green) if green else None}


# ---- the engine against the hardware (``benchmarks/engine_floor.py``) ------------------------

FLOOR_TARGETS = {"decode_b1_vs_floor": 1.25, "decode_b32_vs_floor": 1.30, "prefill_4k_frac_of_matmul": 0.85}


def recompute_floors(result: dict[str, Any]) -> dict[str, Any]:
    """The run's ceilings, the best of its start and end measurements (``ceilings_start`` /
    ``ceilings_end``); every decode floor and prefill fraction in ``result`` is recomputed
    against them, in place. Returns the ceilings."""
    start = result["ceilings_start"]
    end = result.get("ceilings_end") or start
    ceil = dict(start)
    for key in ("copy_GBps", "matmul_TFLOPs"):
        ceil[key] = max(start[key], end[key])
        ceil[key + "_median"] = max(start[key + "_median"], end[key + "_median"])
        ceil[key + "_from"] = "start" if start[key] >= end[key] else "end"
    bw = ceil["copy_GBps"] * 1e9
    for row in [*result.get("decode", []), *result.get("gemv", {}).get("decode", []),
                *result.get("hf", {}).get("decode", [])]:
        row["floor_ms"] = row["floor_bytes"] / bw * 1e3
        row["vs_floor"] = row["step_ms"] / row["floor_ms"]
        if "gpu_ms" in row:
            row["gpu_vs_floor"] = row["gpu_ms"] / row["floor_ms"]
    for row in [*result.get("prefill", []), *result.get("prefill_alt", []), *result.get("hf", {}).get("prefill", [])]:
        row["frac_of_matmul"] = row["TFLOPs"] / ceil["matmul_TFLOPs"]
        row["frac_of_matmul_median"] = row["TFLOPs"] / ceil["matmul_TFLOPs_median"]
    return ceil


def best_prefill_rows(result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per prefill case ``"<batch>x<length>"``, the faster of PyTorch's SDPA choice and the
    alternative backend (``prefill_alt``)."""
    best: dict[str, dict[str, Any]] = {}
    for row in [*result.get("prefill", []), *result.get("prefill_alt", [])]:
        key = f"{row['batch']}x{row['length']}"
        if key not in best or row["ms"] < best[key]["ms"]:
            best[key] = row
    return best


def saturation_rate(decode_rows: Sequence[Mapping[str, Any]], prefill_rows: Sequence[Mapping[str, Any]],
                    prompt_len: float, output_len: float, fraction: float = 0.9) -> float:
    """Requests/s one engine sustains, from its measured steps: each request costs the prefill
    of its prompt (at the largest prefill's per-token time) plus its share of decode steps at
    the largest batch; ``fraction`` of that."""
    pre = max(prefill_rows, key=lambda r: r["tokens"])
    dec = max(decode_rows, key=lambda r: r["batch"])
    prefill_s = pre["ms"] / 1e3 / pre["tokens"] * prompt_len
    decode_s = dec["step_ms"] / 1e3 / dec["batch"] * output_len
    return fraction / (prefill_s + decode_s)


def _rounded(rows: Mapping[Any, Mapping[str, Any]], key: str, digits: int = 3) -> dict[Any, float]:
    return {k: round(row[key], digits) for k, row in rows.items() if key in row}


def floor_summary(r: Mapping[str, Any], targets: Mapping[str, float] = FLOOR_TARGETS) -> dict[str, Any]:
    """The engine-floor result in a few numbers, with the verdict on each of ``targets``:
    decode against the floor of the BEST copy rate; prefill against the MEDIAN matmul burst
    (a 4k prefill runs long enough to settle at the sustained clock), the best beside it."""
    dec = {row["batch"]: row for row in r["decode"]}
    pre = best_prefill_rows(r)
    c = r["ceilings"]
    s: dict[str, Any] = {
        "gpu": r.get("gpu"), "model": r.get("model"), "dtype": r.get("dtype"),
        "copy_GBps": round(c["copy_GBps"], 1), "copy_GBps_median": round(c["copy_GBps_median"], 1),
        "matmul_TFLOPs": round(c["matmul_TFLOPs"], 2), "matmul_TFLOPs_median": round(c["matmul_TFLOPs_median"], 2),
        "ceiling_statistic": "best of repeats (floors use it); medians beside",
        "decode_vs_floor": _rounded(dec, "vs_floor"), "decode_step_ms": _rounded(dec, "step_ms"),
        "decode_gpu_ms": _rounded(dec, "gpu_ms"), "decode_host_ms": _rounded(dec, "host_ms"),
        "prefill_frac_of_matmul": _rounded(pre, "frac_of_matmul"),
        "prefill_frac_of_matmul_median": _rounded(pre, "frac_of_matmul_median"),
        "prefill_target_ceiling": "median", "decode_target_ceiling": "best",
        "decode_variant": r.get("runner", {}).get("decode_variant"),
        "prefill_sdpa_backend": {k: row.get("sdpa_backend", "auto") for k, row in pre.items()},
    }
    if 1 in dec:
        s["target_decode_b1"] = dec[1]["vs_floor"] <= targets["decode_b1_vs_floor"]
    if 32 in dec:
        s["target_decode_b32"] = dec[32]["vs_floor"] <= targets["decode_b32_vs_floor"]
    big = [row for row in pre.values() if row["tokens"] >= 4096]
    if big:
        s["target_prefill_4k"] = min(row["frac_of_matmul_median"] for row in big) >= targets["prefill_4k_frac_of_matmul"]
        s["target_prefill_4k_vs_best"] = min(row["frac_of_matmul"] for row in big) >= \
            targets["prefill_4k_frac_of_matmul"]
    if r.get("gemv", {}).get("decode"):
        s["decode_vs_floor_gemv"] = {row["batch"]: round(row["vs_floor"], 3) for row in r["gemv"]["decode"]}
    if r.get("hf", {}).get("decode"):
        s["hf_decode_step_ms"] = {row["batch"]: round(row["step_ms"], 2) for row in r["hf"]["decode"]}
    if "workload" in r:
        w = r["workload"]
        keys = ("throughput_tok_s", "goodput_req_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
                "skipped", "requests_used")
        runs = {**w["runs"], **({"hf-generate": w["hf-generate"]} if "hf-generate" in w else {})}
        s["workload"] = {m: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k in keys}
                         for m, row in runs.items()}
        s["workload_best_chunked"] = w.get("best_chunked")
        s["workload_rate_rps"] = round(w["rate_rps"], 3)
    if "total_s" in r:
        s["total_s"] = round(r["total_s"], 1)
    return s


# ---- where splitting pays: a rate sweep judged under several SLOs --------------------------------

def _sweep_point(name: str) -> tuple[str, str, float]:
    """``"split-green-slo--poisson-r16"`` -> (step, workload family, rate)."""
    import re

    m = re.fullmatch(r"(.+)--([a-z]+)-r([0-9.]+)", name)
    if m is None:
        raise ValueError(f"run name {name!r} is not '<step>--<workload>-r<rate>'")
    return m.group(1), m.group(2), float(m.group(3))


def _rate_value(mr) -> float:
    """A MaxRate as a number to compare: NaN below the lowest rate counts as 0."""
    return 0.0 if math.isnan(mr.rate) else mr.rate


def run_latency_row(run: Run, slos: dict[str, Any]) -> dict[str, Any]:
    """One run of a sweep: goodput and attainment under each SLO, TTFT p50/p99, ITL
    p99/p99.9, decode slowdown beside prefill (split), the policy's decision time and the
    share of decode steps on each SM count (adaptive split)."""
    s = run.summary()
    gaps = run.itl_gaps()
    row: dict[str, Any] = {"ttft_p50_s": s["ttft_p50_s"], "ttft_p99_s": s["ttft_p99_s"],
                           "itl_p99_s": float(np.quantile(gaps, 0.99)) if len(gaps) else math.nan,
                           "itl_p999_s": float(np.quantile(gaps, 0.999)) if len(gaps) else math.nan,
                           "throughput_tok_s": s["throughput_tok_s"]}
    for label, slo in slos.items():
        scored = run.summary(slo)
        row[f"goodput_{label}_req_s"], row[f"attainment_{label}"] = scored["goodput_req_s"], scored["slo_attainment"]
    if run.mode == "split":
        row["decode_slowdown"] = decode_interference(run)["slowdown_batch_matched"]
    green = run.config.green or {}
    if "decide_p50_s" in green:
        dec = [st.sms for st in run.steps if st.worker == "decode" and st.sms]
        row.update(decide_p50_s=green["decide_p50_s"], decide_p99_s=green["decide_p99_s"],
                   decide_max_s=green["decide_max_s"],
                   decode_sms_share={str(k): dec.count(k) / len(dec) for k in sorted(set(dec))} if dec else {})
    return row


def where_split_pays(runs: dict[str, Run], slos: dict[str, Any], target: float = 0.9,
                     splits: tuple[str, ...] | None = None,
                     peers: tuple[str, ...] = ("serial", "chunked")) -> dict[str, Any]:
    """A rate sweep (``{"<step>--<workload>-r<rate>": Run}``) judged under ``slos``: per
    workload family and SLO the highest rate each step sustains at ``target`` attainment,
    chunked at its best chunk budget for that SLO (the fair peer), each split step's rate
    over the best peer's (``splits``; default every step named ``split-...``: the adaptive
    policies and the static splits beside them), and per run the latencies (``run_latency_row``)."""
    from splitlab.measure.slo import attainment_vs_rate, max_rates

    points = {name: _sweep_point(name) for name in runs}
    per_run = {name: {"step": st, "workload": fam, "rate": rate, **run_latency_row(runs[name], slos)}
               for name, (st, fam, rate) in points.items()}
    out: dict[str, Any] = {"target_attainment": target, "runs": per_run, "max_rate": {}, "vs_best_peer": {}}
    for fam in sorted({fam for _, fam, _ in points.values()}):
        groups: dict[str, list] = {}
        for name, (st, f, rate) in points.items():
            if f == fam:
                groups.setdefault(st, []).append((rate, runs[name]))
        for label, slo in slos.items():
            rates = max_rates(attainment_vs_rate(groups, slo), target)
            key = f"{fam}/{label}"
            out["max_rate"][key] = {st: {"rate": mr.rate, "status": mr.status, "text": str(mr)}
                                    for st, mr in rates.items()}
            chunked = [st for st in rates if st.startswith("chunked")]
            best_chunked = max(chunked, key=lambda st: _rate_value(rates[st])) if chunked else None
            peer_names = [st for st in rates if st in peers] + ([best_chunked] if best_chunked else [])
            best = max(peer_names, key=lambda st: _rate_value(rates[st]))
            lowest = min(r for st in groups for r, _ in groups[st])
            entry: dict[str, Any] = {"best_chunked": best_chunked, "best_peer": best,
                                     "best_peer_rate": rates[best].rate, "best_peer_status": rates[best].status}
            for st in (splits if splits is not None else sorted(st for st in rates if st.startswith("split-"))):
                if st not in rates:
                    continue
                num, den = _rate_value(rates[st]), _rate_value(rates[best])
                if rates[best].at_least:  # the peer met the target at every rate: no ratio to give
                    ratio, bound = math.nan, False
                else:  # a peer below the lowest rate measured sustains less than it: a lower bound
                    ratio = num / den if den else (num / lowest if num else math.nan)
                    bound = den == 0 or rates[st].at_least
                entry[st] = {"ratio": ratio, "ratio_is_lower_bound": bound, "rate": rates[st].rate,
                             "status": rates[st].status}
            out["vs_best_peer"][key] = entry
    return out
