"""Serial and chunked modes: one worker, continuous batching, prefill and decode on one stream."""

from __future__ import annotations

import time
from typing import Callable

import torch

from splitlab.config import EngineConfig, RunConfig
from splitlab.engine.loop import EngineParts, Worker, build_engine, drive
from splitlab.engine.scheduler import Scheduler
from splitlab.engine.warmup import warm_up
from splitlab.measure.metrics import Run
from splitlab.modes.common import build_run, peak_bytes, reset_peak, worker_facts
from splitlab.modes.worker_kv import new_allocator, warn_preemptions
from splitlab.workload import Workload

MODES = ("serial", "chunked")


def _run_continuous(workload: Workload, model, mode: str, config: EngineConfig, progress: bool = True) -> Run:
    """Serve ``workload`` on ``model`` with continuous batching in real time; return the ``Run``
    (``splitlab.run(..., mode="serial" / "chunked")``, which checked the input).

    Requests become visible to the scheduler at their ``arrival_s`` (seconds after the run's
    start, which is after engine build and warm-up); when nothing is runnable the loop sleeps
    until the next arrival. Outputs are exactly ``max_new_tokens`` greedy tokens (EOS ignored).
    """
    reset_peak(torch.device(model.device))
    parts = build_engine(model, config)
    if config.warmup:
        warm_up(parts.runner, token_budget=config.token_budget)
    return serve_on(parts, workload, model, mode, warmed_up=config.warmup, progress=progress)


def serve_on(parts: EngineParts, workload: Workload, model, mode: str, *, warmed_up: bool, progress: bool = True,
             make_worker: Callable[..., Worker] = Worker, slo=None) -> Run:
    """One run of ``workload`` in ``mode`` on an engine already built (``build_engine``) and
    warmed as ``warmed_up`` says: a fresh allocator and scheduler each call, so a benchmark can
    serve several workloads on one engine. ``make_worker``: builds the ``Worker`` that steps it
    (a benchmark's adds a time bound); ``slo``: recorded in the run's config."""
    config, runner = parts.config, parts.runner
    scheduler = Scheduler(mode, new_allocator(parts.kv, config), runner.max_batch, config.token_budget,
                          config.chunk_size)
    import tqdm.auto  # noqa: F401  (imported before the clock starts: the first import is slow)

    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    worker = make_worker(mode, runner, scheduler, clock)
    traces = drive(worker, workload, clock, progress=progress)
    counters = scheduler.counters()  # preemptions of a paged pool that ran out, prefix-cache hits
    warn_preemptions(mode, counters)
    memory = {"peak_bytes": peak_bytes(runner.device), "kv_pool_bytes": parts.kv.nbytes,
              "weight_bytes": runner.weight_bytes, **counters}
    config_record = RunConfig(mode=mode, engine=config, effective=worker_facts(runner, warmed_up), slo=slo)
    return build_run(config_record, model, workload, traces.values(), worker.steps, memory)
