"""Workloads at arrival rates set against what the serial engine serves.

A rate means little on its own: 2 req/s overloads a big model and idles a small one. So a
benchmark first measures ``burst_capacity`` (the requests/s of ``serial`` on a workload whose
requests all arrive at t=0), then builds its workloads at multiples of it: ``poisson_at`` under
the keys of ``analysis.rate_labels`` (``poisson-low`` / ``-mid`` / ``-high``) and ``trace_at``,
a trace's first requests replayed at target mean rates (``azure-a``, ``azure-b``), the keys
``analysis.colocation_targets`` reads. ``Calibration`` does both and records what it measured;
``benchmarks/colocation.py`` calibrates this way.

A benchmark resumed from a merged file must serve the same requests as the runs it keeps:
``Calibration`` reuses the rates that file used, and ``workload_changes`` names what differs.
``check_workload`` is the small workload every session of a comparison runs first, its tokens
compared with serial's.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from splitlab.config import EngineConfig
from splitlab.errors import WorkloadError
from splitlab.measure.analysis import calibrated_rates, rate_labels
from splitlab.workload import LengthDist, Request, Workload, from_azure_trace, from_prompts, poisson

Built = dict[str, tuple[Workload, dict[str, Any]]]  # key -> (workload, what the result file records of it)
TRACE_LABELS = ("a", "b")
RATE_MULTIPLES = (0.6, 1.0, 1.3)  # of serial's burst capacity: low, near saturation, overload
TRACE_MULTIPLES = (0.6, 1.0)


def rebase(requests: Iterable[Request], name: str, at_zero: bool = False) -> Workload:
    """Requests with ids 0.. in arrival order and the first arrival at 0 (all at 0 with ``at_zero``)."""
    requests = list(requests)
    if not requests:
        raise WorkloadError(f"{name}: no requests to rebase")
    t0 = min(r.arrival_s for r in requests)
    ordered = sorted(requests, key=lambda r: (r.arrival_s, r.id))
    return Workload(name, tuple(Request(i, r.prompt_ids, r.max_new_tokens, 0.0 if at_zero else r.arrival_s - t0)
                                for i, r in enumerate(ordered)))


def burst_capacity(workload: Workload, model, config: EngineConfig) -> float:
    """Requests/s of ``serial`` on ``workload`` with every request arriving at t=0."""
    import splitlab

    run = splitlab.run(rebase(workload.requests, workload.name, at_zero=True), model, mode="serial", config=config,
                       progress=False)
    return len(workload) / run.wall_s


def mean_rate(workload: Workload) -> float:
    """Requests per second from the first arrival (at 0) to the last."""
    return len(workload) / (max(r.arrival_s for r in workload) or 1.0)


def poisson_at(rates: Sequence[float], n: int, prompt_len: LengthDist, output_len: LengthDist, model,
               seed: int = 1) -> Built:
    """``n`` Poisson requests at each of 1 to 3 rates, keyed ``poisson-low`` / ``-mid`` / ``-high``."""
    return {key: (poisson(n, rate=rate, prompt_len=prompt_len, output_len=output_len, seed=seed, model=model,
                          name=f"poisson-r{rate:.3g}-n{n}"), {"kind": "poisson", "rate": rate})
            for key, rate in rate_labels(rates).items()}


def prefix_of(workload: Workload, meta: Mapping[str, Any], first: int) -> tuple[Workload, dict[str, Any]]:
    """The first ``first`` requests of a Poisson workload (for a mode too slow for all of them)."""
    return (rebase(workload.requests[:first], f"{workload.name}-first{first}"),
            {"kind": "poisson-prefix", "rate": meta["rate"]})


def trace_at(path: str | Path, targets: Sequence[float], trace_rate: float, n: int, max_total_len: int, model,
             seed: int = 3) -> Built:
    """The trace's first ``n`` requests at each target mean rate (at most two, ``azure-a`` and
    ``azure-b``), its arrivals scaled from ``trace_rate``, the trace's own mean rate."""
    out: Built = {}
    for label, target in zip(TRACE_LABELS, targets):
        scale = target / trace_rate
        wl = from_azure_trace(path, rate_scale=scale, limit=n, max_total_len=max_total_len, seed=seed, model=model,
                              name=f"azure-code-x{scale:.3g}-n{n}")
        out[f"azure-{label}"] = (wl, {"kind": "azure", "rate": target, "rate_scale": scale})
    return out


def recorded_rates(recorded: Mapping[str, Mapping[str, Any]], kind: str) -> list[float]:
    """The rates of a result file's workloads of one kind (``poisson`` or ``azure``), in its order."""
    return [m["rate"] for m in recorded.values() if m.get("kind") == kind]


def workload_changes(built: Built, recorded: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Each workload whose name or size differs from the result file's entry under its key."""
    return [f"workload {key} was {recorded[key]['name']} ({recorded[key]['requests']} requests), now {wl.name} "
            f"({len(wl)})" for key, (wl, _meta) in built.items()
            if key in recorded and (recorded[key]["name"] != wl.name or recorded[key]["requests"] != len(wl))]


def check_workload(vocab_size: int, lens: Sequence[int], new_tokens: int, seed: int = 7) -> Workload:
    """Random prompts of the given lengths, the first three arriving at once and the rest spread
    over 0.2 s, so a mode batches, queues and joins requests while its tokens are checked."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, vocab_size) for _ in range(k)] for k in lens]
    arrivals = [0.0 if i < 3 else 0.2 * i / len(lens) for i in range(len(prompts))]
    return from_prompts(prompts, new_tokens, arrivals, name="check")


class Calibration:
    """Sets arrival rates against serial's burst capacity and builds the workloads at them.

    ``recorded``: the ``workloads`` of a result file being resumed; its rates are reused (and
    nothing measured), so the runs kept and the runs added serve the same requests.
    ``measured``: the dict this records its measurements in (capacities, the trace's own rate),
    updated in place so a caller's state holds them even if a later step fails.
    ``on_capacity(workload, req_s)`` is called after each capacity measurement.
    """

    def __init__(self, model, config: EngineConfig, recorded: Mapping[str, Mapping[str, Any]] | None = None,
                 measured: dict[str, Any] | None = None,
                 on_capacity: Callable[[Workload, float], None] | None = None) -> None:
        self.model, self.config, self.recorded = model, config, recorded or {}
        self.measured = measured if measured is not None else {}
        self.on_capacity = on_capacity

    def capacity(self, workload: Workload) -> float:
        cap = burst_capacity(workload, self.model, self.config)
        if self.on_capacity is not None:
            self.on_capacity(workload, cap)
        return cap

    def poisson(self, n: int, prompt_len: LengthDist, output_len: LengthDist, rates: Sequence[float] | None = None,
                calib_n: int = 8, multiples: Sequence[float] = RATE_MULTIPLES) -> Built:
        """Poisson workloads at ``rates``, else at the recorded ones, else at ``multiples`` of the
        capacity measured on a burst of ``calib_n`` requests."""
        rates = rates or recorded_rates(self.recorded, "poisson") or None
        if rates is None:
            burst = poisson(calib_n, rate=1e6, prompt_len=prompt_len, output_len=output_len, seed=99, model=self.model,
                            name="calibration-poisson")
            self.measured.update(poisson_capacity_req_s=self.capacity(burst), rate_multiples=list(multiples))
            rates = calibrated_rates(self.measured["poisson_capacity_req_s"], multiples)
        return poisson_at(rates, n, prompt_len, output_len, self.model)

    def trace(self, path: str | Path, n: int, max_total_len: int, targets: Sequence[float] | None = None,
              multiples: Sequence[float] = TRACE_MULTIPLES) -> Built:
        """The trace replayed at ``targets`` (req/s), else at the recorded rates, else at
        ``multiples`` of serial's capacity on the trace's requests all at once."""
        base = from_azure_trace(path, rate_scale=1.0, limit=n, max_total_len=max_total_len, seed=3, model=self.model,
                                name="azure-code")
        targets = sorted(targets or recorded_rates(self.recorded, "azure"))
        if not targets:
            cap = self.measured["azure_capacity_req_s"] = self.capacity(rebase(base.requests, "calibration-azure"))
            targets = [m * cap for m in multiples]
        trace_rate = self.measured["azure_trace_rate_req_s"] = mean_rate(base)
        return trace_at(path, targets, trace_rate, n, max_total_len, self.model)
