"""Verdicts on recorded sweeps: the split's targets judged from ``where_split_pays``, and the
Splitwiser paper's own setup (replicas of ``generate()`` against sequential ``generate()``)
beside the paper's figures.

``sweep_groups`` sorts the runs of a rate sweep (``<step>--<workload>-r<rate>``) into
``{workload: {step: [(rate, run)]}}``, what ``splitlab.measure.slo`` takes. ``split_targets``
reads an analysis of ``splitlab.measure.analysis.where_split_pays`` and returns one row per
target: what was aimed at, what was measured, and the verdict, every number from the
analysis. ``paper_setup_table`` adds the paper's two figures (latency reduction, throughput
ratio) to rows of ``benchmarks/paper_setup.py`` or of a live run of the same setup;
``paper_claims`` puts the recorded figures beside the paper's. ``sm_choices`` says how a split
that records its SMs per step (the adaptive green split) chose them: per decode SM count, how
many steps, at which batch sizes, and how many of them ran beside a prefill. Plain Python and
pandas (lazy).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from splitlab.errors import ConfigError

# what the adaptive split is held to (ratios; the decision time in seconds)
# (max-rate ratios per SLO: smooth streaming 2x the best peer, relaxed never below it)
SPLIT_TARGETS = {"goodput_vs_best_peer": 2.0, "relaxed_vs_best_peer": 1.0, "ttft_p50_vs_serial": 1.2,
                 "decode_slowdown": 1.15, "decide_p99_s": 1e-3}
ADAPTIVE = ("split-green-table", "split-green-table-lg8", "split-green-slo", "split-green-slo-g20")
GREEN = ("split-green",) + ADAPTIVE
# the Splitwiser paper (arXiv 2505.03763): its baseline is sequential HF generate()
PAPER_FIGURES = {"latency_reduction": 0.176, "throughput_ratio_4": 1.1, "throughput_ratio_max": 1.42,
                 "latency_reduction_max": 0.182}


def sweep_groups(runs) -> dict[str, dict[str, list[tuple[float, Any]]]]:
    """``{workload family: {step: [(rate, run), ...]}}`` of a rate sweep's runs, named
    ``<step>--<workload>-r<rate>`` (runs as ``splitlab.measure.slo.runs_by_label`` takes:
    a folder, a glob, or a ``{name: Run}`` mapping), each list by rate."""
    from splitlab.measure.analysis import _sweep_point
    from splitlab.measure.slo import runs_by_label

    out: dict[str, dict[str, list[tuple[float, Any]]]] = {}
    for name, run in runs_by_label(runs).items():
        step, family, rate = _sweep_point(name)
        out.setdefault(family, {}).setdefault(step, []).append((rate, run))
    for steps in out.values():
        for points in steps.values():
            points.sort(key=lambda p: p[0])
    return out


def _range(values: Sequence[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.3g}x" if f"{lo:.3g}" == f"{hi:.3g}" else f"{lo:.3g}-{hi:.3g}x"


def _ratio_verdict(ratio: float, lower_bound: bool, target: float | None) -> str:
    if not math.isfinite(ratio):
        return "no ratio"
    if target is None:
        return "reported"
    if ratio >= target:
        return "met"
    return "not shown" if lower_bound else "missed"


def split_targets(analysis: Mapping[str, Any], targets: Mapping[str, float] = SPLIT_TARGETS,
                  adaptive: Sequence[str] = ADAPTIVE, splits: Sequence[str] = GREEN,
                  goodput_aims: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """The split's targets judged from a ``where_split_pays`` analysis, one row per target:
    ``target`` (words), ``aim`` (words) and its ``threshold`` (a ratio, or seconds for the
    decision time; None where only reported), ``measured`` (words), ``verdict`` and the
    numbers (``value``, ``low``, ``high``).

    - For each workload and SLO of ``vs_best_peer``: the best of the ``adaptive`` policies'
      highest rate at the target attainment over the best peer's (serial, chunked at its best
      budget), against the aim ``goodput_aims`` gives that SLO (default: ``smooth`` at
      ``goodput_vs_best_peer``, ``relaxed`` at ``relaxed_vs_best_peer``); other SLOs are reported. Verdicts: ``met``; ``missed``; ``not shown`` (a lower bound below
      the aim: the peer missed the target even at the lowest rate measured, or the policy met
      it at the highest); ``no ratio`` (the peer met the target at every rate measured).
    - TTFT p50 of each of ``splits`` over serial's at the same workload and rate (every run),
      against ``ttft_p50_vs_serial``: ``met`` when every ratio is within it, ``missed`` when
      none is, else ``partly``.
    - The decode step's slowdown beside a prefill (batch-matched) of ``splits``, against
      ``decode_slowdown``, judged the same way.
    - The policy's decision time, p99 of each adaptive run, against ``decide_p99_s``.
    """
    runs = analysis.get("runs") or {}
    vs = analysis.get("vs_best_peer") or {}
    if not runs or not vs:
        raise ConfigError("give the analysis of measure.analysis.where_split_pays (it has 'runs' and 'vs_best_peer')")
    aims = goodput_aims if goodput_aims is not None else {"smooth": targets["goodput_vs_best_peer"],
                                                          "relaxed": targets["relaxed_vs_best_peer"]}
    rows: list[dict[str, Any]] = []
    for key, entry in vs.items():
        family, slo = key.split("/")
        aim = aims.get(slo)
        cands = [(st, entry[st]) for st in adaptive if st in entry]
        finite = [(st, e) for st, e in cands if e["ratio"] is not None and math.isfinite(e["ratio"])]
        peer = f"{entry['best_peer']} ({_rate_words(entry['best_peer_rate'], entry['best_peer_status'])})"
        if finite:
            st, best = max(finite, key=lambda p: p[1]["ratio"])
            ratio, bound = float(best["ratio"]), bool(best["ratio_is_lower_bound"])
            measured = (f"{'≥ ' if bound else ''}{ratio:.3g}x: {st} "
                        f"({_rate_words(best['rate'], best['status'])}) over {peer}")
        else:
            st, ratio, bound = None, math.nan, False
            measured = f"no ratio: the best peer, {peer}, met the target at every rate measured"
        rows.append({"target": f"adaptive split's max rate over the best peer's, {family}, {slo} SLO",
                     "aim": f"≥ {aim:g}x" if aim is not None else "reported", "threshold": aim, "measured": measured,
                     "verdict": _ratio_verdict(ratio, bound, aim), "value": ratio, "low": ratio, "high": ratio,
                     "lower_bound": bound, "best": st})
    serial = {(r["workload"], r["rate"]): r for r in runs.values() if r["step"] == "serial"}
    ttft = {st: [r["ttft_p50_s"] / serial[(r["workload"], r["rate"])]["ttft_p50_s"]
                 for r in runs.values() if r["step"] == st and (r["workload"], r["rate"]) in serial]
            for st in splits}
    rows.append(_bound_row("TTFT p50 of the split over serial's (same workload and rate)",
                           targets["ttft_p50_vs_serial"], ttft))
    slow = {st: [r["decode_slowdown"] for r in runs.values() if r["step"] == st
                 and r.get("decode_slowdown") is not None and math.isfinite(r["decode_slowdown"])] for st in splits}
    rows.append(_bound_row("decode step slowdown beside a prefill (batch-matched)", targets["decode_slowdown"], slow))
    decide = [r["decide_p99_s"] for r in runs.values() if r["step"] in adaptive and r.get("decide_p99_s") is not None]
    if decide:
        worst = max(decide)
        rows.append({"target": "policy decision time, p99 per run", "aim": f"≤ {targets['decide_p99_s'] * 1e3:g} ms",
                     "threshold": targets["decide_p99_s"],
                     "measured": f"at most {worst * 1e3:.3g} ms over {len(decide)} runs",
                     "verdict": "met" if worst <= targets["decide_p99_s"] else "missed", "value": worst,
                     "low": min(decide), "high": worst, "lower_bound": False, "best": None})
    return rows


def _bound_row(what: str, aim: float, values: Mapping[str, list[float]]) -> dict[str, Any]:
    every = [v for vs in values.values() for v in vs]
    if not every:
        raise ConfigError(f"no run of {sorted(values)} has the numbers for: {what}")
    within = sum(v <= aim for v in every)
    verdict = "met" if within == len(every) else ("missed" if within == 0 else "partly")
    detail = "; ".join(f"{st} {_range(vs)}" for st, vs in values.items() if vs)
    return {"target": what, "aim": f"≤ {aim:g}x", "threshold": aim, "measured": f"{_range(every)} ({detail})",
            "verdict": verdict, "value": max(every), "low": min(every), "high": max(every), "lower_bound": False,
            "best": None}


def _rate_words(rate, status: str) -> str:
    if status == "below_lowest":
        return "below 90% at every rate measured"
    if status == "at_least":
        return f"≥ {rate:.3g} req/s"
    return f"{rate:.3g} req/s"


# ---- the paper's own setup -----------------------------------------------------------------

def setup_row(run, cell: str, startup_s: float | None = None, warmup_s: float | None = None) -> dict[str, Any]:
    """One configuration of the paper's setup as ``benchmarks/paper_setup.py`` records it:
    start-up and warm-up (seconds, None when not timed apart), the measured run's wall time,
    throughput, and each request's mean and median end-to-end latency."""
    table = run.requests
    return {"cell": cell, "startup_s": startup_s, "warmup_s": warmup_s, "wall_s": run.wall_s,
            "throughput_tok_s": run.summary()["throughput_tok_s"], "e2e_mean_s": float(table["e2e_s"].mean()),
            "e2e_p50_s": float(table["e2e_s"].median()), "requests": len(table)}


def paper_setup_rows(model, workload, batch_size: int, processes: Sequence[int] = (2, 4),
                     mps: Sequence[bool] = (False,), progress: bool = False) -> list[dict[str, Any]]:
    """The paper's setup measured as ``benchmarks/paper_setup.py`` measures it: ``sequential``
    (one ``generate()`` loop over static batches of ``batch_size``, in this process: no
    start-up) and ``replicas-N[-mps]`` (N processes of ``generate()``, each on its share of the
    requests) for every N of ``processes`` and every choice of ``mps``. Each is timed three
    ways, apart: the session's start-up (spawning the processes, loading and sharing the
    model), a warm-up run (one static batch per replica, other prompts), and the measured run
    of ``workload``. Returns ``setup_row`` dicts (the Run of each under ``"run"``)."""
    import time

    import splitlab
    from splitlab.modes.replicas import ReplicaSession
    from splitlab.workload import fixed_batch

    lengths = sorted({len(r.prompt_ids) for r in workload.requests})
    out_len = max(r.max_new_tokens for r in workload.requests)

    def warm(n: int):
        return fixed_batch(max(1, n) * batch_size, lengths[-1], out_len, model=model, seed=1, name="warm-up")

    start = time.perf_counter()
    splitlab.run(warm(1), model, mode="hf-generate", batch_size=batch_size, progress=False)
    warm_s = time.perf_counter() - start
    run = splitlab.run(workload, model, mode="hf-generate", batch_size=batch_size, progress=progress)
    rows = [{**setup_row(run, "sequential", 0.0, warm_s), "run": run}]
    for n in processes:
        for on in mps:
            start = time.perf_counter()
            with ReplicaSession(model, num_replicas=n, engine="generate", mps=on, batch_size=batch_size) as session:
                startup_s = time.perf_counter() - start
                start = time.perf_counter()
                session.run(warm(n), progress=False)
                warm_s = time.perf_counter() - start
                run = session.run(workload, progress=progress)
            rows.append({**setup_row(run, f"replicas-{n}{'-mps' if on else ''}", startup_s, warm_s), "run": run})
    return rows


def paper_setup_table(rows: Iterable[Mapping[str, Any]], baseline: str = "sequential"):
    """The rows of the paper's setup with its figures against ``baseline`` (sequential
    ``generate()``): ``latency_reduction`` (1 - mean E2E / the baseline's, as the benchmark
    records it), ``wall_reduction`` (1 - wall time / the baseline's: the batch's latency),
    ``throughput_ratio`` and, where start-up was timed, ``reduction_with_startup`` (1 -
    (start-up + warm-up + wall) / the baseline's: the paper timed its processes' start-up
    inside the run, and a start-up of seconds against a run of tenths makes this a large
    negative fraction). Also ``processes`` and ``mps`` read from the cell name
    (``replicas-4-mps``)."""
    import pandas as pd

    df = pd.DataFrame([dict(r) for r in rows])
    if not len(df) or baseline not in set(df["cell"]):
        raise ConfigError(f"the rows must include the baseline {baseline!r}; got {list(df.get('cell', []))}")
    base = df.set_index("cell").loc[baseline]
    df["processes"] = [1 if c == baseline else int(c.split("-")[1]) for c in df["cell"]]
    df["mps"] = [c.endswith("-mps") for c in df["cell"]]
    df["latency_reduction"] = 1 - df["e2e_mean_s"] / base["e2e_mean_s"]
    df["wall_reduction"] = 1 - df["wall_s"] / base["wall_s"]
    df["throughput_ratio"] = df["throughput_tok_s"] / base["throughput_tok_s"]
    if df["startup_s"].notna().all() and df["warmup_s"].notna().all():
        total = df["startup_s"] + df["warmup_s"] + df["wall_s"]
        df["reduction_with_startup"] = 1 - total / float(total[df["cell"] == baseline].iloc[0])
    return df


def paper_claims(table, paper: Mapping[str, float] = PAPER_FIGURES) -> list[dict[str, Any]]:
    """The paper's figures beside the same figures of ``paper_setup_table``: 2 processes'
    latency reduction (MPS off and on), 4 processes' throughput ratio, and the best of each
    over every configuration. One row each: ``claim``, ``paper``, ``measured`` (words),
    ``value`` and ``cell``."""
    t = table.set_index("cell")
    rows = []

    def add(claim: str, paper_value: str, column: str, cells: Sequence[str], fmt) -> None:
        for cell in cells:
            if cell in t.index:
                v = float(t.loc[cell, column])
                rows.append({"claim": claim, "paper": paper_value, "cell": cell, "value": v, "measured": fmt(v)})

    pct, times = "{:.1%}".format, "{:.2f}x".format
    add("latency reduction, 2 processes vs sequential", f"{paper['latency_reduction']:.1%}", "latency_reduction",
        ("replicas-2", "replicas-2-mps"), pct)
    add("throughput, 4 processes vs sequential", f"{paper['throughput_ratio_4']:.2g}x", "throughput_ratio",
        ("replicas-4", "replicas-4-mps"), times)
    replicas = t[t.index != "sequential"]
    if len(replicas):
        add("best throughput vs sequential", f"up to {paper['throughput_ratio_max']:.3g}x", "throughput_ratio",
            (replicas["throughput_ratio"].idxmax(),), times)
        add("best latency reduction vs sequential", f"up to {paper['latency_reduction_max']:.1%}",
            "latency_reduction", (replicas["latency_reduction"].idxmax(),), pct)
    return rows


# ---- the SM split over time ------------------------------------------------------------------

def sm_choices(run):
    """One row per SM count the decode steps of ``run`` ran on (``plots.step_sms``: the
    adaptive green split's per-step record, a static green split's partition): ``decode_sms``,
    ``decode_steps``, ``share`` of the decode steps, ``batch_min`` / ``batch_median`` /
    ``batch_max`` (requests per step), and ``beside_prefill``: the share of those steps that
    overlapped a prefill step in time. Empty when no step's SMs are known."""
    import numpy as np
    import pandas as pd

    from splitlab.present.plots import step_sms

    pre = sorted((s.start_s, s.end_s) for s in run.steps if s.worker == "prefill")
    starts = np.array([a for a, _ in pre])
    ends = np.maximum.accumulate(np.array([b for _, b in pre])) if pre else np.array([])
    rows = []
    for s, sms in zip(run.steps, step_sms(run)):
        if s.worker != "decode" or sms is None:
            continue
        k = int(np.searchsorted(starts, s.end_s))  # prefill steps starting before this step ends
        rows.append({"decode_sms": sms, "batch": len(s.request_ids), "beside": bool(k and ends[k - 1] > s.start_s)})
    cols = ["decode_sms", "decode_steps", "share", "batch_min", "batch_median", "batch_max", "beside_prefill"]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows)
    out = df.groupby("decode_sms").agg(decode_steps=("batch", "size"), batch_min=("batch", "min"),
                                       batch_median=("batch", "median"), batch_max=("batch", "max"),
                                       beside_prefill=("beside", "mean")).reset_index()
    out.insert(2, "share", out["decode_steps"] / out["decode_steps"].sum())
    return out[cols]
