"""One self-contained HTML report of a results folder (opens offline: plotly.js inline, once).

``write_report(results_dir, out_path)`` reads every run (``index.json`` folders: the folder
itself and its direct sub-folders, each one *experiment*) and every profile JSON there, and
writes one HTML file a student can read top to bottom:

- the runs of each experiment in one table (readable units), and apart from them the short
  correctness checks (``is_check``), which no figure shows;
- per workload: latency CDFs of its runs, their speedup over the experiment's baseline on
  five metrics, and where each run's time went (queue, prefill, decode);
- the timeline of one split run beside its baseline's, and the per-request breakdown;
- goodput over arrival rate × run, one heatmap per experiment (never averaged across);
- the roofline of each profile sweep with its measured-vs-datasheet ceilings.

Runs of different experiments are never averaged together; legends carry the arrival rate,
and the experiment where two runs would otherwise read the same. The first figure carries
plotly.js (``include_plotlyjs=True``), every later one refers to it; no CDN is referenced.
The figures keep a few hundred points each (``splitlab.present.plots``), so the report of
the recorded H200 results is under 1 MB beside plotly.js itself (4.8 MB in plotly 7).

``png=True`` also writes each figure as PNG next to the report, where kaleido and a
Chromium are present; elsewhere it says so (stderr and in the report) and carries on.
"""

from __future__ import annotations

import datetime as _dt
import html
import sys
from pathlib import Path
from typing import Any

from splitlab.errors import SplitlabError
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
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(head)}</title>"
           f"<style>{_CSS}</style></head><body><h1>{html.escape(head)}</h1>{meta}{_render(sections)}</body></html>")
    out.write_text(doc, encoding="utf-8")
    return out


def _render(sections) -> str:
    """The sections as HTML: plotly.js inline with the first figure only."""
    body = []
    first = True
    for heading, items in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        for item in items:
            if isinstance(item, tuple):
                _, fig = item
                height = fig.layout.height or 480
                body.append(fig.to_html(full_html=False, include_plotlyjs=first, default_width="100%",
                                        default_height=f"{height}px", config={"displaylogo": False}))
                first = False
            else:
                body.append(item)
    return "".join(body)


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
        tables.append(table)
        runs.update({prefix + k: v for k, v in found.items()})
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return table, runs


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
    for workload, part in real.groupby("workload", sort=False):
        sections.append((f"Workload {workload}", _workload_items(workload, part, runs, many)))
    sections += _timeline_sections(real, runs)
    heat = _heatmap_items(real)
    if heat:
        sections.append(("Goodput over arrival rate, per experiment", heat))
    return sections


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


def _workload_items(workload, part, runs, many_experiments: bool) -> list[Any]:
    rates = part["rate"].dropna().unique() if "rate" in part else []
    sizes = sorted(part["num_requests"].unique()) if "num_requests" in part else []
    what = [f"{len(part)} run(s)"]
    if len(rates) == 1:
        what.append(f"arrivals at {rates[0]:.3g} req/s")
    if sizes:
        what.append(f"{', '.join(str(s) for s in sizes)} requests each")
    if many_experiments:
        what.append("experiments " + ", ".join(part["experiment"].unique()))
    items: list[Any] = [f"<p class='note'>{html.escape('; '.join(what))}.</p>"]
    chosen = dict(zip(legends(part), (runs[i] for i in part["id"])))
    cdf = plots.latency_cdf_grid(chosen, title=f"Latency distributions — {workload}")
    items.append((f"cdf_{_slug(workload)}", cdf))
    for experiment, rows in part.groupby("experiment", sort=False):
        base = next((b for b in BASELINES if b in set(rows["mode"])), None)
        if base is None or rows["label"].nunique() < 2:
            continue
        metrics = [m for m in SPEEDUP_METRICS if m in rows and rows[m].notna().all() and (rows[m] > 0).all()]
        if not metrics:
            continue
        fig = plots.speedup_bars(rows, base, metrics,
                                 title=f"Speedup over {base} — {workload}" + (f", {experiment}" if many_experiments
                                                                              else ""))
        fig.update_layout(height=440)
        items.append((f"speedup_{_slug(experiment)}_{_slug(workload)}", fig))
    if len(part) > 1:
        fig = plots.phase_breakdown_runs(chosen, title=f"Phase time per run (mean per request) — {workload}")
        items.append((f"breakdown_{_slug(workload)}", fig))
    return items


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
    items.append((f"breakdown_requests_{_slug(first)}",
                  plots.phase_breakdown(runs[first], title=f"Where each request's time went — {names[first]} "
                                                           f"({where[first]})")))
    return [(f"Timeline of one run ({names[first]}, {where[first]})", items)]


def _heatmap_items(real) -> list[Any]:
    """Goodput over rate × run label, one heatmap per experiment. At each rate only the
    workload most of the experiment's runs share there (its sweep) is drawn: a run of
    another workload at that rate (e.g. a shorter one) is named below, not pooled."""
    if not {"rate", "goodput_req_s", "label"} <= set(real.columns):
        return []
    grid = real.dropna(subset=["rate"])
    keep = [e for e, part in grid.groupby("experiment", sort=False) if part["rate"].nunique() > 1]
    grid = grid[grid["experiment"].isin(keep)]
    if not len(grid):
        return []
    main = grid.groupby(["experiment", "rate"])["workload"].agg(lambda w: w.value_counts().index[0])
    in_sweep = [main[(e, r)] == w for e, r, w in zip(grid["experiment"], grid["rate"], grid["workload"])]
    left = grid[[not k for k in in_sweep]]
    grid = grid[in_sweep]
    slo = f" at SLO {grid['slo'].iloc[0]}" if "slo" in grid and grid["slo"].nunique() == 1 else ""
    fig = plots.heatmap(grid, "rate", "label", "goodput_req_s", title=f"Goodput (req/s){slo}: run × arrival rate")
    note = ("One heatmap per experiment: runs of different experiments are never averaged. A cell shows the "
            "goodput of the run(s) of that label at that rate, and how many runs it holds when more than one.")
    if len(left):
        note += " Not drawn (another workload at the same rate): " + ", ".join(
            f"{lab} ({w})" for lab, w in zip(left["label"], left["workload"])) + "."
    return [f"<p class='note'>{html.escape(note)}</p>", ("heatmap", fig)]


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
    return (f"<div style='overflow-x:auto'><table class='data'><thead><tr>{head}</tr></thead>"
            f"<tbody>{rows}</tbody></table></div>")


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
