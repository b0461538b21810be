"""Analysis of recorded runs: what co-location cost decode, and where splitting pays."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from splitlab.measure.metrics import Run


def decode_interference(run: Run, min_coverage: float = 0.5) -> dict[str, Any]:
    """Decode step times while a prefill step runs beside them vs alone, from ``run.steps``.

    A decode step is *overlapped* when prefill steps cover at least ``min_coverage`` of its
    duration, *alone* when none overlaps it at all. ``slowdown_p50`` is the ratio of the
    median step times; ``slowdown_batch_matched`` compares medians within each decode batch
    size seen both ways (weighted by the overlapped steps), so a bigger batch while
    prefill runs does not pass for interference. NaN where a group is empty.
    """
    pre = sorted((s.start_s, s.end_s) for s in run.steps if s.worker == "prefill")
    dec = sorted((s for s in run.steps if s.worker == "decode" and s.kind == "decode"), key=lambda s: s.start_s)
    alone: dict[int, list[float]] = collections.defaultdict(list)
    over: dict[int, list[float]] = collections.defaultdict(list)
    j = 0
    for d in dec:
        dur = d.end_s - d.start_s
        while j < len(pre) and pre[j][1] <= d.start_s:
            j += 1
        covered = 0.0
        k = j
        while k < len(pre) and pre[k][0] < d.end_s:
            covered += max(0.0, min(d.end_s, pre[k][1]) - max(d.start_s, pre[k][0]))
            k += 1
        if covered <= 0.0:
            alone[d.num_tokens].append(dur)
        elif dur > 0 and covered / dur >= min_coverage:
            over[d.num_tokens].append(dur)
    all_alone = [x for v in alone.values() for x in v]
    all_over = [x for v in over.values() for x in v]
    med_alone = float(np.median(all_alone)) if all_alone else float("nan")
    med_over = float(np.median(all_over)) if all_over else float("nan")
    num = den = 0.0
    for batch, times in over.items():
        if alone.get(batch):
            num += len(times) * float(np.median(times)) / float(np.median(alone[batch]))
            den += len(times)
    return {
        "decode_steps": len(dec),
        "alone_steps": len(all_alone),
        "overlapped_steps": len(all_over),
        "overlap_fraction": len(all_over) / len(dec) if dec else float("nan"),
        "decode_step_alone_p50_s": med_alone,
        "decode_step_overlapped_p50_s": med_over,
        "slowdown_p50": med_over / med_alone if all_alone and all_over else float("nan"),
        "slowdown_batch_matched": num / den if den else float("nan"),
    }
