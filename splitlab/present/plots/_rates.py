"""Figures over arrival rates and SLOs: heatmaps of a summary column, SLO curves (tables of
``splitlab.measure.slo``), rate curves and the goodput-ratio map."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from splitlab.errors import SplitlabError
from splitlab.present.plots._base import _color, _go, _wide, rounded, template
from splitlab.present.tables import column_info, column_title, format_value


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
