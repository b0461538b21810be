"""SLO curves over recorded runs: re-scoring, attainment against an SLO scale and against the
arrival rate, the highest rate a mode sustains, and split's goodput ratio over its peers.

Pure functions of ``Run`` objects (or run files: ``.json`` / ``.json.gz`` written by
``Run.save``, a folder of them, or a glob pattern); every number comes from
``splitlab.measure.metrics.goodput``, so a request counts only when it meets every bound of the
SLO, and goodput is per second of the run's wall time (time 0 to the last token).

The conventions are DistServe's: attainment (the fraction of requests meeting every bound)
against an SLO scale factor (every bound multiplied by it), and the highest arrival rate at
which a mode keeps 90% attainment.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import numbers
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from splitlab.config import SLO
from splitlab.errors import ConfigError
from splitlab.measure.metrics import Run, goodput, itl_statistic, load_run, request_gaps

# SLO scale factors of ``attainment_vs_scale`` (0.25x to 3x every bound)
DEFAULT_SCALES = tuple(round(0.25 * i, 2) for i in range(1, 13))


# ---- runs in, labels, rates ------------------------------------------------------------

def _load(item) -> tuple[str | None, Run]:
    """(label from the file name or None, run) of a Run or a run file."""
    if isinstance(item, Run):
        return None, item
    if isinstance(item, (str, Path)):
        path = Path(item)
        return re.sub(r"\.json(\.gz)?$", "", path.name), load_run(path)
    raise ConfigError(f"expected a splitlab Run or the path of a run file, got {type(item).__name__}")


def _expand(source) -> list:
    """A folder or a glob pattern -> its run files (sorted); anything else as given."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if re.search(r"\.json(\.gz)?$", p.name) and p.name != "index.json")
        elif path.is_file():
            return [path]
        else:
            files = sorted(Path(p) for p in glob.glob(str(source)))
        if not files:
            raise ConfigError(f"no run files at {str(source)!r}; give a run file, a folder of them or a glob pattern")
        return files
    if isinstance(source, Run):
        return [source]
    return list(source)


def runs_by_label(runs) -> dict[str, Run]:
    """``{label: Run}`` from a Run, run files (a path, folder or glob), a list, or a mapping.

    Labels: the mapping's keys, else the file name (``serial--poisson-mid``), else
    ``run_name``; repeats get `` #2``, `` #3``.
    """
    if isinstance(runs, Mapping):
        return {str(k): _load(v)[1] for k, v in runs.items()}
    out: dict[str, Run] = {}
    for item in _expand(runs):
        name, run = _load(item)
        label = name or run_name(run)
        n = 1
        while (label if n == 1 else f"{label} #{n}") in out:
            n += 1
        out[label if n == 1 else f"{label} #{n}"] = run
    return out


def run_name(run: Run) -> str:
    """A short label from the run's own record: ``split mps 60/40``, ``replicas x2 serial+mps``."""
    cfg = run.config
    parts = [run.mode]
    if cfg.replicas:
        parts.append(f"x{cfg.replicas}")
    if cfg.backend:
        parts.append(str(cfg.backend))
    if cfg.prefill_share is not None and cfg.decode_share is not None:
        parts.append(f"{cfg.prefill_share:g}/{cfg.decode_share:g}")
    return " ".join(parts)


def arrival_rate(run: Run) -> float | None:
    """The run's arrival rate (requests/s) as its config records it (``RunConfig.rate``; an
    older run's comes from its workload's name, ``poisson-r21.2-n160`` -> 21.2); None when it
    has none (e.g. a trace replay)."""
    return run.config.rate


def _rate_points(runs) -> list[tuple[float, str | None, Run]]:
    """(rate, file label, run) of each item: a Run / run file (rate from its record) or a
    ``(rate, run)`` pair."""
    points = []
    for item in _expand(runs):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], numbers.Real):
            rate, (name, run) = float(item[0]), _load(item[1])
        else:
            name, run = _load(item)
            rate = arrival_rate(run)
            if rate is None:
                raise ConfigError(f"run {name or run_name(run)} ({run.workload}) records no arrival rate; "
                                  "pass (rate, run) pairs instead")
        if not math.isfinite(rate) or rate <= 0:
            raise ConfigError(f"an arrival rate must be a positive number of requests/s, got {rate!r}")
        points.append((rate, name, run))
    if not points:
        raise ConfigError("no runs given; give runs of one mode at several arrival rates")
    return sorted(points, key=lambda p: p[0])


class _Scorer:
    """One run's request table and gaps, computed once and scored under many SLOs."""

    def __init__(self, run: Run):
        self.table = run.requests
        self.wall_s = run.wall_s
        self.gaps = request_gaps(run.traces)
        self._itl: dict[float, np.ndarray] = {}

    def score(self, slo: SLO) -> dict[str, Any]:
        itl = None
        if slo.itl_s is not None:
            if slo.itl_quantile not in self._itl:
                self._itl[slo.itl_quantile] = itl_statistic(self.gaps, slo.itl_quantile)
            itl = self._itl[slo.itl_quantile]
        return goodput(self.table, self.wall_s, slo, itl=itl)


def _check_slo(slo) -> SLO:
    if not isinstance(slo, SLO):
        raise ConfigError(f"expected a splitlab.SLO (e.g. SLO(ttft_s=2, tpot_s=None, itl_s=0.03)), got {slo!r}")
    return slo


# ---- re-scoring and curves ----------------------------------------------------------------

def rescore(runs, slo: SLO):
    """Goodput of recorded runs under any ``slo``: one row per run (label, mode, workload,
    rate, requests, wall time, then ``goodput``'s keys). ``runs``: as ``runs_by_label``, e.g.
    ``rescore("results/colocation_h200/*poisson-mid*", SLO(ttft_s=2, tpot_s=None, itl_s=0.03))``.
    """
    import pandas as pd

    slo = _check_slo(slo)
    rows = [{"label": label, "mode": run.mode, "workload": run.workload, "rate": arrival_rate(run),
             "num_requests": len(run.traces), "wall_s": run.wall_s, **_Scorer(run).score(slo)}
            for label, run in runs_by_label(runs).items()]
    return pd.DataFrame(rows)


def attainment_vs_scale(runs, slo: SLO, scales: Sequence[float] = DEFAULT_SCALES):
    """Attainment and goodput of each run with every bound of ``slo`` multiplied by each
    scale (DistServe's "SLO scale" figure): one row per (label, scale)."""
    import pandas as pd

    slo = _check_slo(slo)
    scaled = [(float(s), slo.scaled(s)) for s in scales]
    if not scaled:
        raise ConfigError("give at least one SLO scale factor, e.g. scales=(0.5, 1, 2)")
    rows = []
    for label, run in runs_by_label(runs).items():
        scorer = _Scorer(run)
        rows += [{"label": label, "scale": s, **scorer.score(cell)} for s, cell in scaled]
    return pd.DataFrame(rows)


def attainment_vs_rate(runs, slo: SLO, label: str | None = None):
    """Attainment and goodput of runs at several arrival rates, one row per run, by rate.

    ``runs``: the runs of ONE mode (Runs, run files, or ``(rate, run)`` pairs where the run
    records no rate), labelled ``label`` (default: the first run's name); or a mapping
    ``{label: runs of that mode}`` for several modes.
    """
    import pandas as pd

    slo = _check_slo(slo)
    groups = runs.items() if isinstance(runs, Mapping) else [(label, runs)]
    rows = []
    for name, items in groups:
        points = _rate_points(items)
        if name is None:  # a recorded file "serial--poisson-mid" names its mode first
            file = points[0][1]
            name = re.sub(r"--.*$", "", file) if file else run_name(points[0][2])
        rows += [{"label": str(name), "rate": rate, "workload": run.workload, **_Scorer(run).score(slo)}
                 for rate, _, run in points]
    return pd.DataFrame(rows)


# ---- the highest rate at a target attainment --------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MaxRate:
    """The highest arrival rate a mode sustains at ``target`` attainment.

    ``status``: ``"interpolated"`` (between the last measured rate that meets the target and
    the first that misses it), ``"at_least"`` (even the highest rate measured meets it:
    ``rate`` is that highest rate, a lower bound) or ``"below_lowest"`` (even the lowest rate
    measured misses it: ``rate`` is NaN). ``reason`` says it in words.
    """

    rate: float
    status: str
    target: float
    reason: str

    @property
    def at_least(self) -> bool:
        return self.status == "at_least"

    def __str__(self) -> str:
        if self.status == "at_least":
            return f"≥ {self.rate:.3g} req/s (highest rate measured)"
        if self.status == "below_lowest":
            return "none: " + self.reason
        return f"{self.rate:.3g} req/s"


def interpolate_max_rate(rates: Sequence[float], attainment: Sequence[float], target: float = 0.9) -> MaxRate:
    """``MaxRate`` from attainment measured at several rates (repeats at one rate averaged).

    Walking up from the lowest rate, the first rate whose attainment falls below ``target``
    ends the range; the answer is linearly interpolated between it and the rate before.
    A later rate that meets the target again does not count (attainment noise is not
    capacity), so the answer is conservative.
    """
    if not (isinstance(target, numbers.Real) and 0 < target <= 1):
        raise ConfigError(f"the target attainment must be in (0, 1], e.g. 0.9; got {target!r}")
    r = np.asarray(rates, dtype=float)
    a = np.asarray(attainment, dtype=float)
    if r.size == 0 or r.size != a.size:
        raise ConfigError(f"give one attainment per rate (got {r.size} rates, {a.size} attainments)")
    levels = np.unique(r)
    mean = np.array([np.nanmean(a[r == x]) for x in levels])
    below = np.flatnonzero(~(mean >= target))  # NaN attainment counts as a miss
    pct = f"{target:.0%}"
    if below.size == 0:
        return MaxRate(float(levels[-1]), "at_least", target,
                       f"every rate measured meets {pct} attainment, up to {levels[-1]:.3g} req/s: "
                       "measure higher rates to find the limit")
    i = int(below[0])
    if i == 0:
        return MaxRate(math.nan, "below_lowest", target,
                       f"even the lowest rate measured, {levels[0]:.3g} req/s, has {mean[0]:.1%} attainment "
                       f"(< {pct}): measure lower rates")
    r0, r1, a0, a1 = levels[i - 1], levels[i], mean[i - 1], mean[i]
    rate = r0 + (a0 - target) / (a0 - a1) * (r1 - r0) if math.isfinite(a1) else r0
    return MaxRate(float(rate), "interpolated", target,
                   f"{pct} attainment is crossed between {r0:.3g} req/s ({a0:.1%}) and {r1:.3g} req/s ({a1:.1%})")


def max_rate(runs, slo: SLO, target: float = 0.9) -> MaxRate:
    """The highest arrival rate the runs of ONE mode sustain at ``target`` attainment of
    ``slo`` (runs as in ``attainment_vs_rate``)."""
    table = attainment_vs_rate(runs, slo)
    return interpolate_max_rate(table["rate"], table["slo_attainment"], target)


def max_rates(table, target: float = 0.9) -> dict[str, MaxRate]:
    """``{label: MaxRate}`` of an ``attainment_vs_rate`` table."""
    for col in ("label", "rate", "slo_attainment"):
        if col not in table:
            raise ConfigError(f"the table has no {col!r} column; give the table of attainment_vs_rate")
    return {str(label): interpolate_max_rate(g["rate"], g["slo_attainment"], target)
            for label, g in table.groupby("label", sort=False)}


# ---- split against its best peer --------------------------------------------------------------

def _near(rates: np.ndarray, rate: float, rel_tol: float) -> np.ndarray:
    return np.abs(rates - rate) <= rel_tol * rate


def goodput_ratio_grid(groups: Mapping[str, Any], split: str, slo: SLO, gap_bounds_s: Sequence[float],
                       peers: Sequence[str] | None = None, rel_tol: float = 0.01):
    """Split's goodput over the best peer's, on a grid of arrival rate × gap bound.

    ``groups``: ``{label: runs of that mode at several rates}`` (as ``attainment_vs_rate``);
    ``split``: the label whose goodput is the numerator; ``peers``: the labels it is compared
    with (default: every other label). Each cell scores every run with ``slo``'s bounds and
    ``itl_s`` set to the cell's gap bound; the peer is whichever of ``peers`` has the most
    goodput at that rate (runs within ``rel_tol`` of split's rate; repeats averaged).
    One row per cell: ``rate``, ``itl_s``, ``split_goodput_req_s``, ``peer_goodput_req_s``,
    ``best_peer``, ``ratio`` (inf where every peer has 0 goodput and split does not; NaN
    where both have none, or no peer ran at that rate).
    """
    import pandas as pd

    slo = _check_slo(slo)
    if split not in groups:
        raise ConfigError(f"no runs labelled {split!r}; labels: {sorted(groups)}")
    peers = [k for k in groups if k != split] if peers is None else list(peers)
    missing = [p for p in peers if p not in groups or p == split]
    if not peers or missing:
        raise ConfigError(f"peers must be other labels of groups ({sorted(k for k in groups if k != split)}); "
                          f"got {missing or peers}")
    bounds = [float(g) for g in gap_bounds_s]
    if not bounds:
        raise ConfigError("give at least one gap bound in seconds, e.g. gap_bounds_s=(0.03, 0.06)")
    scored = {k: [(rate, _Scorer(run)) for rate, _, run in _rate_points(groups[k])] for k in [split, *peers]}
    rows = []
    for gap in bounds:
        cell_slo = slo.replace(itl_s=gap)
        scores = {k: np.array([[rate, s.score(cell_slo)["goodput_req_s"]] for rate, s in pts])
                  for k, pts in scored.items()}
        for rate in np.unique(scores[split][:, 0]):
            mine = float(scores[split][scores[split][:, 0] == rate, 1].mean())
            theirs = {k: float(scores[k][_near(scores[k][:, 0], rate, rel_tol), 1].mean())
                      for k in peers if _near(scores[k][:, 0], rate, rel_tol).any()}
            best = max(theirs, key=theirs.get) if theirs else None
            peer = theirs[best] if best else math.nan
            ratio = mine / peer if peer > 0 else (math.inf if mine > 0 and best else math.nan)
            rows.append({"rate": float(rate), "itl_s": gap, "split_goodput_req_s": mine,
                         "peer_goodput_req_s": peer, "best_peer": best, "ratio": ratio})
    return pd.DataFrame(rows)
