"""Latency distributions (empirical CDFs) and the comparisons of runs on one summary column
(speedup bars, metric bars)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from splitlab.errors import SplitlabError
from splitlab.present.plots._base import _color, _go, _labelled, _requests, _wide, rounded, template
from splitlab.present.tables import column_info, column_title, format_value

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
