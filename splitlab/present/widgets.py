"""Explorers over runs: one plotly figure each, whose dropdown or slider lives in the figure.

An explorer lays out ``splitlab.present.plots`` figures, one *view* per choice (a latency and
a percentile, an arrival rate and an SM share, a model), and adds a control drawn by plotly.js
that shows one view at a time; legend entries toggle traces and hover shows every number.
Which runs a view holds is decided by ``splitlab.present.results.select_runs`` (a pure, tested
function); an explorer has no selection logic of its own.

Nothing calls back into Python, so an explorer works in a saved notebook, an HTML export or a
report without a kernel, and executing a notebook never waits on it. (The explorers were
ipywidgets drawing into an ``ipywidgets.Output``: every output routed into one makes nbclient,
the executor of papermill and nbconvert, send the widget's new state to the kernel on the
shell channel while it awaits the cell's execute reply on that channel, and a cell holding a
large plotly figure hung there until its timeout.)

``view(fig, label)`` applies one choice of an explorer's control in Python (plotly's own
``plotly_update``), e.g. to read or save what a choice shows. plotly is imported inside the
functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from splitlab.errors import ConfigError
from splitlab.present import plots
from splitlab.present.results import choices, load_profile, load_results, runs_table, select_runs

LATENCIES = ("ttft_s", "tpot_s", "e2e_s", "itl")
PERCENTILES = (50, 90, 99)
SHORT = {"ttft_s": "TTFT", "tpot_s": "TPOT", "e2e_s": "E2E", "itl": "ITL"}
# axis properties that belong to the layout of the combined figure, not to a view
_AXIS_FIXED = ("domain", "anchor", "matches", "overlaying", "position")
# pixels: a figure's height when it sets none (plotly's default), what of it goes to margins,
# the least height of a panel, and the space between two panels / two rows of one panel
_HEIGHT, _MARGIN_PX, _MIN_PANEL_PX = 450, 180, 240
_PANEL_GAP_PX, _ROW_GAP_PX = 150, 30


def _load(results, slo=None):
    """``(table, runs)`` from a folder, from runs in memory (``{name: Run}`` or a list), or
    passed through when already loaded."""
    if isinstance(results, tuple):
        return results
    if isinstance(results, (dict, list)):
        return runs_table(results, slo)
    return load_results(Path(results), slo)


def _axis_number(ref: str | None) -> int:
    """1 for ``"x"`` / ``"y"`` / None, k for ``"xk"`` / ``"yk"``."""
    return int(ref[1:]) if ref and len(ref) > 1 else 1


def _axis_name(letter: str, number: int) -> str:
    return f"{letter}axis" if number == 1 else f"{letter}axis{number}"


def _rows(fig) -> int:
    """How many stacked subplots a (single-column) figure draws on."""
    return max([_axis_number(getattr(t, "xaxis", None)) for t in fig.data] + [1])


def _combine(views: Sequence[tuple[str, Sequence[Any]]], control: str, title: str, control_label: str = "",
             active: int = 0):
    """One figure holding every view, with a control that shows one view at a time.

    ``views``: ``(label, panels)`` pairs; every view has the same number of panels, figures
    stacked top to bottom (a panel may itself be a single-column subplot figure). A panel figure
    shared by several views (the same object) is added once. ``control``: ``"dropdown"`` (buttons
    named by the labels) or ``"slider"`` (steps named by the labels, ``control_label`` before the
    current one). Each view brings its panel titles and axis settings (titles, log or category
    axes, ranges) with it.
    """
    from plotly.subplots import make_subplots

    if not views:
        raise ConfigError("an explorer needs at least one view")
    if control not in ("dropdown", "slider"):
        raise ConfigError(f"control must be 'dropdown' or 'slider', got {control!r}")
    rows_of = [max(_rows(panels[j]) for _, panels in views) for j in range(len(views[0][1]))]
    first_row = [1 + sum(rows_of[:j]) for j in range(len(rows_of))]
    fig = make_subplots(rows=sum(rows_of), cols=1)
    plot_height = _place_rows(fig, _row_heights(views, rows_of), first_row)
    added, base_visible = _add_traces(fig, views, first_row)
    _panel_titles_and_legends(fig, views, first_row)
    items = _control_items(views, added, base_visible, rows_of, first_row)
    first = views[0][1][0].layout
    margin = dict(t=110, b=150 if control == "slider" else 70)
    fig.update_layout(template=first.template, barmode=first.barmode, bargap=first.bargap, title=title,
                      height=round(plot_height) + margin["t"] + margin["b"], margin=margin)
    _add_control(fig, control, items, active, control_label)
    fig.update_traces(visible=False)
    fig.plotly_update(restyle_data=items[active]["args"][0], relayout_data=items[active]["args"][1])
    return fig


def _row_heights(views, rows_of: list[int]) -> list[float]:
    """Pixels of each row of the combined figure: each panel as tall as its tallest figure, split
    into rows as that figure splits them."""
    row_px: list[float] = []
    for j, rows in enumerate(rows_of):
        tallest = max((panels[j] for _, panels in views), key=lambda f: (_rows(f), f.layout.height or _HEIGHT))
        plot_px = max(_MIN_PANEL_PX, (tallest.layout.height or _HEIGHT) - _MARGIN_PX)
        spans = [tallest.layout[_axis_name("y", k)].domain or (0, 1) for k in range(1, _rows(tallest) + 1)]
        spans += [(0, 1)] * (rows - len(spans))
        size = sum(b - a for a, b in spans)
        row_px += [plot_px * (b - a) / size for a, b in spans]
    return row_px


def _place_rows(fig, row_px: list[float], first_row: list[int]) -> float:
    """Set each row's y domain, leaving room between panels for tick labels, an axis title and
    the next panel's title; returns the height in pixels of all rows and gaps."""
    total = len(row_px)
    gaps = [(_PANEL_GAP_PX if r + 1 in first_row else _ROW_GAP_PX) for r in range(1, total)]
    plot_height = sum(row_px) + sum(gaps)
    top = plot_height
    for r in range(1, total + 1):
        bottom = top - row_px[r - 1]
        fig.layout[_axis_name("y", r)].domain = (max(0.0, bottom / plot_height), min(1.0, top / plot_height))
        top = bottom - (gaps[r - 1] if r < total else 0)
    return plot_height


def _add_traces(fig, views, first_row: list[int]) -> tuple[dict[int, list[int]], list[bool]]:
    """Every panel figure's traces, once per figure: ``{id(panel): its trace indexes in fig}``
    and whether each trace was visible in its own figure."""
    added: dict[int, list[int]] = {}
    base_visible: list[bool] = []
    for _, panels in views:
        for j, panel in enumerate(panels):
            if id(panel) in added:
                continue
            added[id(panel)] = []
            for trace in panel.data:
                row = first_row[j] - 1 + _axis_number(getattr(trace, "xaxis", None))
                base_visible.append(trace.visible is not False)
                fig.add_trace(trace, row=row, col=1)
                fig.data[-1].update(legend="legend" if j == 0 else f"legend{j + 1}")
                added[id(panel)].append(len(fig.data) - 1)
    return added, base_visible


def _panel_titles_and_legends(fig, views, first_row: list[int]) -> None:
    """An (empty, filled per view) title over each panel and a legend beside it."""
    for j, row in enumerate(first_row):
        top = fig.layout[_axis_name("y", row)].domain[1]
        fig.add_annotation(text="", x=0.5, y=top, xref="paper", yref="paper", xanchor="center", yanchor="bottom",
                           showarrow=False, font=dict(size=14))
        legend = dict(y=top, yanchor="top", x=1.02, xanchor="left", tracegroupgap=2)
        source_title = views[0][1][j].layout.legend.title.text
        if source_title:
            legend["title"] = dict(text=source_title)
        fig.update_layout({"legend" if j == 0 else f"legend{j + 1}": legend})


def _panel_update(panel, j: int, rows_of: list[int], first_row: list[int]) -> dict[str, Any]:
    """The relayout that shows ``panel`` in the rows of panel ``j``: its title and its axes
    (rows it does not use hidden)."""
    update: dict[str, Any] = {f"annotations[{j}].text": panel.layout.title.text or ""}
    own = _rows(panel)
    for k in range(1, rows_of[j] + 1):
        row = first_row[j] - 1 + k
        for letter in "xy":
            name = _axis_name(letter, row)
            update[f"{name}.visible"] = k <= own
            if k > own:
                continue
            source = panel.layout[_axis_name(letter, k)].to_plotly_json()
            if "range" not in source:  # a range zoomed in one view must not stick in the next
                update[f"{name}.autorange"] = source.get("autorange", True)
            for key, value in source.items():
                if key not in _AXIS_FIXED and key != "visible":
                    update[f"{name}.{key}"] = value
            if source.get("matches"):  # rows of one panel that share an axis still do
                update[f"{name}.matches"] = f"{letter}{first_row[j] - 1 + _axis_number(source['matches'])}"
    return update


def _control_items(views, added, base_visible: list[bool], rows_of: list[int], first_row: list[int]) -> list[dict]:
    """One ``update`` item per view: which traces it shows and its layout, every key any view
    sets present in each (None unsets what another view set)."""
    visibles, layouts = [], []
    for _, panels in views:
        shown = {i for panel in panels for i in added[id(panel)]}
        visibles.append([i in shown and base_visible[i] for i in range(len(base_visible))])
        update: dict[str, Any] = {}
        for j, panel in enumerate(panels):
            update.update(_panel_update(panel, j, rows_of, first_row))
        layouts.append(update)
    keys = sorted({k for update in layouts for k in update})
    return [dict(label=label, method="update", args=[{"visible": visibles[i]}, {k: layouts[i].get(k) for k in keys}])
            for i, (label, _) in enumerate(views)]


def _add_control(fig, control: str, items: list[dict], active: int, control_label: str) -> None:
    """The dropdown (above the figure) or the slider (under it) that switches the views."""
    if control == "dropdown":
        fig.update_layout(updatemenus=[dict(type="dropdown", buttons=items, active=active, showactive=True,
                                            x=0.0, xanchor="left", y=1.0, yanchor="bottom",
                                            pad=dict(t=38), direction="down")])
    else:
        prefix = f"{control_label}: " if control_label else ""
        fig.update_layout(sliders=[dict(steps=items, active=active, x=0.0, len=1.0, y=0.0, yanchor="top",
                                        pad=dict(t=60), currentvalue=dict(prefix=prefix))])


def _controls(fig) -> list:
    """The buttons (dropdown) or steps (slider) of an explorer figure."""
    if fig.layout.updatemenus:
        return list(fig.layout.updatemenus[0].buttons)
    if fig.layout.sliders:
        return list(fig.layout.sliders[0].steps)
    raise ConfigError("this figure has no dropdown or slider")


def labels(fig) -> list[str]:
    """The choices of an explorer's control, in order."""
    return [item.label for item in _controls(fig)]


def view(fig, label: str | int):
    """A copy of an explorer figure showing one choice of its control (a label or an index)."""
    go = plots._go()
    items = _controls(fig)
    item = items[label] if isinstance(label, int) else next((i for i in items if i.label == label), None)
    if item is None:
        raise KeyError(f"no choice {label!r}; the choices are {[i.label for i in items]}")
    out = go.Figure(fig)
    out.plotly_update(restyle_data=item.args[0], relayout_data=item.args[1])
    menu = out.layout.updatemenus[0] if out.layout.updatemenus else out.layout.sliders[0]
    menu.active = items.index(item)
    return out


def runs_explorer(results, slo=None, title: str | None = None, start: str = "TTFT p99"):
    """Runs side by side; a dropdown picks the latency (TTFT, TPOT, E2E, ITL) and the percentile.

    Top: the latency CDFs of every run (click a legend entry to hide a run); bottom: a bar per
    run of ``<metric>_p<pct>_s``. A run is named by ``plots.legend_label``, and where two names
    are the same by its workload too. ``results``: a folder, runs in memory (``{name: Run}`` or a
    list), or the ``(table, runs)`` pair of
    ``load_results``. ``start``: the view shown first, e.g. ``"ITL p50"`` where each run has few
    requests (one request has one TTFT, but a gap between every two tokens).
    """
    table, runs = _load(results, slo)
    # one name per run, in the CDF legend and under its bar: plots.legend_label (mode, backend,
    # shares, rate), and where two are the same the workload too, then the id
    names = pd.Series([plots.legend_label(runs[i]) for i in table["id"]], index=table.index)
    for extra in ("workload", "id"):
        dup = names.duplicated(keep=False)
        if dup.any() and extra in table.columns:
            names = names.where(~dup, names + " · " + table[extra].astype(str))
    named = table.assign(label=names.to_numpy())
    chosen = {name: runs[i] for name, i in zip(names, table["id"])}
    views = []
    for metric in LATENCIES:
        cdf = plots.latency_cdf(chosen, metric)
        for pct in PERCENTILES:
            column = f"{'itl' if metric == 'itl' else metric[:-2]}_p{pct}_s"
            bars = plots.metric_bars(named, column, title=f"{column} per run").update_traces(showlegend=False)
            views.append((f"{SHORT[metric]} p{pct}", [cdf, bars]))
    names = [label for label, _ in views]
    if start not in names:
        raise ConfigError(f"runs_explorer: start must be one of {', '.join(names)}; got {start!r}")
    default = names.index(start)
    return _combine(views, "dropdown", title or f"{len(table)} runs: pick a latency and a percentile", active=default)


def sweep_explorer(results, mode: str | None = "split", slo=None, title: str | None = None):
    """A slider over the recorded (arrival rate, prefill SM share) pairs.

    At each step: the phase breakdown of every run that ``select_runs(table, rate, share)``
    picks (baselines without shares stay in view), and under it the timeline of the picked
    ``mode`` run (the one with that share when there is one), its title naming that run (id,
    mode, shares and rate), so a reader sees which recorded run a step shows.
    Rates without a share-carrying run get one step; with no rates at all, one step shows
    every run.
    """
    table, runs = _load(results, slo)
    modes = choices(table, "mode")
    mode = mode if mode in modes else (modes[0] if modes else None)
    steps: list[tuple[Any, Any]] = []
    for rate in choices(table, "rate") or [None]:
        shares = choices(select_runs(table, rate=rate), "prefill_share")
        steps += [(rate, share) for share in shares or [None]]
    views, timelines = [], {}
    for rate, share in steps:
        chosen = select_runs(table, rate=rate, share=share)
        if not len(chosen):
            continue
        main = chosen[chosen["mode"] == mode]
        if share is not None and "prefill_share" in main.columns and (main["prefill_share"] == share).any():
            main = main[main["prefill_share"] == share]
        panels = [plots.phase_breakdown_runs([runs[i] for i in chosen["id"]],
                                             title="Phase time per run at this rate (mean per request)")]
        rid = main["id"].iloc[0] if len(main) else None
        if rid is not None:
            if rid not in timelines:  # its title names the recorded run it draws (the step may snap to it)
                timelines[rid] = plots.timeline(runs[rid], max_ids=4,  # hover lists 4 request ids a step
                                                title=f"Timeline of run {rid} ({plots.legend_label(runs[rid])})")
            panels.append(timelines[rid])
        else:
            panels.append(plots._go().Figure(layout=dict(title=f"no {mode} run here")))
        label = ("all runs" if rate is None else f"{rate:g} req/s") + ("" if share is None else f" · prefill {share:g}%")
        views.append((label, panels))
    return _combine(views, "slider", title or f"Runs by arrival rate and prefill SM share; timeline of {mode}",
                    control_label="rate · SM share")


def roofline_explorer(profile, title: str | None = None):
    """A dropdown over the models (and backends) of a profile sweep, drawing its roofline.

    ``profile``: a path to a profile JSON or a ``results.Profile``. The first choice shows
    every model at once.
    """
    prof = load_profile(profile) if isinstance(profile, (str, Path)) else profile
    df = prof.table
    keys = sorted({(m, b) for m, b in zip(df["model"], df["backend"])}) if len(df) else []
    views = [("all models", [plots.roofline(df, prof.ceilings, prof.datasheet)])]
    for m, b in keys:
        part = df[(df["model"] == m) & (df["backend"] == b)]
        views.append((f"{m} ({b})", [plots.roofline(part, prof.ceilings, prof.datasheet, title=f"Roofline — {m} ({b})")]))
    return _combine(views, "dropdown", title or "Roofline: pick a model")


def policy_explorer(groups, slo, policies, peers: Sequence[str] = ("serial", "chunked-2048"),
                    rate: float | None = None, title: str | None = None):
    """A dropdown over SM policies of a split, each showing goodput and the inter-token tail
    against the arrival rate beside the peers, and the SM split over time at one rate.

    ``groups``: ``{label: runs of that label at several rates}`` (as
    ``splitlab.measure.slo.attainment_vs_rate``: Runs that record their rate, or
    ``(rate, run)`` pairs), one workload; ``policies``: ``{menu label: label in groups}``,
    e.g. ``{"static": "split-green", "table": "split-green-table"}``; ``peers``: labels drawn
    dashed in every view. Per choice: goodput under ``slo`` (req/s), the p99 of the pooled
    inter-token gaps (log axis when it spans more than 10x), and ``plots.timeline`` of the
    policy's run at the recorded rate nearest ``rate`` (default: the middle one), its title
    naming that run and rate.
    """
    from splitlab.measure.slo import _rate_points
    from splitlab.present.results import nearest

    missing = [g for g in [*policies.values(), *peers] if g not in groups]
    if missing or not policies:
        raise ConfigError(f"policies and peers must be labels of groups ({sorted(groups)}); missing: {missing}")
    points = {label: _rate_points(groups[label]) for label in [*peers, *policies.values()]}
    rows = [{"label": label, "rate": r, **run.summary(slo)} for label, pts in points.items() for r, _, run in pts]
    table = pd.DataFrame(rows)
    colors = {label: plots._color(i) for i, label in enumerate(points)}
    log_itl = plots._wide(table["itl_p99_s"].to_numpy(float))
    views = []
    for name, label in policies.items():
        part = table[table["label"].isin([*peers, label])]
        rates = [r for r, _, _ in points[label]]
        at = nearest(rates, rate if rate is not None else rates[len(rates) // 2])
        run = next(run for r, _, run in points[label] if r == at)
        panels = [plots.rate_curves(part, "goodput_req_s", colors=colors, dash=peers,
                                    title=f"{name}: goodput under {slo.describe()}"),
                  plots.rate_curves(part, "itl_p99_s", log=log_itl, colors=colors, dash=peers,
                                    title=f"{name}: p99 of the gaps between tokens"),
                  plots.timeline(run, max_ids=4, title=f"{name}: run {label} at {at:g} req/s, the SM split over time")]
        views.append((name, panels))
    return _combine(views, "dropdown", title or "SM policy: pick one")
