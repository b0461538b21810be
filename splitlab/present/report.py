"""One self-contained HTML report of a results folder (opens offline: plotly JS inline).

``write_report(results_dir, out_path)`` reads every run (``index.json`` folders: the folder
itself and its direct sub-folders) and every profile JSON there, and writes one HTML file:
a summary table, latency CDFs, speedup bars against a baseline, the phase breakdown per
run, the timeline of one run, a rate x SM-share heatmap when the runs span both, and the
roofline of each profile sweep with its measured-vs-datasheet ceilings. The first figure
carries plotly.js inline (``include_plotlyjs=True``); no CDN is referenced.

``png=True`` also writes each figure as PNG next to the report, where kaleido and a
Chromium are present; elsewhere it says so (stderr and in the report) and carries on.
"""

from __future__ import annotations

import datetime as _dt
import html
import math
import sys
from pathlib import Path
from typing import Any

from splitlab.present import plots
from splitlab.errors import SplitlabError
from splitlab.present.results import INDEX, RUN_FORMAT, find_profiles, load_profile, load_results

SUMMARY_COLUMNS = (
    "label", "workload", "model", "gpu", "rate", "num_requests", "completed", "throughput_tok_s",
    "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "itl_p99_s", "e2e_p99_s", "goodput_req_s",
    "slo_attainment", "peak_memory_bytes",
)
BASELINES = ("serial", "chunked", "hf-generate")

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:4px}
table.data{border-collapse:collapse;font-size:12px;margin:8px 0}
table.data td,table.data th{border:1px solid #ddd;padding:3px 6px;text-align:right}
table.data th{background:#f4f4f4}.note{color:#555;font-size:13px}.warn{color:#a33}
"""


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
        sections += _run_sections(table, runs)
    for prof in profiles:
        sections.append(_profile_section(prof))

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = [item for _, items in sections for item in items if isinstance(item, tuple)]
    png_note = _export_png(figures, out) if png else None

    body = []
    first = True
    for heading, items in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        for item in items:
            if isinstance(item, tuple):
                _, fig = item
                height = fig.layout.height or 520
                body.append(fig.to_html(full_html=False, include_plotlyjs=True if first else False,
                                        default_width="100%", default_height=f"{height}px"))
                first = False
            else:
                body.append(item)
    head = title or f"splitlab report — {root.name}"
    meta = (f"<p class='note'>Generated {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} "
            f"from <code>{html.escape(str(root))}</code>: {len(runs)} run(s), {len(profiles)} profile sweep(s). "
            "Metric definitions: TTFT = arrival to first token; TPOT = (E2E - TTFT)/(tokens - 1); ITL = every gap "
            "between consecutive tokens; E2E = arrival to last token; goodput = requests meeting every SLO per "
            "second of wall time.</p>")
    if png_note:
        meta += f"<p class='note'>{html.escape(png_note)}</p>"
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(head)}</title>"
           f"<style>{_CSS}</style></head><body><h1>{html.escape(head)}</h1>{meta}{''.join(body)}</body></html>")
    out.write_text(doc, encoding="utf-8")
    return out


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
        if RUN_FORMAT in start:
            return True
    return False


def _collect_runs(root: Path, slo):
    import pandas as pd

    tables, runs = [], {}
    for folder in _folders(root):
        if not _has_runs(folder):
            continue
        table, found = load_results(folder, slo)
        prefix = "" if folder == root else f"{folder.name}/"
        table = table.assign(id=[prefix + i for i in table["id"]])
        tables.append(table)
        runs.update({prefix + k: v for k, v in found.items()})
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return table, runs


# ---- sections ------------------------------------------------------------------------------------

def _run_sections(table, runs) -> list[tuple[str, list[Any]]]:
    sections = []
    cols = [c for c in SUMMARY_COLUMNS if c in table.columns]
    sections.append(("Summary", [_table_html(table[cols])]))

    by_workload = list(table.groupby("workload", sort=False))
    cdf_items: list[Any] = []
    speed_items: list[Any] = []
    for workload, part in by_workload:
        chosen = [runs[i] for i in part["id"]]
        suffix = f" — {workload}" if len(by_workload) > 1 else ""
        fig = plots.latency_cdf_grid(chosen, title=f"Latency distributions{suffix}")
        cdf_items.append((f"cdf_{_slug(workload)}", fig))
        base = next((b for b in BASELINES if b in set(part["mode"])), None)
        if base is not None and part["label"].nunique() > 1:
            for metric in ("throughput_tok_s", "goodput_req_s", "ttft_p99_s", "tpot_p99_s"):
                values = part[metric].astype(float) if metric in part else None
                if values is None or not values.notna().all() or (values <= 0).any():
                    continue
                fig = plots.speedup_bars(part, base, metric)
                fig.update_layout(title=f"Speedup over {base} on {metric}{suffix}", height=380)
                speed_items.append((f"speedup_{metric}_{_slug(workload)}", fig))
    sections.append(("Latency distributions", cdf_items))
    if speed_items:
        sections.append(("Speedups", speed_items))
    else:
        sections.append(("Speedups", ["<p class='note'>No baseline run (serial, chunked or hf-generate) beside "
                                      "another run of the same workload: no speedup to show.</p>"]))
    sections.append(("Phase time per run", [("breakdown", plots.phase_breakdown_runs([runs[i] for i in table["id"]]))]))

    pick = _timeline_pick(table, runs)
    if pick is not None:
        run = runs[pick]
        sections.append((f"Timeline of one run ({plots.run_label(run)}, {run.workload})",
                         [("timeline", plots.timeline(run)),
                          ("breakdown_requests", plots.phase_breakdown(run))]))
    if {"rate", "prefill_share"} <= set(table.columns):
        grid = table.dropna(subset=["rate", "prefill_share"])
        if grid["rate"].nunique() > 1 and grid["prefill_share"].nunique() > 1:
            sections.append(("Goodput over arrival rate and SM share",
                             [("heatmap", plots.heatmap(grid, "rate", "prefill_share", "goodput_req_s"))]))
    return sections


def _timeline_pick(table, runs) -> str | None:
    """The run whose timeline is shown: a split run if any, else the first with steps."""
    with_steps = [i for i in table["id"] if runs[i].steps]
    split = [i for i in with_steps if runs[i].mode == "split"]
    return (split or with_steps or [None])[0]


def _profile_section(prof) -> tuple[str, list[Any]]:
    from splitlab.measure.profile import ceilings_table

    meta = prof.meta
    versions = meta.get("versions") or {}
    info = (f"<p class='note'>{html.escape(str(meta.get('gpu')))}, {html.escape(str(meta.get('date')))}; "
            f"command <code>{html.escape(str(meta.get('command')))}</code>; "
            + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + "</p>")
    ceil = ceilings_table(prof.ceilings, prof.datasheet)
    items: list[Any] = [info, _table_html(ceil)]
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
    def fmt(v):
        if isinstance(v, float):
            if math.isnan(v):
                return ""
            return f"{v:.4g}"
        return html.escape(str(v)) if v is not None else ""

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
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
            fig.write_image(str(folder / f"{k:02d}_{_slug(name)}.png"), width=1100, height=520)
            written += 1
        except Exception as exc:  # kaleido / browser failures: report, do not fail the report
            msg = f"PNG export stopped after {written} figure(s): {exc.__class__.__name__}: {str(exc)[:200]}"
            print(f"splitlab report: {msg}", file=sys.stderr)
            return msg
    return f"{written} PNG figure(s) written to {folder}"
