"""Thin ipywidgets explorers over ``splitlab.present.plots``: selection only, no logic of their own.

Which runs a slider or dropdown picks is decided by ``splitlab.present.results.select_runs`` (a pure,
tested function); what is drawn is a ``splitlab.present.plots`` figure. Each explorer returns an
ipywidgets ``VBox``; its ``state`` attribute holds the current selection (a DataFrame) and
figures (dict name -> plotly Figure), so a notebook (or a test) can read what is shown.
ipywidgets and plotly are imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from splitlab.present import plots
from splitlab.present.results import choices, load_profile, load_results, select_runs

LATENCIES = ("ttft_s", "tpot_s", "e2e_s", "itl")
PERCENTILES = (50, 90, 99)


def _show(out, figures: dict[str, Any]) -> None:
    from IPython.display import display

    out.clear_output(wait=True)
    with out:
        for fig in figures.values():
            display(fig)


def _load(results, slo=None):
    """``(table, runs)`` from a folder, or passed through when already loaded."""
    if isinstance(results, tuple):
        return results
    return load_results(Path(results), slo)


def runs_explorer(results, slo=None):
    """Pick runs from a results folder; a dropdown for the latency and one for the percentile.

    Shows the latency CDFs of the chosen runs and a bar per run of ``<metric>_p<pct>_s``.
    ``results``: a folder, or the ``(table, runs)`` pair of ``load_results``.
    """
    import ipywidgets as W

    table, runs = _load(results, slo)
    options = [(f"{row['label']} — {row['workload']}", row["id"]) for _, row in table.iterrows()]
    pick = W.SelectMultiple(options=options, value=tuple(i for _, i in options), description="runs",
                            rows=min(10, max(3, len(options))), layout=W.Layout(width="60%"))
    metric = W.Dropdown(options=list(LATENCIES), value="ttft_s", description="metric")
    pct = W.Dropdown(options=list(PERCENTILES), value=99, description="percentile")
    out = W.Output()
    box = W.VBox([pick, W.HBox([metric, pct]), out])
    box.state = {}

    def update(*_):
        chosen = table[table["id"].isin(pick.value)]
        column = f"{'itl' if metric.value == 'itl' else metric.value[:-2]}_p{pct.value}_s"
        figures = {"cdf": plots.latency_cdf([runs[i] for i in chosen["id"]], metric.value)}
        if len(chosen):
            figures["bars"] = plots.metric_bars(chosen, column)
        box.state.update(selection=chosen, figures=figures)
        _show(out, figures)

    for w in (pick, metric, pct):
        w.observe(update, names="value")
    update()
    return box


def sweep_explorer(results, mode: str | None = "split", slo=None):
    """Sliders for arrival rate and prefill SM share that pick the matching recorded run(s).

    Shows the timeline of the picked ``mode`` run and the phase breakdown of every run at
    that rate (baselines without shares stay in view, see ``select_runs``).
    """
    import ipywidgets as W

    table, runs = _load(results, slo)
    rates = choices(table, "rate")
    shares = choices(table, "prefill_share")
    # a slider needs labelled options: when nothing was recorded, one "any" entry that selects all
    rate = W.SelectionSlider(options=rates or [("any", None)], description="rate (req/s)", continuous_update=False)
    share = W.SelectionSlider(options=shares or [("any", None)], description="prefill SM %",
                              continuous_update=False)
    modes = choices(table, "mode")
    mode_box = W.Dropdown(options=modes, value=mode if mode in modes else (modes[0] if modes else None),
                          description="timeline of")
    out = W.Output()
    box = W.VBox([W.HBox([rate, share, mode_box]), out])
    box.state = {}

    def update(*_):
        chosen = select_runs(table, rate=rate.value, share=share.value)
        figures = {}
        if len(chosen):
            figures["breakdown"] = plots.phase_breakdown_runs([runs[i] for i in chosen["id"]])
            main = chosen[chosen["mode"] == mode_box.value]
            if len(main):
                figures["timeline"] = plots.timeline(runs[main["id"].iloc[0]])
        box.state.update(selection=chosen, figures=figures)
        _show(out, figures)

    for w in (rate, share, mode_box):
        w.observe(update, names="value")
    update()
    return box


def roofline_explorer(profile):
    """A dropdown over the models (and backends) of a profile sweep, drawing its roofline.

    ``profile``: a path to a profile JSON or a ``results.Profile``.
    """
    import ipywidgets as W

    prof = load_profile(profile) if isinstance(profile, (str, Path)) else profile
    df = prof.table
    keys = sorted({(m, b) for m, b in zip(df["model"], df["backend"])}) if len(df) else []
    pick = W.Dropdown(options=[("all", None)] + [(f"{m} ({b})", (m, b)) for m, b in keys], value=None,
                      description="model")
    out = W.Output()
    box = W.VBox([pick, out])
    box.state = {}

    def update(*_):
        part = df if pick.value is None else df[(df["model"] == pick.value[0]) & (df["backend"] == pick.value[1])]
        figures = {"roofline": plots.roofline(part, prof.ceilings, prof.datasheet)}
        box.state.update(selection=part, figures=figures)
        _show(out, figures)

    pick.observe(update, names="value")
    update()
    return box
