"""The offline replay: a workload known in advance, run through an online engine.

There is one engine loop. ``splitlab.run(..., mode="serial" | "chunked" | "split")`` builds an
online engine (``splitlab.engine.online``), submits every request at once with its arrival
time (seconds after the run's start, ``t0``), and waits: the engine admits each request only
once its clock passes ``t0 + arrival_s``, exactly as a server admits a request when it comes.
The traces and steps are then moved to the run's time base (seconds since ``t0``), which is
what every ``Run`` records.

Every request asks for exactly ``max_new_tokens`` greedy tokens with EOS masked
(``ignore_eos``): the runner's own path, HF ``generate(do_sample=False, min_new_tokens=n)``'s
tokens.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from splitlab.errors import WorkerError
from splitlab.measure.metrics import RequestTrace, StepTrace
from splitlab.workload import Workload

#: Seconds between submitting the last request and the run's start, per request submitted
#: (a workload's first arrivals must not be in the past by the time all are queued).
LEAD_S, LEAD_PER_REQUEST_S = 0.02, 2e-5
#: How often the waiting caller looks at the engine (progress bar, failure, stall).
POLL_S = 0.05


def replay(engine, workload: Workload, *, progress: bool = True, desc: str | None = None,
           deadline_s: float | None = None, stall_timeout_s: float | None = None
           ) -> tuple[list[RequestTrace], list[StepTrace]]:
    """Run ``workload`` on ``engine`` (any online engine); its traces (workload order) and the
    steps of this run, both in seconds since the run's start.

    ``deadline_s``: seconds after the start past which the run is stopped (``TimeoutError``;
    every request still open is cancelled). ``stall_timeout_s``: no token for this long after
    the last arrival stops it (``WorkerError``). A failed engine raises ``WorkerError``."""
    from tqdm.auto import tqdm

    t0 = engine.clock() + LEAD_S + LEAD_PER_REQUEST_S * len(workload)
    handles = [engine.submit(list(r.prompt_ids), r.max_new_tokens, ignore_eos=True, arrival_s=t0 + r.arrival_s,
                             request_id=r.id) for r in workload]
    last_arrival = max((r.arrival_s for r in workload), default=0.0)
    bar = tqdm(total=workload.total_output_tokens, unit="tok", desc=desc or engine.mode, disable=not progress,
               leave=False)
    try:
        _wait(engine, handles, bar, t0, last_arrival, deadline_s, stall_timeout_s)
    except BaseException:
        for h in handles:
            engine.cancel(h, wait=False)
        raise
    finally:
        bar.close()
    failed = [h for h in handles if h.finish_reason != "length"]
    if failed:
        h = failed[0]
        raise WorkerError(f"the {engine.mode} run ended with {len(failed)} requests unfinished; request {h.id}: "
                          f"{h.finish_reason}{': ' + h.error if h.error else ''}")
    traces = [shifted_trace(h.trace, t0) for h in handles]
    steps = [dataclasses.replace(s, start_s=s.start_s - t0, end_s=s.end_s - t0)
             for s in engine.steps if s.start_s >= t0]
    return traces, steps


def _wait(engine, handles, bar, t0: float, last_arrival: float, deadline_s: float | None,
          stall_timeout_s: float | None) -> None:
    made, progressed, polls = 0, time.monotonic(), 0
    for h in handles:
        while not h.wait(POLL_S):
            now = engine.clock() - t0
            polls += 1
            if polls % 10 == 0:  # the count costs a pass over every handle: twice a second
                total = sum(len(x.output_ids) for x in handles)
                if total != made:
                    bar.update(total - made)
                    made, progressed = total, time.monotonic()
            if not engine.alive:
                raise WorkerError(f"the {engine.mode} engine stopped during the run: {engine_failure(engine)}")
            if deadline_s is not None and now > deadline_s:
                raise TimeoutError(f"the run passed its time bound of {deadline_s:.0f} s and was stopped")
            if (stall_timeout_s is not None and now > last_arrival
                    and time.monotonic() - progressed > stall_timeout_s):
                raise WorkerError(f"no token for {stall_timeout_s:g} s after the last arrival: the {engine.mode} "
                                  "run stalled and was stopped")
    bar.update(sum(len(x.output_ids) for x in handles) - made)


def engine_failure(engine) -> str:
    return getattr(engine, "_failure_text", "") or "it was closed"


def shifted_trace(trace: RequestTrace, t0: float) -> RequestTrace:
    """``trace`` in seconds since ``t0`` (a new object: the handle keeps the engine's clock)."""
    def at(t: float | None) -> float | None:
        return None if t is None else t - t0

    return dataclasses.replace(trace, arrival_s=trace.arrival_s - t0, prefill_start_s=at(trace.prefill_start_s),
                               prefill_end_s=at(trace.prefill_end_s),
                               token_times_s=[t - t0 for t in trace.token_times_s],
                               output_ids=list(trace.output_ids))


def counters_since(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per-run counters of a scheduler that outlives runs (numbers subtracted, rates as after)."""
    out = {}
    for key, value in after.items():
        old = before.get(key)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        out[key] = value - old if numeric and isinstance(old, (int, float)) and "rate" not in key else value
    return out
