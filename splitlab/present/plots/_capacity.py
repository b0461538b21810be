"""What the GPU holds and shares: two jobs co-run (``corun_fractions``), the KV pool in use
over time (``kv_usage``) and the KV page size (``page_size_figure``,
benchmarks/paged_capacity.py)."""

from __future__ import annotations

from typing import Mapping

from splitlab.errors import SplitlabError
from splitlab.present.plots._base import _color, _go, _labelled, rounded, template

CORUN_JOBS = (("compute (fraction of solo)", "matmul (compute-bound)", "#72B7B2"),
              ("memory (fraction of solo)", "copy (memory-bound)", "#E45756"))


def corun_fractions(table, title: str | None = None):
    """Two jobs run at once (``benchmarks/mps_corun.py``): each job's rate as a fraction of its
    solo rate, one stacked bar per way of sharing the GPU (``table``: indexed by case, with the
    columns of ``CORUN_JOBS``), its height their sum against the 1.0 of taking turns; the menu
    switches to the sums alone, each written on its bar."""
    go = _go()
    missing = [c for c, _, _ in CORUN_JOBS if c not in table.columns]
    if missing:
        raise SplitlabError(f"co-run table has no column {missing[0]!r}; give the fractions of mps_corun's cases")
    cases = [str(c) for c in table.index]
    total = sum(table[col].to_numpy(float) for col, _, _ in CORUN_JOBS)
    fig = go.Figure([go.Bar(x=cases, y=rounded(table[col].to_numpy(float)), name=name, marker_color=color,
                            hovertemplate="%{x}: %{y:.2f} of its solo rate<extra>" + name + "</extra>")
                     for col, name, color in CORUN_JOBS])
    fig.add_trace(go.Bar(x=cases, y=rounded(total), name="the two together", marker_color="#4C78A8", visible=False,
                         text=[f"{v:.2f}" for v in total], textposition="outside",
                         hovertemplate="%{x}: %{y:.2f} together<extra></extra>"))
    # the line of no gain, named in the legend (a note on the plot would sit on the bars near 1.0)
    fig.add_hline(y=1.0, line_dash="dot", line_color="#444")
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=dict(dash="dot", color="#444"),
                             name="1.0 = no gain over taking turns", hoverinfo="skip"))
    views = (("each job (stacked)", [True, True, False, True], "fraction of each job's solo rate (stacked)"),
             ("their sum", [False, False, True, True], "sum of the two jobs' fractions of their solo rates"))
    menu = [dict(label=label, method="update", args=[{"visible": shown}, {"yaxis.title.text": axis}])
            for label, shown, axis in views]
    fig.update_layout(template=template(), barmode="stack", title=title or "What two jobs get done together",
                      xaxis=dict(title=dict(text="how the two jobs share the GPU")),
                      yaxis=dict(title=dict(text=views[0][2])),
                      updatemenus=[dict(buttons=menu, direction="down", x=1.0, xanchor="right", y=1.15,
                                        yanchor="bottom", showactive=True)],
                      margin=dict(t=110))
    return fig


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
