"""What every figure module shares: plotly's import, the lean template, rounding, the
per-run ``requests`` cache (``shared_tables``), the phase colours, run labels and colours."""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np

from splitlab.present.results import run_label

PHASE_COLORS = {
    "prefill": "#4C78A8",
    "decode": "#F58518",
    "mixed": "#54A24B",
    "queue": "#BAB0AC",
    "handoff": "#B279A2",
    "unsplit": "#9D755D",
}


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


def _wide(values: Sequence[float], factor: float = 10.0) -> bool:
    """Positive finite values spanning more than ``factor``× (then a log axis reads better)."""
    v = [float(x) for x in values if x is not None and np.isfinite(x)]
    return bool(v) and min(v) > 0 and max(v) / min(v) > factor
