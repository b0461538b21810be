"""Pure functions from data to plotly Figures (testable without a browser).

Every figure has axis titles with units (``splitlab.present.tables.column_title``: the one
mapping from a column to its title and unit) and named traces. Inputs are the project's
own objects: a ``Run`` (or several), a summary table (``load_results`` / ``summaries_table``),
a profile table (``profile_phases``) with its ``Ceilings``. plotly is imported inside each
function, so the core imports where plotly is absent.

Figures stay small, in a notebook and in a report: a CDF keeps at most ``CDF_POINTS`` of
its corners (rounded to four significant figures), a timeline draws runs of back-to-back
decode steps as one span and the decode batch as a step line, and every figure carries the
lean ``template()`` rather than plotly_white's defaults for every trace type.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np

from splitlab.errors import SplitlabError
from splitlab.present.results import run_label
from splitlab.present.tables import column_info, column_title, format_value  # noqa: F401 (plots.column_title)

PHASE_COLORS = {
    "prefill": "#4C78A8",
    "decode": "#F58518",
    "mixed": "#54A24B",
    "queue": "#BAB0AC",
    "handoff": "#B279A2",
    "unsplit": "#9D755D",
}
ROOF_COLORS = {"memory": "#E45756", "compute": "#72B7B2", "datasheet": "#888888"}
METRICS = {
    "ttft_s": "time to first token",
    "tpot_s": "time per output token",
    "e2e_s": "end-to-end latency",
    "itl": "inter-token latency",
}
# Summary columns where smaller is better (latencies); everything else (throughput,
# goodput, attainment) is better when larger.
_LOWER_IS_BETTER = ("ttft", "tpot", "e2e", "itl", "wall_s", "peak_memory")
# most corners of an empirical CDF a trace keeps (a run pools ~40k token gaps)
CDF_POINTS = 200
# back-to-back steps of one worker closer than this are drawn as one span on a timeline
MERGE_GAP_S = 0.002


def _go():
    import plotly.graph_objects as go

    return go


_TABLES: list[dict[int, Any]] = []


@contextlib.contextmanager
def shared_tables():
    """Within it, each run's ``requests`` table is built once for every figure drawn (a
    report draws several figures of each run; the table takes ~0.1 s per 160 requests).
    The runs must not change inside it."""
    _TABLES.append({})
    try:
        yield
    finally:
        _TABLES.pop()


def _requests(run):
    if not _TABLES:
        return run.requests
    cache = _TABLES[-1]
    if id(run) not in cache:
        cache[id(run)] = (run, run.requests)  # the run is held: its id stays its own
    return cache[id(run)][1]


_TEMPLATE: list[Any] = []


def template():
    """plotly_white's look for 2-D charts, without its defaults for every trace type (a
    figure carries its template: plotly_white is ~7 kB in every figure, this one ~1 kB).
    Bars get no outline."""
    if not _TEMPLATE:
        import plotly.io as pio

        white = pio.templates["plotly_white"].layout
        keep = ("colorway", "font", "hovermode", "hoverlabel", "paper_bgcolor", "plot_bgcolor", "xaxis", "yaxis",
                "title", "shapedefaults", "annotationdefaults", "autotypenumbers")
        _TEMPLATE.append(_go().layout.Template(layout={k: white[k] for k in keep}))
    return _TEMPLATE[0]


def rounded(values, digits: int = 4) -> list[float]:
    """``values`` rounded to ``digits`` significant figures, as plain floats (short in JSON)."""
    a = np.asarray(values, dtype=float)
    if not a.size:
        return []
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(np.isfinite(a) & (a != 0), np.floor(np.log10(np.abs(a))), 0.0)
    exp = (digits - 1 - mag).astype(int)
    up = 10.0 ** np.clip(exp, 0, None)
    down = 10.0 ** np.clip(-exp, 0, None)
    out = np.where(exp >= 0, np.round(a * up) / up, np.round(a / down) * down)
    return [float(v) for v in out]


# ---- roofline ------------------------------------------------------------------------------

def roofline(profile_df, ceilings, datasheet=None, title: str | None = None, labels: bool = False):
    """Log-log roofline: measured memory and compute roofs, prefill and decode points.

    ``profile_df``: the table of ``profile_phases`` (columns phase, batch, tokens,
    intensity, achieved_flops_s, ...). ``ceilings``: a ``Ceilings`` (or its dict). One trace
    per phase and length (``prefill L=512``, ``decode C=2048``; `` · model · backend`` added
    when the table holds several): blue shades for prefill, orange for decode, darker for
    longer; marker size grows with the batch; the symbol tells models/backends apart; hover
    shows every number. ``labels=True`` also writes ``B=..`` beside each point.
    ``datasheet``: a ``GPUSpec`` drawn as a dashed roof for comparison.
    """
    go = _go()
    peak, bw = _ceiling_values(ceilings)
    ridge = peak / bw
    df = profile_df[np.isfinite(profile_df["achieved_flops_s"].astype(float))] if len(profile_df) else profile_df
    intens = [float(v) for v in df["intensity"]] if len(df) else []
    lo = min(intens + [ridge]) / 4
    hi = max(intens + [ridge]) * 4
    if datasheet is not None:
        lo = min(lo, datasheet.ridge / 4)
        hi = max(hi, datasheet.ridge * 4)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[lo, ridge], y=[bw * lo, peak], mode="lines",
                             name=f"memory roof ({bw / 1e12:.3g} TB/s measured)",
                             line=dict(color=ROOF_COLORS["memory"], width=2),
                             hovertemplate="memory roof: %{y:.3s}FLOP/s at %{x:.3g} FLOP/B<extra></extra>"))
    fig.add_trace(go.Scatter(x=[ridge, hi], y=[peak, peak], mode="lines",
                             name=f"compute roof ({peak / 1e12:.3g} TFLOP/s measured; ridge {ridge:.3g} FLOP/B)",
                             line=dict(color=ROOF_COLORS["compute"], width=2),
                             hovertemplate="compute roof: %{y:.3s}FLOP/s<extra></extra>"))
    if datasheet is not None:
        fig.add_trace(go.Scatter(
            x=[lo, datasheet.ridge, hi], y=[datasheet.bytes_s * lo, datasheet.flops_s, datasheet.flops_s],
            mode="lines", name=f"datasheet roof ({datasheet.name}: {datasheet.bf16_tflops:g} TFLOP/s, "
                               f"{datasheet.mem_tb_s:g} TB/s)",
            line=dict(color=ROOF_COLORS["datasheet"], dash="dash", width=1)))
    if len(df):
        extra = [c for c in ("model", "backend") if c in df.columns and df[c].nunique() > 1]
        order = {"prefill": 0, "mixed": 1, "decode": 2}
        parts = [((k if isinstance(k, tuple) else (k,)), p) for k, p in df.groupby(["phase", "tokens"] + extra,
                                                                                    sort=False)]
        parts.sort(key=lambda kp: (order.get(kp[0][0], 3), kp[0][1]))  # stable: models keep their order
        combos = list(dict.fromkeys(k[2:] for k, _ in parts))
        lengths = {ph: sorted({k[1] for k, _ in parts if k[0] == ph}) for ph in {k[0] for k, _ in parts}}
        for key, part in parts:
            phase, n = key[0], int(key[1])
            length = "L" if phase == "prefill" else "C"
            name = f"{phase} {length}={n}" + "".join(f" · {k}" for k in key[2:])
            shades = _SHADES.get(phase, ["#333333"])
            color = _shade(shades, lengths[phase].index(key[1]), len(lengths[phase]))
            text = [f"B={int(b)}" for b in part["batch"]]
            hover = [
                f"{phase} B={int(b)} {length}={n}" + "".join(f" · {k}" for k in key[2:])
                + f"<br>{t * 1e3:.4g} ms, {tps:.4g} tok/s<br>{af / 1e12:.3g} TFLOP/s, {ab / 1e12:.3g} TB/s"
                f"<br>intensity {i:.3g} FLOP/B ({bound}-bound)<br>{fr:.0%} of the roof"
                for b, t, tps, af, ab, i, bound, fr in zip(
                    part["batch"], part["time_s"], part["tokens_per_s"], part["achieved_flops_s"],
                    part["achieved_bytes_s"], part["intensity"], part["bound"], part["frac_of_roof"])
            ]
            fig.add_trace(go.Scatter(
                x=part["intensity"].astype(float).tolist(), y=part["achieved_flops_s"].astype(float).tolist(),
                mode="markers+text" if labels else "markers", name=name, text=text, textposition="top center",
                textfont=dict(size=9), hovertext=hover, hoverinfo="text",
                marker=dict(size=[7 + 3 * math.log2(max(1, int(b))) for b in part["batch"]], color=color,
                            opacity=0.9, symbol=_SYMBOLS[combos.index(key[2:]) % len(_SYMBOLS)],
                            line=dict(width=1, color="white"))))
    dev = getattr(ceilings, "device_name", None) or (ceilings.get("device_name") if isinstance(ceilings, Mapping) else None)
    fig.update_layout(
        title=title or f"Roofline{f' — {dev}' if dev else ''}",
        xaxis=dict(type="log", title=dict(text="arithmetic intensity (FLOP/byte)")),
        yaxis=dict(type="log", title=dict(text="achieved FLOP/s"), exponentformat="SI"),
        legend=dict(title=dict(text="marker size = batch")), template=template(),
    )
    return fig


_SHADES = {
    "prefill": ["#9ecae1", "#6baed6", "#3182bd", "#08519c", "#08306b"],
    "decode": ["#fdae6b", "#fd8d3c", "#e6550d", "#a63603", "#7f2704"],
    "mixed": ["#a1d99b", "#41ab5d", "#006d2c"],
}
def _shade(shades: list[str], rank: int, count: int) -> str:
    """Spread ``count`` lengths over the darker shades (the lightest is too pale alone)."""
    if count <= 1:
        return shades[len(shades) // 2]
    return shades[int(round(1 + rank * (len(shades) - 2) / (count - 1)))]


_SYMBOLS = ["circle", "diamond", "square", "triangle-up", "cross", "x"]


def _ceiling_values(ceilings) -> tuple[float, float]:
    if isinstance(ceilings, Mapping):
        return float(ceilings["matmul_flops_s"]), float(ceilings["copy_bytes_s"])
    return float(ceilings.matmul_flops_s), float(ceilings.copy_bytes_s)


# ---- phase breakdowns ------------------------------------------------------------------------

def _segments(run) -> dict[str, np.ndarray]:
    """Per-request seconds of queue, prefill, prefill-end-to-first-token, decode."""
    t = _requests(run)
    queue = t["queue_s"].to_numpy(float)
    prefill = t["prefill_s"].to_numpy(float)
    ttft = t["ttft_s"].to_numpy(float)
    decode = t["decode_s"].to_numpy(float)
    split = np.isfinite(queue) & np.isfinite(prefill)
    handoff = np.where(split, np.clip(ttft - queue - prefill, 0.0, None), 0.0)
    return {
        "ids": t["id"].to_numpy(),
        "queue": np.where(split, queue, 0.0),
        "prefill": np.where(split, prefill, 0.0),
        "handoff": np.nan_to_num(handoff),
        "unsplit": np.where(split, 0.0, np.nan_to_num(ttft)),
        "decode": np.nan_to_num(decode),
    }


_SEGMENT_NAMES = {
    "queue": "queue",
    "prefill": "prefill",
    "handoff": "prefill end → first token",
    "unsplit": "first token (queue + prefill, not recorded apart)",
    "decode": "decode",
}


def phase_breakdown(run, title: str | None = None):
    """Per-request stacked bars: queue, prefill and decode time (seconds after arrival).

    The bars add up to each request's E2E: "prefill end → first token" appears when a
    first token came later than its prefill ended, and a single "first token" segment when
    the run did not record prefill start/end.
    """
    go = _go()
    seg = _segments(run)
    fig = go.Figure()
    x = [str(i) for i in seg["ids"]]
    for key in ("queue", "prefill", "handoff", "unsplit", "decode"):
        values = seg[key]
        if key in ("handoff", "unsplit") and not np.any(values > 1e-9):
            continue
        fig.add_trace(go.Bar(x=x, y=rounded(values), name=_SEGMENT_NAMES[key], marker_color=PHASE_COLORS[key],
                             hovertemplate=f"request %{{x}}: {_SEGMENT_NAMES[key]} %{{y:.4g}} s<extra></extra>"))
    fig.update_layout(barmode="stack", template=template(), bargap=0.05,
                      title=title or f"Where each request's time went — {run_label(run)}",
                      xaxis=dict(title=dict(text="request id"), type="category"),
                      yaxis=dict(title=dict(text="time since arrival (s)")))
    return fig


def phase_breakdown_runs(runs, agg: str = "mean", title: str | None = None):
    """One stacked bar per run: the mean (or ``agg="sum"``) per-request queue, prefill, decode time."""
    go = _go()
    if agg not in ("mean", "sum"):
        raise SplitlabError(f"agg must be 'mean' or 'sum', got {agg!r}")
    labels, segs = _labelled(runs), []
    for _, run in labels:
        s = _segments(run)
        segs.append({k: float(getattr(np, agg)(v)) if len(v) else 0.0 for k, v in s.items() if k != "ids"})
    fig = go.Figure()
    names = [lab for lab, _ in labels]
    for key in ("queue", "prefill", "handoff", "unsplit", "decode"):
        values = [s[key] for s in segs]
        if key in ("handoff", "unsplit") and not any(v > 1e-9 for v in values):
            continue
        fig.add_trace(go.Bar(x=names, y=rounded(values), name=_SEGMENT_NAMES[key], marker_color=PHASE_COLORS[key],
                             hovertemplate=f"%{{x}}: {_SEGMENT_NAMES[key]} %{{y:.4g}} s<extra></extra>"))
    what = "mean per request" if agg == "mean" else "total over requests"
    fig.update_layout(barmode="stack", template=template(), title=title or f"Phase time per run ({what})",
                      height=max(380, 300 + 9 * max((len(n) for n in names), default=0)),
                      xaxis=dict(title=dict(text="run"), tickangle=-30 if len(names) > 4 else 0),
                      yaxis=dict(title=dict(text=f"time ({what}, s)")))
    return fig


# ---- timeline ------------------------------------------------------------------------------------

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


# ---- latency distributions ----------------------------------------------------------------------------

def cdf_points(values, max_points: int = CDF_POINTS) -> tuple[list[float], list[float]]:
    """Corners of the empirical CDF of ``values``: (value, fraction at or below it), from
    (smallest, 0). Past ``max_points`` values, a subset of the corners: evenly spaced in
    rank, with the largest ranks denser (the tail: p99, p99.9 and the maximum are kept), so
    the step line drawn through them is within 1/(0.75·max_points) of the full one. Values
    are rounded to four significant figures, fractions to four decimals."""
    v = np.sort(np.asarray(values, dtype=float))
    v = v[np.isfinite(v)]
    n = len(v)
    if not n:
        return [], []
    if n <= max_points:
        idx = np.arange(n)
    else:
        body = np.linspace(0, n - 1, max(2, max_points * 3 // 4))
        tail = n - 1 - np.geomspace(1, max(1.0, 0.1 * n), max(1, max_points - len(body)))
        idx = np.unique(np.concatenate([body, tail]).round().astype(int))
    x = rounded(v[idx])
    y = np.round((idx + 1) / n, 4).tolist()
    return [x[0]] + x, [0.0] + y


def _cdf_xy(run, metric: str, max_points: int = CDF_POINTS) -> tuple[list[float], list[float]]:
    values = run.itl_gaps() if metric == "itl" else _requests(run)[metric].dropna().to_numpy(float)
    return cdf_points(values, max_points)


def latency_cdf(runs, metric: str = "ttft_s", title: str | None = None, max_points: int = CDF_POINTS):
    """Empirical CDFs of a latency, one trace per run (named by mode, backend, shares and rate).

    ``metric``: ``"ttft_s"``, ``"tpot_s"``, ``"e2e_s"`` (one value per request) or
    ``"itl"`` (every gap between consecutive tokens, all requests pooled; log time axis).
    ``runs``: a list (traces named by ``legend_label``) or a ``{name: run}`` mapping (your
    names). Each trace starts at (smallest value, 0) and steps up at every value it keeps
    (``cdf_points``: at most ``max_points``).
    """
    go = _go()
    _check_metric(metric)
    fig = go.Figure()
    for i, (label, run) in enumerate(_labelled(runs)):
        x, y = _cdf_xy(run, metric, max_points)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", line_shape="hv", name=label,
                                 line=dict(color=_color(i), width=1.5),
                                 hovertemplate=f"{label}<br>%{{x:.4g}} s: %{{y:.1%}}<extra></extra>"))
    unit = "token gaps" if metric == "itl" else "requests"
    fig.update_layout(template=template(), title=title or f"CDF of {METRICS[metric]}",
                      xaxis=dict(title=dict(text=f"{METRICS[metric]} (s)"), type="log" if metric == "itl" else None),
                      yaxis=dict(title=dict(text=f"fraction of {unit}"), range=[0, 1.02]))
    return fig


def latency_cdf_grid(runs, metrics: Sequence[str] = ("ttft_s", "tpot_s", "e2e_s", "itl"), title: str | None = None,
                     max_points: int = CDF_POINTS):
    """The CDFs of several latencies side by side (2 per row), one colour per run, one legend
    (the inter-token gaps on a log time axis: their tail spans two orders of magnitude)."""
    go = _go()
    from plotly.subplots import make_subplots

    for m in metrics:
        _check_metric(m)
    rows = (len(metrics) + 1) // 2
    fig = make_subplots(rows=rows, cols=2, subplot_titles=[f"CDF of {METRICS[m]}" for m in metrics],
                        horizontal_spacing=0.08, vertical_spacing=0.16 if rows > 1 else 0.1)
    for i, (label, run) in enumerate(_labelled(runs)):
        for j, metric in enumerate(metrics):
            x, y = _cdf_xy(run, metric, max_points)
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines", line_shape="hv", name=label, legendgroup=label,
                                     showlegend=j == 0, line=dict(color=_color(i), width=1.5),
                                     hovertemplate=f"{label}<br>%{{x:.4g}} s: %{{y:.1%}}<extra></extra>"),
                          row=j // 2 + 1, col=j % 2 + 1)
    for j, metric in enumerate(metrics):
        unit = "token gaps" if metric == "itl" else "requests"
        fig.update_xaxes(title_text=f"{METRICS[metric]} (s)", type="log" if metric == "itl" else None,
                         row=j // 2 + 1, col=j % 2 + 1)
        fig.update_yaxes(title_text=f"fraction of {unit}", range=[0, 1.02], row=j // 2 + 1, col=j % 2 + 1)
    fig.update_layout(template=template(), title=title or "Latency distributions", height=380 * rows + 80)
    return fig


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise SplitlabError(f"unknown metric {metric!r}; accepted: {', '.join(METRICS)}")


# ---- comparisons ---------------------------------------------------------------------------------------

def lower_is_better(metric: str) -> bool:
    return metric.startswith(_LOWER_IS_BETTER)


def _wide(values: Sequence[float], factor: float = 10.0) -> bool:
    """Positive finite values spanning more than ``factor``× (then a log axis reads better)."""
    v = [float(x) for x in values if x is not None and np.isfinite(x)]
    return bool(v) and min(v) > 0 and max(v) / min(v) > factor


def speedup_bars(summary_df, baseline_mode: str, metric: str | Sequence[str] = "throughput_tok_s",
                 title: str | None = None, key: str | None = None):
    """Bars of each run's speedup over the baseline on ``metric`` (> 1 = better than baseline).

    For latencies (ttft/tpot/e2e/itl columns) the speedup is baseline / value; for rates
    (throughput, goodput, attainment) value / baseline. Rows are grouped by ``key`` (default
    ``label``, else ``mode``) and averaged; the baseline is the mean over rows whose mode or
    label is ``baseline_mode``: give one experiment's rows of one workload. Several metrics:
    one bar per run and metric, grouped by run, the numbers on hover (one metric: on the
    bars). The axis is logarithmic when the speedups span more than 10×.
    """
    go = _go()
    metrics = [metric] if isinstance(metric, str) else list(metric)
    for m in metrics:
        if m not in summary_df.columns:
            raise SplitlabError(f"summary table has no column {m!r}; columns: {list(summary_df.columns)}")
    key = key or ("label" if "label" in summary_df.columns else "mode")
    is_base = (summary_df["mode"] == baseline_mode) if "mode" in summary_df.columns else False
    if "label" in summary_df.columns:
        is_base = is_base | (summary_df["label"] == baseline_mode)
    base_rows = summary_df[is_base]
    if not len(base_rows):
        raise SplitlabError(f"no run of baseline {baseline_mode!r} in the table; modes: "
                            f"{sorted(summary_df['mode'].unique()) if 'mode' in summary_df else []}")
    fig = go.Figure()
    every, ways = [], []
    for k, m in enumerate(metrics):
        base = float(base_rows[m].astype(float).mean())
        means = summary_df.groupby(key, sort=False)[m].mean()
        lower = lower_is_better(m)
        speed = [(base / v if lower else v / base) if v and np.isfinite(v) else math.nan
                 for v in means.to_numpy(float)]
        every += speed
        ways.append("baseline ÷ run" if lower else "run ÷ baseline")
        colors = (["#BAB0AC" if lab in set(base_rows[key]) else "#4C78A8" for lab in means.index]
                  if len(metrics) == 1 else _color(k))
        fig.add_trace(go.Bar(x=[str(lab) for lab in means.index], y=rounded(speed),
                             name=f"{column_info(m).title} ({ways[-1]})",
                             text=[f"{s:.2f}×" if np.isfinite(s) else "n/a" for s in speed] if len(metrics) == 1
                             else None, textposition="outside",
                             marker_color=colors, customdata=[format_value(v, m) for v in means],
                             hovertemplate=f"%{{x}}: %{{y:.3f}}× on {column_info(m).title} "
                                           f"(%{{customdata}})<extra></extra>"))
    fig.add_hline(y=1.0, line_dash="dot", line_color="#555555")
    what = f" on {column_info(metrics[0]).title}" if len(metrics) == 1 else ""
    ytitle = (f"speedup over {baseline_mode}{what} (×, {ways[0]})" if what
              else f"speedup over {baseline_mode} (×, > 1 = better)")
    fig.update_layout(template=template(), barmode="group", title=title or f"Speedup over {baseline_mode}{what}",
                      showlegend=len(metrics) > 1,
                      xaxis=dict(title=dict(text="run"), tickangle=-30 if len(fig.data[0].x) > 4 else 0),
                      yaxis=dict(title=dict(text=ytitle), type="log" if _wide(every) else None))
    return fig


def metric_bars(summary_df, column: str, title: str | None = None, log: bool | None = None):
    """One bar per run (label) of one summary column, e.g. ``ttft_p99_s``, its value written
    on it. ``log``: a logarithmic axis; by default for a latency whose values span more
    than 10× (one stalled run must not flatten the others)."""
    go = _go()
    if column not in summary_df.columns:
        raise SplitlabError(f"summary table has no column {column!r}")
    key = "label" if "label" in summary_df.columns else "mode"
    values = summary_df.groupby(key, sort=False)[column].mean()
    y = values.to_numpy(float)
    if log is None:
        log = column_info(column).unit == "s" and _wide(y)
    fig = go.Figure(go.Bar(x=[str(i) for i in values.index], y=rounded(y), name=column_info(column).title,
                           text=[format_value(v, column) for v in y], textposition="outside",
                           marker_color="#4C78A8",
                           hovertemplate="%{x}: %{text}<extra></extra>"))
    fig.update_layout(template=template(), title=title or column_title(column),
                      xaxis=dict(title=dict(text="run"), tickangle=-30 if len(y) > 4 else 0),
                      yaxis=dict(title=dict(text=column_title(column) + (", log scale" if log else "")),
                                 type="log" if log else None))
    return fig


CORUN_JOBS = (("compute (fraction of solo)", "matmul (compute-bound)", "#72B7B2"),
              ("memory (fraction of solo)", "copy (memory-bound)", "#E45756"))


def corun_fractions(table, title: str | None = None):
    """Two jobs run at once (``benchmarks/mps_corun.py``): each job's rate as a fraction of its
    solo rate, one bar group per way of sharing the GPU. ``table``: indexed by case, with the
    columns of ``CORUN_JOBS``. Stacked, a bar's height is their sum against the 1.0 of taking
    turns; the menu sets the two jobs side by side instead."""
    go = _go()
    missing = [c for c, _, _ in CORUN_JOBS if c not in table.columns]
    if missing:
        raise SplitlabError(f"co-run table has no column {missing[0]!r}; give the fractions of mps_corun's cases")
    cases = [str(c) for c in table.index]
    fig = go.Figure([go.Bar(x=cases, y=rounded(table[col].to_numpy(float)), name=name, marker_color=color,
                            hovertemplate="%{x}: %{y:.2f} of its solo rate<extra>" + name + "</extra>")
                     for col, name, color in CORUN_JOBS])
    fig.add_hline(y=1.0, line_dash="dot", annotation_text="1.0 = no gain over taking turns",
                  annotation_position="top left")
    menu = [dict(label=label, method="relayout", args=[{"barmode": mode, "yaxis.title.text": axis}])
            for label, mode, axis in (("stacked: the sum", "stack", "fraction of each job's solo rate (stacked)"),
                                      ("side by side: each job", "group", "fraction of its solo rate"))]
    fig.update_layout(template=template(), barmode="stack", title=title or "What two jobs get done together",
                      xaxis=dict(title=dict(text="how the two jobs share the GPU")),
                      yaxis=dict(title=dict(text="fraction of each job's solo rate (stacked)")),
                      updatemenus=[dict(buttons=menu, direction="down", x=1.0, xanchor="right", y=1.15,
                                        yanchor="bottom", showactive=True)],
                      margin=dict(t=110))
    return fig


def _heat_grid(df, x: str, y: str, z: str, agg: str):
    """(x ticks, y ticks, values, run counts) of ``z`` over two columns, both sorted."""
    grid = df.pivot_table(index=y, columns=x, values=z, aggfunc=agg).sort_index().sort_index(axis=1)
    count = df.pivot_table(index=y, columns=x, values=z, aggfunc="count").reindex_like(grid)
    return ([_tick(v, x) for v in grid.columns], [_tick(v, y) for v in grid.index], grid.to_numpy(float),
            np.nan_to_num(count.to_numpy(float)).astype(int))


def heatmap(summary_df, x: str, y: str, z: str, agg: str = "mean", title: str | None = None,
            facet: str = "experiment"):
    """Heatmap of ``z`` over two columns, e.g. x="rate", y="label", z="goodput_req_s".

    Each cell shows its value and, when several runs fell in it, their ``agg`` (mean by
    default) and how many; missing cells are blank. Rows of different ``facet`` values
    (the results folder a run came from) are never pooled: one heatmap each, stacked,
    sharing one colour scale. Every row is labelled; rows are at least 30 px tall.
    """
    go = _go()
    from plotly.subplots import make_subplots

    for col in (x, y, z):
        if col not in summary_df.columns:
            raise SplitlabError(f"summary table has no column {col!r}")
    df = summary_df.dropna(subset=[x, y])
    parts = list(df.groupby(facet, sort=False)) if facet in df.columns and df[facet].nunique() > 1 else [(None, df)]
    grids = [(name, _heat_grid(part, x, y, z, agg)) for name, part in parts]
    heights = [max(len(g[1]), 1) for _, g in grids]
    fig = make_subplots(rows=len(grids), cols=1, row_heights=heights, vertical_spacing=0.12 / len(grids),
                        subplot_titles=[str(n) for n, _ in grids] if len(grids) > 1 else None)
    for row, (name, (xs, ys, values, counts)) in enumerate(grids, start=1):
        text = [[("" if not np.isfinite(v) else format_value(v, z) + (f"<br>({n} runs)" if n > 1 else ""))
                 for v, n in zip(vr, cr)] for vr, cr in zip(values, counts)]
        fig.add_trace(go.Heatmap(z=[rounded(r) for r in values], x=xs, y=ys, text=text, texttemplate="%{text}",
                                 customdata=counts.tolist(), name=str(name or column_info(z).title),
                                 coloraxis="coloraxis",
                                 hovertemplate=f"{column_info(x).title} %{{x}}, {column_info(y).title} %{{y}}: "
                                               f"{column_info(z).title} %{{z:.4g}} (%{{customdata}} run(s))"
                                               "<extra></extra>"), row=row, col=1)
        fig.update_xaxes(title_text=column_title(x), type="category", row=row, col=1)
        fig.update_yaxes(title_text=column_title(y), type="category", tickmode="array", tickvals=ys, ticktext=ys,
                         row=row, col=1)
    fig.update_layout(template=template(), title=title or f"{column_title(z)} over {column_info(x).title} × "
                                                          f"{column_info(y).title}",
                      coloraxis=dict(colorscale="Viridis", colorbar=dict(title=dict(text=column_title(z)))),
                      height=200 + 30 * sum(heights) + 110 * (len(grids) - 1))
    return fig


# ---- helpers -------------------------------------------------------------------------------------------

def legend_label(run) -> str:
    """``run_label`` and the arrival rate: ``split mps 60/40 · 21.2 req/s``."""
    rate = getattr(run.config, "rate", None)
    label = run_label(run)
    return f"{label} · {rate:.3g} req/s" if rate else label


def _labelled(runs) -> list[tuple[str, Any]]:
    """(unique label, run) pairs from a list of runs or a {label: run} mapping. A list's
    labels are ``legend_label``; two that are the same get their workload, then ``#2``...."""
    if isinstance(runs, Mapping):
        items = [(str(k), r) for k, r in runs.items()]
    else:
        items = [(legend_label(r), r) for r in runs]
        counts = Counter(label for label, _ in items)
        workloads = {label: {r.workload for lab, r in items if lab == label} for label in counts}
        items = [(f"{label} · {r.workload}" if counts[label] > 1 and len(workloads[label]) > 1 else label, r)
                 for label, r in items]
    seen: dict[str, int] = {}
    out = []
    for label, run in items:
        seen[label] = seen.get(label, 0) + 1
        out.append((label if seen[label] == 1 else f"{label} #{seen[label]}", run))
    return out


_PALETTE = ("#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692", "#B6E880", "#FF97FF",
            "#FECB52", "#2E91E5", "#E15F99", "#1CA71C", "#FB0D0D", "#DA16FF", "#222A2A", "#B68100", "#750D86")


def _color(i: int) -> str:
    """A distinct colour for the i-th run of a figure (18 before they repeat)."""
    return _PALETTE[i % len(_PALETTE)]


def _tick(value, column: str = "") -> str:
    """A category tick: a rate as ``16.3 req/s``, a share as ``60%``, other numbers with at
    most three significant figures (never ``16.28002154932318``)."""
    if isinstance(value, (float, int, np.floating, np.integer)) and not isinstance(value, bool):
        v = float(value)
        text = f"{v:g}" if v.is_integer() else f"{v:.3g}"
        unit = column_info(column).unit if column else ""
        if unit == "%":
            return f"{text}%"
        return f"{text} {unit}" if unit in ("req/s",) else text
    return str(value)


# ---- SLO curves (tables of splitlab.measure.slo) -----------------------------------------------

def _target_trace(go, x_range: Sequence[float], target: float):
    return go.Scatter(x=list(x_range), y=[target * 100] * 2, mode="lines", name=f"{target:.0%} attainment",
                      line=dict(color="#555555", dash="dot"), hoverinfo="skip")


def _slo_words(table, scale_col: str | None = None) -> str:
    """The SLO of a curve table in words (the scale-1 row's, on a scale curve)."""
    if "slo" not in table or not len(table):
        return ""
    rows = table[table[scale_col] == 1] if scale_col and (table[scale_col] == 1).any() else table
    return str(rows["slo"].iloc[0])


def slo_scale_curve(table, target: float = 0.9, title: str | None = None):
    """SLO attainment against the SLO scale (every bound multiplied by it), one line per run.

    ``table``: ``splitlab.measure.slo.attainment_vs_scale``. A dotted line marks ``target``.
    """
    go = _go()
    for col in ("label", "scale", "slo_attainment"):
        if col not in table:
            raise SplitlabError(f"the table has no {col!r} column; give the table of attainment_vs_scale")
    fig = go.Figure()
    for i, (label, g) in enumerate(table.groupby("label", sort=False)):
        g = g.sort_values("scale")
        fig.add_trace(go.Scatter(x=g["scale"].tolist(), y=(g["slo_attainment"] * 100).tolist(), mode="lines+markers",
                                 name=str(label), line=dict(color=_color(i)),
                                 hovertemplate=f"{label}: %{{y:.1f}}% at %{{x:g}}× the SLO<extra></extra>"))
    fig.add_trace(_target_trace(go, (float(table["scale"].min()), float(table["scale"].max())), target))
    words = _slo_words(table, "scale")
    fig.update_layout(template="plotly_white",
                      title=title or "SLO attainment against SLO scale" + (f" (1× = {words})" if words else ""),
                      xaxis=dict(title=dict(text="SLO scale (× every bound)")),
                      yaxis=dict(title=dict(text="SLO attainment (% of requests)"), range=[0, 105]))
    return fig


def attainment_rate_curve(table, target: float = 0.9, title: str | None = None):
    """SLO attainment against arrival rate, one line per mode, the ``target`` line dotted and
    each mode's highest sustained rate (``splitlab.measure.slo.max_rates``) marked on it.

    ``table``: ``splitlab.measure.slo.attainment_vs_rate``. A mode that meets the target at
    every rate measured gets a triangle at its highest rate (≥); one that misses it at every
    rate gets no marker, and a note over the plot names it.
    """
    from splitlab.measure.slo import max_rates

    go = _go()
    limits = max_rates(table, target)
    fig = go.Figure()
    colors = {}
    for i, (label, g) in enumerate(table.groupby("label", sort=False)):
        g = g.sort_values("rate")
        colors[str(label)] = _color(i)
        fig.add_trace(go.Scatter(x=g["rate"].tolist(), y=(g["slo_attainment"] * 100).tolist(), mode="lines+markers",
                                 name=str(label), legendgroup=str(label), line=dict(color=_color(i)),
                                 hovertemplate=f"{label}: %{{y:.1f}}% at %{{x:.3g}} req/s<extra></extra>"))
    fig.add_trace(_target_trace(go, (float(table["rate"].min()), float(table["rate"].max())), target))
    for label, limit in limits.items():  # each mode's mark in its line's colour, toggled with it
        name = f"{label}: max rate at {target:.0%} {limit}"
        if limit.status == "below_lowest":
            name = f"{label}: below {target:.0%} at every rate measured"
        fig.add_trace(go.Scatter(x=[] if limit.status == "below_lowest" else [limit.rate],
                                 y=[] if limit.status == "below_lowest" else [target * 100], mode="markers",
                                 name=name, legendgroup=label,
                                 marker=dict(symbol="triangle-right" if limit.at_least else "x", size=12,
                                             color=colors.get(label)),
                                 hovertemplate=f"{label}: {limit.reason}<extra></extra>"))
    never = [label for label, limit in limits.items() if limit.status == "below_lowest"]
    if never:  # their marks are empty, and plotly draws no legend entry for an empty trace
        fig.add_annotation(text=f"no mark: below {target:.0%} at every rate measured: {', '.join(never)}",
                           x=0, y=1.0, xref="paper", yref="paper", xanchor="left", yanchor="bottom",
                           showarrow=False, font=dict(size=11, color="#555555"))
    words = _slo_words(table)
    fig.update_layout(template="plotly_white",
                      title=title or "SLO attainment against arrival rate" + (f" ({words})" if words else ""),
                      legend=dict(tracegroupgap=4), height=max(450, 150 + 21 * len(fig.data)),  # every entry in view
                      xaxis=dict(title=dict(text="arrival rate (req/s)")),
                      yaxis=dict(title=dict(text="SLO attainment (% of requests)"), range=[0, 105]))
    return fig


def rate_curves(table, column: str, title: str | None = None, log: bool | None = None,
                colors: Mapping[str, str] | None = None, dash: Sequence[str] = ()):
    """One summary column against the arrival rate, one line per ``label`` (e.g. goodput or
    ITL p99 of each mode over a rate sweep). ``table``: rows with ``label``, ``rate`` and
    ``column`` (e.g. ``attainment_vs_rate`` or ``load_results``). ``log``: a logarithmic y
    axis; by default when the values span more than 10×. ``colors``: a colour per label
    (else one each, in order); labels in ``dash`` are drawn dashed (e.g. the peers)."""
    go = _go()
    for col in ("label", "rate", column):
        if col not in table:
            raise SplitlabError(f"the table has no {col!r} column")
    values = table[column].to_numpy(float)
    if log is None:
        log = _wide(values)
    fig = go.Figure()
    for i, (label, g) in enumerate(table.groupby("label", sort=False)):
        g = g.sort_values("rate")
        color = (colors or {}).get(str(label), _color(i))
        text = [format_value(v, column) for v in g[column]]
        fig.add_trace(go.Scatter(x=g["rate"].tolist(), y=rounded(g[column]), mode="lines+markers", name=str(label),
                                 line=dict(color=color, dash="dash" if label in dash else None), text=text,
                                 hovertemplate=f"{label}: %{{text}} at %{{x:.3g}} req/s<extra></extra>"))
    fig.update_layout(template=template(), title=title or f"{column_title(column)} against arrival rate",
                      xaxis=dict(title=dict(text=column_title("rate"))),
                      yaxis=dict(title=dict(text=column_title(column) + (", log scale" if log else "")),
                                 type="log" if log else None, rangemode=None if log else "tozero"))
    return fig


_RATIO_TICKS = (0.01, 0.03, 0.1, 0.3, 0.5, 1, 2, 3, 10, 30, 100, 300, 1000)


def goodput_ratio_map(grid, split: str = "split", title: str | None = None):
    """Heatmap of split's goodput over its best peer's, arrival rate × gap bound.

    ``grid``: ``splitlab.measure.slo.goodput_ratio_grid``. The colour is the ratio on a log
    scale centred on 1 (blue: split ahead); each cell's text is the ratio and the peer it
    beat or lost to. A cell whose peers all had zero goodput shows ``∞`` at the top colour.
    """
    go = _go()
    for col in ("rate", "itl_s", "ratio", "best_peer"):
        if col not in grid:
            raise SplitlabError(f"the grid has no {col!r} column; give the table of goodput_ratio_grid")
    rates = sorted(grid["rate"].unique())
    gaps = sorted(grid["itl_s"].unique())
    cells = {(r, g): row for r, g, row in zip(grid["rate"], grid["itl_s"], grid.to_dict("records"))}
    ratios = np.array([[cells[(r, g)]["ratio"] if (r, g) in cells else math.nan for r in rates] for g in gaps], float)
    logs = np.log10(np.where(np.isfinite(ratios) & (ratios > 0), ratios, math.nan))
    finite = np.abs(logs[np.isfinite(logs)])
    top = max(float(finite.max()) if finite.size else 0.0, math.log10(2))
    z = np.where(np.isposinf(ratios), top, np.clip(logs, -top, top))
    text = [[_ratio_text(cells.get((r, g))) for r in rates] for g in gaps]
    ticks = [t for t in _RATIO_TICKS if abs(math.log10(t)) <= top + 1e-9]
    fig = go.Figure(go.Heatmap(
        z=[[None if not np.isfinite(v) else float(v) for v in row] for row in z],
        x=[f"{r:.3g}" for r in rates], y=[f"{g * 1000:.3g} ms" for g in gaps],
        text=text, texttemplate="%{text}", colorscale="RdBu", zmid=0, zmin=-top, zmax=top,
        name="goodput ratio", hovertemplate="%{x} req/s, gap ≤ %{y}: %{text}<extra></extra>",
        colorbar=dict(title=dict(text=f"goodput {split} / best peer"),
                      tickvals=[math.log10(t) for t in ticks], ticktext=[f"{t:g}×" for t in ticks])))
    fig.update_layout(template="plotly_white",
                      title=title or f"Goodput of {split} over its best peer, arrival rate × gap bound",
                      xaxis=dict(title=dict(text="arrival rate (req/s)"), type="category"),
                      yaxis=dict(title=dict(text="bound on every inter-token gap (ms)"), type="category"))
    return fig


def _ratio_text(row) -> str:
    if row is None:
        return ""
    ratio, peer = row["ratio"], row.get("best_peer")
    if math.isinf(ratio):
        return "∞ (peers 0)"
    if not math.isfinite(ratio):
        return "no goodput" if peer else "no peer"
    return f"{ratio:.3g}×<br>vs {peer}"


# ---- KV cache capacity (benchmarks/paged_capacity.py) ------------------------------------------------

def _kv_unit(run, worker: str) -> tuple[int | None, str]:
    """Positions one unit of ``worker``'s KV pool holds and the unit's name: a page of
    ``kv_block_size`` positions, or a slot of ``max_seq_len`` (what the worker ran with:
    ``config.workers``, else ``config.effective``, else the run's ``EngineConfig``)."""
    cfg = run.config
    facts = (cfg.workers or {}).get(worker) or cfg.effective or {}
    engine = cfg.engine
    block = facts["kv_block_size"] if "kv_block_size" in facts else getattr(engine, "kv_block_size", None)
    if block:
        return int(block), f"pages of {int(block)}"
    length = facts.get("max_seq_len") or getattr(engine, "max_seq_len", None)
    return (int(length), f"slots of {int(length)}") if length else (None, "slots or pages")


def _kv_line(steps) -> tuple[list[float], list[int], list[int]]:
    """Corners of a step line of the KV in use after each step (held until the next): the end of
    each step whose value differs from the last one's, and the last step's end."""
    xs, used, totals = [], [], []
    for s in sorted(steps, key=lambda s: s.end_s):
        if not used or (s.kv_used, s.kv_total) != (used[-1], totals[-1]):
            xs.append(s.end_s)
            used.append(s.kv_used)
            totals.append(s.kv_total)
    if steps and xs[-1] != max(s.end_s for s in steps):
        xs.append(max(s.end_s for s in steps))
        used.append(used[-1])
        totals.append(totals[-1])
    return rounded(xs, 6), used, totals


def kv_usage(runs, title: str | None = None):
    """The KV pool in use over time (% of its slots or pages), one line per run and worker.

    ``runs``: a Run, a list of runs, or ``{label: run}``. Each step records the pool after it
    (``StepTrace.kv_used`` / ``kv_total``: slots of a slot pool, pages of a paged pool); the
    hover adds the count and the positions they hold (a slot holds ``max_seq_len`` of them
    whether its sequence uses them or not, a page ``kv_block_size``). Workers that cannot see
    the pool (a split's decode side) and runs recorded before the fields existed draw no line;
    a SplitlabError when no run has any.
    """
    go = _go()
    runs = [runs] if hasattr(runs, "steps") else runs
    fig = go.Figure()
    for label, run in _labelled(runs):
        known = [s for s in run.steps if s.kv_used is not None and s.kv_total]
        workers = sorted({s.worker for s in known})
        for worker in workers:
            x, used, totals = _kv_line([s for s in known if s.worker == worker])
            unit, unit_name = _kv_unit(run, worker)
            name = label if len(workers) == 1 else f"{label} — {worker}"
            positions = [u * unit if unit else None for u in used]
            held = "<br>%{customdata[2]:,} positions held" if unit else ""
            fig.add_trace(go.Scatter(
                x=x, y=rounded([100 * u / t for u, t in zip(used, totals)]), mode="lines", line_shape="hv",
                name=name, line=dict(color=_color(len(fig.data)), width=1.5),
                customdata=[[u, t, p] for u, t, p in zip(used, totals, positions)],
                hovertemplate=f"{name}: %{{y:.1f}}% of the KV pool at %{{x:.3f}} s<br>%{{customdata[0]}} of "
                              f"%{{customdata[1]}} {unit_name}{held}<extra></extra>"))
    if not fig.data:
        raise SplitlabError("none of these runs recorded its KV usage (StepTrace.kv_used): runs made before the "
                            "field existed, or only workers that do not see the pool; record the runs again")
    fig.update_layout(template=template(), title=title or "KV cache in use over time",
                      xaxis=dict(title=dict(text="time since run start (s)")),
                      yaxis=dict(title=dict(text="KV pool in use (% of its slots or pages)"), range=[0, 105]))
    return fig


_PAGE_COLUMNS = ("page_size", "workload_key", "peak_decode_batch")


def page_size_figure(records, step: str | None = "serial", time_column: str = "decode_step_p50_ms",
                     title: str | None = None):
    """Decode step time (ms) and concurrent sequences against the KV page size, one line per
    workload measured at several page sizes, the slot pool's concurrency dashed beside each.

    ``records``: the rows of ``benchmarks/paged_capacity.py``'s result (its ``runs`` list, the
    whole result, or a DataFrame): ``page_size`` (None for the slot pool), ``workload_key``,
    ``peak_decode_batch`` (the most sequences one decode step carried) and ``time_column``
    (``decode_step_p50_ms``: the median decode step; ``decode_step_at_peak_ms``: at the peak
    batch). ``step``: the rows of that step only (None: every row).
    """
    import pandas as pd

    go = _go()
    from plotly.subplots import make_subplots

    if isinstance(records, Mapping):
        records = records.get("runs", [])
    table = records if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    missing = [c for c in (*_PAGE_COLUMNS, time_column) if c not in table]
    if missing:
        raise SplitlabError(f"the records have no {', '.join(missing)}; give the rows of benchmarks/paged_capacity.py")
    if step is not None and "step" in table:
        table = table[table["step"] == step]
    paged = table[table["page_size"].notna()]
    if paged.empty:
        raise SplitlabError(f"no paged-pool rows{f' of step {step!r}' if step else ''} (every page_size is None)")
    counts = paged.groupby("workload_key")["page_size"].nunique()
    if (counts > 1).any():  # the page-size sweep's workloads, not those measured at one size
        paged = paged[paged["workload_key"].isin(counts[counts > 1].index)]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("decode step time", "concurrent sequences"))
    sizes = sorted(int(v) for v in paged["page_size"].unique())
    for i, (workload, g) in enumerate(paged.groupby("workload_key", sort=False)):
        g, color = g.sort_values("page_size"), _color(i)
        x = [int(v) for v in g["page_size"]]
        fig.add_trace(go.Scatter(x=x, y=rounded(g[time_column]), mode="lines+markers", name=str(workload),
                                 legendgroup=str(workload), line=dict(color=color),
                                 hovertemplate=f"{workload}: %{{y:.3g}} ms per decode step, pages of %{{x}}"
                                               "<extra></extra>"), row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=g["peak_decode_batch"].tolist(), mode="lines+markers", name=str(workload),
                                 legendgroup=str(workload), showlegend=False, line=dict(color=color),
                                 hovertemplate=f"{workload}: %{{y}} sequences at once, pages of %{{x}}<extra></extra>"),
                      row=1, col=2)
        slots = table[table["page_size"].isna() & (table["workload_key"] == workload)]
        if len(slots):
            peak = int(slots["peak_decode_batch"].iloc[0])
            fig.add_trace(go.Scatter(x=[sizes[0], sizes[-1]], y=[peak, peak], mode="lines",
                                     name=f"slot pool · {workload}", legendgroup=str(workload),
                                     line=dict(color=color, dash="dash"),
                                     hovertemplate=f"slot pool, {workload}: {peak} sequences at once<extra></extra>"),
                          row=1, col=2)
    fig.update_xaxes(title_text="KV page size (positions per page)", type="log", tickvals=sizes,
                     ticktext=[str(s) for s in sizes])
    fig.update_yaxes(title_text="decode step time (ms)", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="concurrent sequences (peak decode batch)", rangemode="tozero", row=1, col=2)
    fig.update_layout(template=template(), title=title or "KV page size: decode step time and concurrent sequences")
    return fig
