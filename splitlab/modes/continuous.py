"""Serial and chunked modes: one worker, continuous batching, prefill and decode on one stream."""

from __future__ import annotations

import time

import torch

from splitlab.config import EngineConfig, RunConfig
from splitlab.engine.loop import Worker, build_engine, drive
from splitlab.engine.scheduler import Scheduler
from splitlab.engine.warmup import warm_up
from splitlab.measure.metrics import Run
from splitlab.modes.common import build_run, peak_bytes, reset_peak, worker_facts
from splitlab.modes.worker_kv import warn_preemptions
from splitlab.workload import Workload

MODES = ("serial", "chunked")


def _run_continuous(workload: Workload, model, mode: str, config: EngineConfig, progress: bool = True) -> Run:
    """Serve ``workload`` on ``model`` with continuous batching in real time; return the ``Run``
    (``splitlab.run(..., mode="serial" / "chunked")``, which checked the input).

    Requests become visible to the scheduler at their ``arrival_s`` (seconds after the run's
    start, which is after engine build and warm-up); when nothing is runnable the loop sleeps
    until the next arrival. Outputs are exactly ``max_new_tokens`` greedy tokens (EOS ignored).
    """
    device = torch.device(model.device)
    reset_peak(device)
    parts = build_engine(model, config)
    runner = parts.runner
    if config.warmup:
        warm_up(runner, token_budget=config.token_budget)
    scheduler = Scheduler(mode, parts.allocator, runner.max_batch, config.token_budget, config.chunk_size)
    import tqdm.auto  # noqa: F401  (imported before the clock starts: the first import is slow)

    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    worker = Worker(mode, runner, scheduler, clock)
    traces = drive(worker, workload, clock, progress=progress)
    counters = scheduler.counters()  # preemptions of a paged pool that ran out, prefix-cache hits
    warn_preemptions(mode, counters)
    memory = {"peak_bytes": peak_bytes(device), "kv_pool_bytes": parts.kv.nbytes, "weight_bytes": runner.weight_bytes,
              **counters}
    config_record = RunConfig(mode=mode, engine=config, effective=worker_facts(runner, config.warmup))
    return build_run(config_record, model, workload, traces.values(), worker.steps, memory)
