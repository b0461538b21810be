"""Serial and chunked modes: one worker, continuous batching, prefill and decode on one stream."""

from __future__ import annotations

import time
from typing import Any

import torch

from splitlab.config import EngineConfig
from splitlab.engine.loop import Worker, build_engine, check_requests, drive
from splitlab.engine.warmup import warm_up
from splitlab.engine.scheduler import Scheduler
from splitlab.errors import ConfigError, ModeError
from splitlab.measure.metrics import Run
from splitlab.workload import Workload

MODES = ("serial", "chunked")


def run_continuous(workload: Workload, model, mode: str, config: EngineConfig | None = None,
                   progress: bool = True, **unknown) -> Run:
    """Serve ``workload`` on ``model`` with continuous batching in real time; return the ``Run``.

    Requests become visible to the scheduler at their ``arrival_s`` (seconds after the run's
    start, which is after engine build and warm-up); when nothing is runnable the loop sleeps
    until the next arrival. Outputs are exactly ``max_new_tokens`` greedy tokens (EOS ignored).
    """
    if unknown:
        raise ConfigError(f"mode {mode!r} takes no keyword(s) {sorted(unknown)}")
    if mode not in MODES:
        raise ModeError(f"run_continuous runs {', '.join(MODES)}; got {mode!r}")
    config = config if config is not None else EngineConfig()
    if not isinstance(config, EngineConfig):
        raise ConfigError(f"config must be a splitlab.config.EngineConfig, got {type(config).__name__}")
    model.require_engine_support(mode)
    check_requests(workload, min(config.max_seq_len, model.facts.max_positions), model.facts.max_positions)

    cuda = torch.device(model.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(model.device)
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

    from splitlab.system.env import environment

    memory: dict[str, Any] = {
        "peak_bytes": int(torch.cuda.max_memory_allocated(model.device)) if cuda else None,
        "kv_pool_bytes": parts.kv.nbytes,
        "weight_bytes": runner.weight_bytes,
    }
    run_config = {
        "mode": mode,
        **config.to_dict(),
        "effective": {
            "max_seq_len": parts.max_seq_len,
            "num_slots": parts.kv.num_slots,
            "max_batch": runner.max_batch,
            "kernels": runner.kernels.name,
            "gemv": runner.gemv_report is not None or bool(config.gemv),
            "sdpa_backend": runner.sdpa_backend,
            "decode_combine": getattr(runner.kernels, "combine", None),
            **runner.decode_variant_info(),
            "sdpa_effective": runner.sdpa_effective_backend() if cuda else runner.sdpa_backend,
            "cuda_graphs": runner.cuda_graphs,
            "device": str(runner.device),
            "dtype": str(runner.dtype).replace("torch.", ""),
        },
    }
    return Run(mode=mode, model=model.spec, workload=workload.name, config=run_config, env=environment(),
               traces=[traces[r.id] for r in workload], steps=worker.steps, memory=memory)
