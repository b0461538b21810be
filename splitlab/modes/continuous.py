"""Serial and chunked modes: one worker, continuous batching, prefill and decode on one stream.

A run is a replay (``splitlab.engine.replay``) through the online engine, the same loop a
server runs: there is no second, offline loop.
"""

from __future__ import annotations

import torch

from splitlab.config import EngineConfig, RunConfig
from splitlab.engine.loop import EngineParts
from splitlab.engine.online import OnlineEngine
from splitlab.engine.replay import replay
from splitlab.measure.metrics import Run
from splitlab.modes.common import build_run, peak_bytes, reset_peak, worker_facts
from splitlab.modes.worker_kv import warn_preemptions
from splitlab.workload import MAX_REQUESTS, Workload

MODES = ("serial", "chunked")


def _run_continuous(workload: Workload, model, mode: str, config: EngineConfig, progress: bool = True) -> Run:
    """Serve ``workload`` on ``model`` with continuous batching in real time; return the ``Run``
    (``splitlab.run(..., mode="serial" / "chunked")``, which checked the input).

    Requests become visible to the scheduler at their ``arrival_s`` (seconds after the run's
    start, which is after engine build and warm-up); when nothing is runnable the loop sleeps
    until the next arrival. Outputs are exactly ``max_new_tokens`` greedy tokens (EOS ignored).
    """
    reset_peak(torch.device(model.device))
    with OnlineEngine(model, mode, config, keep_steps=None, max_queued=MAX_REQUESTS) as engine:
        return _replay_run(engine, workload, model, mode, warmed_up=config.warmup, progress=progress)


def serve_on(parts: EngineParts, workload: Workload, model, mode: str, *, warmed_up: bool, progress: bool = True,
             deadline_s: float | None = None, slo=None) -> Run:
    """One run of ``workload`` in ``mode`` on an engine already built (``build_engine``) and
    warmed as ``warmed_up`` says: a fresh allocator and scheduler each call, so a benchmark can
    serve several workloads on one engine. ``deadline_s``: stop the run this many seconds after
    its start (``TimeoutError``); ``slo``: recorded in the run's config."""
    with OnlineEngine(model, mode, parts.config, parts=parts, keep_steps=None, max_queued=MAX_REQUESTS) as engine:
        return _replay_run(engine, workload, model, mode, warmed_up=warmed_up, progress=progress,
                           deadline_s=deadline_s, slo=slo)


def _replay_run(engine: OnlineEngine, workload: Workload, model, mode: str, *, warmed_up: bool, progress: bool,
                deadline_s: float | None = None, slo=None) -> Run:
    traces, steps = replay(engine, workload, progress=progress, deadline_s=deadline_s)
    parts, runner = engine.parts, engine.parts.runner
    counters = engine.scheduler.counters()  # preemptions of a paged pool that ran out, prefix-cache hits
    warn_preemptions(mode, counters)
    memory = {"peak_bytes": peak_bytes(runner.device), "kv_pool_bytes": parts.kv.nbytes,
              "weight_bytes": runner.weight_bytes, **counters}
    config_record = RunConfig(mode=mode, engine=parts.config, effective=worker_facts(runner, warmed_up), slo=slo)
    return build_run(config_record, model, workload, traces, steps, memory)
