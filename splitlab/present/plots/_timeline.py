"""The step timeline (each worker's steps, the decode batch, NVML) and the SM split over
time (``step_sms``, ``total_sms``)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from splitlab.present.plots._base import PHASE_COLORS, _go, rounded, template
from splitlab.present.results import run_label

# back-to-back steps of one worker closer than this are drawn as one span on a timeline
MERGE_GAP_S = 0.002


def _spans(steps, gap_s: float) -> list[list[Any]]:
    """Runs of one worker's back-to-back steps of one kind (each next one starting within
    ``gap_s`` of the last one's end), in time order."""
    runs: list[list[Any]] = []
    for s in sorted(steps, key=lambda s: (s.worker, s.start_s)):
        last = runs[-1][-1] if runs else None
        if last is not None and last.worker == s.worker and s.start_s - last.end_s <= gap_s:
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


def _ids_text(ids: Sequence[int], max_ids: int) -> str:
    text = ", ".join(str(i) for i in ids[:max_ids])
    return text + (f", … ({len(ids)} in all)" if len(ids) > max_ids else "")


def _step_bars(go, steps, kind: str, max_ids: int, gap_s: float):
    """One bar per prefill step; one bar per run of back-to-back decode (or mixed) steps."""
    if kind == "prefill":
        groups = [[s] for s in steps]
    else:
        groups = _spans(steps, gap_s)
    hover = []
    for g in groups:
        t0, t1 = g[0].start_s, g[-1].end_s
        if len(g) == 1:
            s = g[0]
            hover.append(f"{s.worker}: {kind} {t0:.4f}–{t1:.4f} s ({(t1 - t0) * 1e3:.3g} ms)<br>{s.num_tokens} "
                         f"tokens, {len(s.request_ids)} requests<br>ids: {_ids_text(s.request_ids, max_ids)}")
        else:
            sizes = [len(s.request_ids) for s in g]
            ms = np.mean([s.end_s - s.start_s for s in g]) * 1e3
            hover.append(f"{g[0].worker}: {len(g)} {kind} steps {t0:.3f}–{t1:.3f} s<br>{min(sizes)}–{max(sizes)} "
                         f"requests per step, {ms:.3g} ms per step on average")
    return go.Bar(y=[g[0].worker for g in groups], x=rounded([g[-1].end_s - g[0].start_s for g in groups], 5),
                  base=rounded([g[0].start_s for g in groups], 6), orientation="h", name=kind,
                  marker=dict(color=PHASE_COLORS.get(kind, "#333333"), line=dict(width=0)),
                  hovertext=hover, hoverinfo="text")


def _batch_line(steps, gap_s: float) -> tuple[list[float], list[int]]:
    """Corners of a step line of requests per step over time: the size at each step's start
    where it changes, and 0 wherever the worker paused longer than ``gap_s``."""
    xs: list[float] = []
    ys: list[int] = []
    end = None
    for s in sorted(steps, key=lambda s: s.start_s):
        size = len(s.request_ids)
        if end is not None and s.start_s - end > gap_s:
            xs.append(end)
            ys.append(0)
        if not ys or ys[-1] != size:
            xs.append(s.start_s)
            ys.append(size)
        end = s.end_s if end is None else max(end, s.end_s)
    if end is not None:
        xs.append(end)
        ys.append(0)
    return rounded(xs, 6), ys


def _batch_traces(go, run, gap_s: float) -> list[Any]:
    decoding = [s for s in run.steps if s.kind in ("decode", "mixed")]
    workers = sorted({s.worker for s in decoding})
    traces = []
    for worker in workers:
        x, y = _batch_line([s for s in decoding if s.worker == worker], gap_s)
        name = "requests per decode step" + (f" — {worker}" if len(workers) > 1 else "")
        traces.append(go.Scatter(x=x, y=y, mode="lines", line_shape="hv", name=name,
                                 fill="tozeroy" if len(workers) == 1 else None,
                                 line=dict(width=1, color=PHASE_COLORS["decode"] if len(workers) == 1 else None),
                                 hovertemplate=f"{worker}: %{{y}} requests at %{{x:.3f}} s<extra></extra>"))
    return traces


def step_sms(run) -> list[int | None]:
    """The SMs of the partition each of ``run.steps`` ran on: ``StepTrace.sms`` (the adaptive
    green split records it per step), else, for a static green split, its worker's partition
    from the run's config (``prefill_sms`` / ``decode_sms``); None where neither is known
    (one stream, MPS shares, streams, processes)."""
    cfg = run.config
    static = {"prefill": getattr(cfg, "prefill_sms", None), "decode": getattr(cfg, "decode_sms", None)}
    return [s.sms if s.sms is not None else static.get(s.worker) for s in run.steps]


def total_sms(run) -> int | None:
    """The SM count of the run's GPU (its environment, else its green-context record)."""
    n = (run.env or {}).get("sm_count") or (getattr(run.config, "green", None) or {}).get("total_sms")
    return int(n) if n else None


def _sms_line(steps: Sequence[tuple[Any, int]], gap_s: float) -> tuple[list[float], list[int | None]]:
    """Corners of a step line of SMs per step over one worker's steps ((step, sms) pairs, by
    start): the SM count at each step's start where it changes, held to the step's end, and a
    break (None) wherever the worker paused longer than ``gap_s``: an idle worker holds no
    partition."""
    xs: list[float] = []
    ys: list[int | None] = []
    end = None
    for s, sms in sorted(steps, key=lambda p: p[0].start_s):
        if end is not None and s.start_s - end > gap_s:
            xs += [end, end]
            ys += [ys[-1], None]
        if not ys or ys[-1] != sms:
            xs.append(s.start_s)
            ys.append(sms)
        end = s.end_s if end is None else max(end, s.end_s)
    if end is not None:
        xs.append(end)
        ys.append(ys[-1])
    return rounded(xs, 6), ys


def _sms_traces(go, run, gap_s: float) -> list[Any]:
    """One step line per worker of the SMs its steps ran on (none when no step's is known)."""
    known = [(s, n) for s, n in zip(run.steps, step_sms(run)) if n is not None]
    traces = []
    for worker in sorted({s.worker for s, _ in known}, key=lambda w: (w != "decode", w)):
        x, y = _sms_line([(s, n) for s, n in known if s.worker == worker], gap_s)
        traces.append(go.Scatter(x=x, y=y, mode="lines", line_shape="hv", name=f"{worker} SMs",
                                 line=dict(width=1.5, color=PHASE_COLORS.get(worker)), connectgaps=False,
                                 hovertemplate=f"{worker}: %{{y}} SMs from %{{x:.3f}} s<extra></extra>"))
    return traces


def timeline(run, title: str | None = None, max_ids: int = 16, merge_gap_s: float = MERGE_GAP_S):
    """Each worker's steps over time, the decode batch under them, the SM split, NVML last.

    Row 1: one bar per prefill step; back-to-back decode (and mixed) steps of a worker, each
    starting within ``merge_gap_s`` of the last one's end, as one bar (hover: how many steps,
    their batch sizes, the mean step time). Row 2: requests per decode (or mixed) step, a
    step line, dropping to 0 where the worker paused. Row 3, when the run knows the SMs its
    steps ran on (``step_sms``: the adaptive green split per step, a static green split from
    its config): the SMs of each worker's partition, a step line per worker, broken where the
    worker was idle. Last, when ``run.monitor`` holds NVML samples: SM and memory-controller
    utilisation (%). One time axis for all rows.
    """
    go = _go()
    from plotly.subplots import make_subplots

    samples = [s for s in (run.monitor or []) if s.get("t_s") is not None]
    band = _batch_traces(go, run, merge_gap_s)
    sms = _sms_traces(go, run, merge_gap_s)
    rows = 1 + bool(band) + bool(sms) + bool(samples)
    heights = {1: [1.0], 2: [0.62, 0.38], 3: [0.5, 0.25, 0.25], 4: [0.4, 0.2, 0.2, 0.2]}[rows]
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, row_heights=heights, vertical_spacing=0.07)
    workers = sorted({s.worker for s in run.steps})
    for kind in ("prefill", "mixed", "decode"):
        steps = [s for s in run.steps if s.kind == kind]
        if steps:
            fig.add_trace(_step_bars(go, steps, kind, max_ids, merge_gap_s), row=1, col=1)
    fig.update_yaxes(title_text="worker", type="category", categoryorder="array", categoryarray=workers, row=1, col=1)
    row = 1
    if band:
        row += 1
        for trace in band:
            fig.add_trace(trace, row=row, col=1)
        fig.update_yaxes(title_text="requests per step", rangemode="tozero", row=row, col=1)
    if sms:
        row += 1
        for trace in sms:
            fig.add_trace(trace, row=row, col=1)
        total = total_sms(run)
        top = max([total or 0] + [v for t in sms for v in t.y if v is not None])
        fig.update_yaxes(title_text=f"SMs{f' (of {total})' if total else ''}", range=[0, top * 1.08],
                         row=row, col=1)
    if samples:
        t = rounded([s["t_s"] for s in samples], 6)
        for key, name, color in (("sm_util_pct", "SM util (%)", "#4C78A8"),
                                 ("mem_util_pct", "memory util (%)", "#E45756")):
            fig.add_trace(go.Scatter(x=t, y=[s.get(key) for s in samples], mode="lines", name=name,
                                     line=dict(color=color)), row=rows, col=1)
        fig.update_yaxes(title_text="utilisation (%)", range=[0, 105], row=rows, col=1)
    fig.update_xaxes(title_text="time since run start (s)", row=rows, col=1)
    fig.update_layout(barmode="overlay", template=template(), title=title or f"Timeline — {run_label(run)}",
                      bargap=0.3, height=220 + 40 * len(workers) + 150 * (rows - 1))
    return fig
