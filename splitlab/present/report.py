"""One self-contained HTML report of a results folder (opens offline, in under 2 s).

``write_report(results_dir, out_path)`` reads every run (``index.json`` folders: the folder
itself and its direct sub-folders, each one *experiment*) and every profile JSON there, and
writes one HTML file a student can read top to bottom:

- the runs of each experiment in one table (readable units), and apart from them the short
  correctness checks (``is_check``), which no figure shows;
- per workload family (one workload at several loads, ``family``: ``poisson-r8-n80`` ...
  ``poisson-r24-n80``): goodput and p99 TTFT, TPOT and ITL over the load, one line per run
  label and experiment; then, at the load with the most runs, the latency CDFs and (a table)
  each experiment's speedups over its baseline on five metrics;
- the timeline of one split run beside its baseline's, and (a table) where a request's time
  went in each;
- the roofline of each profile sweep with its measured-vs-datasheet ceilings.

Runs of different experiments are never averaged together, nor runs of different
configurations that ``run_label`` names alike (``distinct_labels``: ``chunked 512`` and
``chunked 2048``); legends carry the experiment where two runs would otherwise read the same.

The page stays small and quick to open (``splitlab.present.html``): plotly.js travels once,
gzip + base64 (2.0 MB of its 4.8 MB), inflated in the browser; each figure is its JSON,
drawn once the library runs, with margins wide enough that plotly draws it once
(``roomy_margins``); a CDF keeps a few hundred points (``splitlab.present.plots``); a sweep
of loads draws a few figures, not a set per load. The recorded H200 results (three
experiments, over a hundred runs) make a page of about 2.4 MB and 11 figures.

``png=True`` also writes each figure as PNG next to the report, where kaleido and a
Chromium are present; elsewhere it says so (stderr and in the report) and carries on.
"""

from __future__ import annotations

import datetime as _dt
import html
import math
import re
import sys
from pathlib import Path
from typing import Any

from splitlab.errors import SplitlabError
from splitlab.present import html as page
from splitlab.present import plots
from splitlab.present.results import INDEX, find_profiles, load_profile, load_results
from splitlab.present.tables import fmt_si, for_people, missing

SUMMARY_COLUMNS = (
    "label", "workload", "rate", "num_requests", "completed", "throughput_tok_s", "ttft_p50_s", "ttft_p99_s",
    "tpot_p50_s", "tpot_p99_s", "itl_p99_s", "e2e_p99_s", "goodput_req_s", "slo_attainment", "peak_memory_bytes",
)
CHECK_COLUMNS = ("experiment", "label", "workload", "num_requests", "completed", "wall_s", "ttft_p50_s", "tpot_p50_s")
SPEEDUP_METRICS = ("throughput_tok_s", "goodput_req_s", "ttft_p99_s", "tpot_p99_s", "itl_p99_s")
BASELINES = ("serial", "chunked", "hf-generate")
# the CDFs of a workload: the first token (prefill's share) and every token gap (decode's)
CDF_METRICS = ("ttft_s", "itl")
_RUN_FORMAT_PREFIX = '"splitlab.run/'
# a run this small beside a run of its experiment 8× larger is a check, not a measurement
CHECK_MAX_REQUESTS = 8

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:1.05em;margin:1.2em 0 .3em}
table.data{border-collapse:collapse;font-size:12px;margin:8px 0}
table.data td,table.data th{border:1px solid #ddd;padding:3px 6px;text-align:left;white-space:nowrap}
table.data td.num{text-align:right}table.data th{background:#f4f4f4}
.note{color:#555;font-size:13px}.warn{color:#a33}
.tablewrap{overflow-x:auto;content-visibility:auto}
.splitlab-figure-error{color:#a33;font-size:13px;padding:8px;border:1px dashed #d99}
"""
_DEFINITIONS = ("Metric definitions: TTFT = arrival to first token; TPOT = (E2E - TTFT)/(tokens - 1); ITL = every "
                "gap between consecutive tokens; E2E = arrival to last token; goodput = requests meeting every SLO "
                "bound per second of wall time.")


def write_report(results_dir: str | Path, out_path: str | Path, *, slo=None, png: bool = False,
                 title: str | None = None) -> Path:
    """Write the HTML report of ``results_dir`` to ``out_path``; return the path written."""
    root = Path(results_dir)
    if not root.is_dir():
        raise SplitlabError(f"no results folder at {root}; give a folder written by splitlab.present.results.save_runs "
                            "or holding profile JSONs")
    table, runs = _collect_runs(root, slo)
    profiles = [load_profile(p) for folder in _folders(root) for p in find_profiles(folder)]
    if not runs and not profiles:
        raise SplitlabError(f"{root} holds no runs (index.json or run JSONs) and no profile JSONs; nothing to report")

    sections: list[tuple[str, list[Any]]] = []  # (heading, [html string | (name, Figure)])
    if runs:
        with plots.shared_tables():
            sections += _run_sections(table, runs)
    for prof in profiles:
        sections.append(_profile_section(prof))

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = [item for _, items in sections for item in items if isinstance(item, tuple)]
    png_note = _export_png(figures, out) if png else None
    head = title or f"splitlab report — {root.name}"
    checks = int(is_check(table).sum()) if len(table) else 0
    meta = (f"<p class='note'>Generated {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} "
            f"from <code>{html.escape(str(root))}</code>: {len(runs) - checks} run(s) and {checks} check run(s) "
            f"in {table['experiment'].nunique() if len(table) else 0} experiment(s), {len(profiles)} profile "
            f"sweep(s). {_DEFINITIONS}</p>")
    if png_note:
        meta += f"<p class='note'>{html.escape(png_note)}</p>"
    library = page.scripts() if figures else ""
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(head)}</title>"
           f"<style>{_CSS}</style>{library}</head><body><h1>{html.escape(head)}</h1>{meta}{_render(sections)}"
           "</body></html>")
    out.write_text(doc, encoding="utf-8")
    return out


def _render(sections) -> str:
    """The sections as HTML, each figure as its JSON (``splitlab.present.html.figure``: the
    loader in the page's head draws it)."""
    body = []
    count = 0
    for heading, items in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        for item in items:
            if isinstance(item, tuple):
                name, fig = item
                count += 1
                body.append(page.figure(roomy_margins(fig), f"fig-{count}-{_slug(name)}"))
            else:
                body.append(item)
    return "".join(body)


# a 12 px label's width per character, generously (plotly's fonts: Open Sans, Verdana, Arial)
_CHAR_PX = 7.0


def roomy_margins(fig):
    """``fig`` with margins wide enough for its legend, tick labels and title, estimated from
    their text. plotly widens a margin that is too narrow for them by drawing the figure
    again (automargin): with room enough it draws once, 10-20% of a report's drawing time.
    It still widens one the estimate left too narrow."""
    def chars(values) -> int:
        return max((len(str(v)) for v in values), default=0)

    shown = [t for t in fig.data if t.showlegend is not False and t.name]
    legend = fig.layout.showlegend is True or (fig.layout.showlegend is None and len(fig.data) > 1)
    right = 30
    if legend and shown:
        title = fig.layout.legend.title.text or ""
        right = int(min(480, 50 + _CHAR_PX * max(chars(t.name for t in shown), len(title))))
    bottom, left = 70, 80
    for t in fig.data:
        if t.type != "bar":
            continue
        horizontal = t.orientation == "h"
        cats = t.y if horizontal else t.x
        if cats is None or not len(cats) or not isinstance(cats[0], str):
            continue
        if horizontal:
            left = max(left, int(40 + _CHAR_PX * chars(cats)))
        else:
            angle = abs(fig.layout.xaxis.tickangle or 0) if isinstance(fig.layout.xaxis.tickangle, (int, float)) else 0
            slant = 0.5 if 0 < angle < 60 else (1.0 if angle >= 60 else 0.0)
            bottom = max(bottom, int(60 + _CHAR_PX * chars(cats) * slant))
    top = 90 if fig.layout.title.text else 40
    margin = fig.layout.margin
    fig.update_layout(margin=dict(l=margin.l if margin.l is not None else left,
                                  r=margin.r if margin.r is not None else right,
                                  t=margin.t if margin.t is not None else top,
                                  b=margin.b if margin.b is not None else bottom))
    return fig


# ---- collecting ------------------------------------------------------------------------------

def _folders(root: Path) -> list[Path]:
    return [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _has_runs(folder: Path) -> bool:
    if (folder / INDEX).is_file():
        return True
    for path in folder.glob("*.json"):
        try:
            with path.open() as fh:
                start = fh.read(200)
        except OSError:
            continue
        if _RUN_FORMAT_PREFIX in start:  # any version of the run format
            return True
    return False


def _collect_runs(root: Path, slo):
    """One table of every run (an ``experiment`` column: the folder it came from) and the runs by id."""
    import pandas as pd

    tables, runs = [], {}
    for folder in _folders(root):
        if not _has_runs(folder):
            continue
        table, found = load_results(folder, slo)
        prefix = "" if folder == root else f"{folder.name}/"
        table = table.assign(id=[prefix + i for i in table["id"]], experiment=folder.name)
        if "label" in table:
            table["label"] = distinct_labels(table["label"], [i[len(prefix):] for i in table["id"]], table["workload"])
        tables.append(table)
        runs.update({prefix + k: v for k, v in found.items()})
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return table, runs


def distinct_labels(labels, ids, workloads) -> list[str]:
    """Run labels that tell one experiment's configurations apart. ``run_label`` says mode,
    backend and shares: two chunk sizes, or a green split's policies, read the same. A label
    that two runs of one workload share is, for every run of it, replaced by its run id's
    configuration part (before ``--``: ``chunked-512--poisson-r8`` -> ``chunked 512``, or the
    label and that part where the part does not read as the label). Ids without ``--`` keep
    their label (the legends then carry the run id)."""
    labels = [str(x) for x in labels]
    stems = [str(i).split("--")[0] if "--" in str(i) else None for i in ids]
    seen: set[tuple[str, str]] = set()
    shared: set[str] = set()
    for lab, wl in zip(labels, workloads):
        if (lab, str(wl)) in seen:
            shared.add(lab)
        seen.add((lab, str(wl)))
    out = []
    for lab, stem in zip(labels, stems):
        if lab not in shared or stem is None:
            out.append(lab)
            continue
        words = stem.replace("-", " ").replace("_", " ")
        out.append(words if words.startswith(lab) else f"{lab} ({stem})")
    return out


def is_check(table):
    """Which rows are correctness checks rather than measurements: a workload named
    ``check...``, or at most ``CHECK_MAX_REQUESTS`` requests where the same experiment has a
    run at least 8× larger (a folder of small runs only, e.g. a CPU demo, has no checks)."""
    import pandas as pd

    if not len(table):
        return pd.Series([], dtype=bool)
    named = table["workload"].astype(str).str.lower().str.startswith("check")
    n = table["num_requests"].astype(float) if "num_requests" in table else pd.Series(float("nan"), table.index)
    group = table["experiment"] if "experiment" in table else pd.Series("", table.index)
    largest = n.groupby(group).transform("max")
    tiny = (n <= CHECK_MAX_REQUESTS) & (n * 8 <= largest)
    return named | tiny


# ---- runs --------------------------------------------------------------------------------------

def _run_sections(table, runs) -> list[tuple[str, list[Any]]]:
    checks = is_check(table)
    real, check = table[~checks], table[checks]
    if not len(real):  # only checks: they are what there is to show
        real, check = table, table.iloc[0:0]
    real = _ordered(real)
    sections = [("Runs", _summary_items(real))]
    if len(check):
        sections.append(("Check runs", [
            "<p class='note'>Short correctness checks (a handful of requests each, run before the measurements): "
            "listed here, left out of every figure and comparison.</p>",
            _table_html(_ordered(check)[[c for c in CHECK_COLUMNS if c in check.columns]])]))
    many = real["experiment"].nunique() > 1
    fam = real.assign(_family=[family(w)[0] for w in real["workload"]])
    for name, part in fam.groupby("_family", sort=False):
        part = part.drop(columns="_family")
        # a lone run beside its experiment's sweeps (a side measurement) is in the tables only
        lone = len(part) == 1 and (fam["experiment"] == part["experiment"].iloc[0]).sum() > 1
        items = [_lone_note(part)] if lone else _family_items(name, part, runs, many)
        sections.append((_family_heading(name, part), items))
    sections += _timeline_sections(real, runs)
    return sections


# a workload name's load token: -r<rate> (Poisson or a trace at that mean rate), -x<speed-up>
_LOAD_TOKEN = re.compile(r"-(r|x)(\d+(?:\.\d+)?)(?=-|$)")


def family(workload: str) -> tuple[str, str | None, float | None]:
    """(workload less its load token, the token's letter, its value): ``poisson-r21.2-n160``
    -> ``("poisson-n160", "r", 21.2)``; a name without one is its own family."""
    m = _LOAD_TOKEN.search(str(workload))
    if m is None:
        return str(workload), None, None
    name = str(workload)
    return name[:m.start()] + name[m.end():], m.group(1), float(m.group(2))


def _loads(part):
    """Each row's load: the arrival rate where recorded, else the value in the workload name."""
    names = [family(w) for w in part["workload"]]
    rates = part["rate"] if "rate" in part else [None] * len(part)
    return [float(r) if not missing(r) else v for r, (_, _, v) in zip(rates, names)]


def _load_axis(part) -> str:
    letters = {family(w)[1] for w in part["workload"]}
    return "trace speed-up (×)" if letters == {"x"} else "arrival rate (req/s)"


def _family_heading(name, part) -> str:
    workloads = list(dict.fromkeys(part["workload"]))
    if len(workloads) == 1:
        return f"Workload {workloads[0]}"
    loads = sorted({v for v in _loads(part) if v is not None})
    unit = "×" if _load_axis(part).startswith("trace") else " req/s"
    return f"Workload {name}, {len(workloads)} loads ({loads[0]:g} to {loads[-1]:g}{unit})"


def _lone_note(part) -> str:
    row = part.iloc[0]
    return (f"<p class='note'>One run ({html.escape(str(row['label']))}, experiment "
            f"{html.escape(str(row['experiment']))}), beside that experiment's other workloads: nothing of its own "
            "workload to compare it with; its numbers are in the table above.</p>")


def _family_items(name, part, runs, many_experiments: bool) -> list[Any]:
    """A family of workloads (one workload at several loads): goodput and tail latencies over
    the load, then, at the load with the most runs, the latency CDFs and the speedups per
    experiment (where it has a baseline and another run)."""
    loads = _loads(part)
    part = part.assign(_load=loads)
    workloads = list(dict.fromkeys(part["workload"]))
    counts = part.groupby("workload", sort=False).agg(n=("id", "size"), load=("_load", "max"))
    top = counts.assign(load=counts["load"].fillna(float("-inf"))).sort_values(["n", "load"]).index[-1]
    at_top = part[part["workload"] == top].drop(columns="_load")
    items: list[Any] = []
    if len(workloads) > 1:
        sizes = sorted(part["num_requests"].unique()) if "num_requests" in part else []
        what = [f"{len(part)} run(s) of {len(workloads)} workloads"]
        if sizes:
            what.append(f"{', '.join(str(s) for s in sizes)} requests each")
        if many_experiments:
            what.append("experiments " + ", ".join(part["experiment"].unique()))
        items.append(f"<p class='note'>{html.escape('; '.join(what))}. Every load in the first figure (and the "
                     f"tables above); the figures after it at {html.escape(str(top))}, the load with the most runs "
                     "(the highest of those).</p>")
        items.append((f"over_load_{_slug(name)}", over_load(part.drop(columns="_load"), loads, name)))
    items += _workload_items(top, at_top, runs, many_experiments, note=len(workloads) == 1)
    return items


# the summary columns drawn over the load: goodput, then the tail latencies
OVER_LOAD = ("goodput_req_s", "ttft_p99_s", "tpot_p99_s", "itl_p99_s")


def over_load(rows, loads, name: str):
    """Goodput and p99 latencies over the load, one line per run label and experiment (runs of
    different experiments are never averaged: each its own line), the SLO bound dashed."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from splitlab.present.tables import column_info, column_title

    cols = [c for c in OVER_LOAD if c in rows and rows[c].notna().any()]
    df = rows.assign(_load=loads).dropna(subset=["_load"])
    fig = make_subplots(rows=(len(cols) + 1) // 2, cols=2, subplot_titles=[column_info(c).title for c in cols],
                        horizontal_spacing=0.09, vertical_spacing=0.14)
    many = df["experiment"].nunique() > 1
    lines = list(df.groupby(["experiment", "label"], sort=False))
    for i, ((experiment, label), g) in enumerate(lines):
        g = g.sort_values("_load")
        lab = f"{label} ({experiment})" if many else str(label)
        for j, c in enumerate(cols):
            fig.add_trace(go.Scatter(x=plots.rounded(g["_load"]), y=plots.rounded(g[c]), mode="lines+markers",
                                     name=lab, legendgroup=lab, showlegend=j == 0,
                                     line=dict(color=plots._color(i), width=1.5), marker=dict(size=5),
                                     hovertemplate=f"{lab}<br>%{{x:g}}: %{{y:.4g}}<extra></extra>"),
                          row=j // 2 + 1, col=j % 2 + 1)
    bounds = {"ttft_p99_s": "slo_ttft_s", "tpot_p99_s": "slo_tpot_s", "itl_p99_s": "slo_itl_s"}
    for j, c in enumerate(cols):
        axis = dict(row=j // 2 + 1, col=j % 2 + 1)
        fig.update_xaxes(title_text=_load_axis(df), **axis)
        latency = c != "goodput_req_s"
        fig.update_yaxes(title_text=column_title(c), type="log" if latency and plots._wide(df[c]) else None, **axis)
        slo = bounds.get(c)
        if slo in df and df[slo].nunique() == 1 and not missing(df[slo].iloc[0]):
            fig.add_hline(y=float(df[slo].iloc[0]), line_dash="dash", line_color="#888888", line_width=1, **axis)
    fig.update_layout(template=plots.template(), title=f"Over the load — {name}",
                      height=340 * ((len(cols) + 1) // 2) + 100)
    return fig


def _ordered(table):
    """Rows by experiment, then workload (Poisson by rate, then the rest by name), then run label."""
    keyed = table.assign(_no_rate=table["rate"].isna() if "rate" in table else True)
    by = [c for c in ("experiment", "_no_rate", "rate", "workload", "label") if c in keyed.columns]
    return keyed.sort_values(by, kind="stable").drop(columns="_no_rate")


def _summary_items(real) -> list[Any]:
    items: list[Any] = []
    for experiment, part in real.groupby("experiment", sort=False):
        facts = []
        for col in ("model", "gpu", "slo"):
            if col in part and part[col].nunique() == 1:
                facts.append(f"{'SLO ' if col == 'slo' else ''}{part[col].iloc[0]}")
        items.append(f"<h3>{html.escape(str(experiment))}</h3><p class='note'>{len(part)} run(s)"
                     + (f"; {html.escape(', '.join(map(str, facts)))}" if facts else "") + "</p>")
        cols = [c for c in SUMMARY_COLUMNS if c in part.columns]
        cols += [c for c in ("model", "gpu") if c in part and part[c].nunique() > 1]
        items.append(_table_html(part[cols]))
    return items


def legends(rows) -> list[str]:
    """Legend labels of summary rows: run label and arrival rate, then the experiment where
    two rows would read the same, then the run id."""
    from collections import Counter

    rates = rows["rate"] if "rate" in rows else [None] * len(rows)
    base = [str(lab) if missing(rate) else f"{lab} · {float(rate):.3g} req/s"
            for lab, rate in zip(rows["label"], rates)]
    counts = Counter(base)
    out = [f"{b} ({exp})" if counts[b] > 1 else b for b, exp in zip(base, rows["experiment"])]
    counts = Counter(out)
    return [f"{o} [{rid}]" if counts[o] > 1 else o for o, rid in zip(out, rows["id"])]


def _workload_items(workload, part, runs, many_experiments: bool, note: bool = True) -> list[Any]:
    rates = part["rate"].dropna().unique() if "rate" in part else []
    sizes = sorted(part["num_requests"].unique()) if "num_requests" in part else []
    what = [f"{len(part)} run(s)"]
    if len(rates) == 1:
        what.append(f"arrivals at {rates[0]:.3g} req/s")
    if sizes:
        what.append(f"{', '.join(str(s) for s in sizes)} requests each")
    if many_experiments:
        what.append("experiments " + ", ".join(part["experiment"].unique()))
    items: list[Any] = [f"<p class='note'>{html.escape('; '.join(what))}.</p>"] if note else []
    chosen = dict(zip(legends(part), (runs[i] for i in part["id"])))
    cdf = plots.latency_cdf_grid(chosen, CDF_METRICS, title=f"Latency distributions — {workload}")
    items.append((f"cdf_{_slug(workload)}", cdf))
    for experiment, rows in part.groupby("experiment", sort=False):
        base = next((b for b in BASELINES if b in set(rows["mode"])), None)
        if base is None or rows["label"].nunique() < 2:
            continue
        metrics = [m for m in SPEEDUP_METRICS if m in rows and rows[m].notna().all() and (rows[m] > 0).all()]
        if not metrics:
            continue
        items.append(speedup_table(rows, base, metrics, f"Speedup over {base} — {workload}"
                                   + (f", {experiment}" if many_experiments else "")))
    return items


def speedup_table(rows, base: str, metrics, title: str) -> str:
    """Each run's speedup over the baseline on ``metrics`` (> 1 = better: baseline ÷ run for a
    latency, run ÷ baseline for a rate), as ``plots.speedup_bars`` computes it, in a table:
    a row per run label (runs of one label averaged: give one experiment's rows of one
    workload), shaded green above 1 and red below; the baseline's own values on top, each
    run's on hover. A table, not a figure: exact, and nothing to draw when the page opens."""
    from splitlab.present.tables import column_info, format_value

    is_base = (rows["mode"] == base) | (rows["label"] == base)
    base_values = {m: float(rows.loc[is_base, m].astype(float).mean()) for m in metrics}
    means = rows.groupby("label", sort=False)[list(metrics)].mean()
    head = "".join(f"<th>{html.escape(column_info(m).title)}</th>" for m in metrics)
    first = "".join(f"<td class='num'>{html.escape(format_value(base_values[m], m))}</td>" for m in metrics)
    body = [f"<tr><td>{html.escape(base)} (baseline)</td>{first}</tr>"]
    for label, values in means.iterrows():
        cells = []
        for m in metrics:
            v = float(values[m])
            ratio = (base_values[m] / v if plots.lower_is_better(m) else v / base_values[m]) if v else float("nan")
            if ratio != ratio:
                cells.append("<td class='num'>n/a</td>")
                continue
            strength = min(1.0, abs(math.log2(ratio)) / 2) * 0.55
            color = f"rgba(84,162,75,{strength:.2f})" if ratio > 1 else f"rgba(228,87,86,{strength:.2f})"
            cells.append(f"<td class='num' style='background:{color}' title='{html.escape(format_value(v, m))}'>"
                         f"{ratio:.2f}×</td>")
        body.append(f"<tr><td>{html.escape(str(label))}</td>{''.join(cells)}</tr>")
    return (f"<h3>{html.escape(title)}</h3><p class='note'>&gt; 1: better than {html.escape(base)} (latencies: "
            f"{html.escape(base)} ÷ run; throughput and goodput: run ÷ {html.escape(base)}); a run's own value "
            "on hover.</p>" + _wrapped("<table class='data'><thead><tr><th>run</th>" + head + "</tr></thead><tbody>"
                                       + "".join(body) + "</tbody></table>", len(body) + 1))


def _timeline_pick(real, runs) -> list[str]:
    """The split run with the best goodput (else the first run with steps) and, beside it,
    the baseline of its experiment and workload."""
    with_steps = real[[bool(runs[i].steps) for i in real["id"]]]
    if not len(with_steps):
        return []
    split = with_steps[with_steps["mode"] == "split"]
    if not len(split):
        return [with_steps["id"].iloc[0]]
    score = split["goodput_req_s"].fillna(-1.0) if "goodput_req_s" in split else split["id"].map(lambda _: 0.0)
    top = split.loc[score.idxmax()]
    same = with_steps[(with_steps["experiment"] == top["experiment"]) & (with_steps["workload"] == top["workload"])]
    base = next((same[same["mode"] == b]["id"].iloc[0] for b in BASELINES if (same["mode"] == b).any()), None)
    return [top["id"]] + ([base] if base is not None else [])


def _timeline_sections(real, runs) -> list[tuple[str, list[Any]]]:
    picks = _timeline_pick(real, runs)
    if not picks:
        return []
    rows = real.set_index("id").loc[picks].reset_index()
    names = dict(zip(picks, legends(rows)))
    where = dict(zip(picks, rows["workload"] + (", " + rows["experiment"] if real["experiment"].nunique() > 1 else "")))
    items: list[Any] = ["<p class='note'>Each bar is a prefill step, or a stretch of back-to-back decode steps "
                        "(hover: how many, their batch sizes); the line under it is the number of requests in each "
                        "decode step.</p>"]
    for rid in picks:
        items.append((f"timeline_{_slug(rid)}", plots.timeline(runs[rid], title=f"Timeline — {names[rid]} "
                                                                               f"({where[rid]})")))
    first = picks[0]
    items.append(_phase_table([(names[rid], runs[rid]) for rid in picks]))
    return [(f"Timeline of one run ({names[first]}, {where[first]})", items)]


def _phase_table(named_runs) -> str:
    """Where a request's time went in each run, on average: queue, prefill, from prefill's end
    to the first token, decode (``plots.phase_breakdown`` draws it request by request)."""
    import numpy as np

    from splitlab.present.tables import format_value

    keys = ("queue", "prefill", "handoff", "unsplit", "decode")
    rows = []
    for name, run in named_runs:
        seg = plots._segments(run)
        rows.append((name, {k: float(np.mean(seg[k])) if len(seg[k]) else float("nan") for k in keys}))
    shown = [k for k in keys if any(v[k] > 0 for _, v in rows)]
    head = "".join(f"<th>{html.escape(plots._SEGMENT_NAMES[k])}</th>" for k in shown)
    body = "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(
        f"<td class='num'>{html.escape(format_value(v[k], 'ttft_p50_s'))}</td>" for k in shown) + "</tr>"
        for name, v in rows)
    return ("<p class='note'>Where a request's time went, mean per request:</p>"
            + _wrapped(f"<table class='data'><thead><tr><th>run</th>{head}</tr></thead><tbody>{body}</tbody></table>",
                       len(rows) + 1))


# ---- profiles ----------------------------------------------------------------------------------

def _profile_section(prof) -> tuple[str, list[Any]]:
    import pandas as pd

    from splitlab.measure.profile import ceilings_table

    meta = prof.meta
    versions = meta.get("versions") or {}
    info = (f"<p class='note'>{html.escape(str(meta.get('gpu')))}, {html.escape(str(meta.get('date')))}; "
            f"command <code>{html.escape(str(meta.get('command')))}</code>; "
            + html.escape(", ".join(f"{k} {v}" for k, v in versions.items() if v)) + "</p>")
    ceil = ceilings_table(prof.ceilings, prof.datasheet)
    shown = pd.DataFrame({
        "ceiling": ceil["ceiling"], "unit": ceil["unit"],
        "measured": [fmt_si(v, str(u).split()[0]) for v, u in zip(ceil["measured"], ceil["unit"])],
        "datasheet": [fmt_si(v, str(u).split()[0]) if v == v else "" for v, u in zip(ceil["datasheet"], ceil["unit"])],
        "measured_over_datasheet": ceil["measured_over_datasheet"],
    })
    items: list[Any] = [info, _table_html(shown)]
    df = prof.table
    items.append(("roofline", plots.roofline(df, prof.ceilings, prof.datasheet)))
    if len(df):
        cols = [c for c in ("model", "backend", "phase", "batch", "tokens", "time_s", "tokens_per_s",
                            "achieved_flops_s", "achieved_bytes_s", "intensity", "bound", "frac_of_roof")
                if c in df.columns]
        items.append(_table_html(df[cols]))
    name = Path(meta.get("path", "profile")).stem
    return (f"Prefill vs decode on the roofline ({name})", items)


# ---- helpers ------------------------------------------------------------------------------------

def _table_html(df) -> str:
    """A table for people (``splitlab.present.tables.for_people``), numbers right-aligned."""
    shown = for_people(df)
    numeric = set(shown.attrs.get("numeric", ()))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
    cls = ["num" if c in numeric else "" for c in shown.columns]
    rows = "".join("<tr>" + "".join(f"<td class='{k}'>{html.escape(v)}</td>" if k else f"<td>{html.escape(v)}</td>"
                                    for k, v in zip(cls, row)) + "</tr>"
                   for row in shown.itertuples(index=False))
    return _wrapped(f"<table class='data'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>", len(shown) + 1)


# a table row's height (12 px text, 3 px padding, 1 px border) and what its wrapper adds (margins, border)
_ROW_PX, _TABLE_PX = 21, 17


def _wrapped(table: str, rows: int) -> str:
    """A table in a scrolling wrapper that the browser lays out only when it comes near the
    view (``content-visibility: auto``: the page's first layout skips the long run tables),
    holding meanwhile the height the table will take, so nothing moves when it does."""
    return (f"<div class='tablewrap' style='contain-intrinsic-size:auto {rows * _ROW_PX + _TABLE_PX}px'>"
            f"{table}</div>")


def _slug(text: Any) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-")[:60] or "x"


def png_export_available() -> tuple[bool, str]:
    """Whether static PNG export can work here (kaleido importable and a Chrome/Chromium found)."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("kaleido") is None:
        return False, "kaleido is not installed (pip install kaleido)"
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        if shutil.which(name):
            return True, f"kaleido with {shutil.which(name)}"
    return False, "no Chrome/Chromium found (e.g. apt install chromium)"


def _export_png(figures, out: Path) -> str:
    ok, why = png_export_available()
    if not ok:
        msg = f"PNG export skipped: {why}. The HTML report is complete without it."
        print(f"splitlab report: {msg}", file=sys.stderr)
        return msg
    folder = out.with_name(out.stem + "_png")
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for k, (name, fig) in enumerate(figures):
        try:
            fig.write_image(str(folder / f"{k:02d}_{_slug(name)}.png"), width=1100, height=fig.layout.height or 520)
            written += 1
        except Exception as exc:  # kaleido / browser failures: report, do not fail the report
            msg = f"PNG export stopped after {written} figure(s): {exc.__class__.__name__}: {str(exc)[:200]}"
            print(f"splitlab report: {msg}", file=sys.stderr)
            return msg
    return f"{written} PNG figure(s) written to {folder}"
