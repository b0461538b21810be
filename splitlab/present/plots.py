"""Pure functions from data to plotly Figures (testable without a browser).

Every figure has axis titles and named traces. Inputs are the project's own objects: a
``Run`` (or several), a summary table (``load_results`` / ``summaries_table``), a profile
table (``profile_phases``) with its ``Ceilings``. plotly is imported inside each function
(DESIGN.md: the core imports where plotly is absent).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from splitlab.errors import SplitlabError
from splitlab.present.results import run_label

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


def _go():
    import plotly.graph_objects as go

    return go


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
        legend=dict(title=dict(text="marker size = batch")), template="plotly_white",
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
    t = run.requests
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
        fig.add_trace(go.Bar(x=x, y=values.tolist(), name=_SEGMENT_NAMES[key],
                             marker_color=PHASE_COLORS[key],
                             hovertemplate=f"request %{{x}}: {_SEGMENT_NAMES[key]} %{{y:.4g}} s<extra></extra>"))
    fig.update_layout(barmode="stack", template="plotly_white",
                      title=title or f"Where each request's time went — {run_label(run)}",
                      xaxis=dict(title=dict(text="request id"), type="category"),
                      yaxis=dict(title=dict(text="seconds since arrival")))
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
        fig.add_trace(go.Bar(x=names, y=values, name=_SEGMENT_NAMES[key], marker_color=PHASE_COLORS[key]))
    what = "mean per request" if agg == "mean" else "total over requests"
    fig.update_layout(barmode="stack", template="plotly_white", title=title or f"Phase time per run ({what})",
                      xaxis=dict(title=dict(text="run")), yaxis=dict(title=dict(text=f"seconds ({what})")))
    return fig


# ---- timeline ------------------------------------------------------------------------------------

def timeline(run, title: str | None = None, max_ids: int = 16):
    """Gantt of each worker's steps (colour = prefill / decode / mixed, request ids on hover).

    When ``run.monitor`` holds NVML samples, a second row under it, on the same time axis,
    shows SM and memory-controller utilisation (%).
    """
    go = _go()
    from plotly.subplots import make_subplots

    samples = [s for s in (run.monitor or []) if s.get("t_s") is not None]
    nvml = bool(samples)
    if nvml:
        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.68, 0.32], vertical_spacing=0.06)
    else:
        fig = make_subplots(rows=1, cols=1)
    workers = sorted({s.worker for s in run.steps})
    for kind in ("prefill", "mixed", "decode"):
        steps = [s for s in run.steps if s.kind == kind]
        if not steps:
            continue
        hover = []
        for s in steps:
            ids = ", ".join(str(i) for i in s.request_ids[:max_ids])
            if len(s.request_ids) > max_ids:
                ids += f", … ({len(s.request_ids)} in all)"
            hover.append(f"{s.worker}: {kind} {s.start_s:.4f}–{s.end_s:.4f} s ({(s.end_s - s.start_s) * 1e3:.3g} ms)"
                         f"<br>{s.num_tokens} tokens, {len(s.request_ids)} requests<br>ids: {ids}")
        fig.add_trace(go.Bar(
            y=[s.worker for s in steps], x=[s.end_s - s.start_s for s in steps], base=[s.start_s for s in steps],
            orientation="h", name=kind, marker_color=PHASE_COLORS.get(kind, "#333333"), hovertext=hover,
            hoverinfo="text", customdata=[list(s.request_ids) for s in steps]), row=1, col=1)
    fig.update_yaxes(title_text="worker", type="category", categoryorder="array", categoryarray=workers, row=1, col=1)
    if nvml:
        t = [s["t_s"] for s in samples]
        for key, name, color in (("sm_util_pct", "SM util (%)", "#4C78A8"),
                                 ("mem_util_pct", "memory util (%)", "#E45756")):
            fig.add_trace(go.Scatter(x=t, y=[s.get(key) for s in samples], mode="lines", name=name,
                                     line=dict(color=color)), row=2, col=1)
        fig.update_yaxes(title_text="utilisation (%)", range=[0, 105], row=2, col=1)
        fig.update_xaxes(title_text="time since run start (s)", row=2, col=1)
    else:
        fig.update_xaxes(title_text="time since run start (s)", row=1, col=1)
    fig.update_layout(barmode="overlay", template="plotly_white", title=title or f"Timeline — {run_label(run)}",
                      bargap=0.3)
    return fig


# ---- latency distributions ----------------------------------------------------------------------------

def _cdf_xy(run, metric: str) -> tuple[list[float], list[float]]:
    """Step-CDF points, starting from 0 at the smallest value (so each step is drawn)."""
    values = run.itl_gaps() if metric == "itl" else run.requests[metric].dropna().to_numpy(float)
    values = np.sort(np.asarray(values, dtype=float))
    if not len(values):
        return [], []
    y = np.arange(1, len(values) + 1) / len(values)
    return [float(values[0])] + values.tolist(), [0.0] + y.tolist()


def latency_cdf(runs, metric: str = "ttft_s", title: str | None = None):
    """Empirical CDFs of a latency, one trace per run (named by mode, backend and shares).

    ``metric``: ``"ttft_s"``, ``"tpot_s"``, ``"e2e_s"`` (one value per request) or
    ``"itl"`` (every gap between consecutive tokens, all requests pooled). ``runs``: a list
    (traces named by ``run_label``) or a ``{name: run}`` mapping (your names). Each trace
    starts at (smallest value, 0) and steps up by 1/n at every value.
    """
    go = _go()
    _check_metric(metric)
    fig = go.Figure()
    for label, run in _labelled(runs):
        x, y = _cdf_xy(run, metric)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", line_shape="hv", name=label,
                                 hovertemplate=f"{label}<br>%{{x:.4g}} s: %{{y:.0%}}<extra></extra>"))
    unit = "token gaps" if metric == "itl" else "requests"
    fig.update_layout(template="plotly_white", title=title or f"CDF of {METRICS[metric]}",
                      xaxis=dict(title=dict(text=f"{METRICS[metric]} (s)")),
                      yaxis=dict(title=dict(text=f"fraction of {unit}"), range=[0, 1.02]))
    return fig


def latency_cdf_grid(runs, metrics: Sequence[str] = ("ttft_s", "tpot_s", "e2e_s", "itl"), title: str | None = None):
    """The CDFs of several latencies side by side (2 per row), one colour per run, one legend."""
    go = _go()
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    for m in metrics:
        _check_metric(m)
    rows = (len(metrics) + 1) // 2
    fig = make_subplots(rows=rows, cols=2, subplot_titles=[f"CDF of {METRICS[m]}" for m in metrics],
                        horizontal_spacing=0.08, vertical_spacing=0.16 if rows > 1 else 0.1)
    palette = qualitative.Plotly
    for i, (label, run) in enumerate(_labelled(runs)):
        for j, metric in enumerate(metrics):
            x, y = _cdf_xy(run, metric)
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines", line_shape="hv", name=label, legendgroup=label,
                                     showlegend=j == 0, line=dict(color=palette[i % len(palette)]),
                                     hovertemplate=f"{label}<br>%{{x:.4g}} s: %{{y:.0%}}<extra></extra>"),
                          row=j // 2 + 1, col=j % 2 + 1)
    for j, metric in enumerate(metrics):
        unit = "token gaps" if metric == "itl" else "requests"
        fig.update_xaxes(title_text=f"{METRICS[metric]} (s)", row=j // 2 + 1, col=j % 2 + 1)
        fig.update_yaxes(title_text=f"fraction of {unit}", range=[0, 1.02], row=j // 2 + 1, col=j % 2 + 1)
    fig.update_layout(template="plotly_white", title=title or "Latency distributions", height=380 * rows + 80)
    return fig


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise SplitlabError(f"unknown metric {metric!r}; accepted: {', '.join(METRICS)}")


# ---- comparisons ---------------------------------------------------------------------------------------

COLUMN_TITLES = {
    "rate": "arrival rate (req/s)",
    "prefill_share": "prefill SM share (%)",
    "decode_share": "decode SM share (%)",
    "goodput_req_s": "goodput (req/s)",
    "throughput_tok_s": "throughput (output tok/s)",
    "slo_attainment": "SLO attainment",
    "batch": "batch size",
    "tokens": "tokens (prompt length or context)",
}


def column_title(column: str) -> str:
    """A readable axis title for a summary column (``ttft_p99_s`` -> ``TTFT p99 (s)``)."""
    if column in COLUMN_TITLES:
        return COLUMN_TITLES[column]
    parts = column.split("_")
    if len(parts) == 3 and parts[0] in ("ttft", "tpot", "itl", "e2e") and parts[2] == "s":
        return f"{parts[0].upper()} {parts[1]} (s)"
    return column


def lower_is_better(metric: str) -> bool:
    return metric.startswith(_LOWER_IS_BETTER)


def speedup_bars(summary_df, baseline_mode: str, metric: str = "throughput_tok_s", title: str | None = None):
    """Bars of each run's speedup over the baseline on ``metric`` (> 1 = better than baseline).

    For latencies (ttft/tpot/e2e/itl columns) the speedup is baseline / value; for rates
    (throughput, goodput, attainment) value / baseline. Rows are grouped by ``label`` (or
    ``mode``) and averaged; the baseline is the mean over rows whose mode or label is
    ``baseline_mode``.
    """
    go = _go()
    if metric not in summary_df.columns:
        raise SplitlabError(f"summary table has no column {metric!r}; columns: {list(summary_df.columns)}")
    key = "label" if "label" in summary_df.columns else "mode"
    is_base = (summary_df["mode"] == baseline_mode) if "mode" in summary_df.columns else False
    if key == "label":
        is_base = is_base | (summary_df["label"] == baseline_mode)
    base_rows = summary_df[is_base]
    if not len(base_rows):
        raise SplitlabError(f"no run of baseline {baseline_mode!r} in the table; modes: "
                            f"{sorted(summary_df['mode'].unique()) if 'mode' in summary_df else []}")
    base = float(base_rows[metric].astype(float).mean())
    means = summary_df.groupby(key, sort=False)[metric].mean()
    lower = lower_is_better(metric)
    speed = [(base / v if lower else v / base) if v and np.isfinite(v) else math.nan for v in means.to_numpy(float)]
    fig = go.Figure(go.Bar(x=[str(i) for i in means.index], y=speed, name=f"speedup ({metric})",
                           text=[f"{s:.2f}x" if np.isfinite(s) else "n/a" for s in speed], textposition="outside",
                           marker_color=["#BAB0AC" if lab in set(base_rows[key]) else "#4C78A8" for lab in means.index],
                           customdata=means.to_numpy(float),
                           hovertemplate="%{x}: %{y:.3f}x (" + metric + " = %{customdata:.4g})<extra></extra>"))
    fig.add_hline(y=1.0, line_dash="dot", line_color="#555555")
    better = "baseline / value" if lower else "value / baseline"
    fig.update_layout(template="plotly_white", title=title or f"Speedup over {baseline_mode} on {metric}",
                      xaxis=dict(title=dict(text="run")),
                      yaxis=dict(title=dict(text=f"speedup over {baseline_mode} ({metric}: {better})")))
    return fig


def metric_bars(summary_df, column: str, title: str | None = None):
    """One bar per run (label) of one summary column, e.g. ``ttft_p99_s``."""
    go = _go()
    if column not in summary_df.columns:
        raise SplitlabError(f"summary table has no column {column!r}")
    key = "label" if "label" in summary_df.columns else "mode"
    values = summary_df.groupby(key, sort=False)[column].mean()
    fig = go.Figure(go.Bar(x=[str(i) for i in values.index], y=values.to_numpy(float).tolist(), name=column,
                           marker_color="#4C78A8"))
    fig.update_layout(template="plotly_white", title=title or column,
                      xaxis=dict(title=dict(text="run")), yaxis=dict(title=dict(text=column)))
    return fig


def heatmap(summary_df, x: str, y: str, z: str, agg: str = "mean", title: str | None = None):
    """Heatmap of ``z`` over two columns, e.g. x="rate", y="prefill_share", z="goodput_req_s".

    Cells with several runs show their ``agg`` (mean by default); missing cells are blank.
    """
    go = _go()
    for col in (x, y, z):
        if col not in summary_df.columns:
            raise SplitlabError(f"summary table has no column {col!r}")
    df = summary_df.dropna(subset=[x, y])
    grid = df.pivot_table(index=y, columns=x, values=z, aggfunc=agg).sort_index().sort_index(axis=1)
    values = grid.to_numpy(float)
    text = [[("" if not np.isfinite(v) else f"{v:.3g}") for v in row] for row in values]
    fig = go.Figure(go.Heatmap(z=values.tolist(), x=[_tick(v) for v in grid.columns], y=[_tick(v) for v in grid.index],
                               text=text, texttemplate="%{text}", name=z, colorscale="Viridis",
                               colorbar=dict(title=dict(text=column_title(z))),
                               hovertemplate=f"{x}=%{{x}}, {y}=%{{y}}: {z}=%{{z:.4g}}<extra></extra>"))
    fig.update_layout(template="plotly_white", title=title or f"{column_title(z)} over {x} × {y}",
                      xaxis=dict(title=dict(text=column_title(x)), type="category"),
                      yaxis=dict(title=dict(text=column_title(y)), type="category"))
    return fig


# ---- helpers -------------------------------------------------------------------------------------------

def _labelled(runs) -> list[tuple[str, Any]]:
    """(unique label, run) pairs from a list of runs or a {label: run} mapping."""
    items = list(runs.items()) if isinstance(runs, Mapping) else [(run_label(r), r) for r in runs]
    seen: dict[str, int] = {}
    out = []
    for label, run in items:
        label = str(label)
        seen[label] = seen.get(label, 0) + 1
        out.append((label if seen[label] == 1 else f"{label} #{seen[label]}", run))
    return out


def _tick(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return f"{value:g}"
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
    for label, g in table.groupby("label", sort=False):
        g = g.sort_values("scale")
        fig.add_trace(go.Scatter(x=g["scale"].tolist(), y=(g["slo_attainment"] * 100).tolist(), mode="lines+markers",
                                 name=str(label),
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
    rate gets no marker (its legend entry says so).
    """
    from splitlab.measure.slo import max_rates

    go = _go()
    limits = max_rates(table, target)
    fig = go.Figure()
    for label, g in table.groupby("label", sort=False):
        g = g.sort_values("rate")
        fig.add_trace(go.Scatter(x=g["rate"].tolist(), y=(g["slo_attainment"] * 100).tolist(), mode="lines+markers",
                                 name=str(label),
                                 hovertemplate=f"{label}: %{{y:.1f}}% at %{{x:.3g}} req/s<extra></extra>"))
    fig.add_trace(_target_trace(go, (float(table["rate"].min()), float(table["rate"].max())), target))
    for label, limit in limits.items():
        name = f"{label}: max rate at {target:.0%} {limit}"
        if limit.status == "below_lowest":
            name = f"{label}: below {target:.0%} at every rate measured"
        fig.add_trace(go.Scatter(x=[] if limit.status == "below_lowest" else [limit.rate],
                                 y=[] if limit.status == "below_lowest" else [target * 100], mode="markers",
                                 name=name, marker=dict(symbol="triangle-right" if limit.at_least else "x", size=12),
                                 hovertemplate=f"{label}: {limit.reason}<extra></extra>"))
    words = _slo_words(table)
    fig.update_layout(template="plotly_white",
                      title=title or "SLO attainment against arrival rate" + (f" ({words})" if words else ""),
                      xaxis=dict(title=dict(text="arrival rate (req/s)")),
                      yaxis=dict(title=dict(text="SLO attainment (% of requests)"), range=[0, 105]))
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
