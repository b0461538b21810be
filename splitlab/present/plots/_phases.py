"""Phase breakdowns: where each request's time went (queue, prefill, decode), per request
and per run."""

from __future__ import annotations

import numpy as np

from splitlab.errors import SplitlabError
from splitlab.present.plots._base import PHASE_COLORS, _go, _labelled, _requests, rounded, template
from splitlab.present.results import run_label


def _segments(run) -> dict[str, np.ndarray]:
    """Per-request seconds of queue, prefill, prefill-end-to-first-token, decode."""
    t = _requests(run)
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
        fig.add_trace(go.Bar(x=x, y=rounded(values), name=_SEGMENT_NAMES[key], marker_color=PHASE_COLORS[key],
                             hovertemplate=f"request %{{x}}: {_SEGMENT_NAMES[key]} %{{y:.4g}} s<extra></extra>"))
    fig.update_layout(barmode="stack", template=template(), bargap=0.05,
                      title=title or f"Where each request's time went — {run_label(run)}",
                      xaxis=dict(title=dict(text="request id"), type="category"),
                      yaxis=dict(title=dict(text="time since arrival (s)")))
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
        fig.add_trace(go.Bar(x=names, y=rounded(values), name=_SEGMENT_NAMES[key], marker_color=PHASE_COLORS[key],
                             hovertemplate=f"%{{x}}: {_SEGMENT_NAMES[key]} %{{y:.4g}} s<extra></extra>"))
    what = "mean per request" if agg == "mean" else "total over requests"
    fig.update_layout(barmode="stack", template=template(), title=title or f"Phase time per run ({what})",
                      height=max(380, 300 + 9 * max((len(n) for n in names), default=0)),
                      xaxis=dict(title=dict(text="run"), tickangle=-30 if len(names) > 4 else 0),
                      yaxis=dict(title=dict(text=f"time ({what}, s)")))
    return fig
