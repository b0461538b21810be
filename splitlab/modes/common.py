"""What every mode shares: the facts a run records, the one Run assembly, and the pieces of
the process-backed modes (injected faults, the split decode side's ``FreedSlots``, checks
of what a worker process loaded).

There is no split loop here: every split run, on any backend, is a replay through the online
split engine (``splitlab.engine.replay``; ``splitlab.modes.split.online_threads`` and
``online_processes``).

``build_run`` makes the ``Run`` of every mode; ``worker_facts`` reads what a runner really
runs with (its ``RunConfig.effective`` / ``workers``).

Tests inject failures with ``Fault`` (a worker name, an action, a step count), passed
explicitly to a session (``faults=``); production code never reads it from anywhere else.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch

from splitlab.config import EngineConfig, RunConfig
from splitlab.errors import ConfigError, WorkerError, WorkloadError
from splitlab.engine.loop import check_requests
from splitlab.engine.runner import ModelRunner
from splitlab.measure.metrics import RequestTrace, Run, StepTrace
from splitlab.system.env import environment, synchronize
from splitlab.workload import Workload

FAULT_ACTIONS = ("raise", "exit", "kill", "hang")


# ---- injected failures (tests) ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Fault:
    """Make worker ``worker`` (``prefill``, ``decode``, ``replica-0``, ...) fail right after
    its ``after_steps``-th step: ``raise`` raises ``RuntimeError``, ``exit`` calls
    ``os._exit(3)`` (no message), ``kill`` sends itself SIGKILL, ``hang`` sleeps for an hour
    (alive, silent: a stall). For tests: sessions take a tuple of them (``faults=``) and hand
    each worker its own."""

    worker: str
    action: str
    after_steps: int

    def __post_init__(self) -> None:
        if not isinstance(self.worker, str) or not self.worker:
            raise ConfigError(f"Fault.worker must be a worker name such as 'decode', got {self.worker!r}")
        if self.action not in FAULT_ACTIONS:
            raise ConfigError(f"Fault.action must be one of {', '.join(FAULT_ACTIONS)}, got {self.action!r}")
        n = self.after_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"Fault.after_steps must be a positive integer, got {n!r}")

    def __call__(self, step: int) -> None:
        """The loops' per-step hook: fail once ``step`` reached ``after_steps``."""
        if step < self.after_steps:
            return
        if self.action == "raise":
            raise RuntimeError(f"injected failure in worker {self.worker} after step {step}")
        if self.action == "exit":
            os._exit(3)
        if self.action == "hang":
            time.sleep(3600.0)
        os.kill(os.getpid(), signal.SIGKILL)


def fault_for(faults: Sequence[Fault], worker: str) -> Fault | None:
    """The fault of ``worker`` among ``faults`` (the first one naming it), or None."""
    return next((f for f in faults if f.worker == worker), None)


def check_faults(faults: Any) -> tuple[Fault, ...]:
    if not isinstance(faults, (tuple, list)) or not all(isinstance(f, Fault) for f in faults):
        raise ConfigError(f"faults must be a tuple of splitlab.modes.common.Fault, got {faults!r}")
    return tuple(faults)


# ---- KV freed by the decode side ------------------------------------------------------------------

class FreedSlots:
    """The decode side's allocator: ``free(slot)`` collects (a slot, or one page id: the
    scheduler frees a sequence's pages one id per call), ``flush()`` sends them back to the
    prefill side's allocator through ``send(list_of_ids)``. It never allocates."""

    def __init__(self, send: Callable[[list[int]], None]):
        self._send = send
        self._pending: list[int] = []

    def alloc(self) -> int | None:
        raise RuntimeError("the decode worker never allocates slots; the prefill worker owns the allocator")

    def free(self, slot: int) -> None:
        self._pending.append(int(slot))

    def flush(self) -> None:
        if self._pending:
            slots, self._pending = self._pending, []
            self._send(slots)

    @property
    def num_free(self) -> int:
        return 0


# ---- facts a run records ----------------------------------------------------------------------------

def check_same_model(model, ready, who: str, how: str) -> None:
    """Refuse to run when the worker process ``who`` loaded other shapes or weights than
    ``model``. Worker processes load the model themselves by (spec, device, dtype, seed) and
    report its facts and a weight fingerprint (``ready``: their ``session.Ready``); ``how``
    says what to do instead."""
    if ready.model_facts != model.facts.to_dict():
        raise ConfigError(f"worker {who} loaded {model.spec!r} with other shapes than the model passed in; {how}")
    mine = weight_fingerprint(model.model)
    if mine is not None and ready.fingerprint != mine:
        raise ConfigError(
            f"the weights worker {who} loaded for {model.spec!r} (seed {model.seed}) differ from those of the "
            f"model passed in (were they changed after load_model?); {how}"
        )


def weight_fingerprint(hf_model) -> list[float] | None:
    """A few sums over slices of the first, middle and last parameters (float64 on CPU):
    equal for the same weights on the same device and dtype, so a child that loaded the
    model by spec can be checked against the model the caller passed. None on ``meta``."""
    params = [p for _, p in hf_model.named_parameters()]
    if not params or any(p.is_meta for p in params[:1]):
        return None
    picks = [params[0], params[len(params) // 2], params[-1]]
    out: list[float] = []
    with torch.no_grad():
        for p in picks:
            flat = p.detach().reshape(-1)[:4096].to("cpu", torch.float64)
            out.extend([float(flat.sum()), float(flat.abs().sum())])
    return out


def mapped_not_owned(tensors, device: torch.device) -> bool:
    """True when ``tensors`` (just received from another process) are mapped, not copied:
    on CPU every one lives in shared memory; on CUDA this process's allocator holds less
    than half their bytes (CUDA IPC mappings are not this process's allocations). Call it
    right after receiving them, before allocating anything else."""
    tensors = list(tensors)
    if torch.device(device).type == "cpu":
        return all(t.is_shared() for t in tensors)
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return int(torch.cuda.memory_allocated(device)) < total / 2


def peak_bytes(device: torch.device) -> int | None:
    if torch.device(device).type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))


def reset_peak(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def engine_config(config) -> EngineConfig:
    """``config``, or the default ``EngineConfig`` for None; anything else is refused."""
    config = config if config is not None else EngineConfig()
    if not isinstance(config, EngineConfig):
        raise ConfigError(f"config must be a splitlab.config.EngineConfig, got {type(config).__name__}")
    return config


def check_workload(workload: Workload, model, config: EngineConfig | None) -> None:
    """The one check of a run's workload (``splitlab.run`` and the sessions' ``run``; below
    them every layer assumes it passed): a ``Workload`` whose every request fits ``model``
    (context and vocabulary) and, for the engine modes (``config`` given), a KV slot."""
    if not isinstance(workload, Workload):
        raise WorkloadError(
            f"workload must be a splitlab Workload (see splitlab.workload builders), got {type(workload).__name__}"
        )
    positions = int(model.facts.max_positions)
    workload.check_fits(positions)
    vocab = int(model.facts.vocab_size)
    for r in workload:
        top, low = max(r.prompt_ids), min(r.prompt_ids)
        if top >= vocab or low < 0:
            raise WorkloadError(
                f"request {r.id} has token id {top if top >= vocab else low} outside the model's "
                f"vocabulary [0, {vocab}); build prompts with model=... so ids come from its vocabulary"
            )
    if config is not None:
        check_requests(workload, min(config.max_seq_len, positions), positions)


def cpu_threads_per_worker(workers: int) -> None:
    """On CPU, give each of ``workers`` co-running processes its share of the cores."""
    n = max(1, (os.cpu_count() or 1) // max(1, workers))
    torch.set_num_threads(n)


def worker_facts(runner: ModelRunner, warmed_up: bool) -> dict[str, Any]:
    """What ``runner`` really runs with, read from the runner and its KV pool (not from the
    config it was given): what a run records per worker, and what a test compares with the
    ``EngineConfig``. ``warmed_up``: whether the worker ran its warm-up."""
    kv = runner.kv
    cuda = runner.device.type == "cuda"
    return {
        "max_seq_len": kv.max_seq_len,
        "num_slots": kv.num_slots,
        "max_batch": runner.max_batch,
        "kernels": runner.kernels.name,
        "gemv": runner.gemv,
        "sdpa_backend": runner.sdpa_backend,
        "sdpa_effective": runner.sdpa_effective_backend() if cuda else runner.sdpa_backend,
        "decode_combine": getattr(runner.kernels, "combine", None),  # Triton kernels only
        **runner.decode_variant_info(),
        "cuda_graphs": runner.cuda_graphs,
        "graphs_captured": runner.num_graphs,  # decode graphs, one per batch bucket
        "graph_capture_s": runner.graph_capture_s if runner.num_graphs else None,
        "graph_pool_bytes": runner.graph_pool_bytes() if runner.num_graphs else None,
        "warmed_up": bool(warmed_up),
        "device": str(runner.device),
        "dtype": str(runner.dtype).replace("torch.", ""),
        "kv_pool_bytes": kv.nbytes,
        "kv_block_size": kv.block_size if kv.paged else None,  # None: slots of max_seq_len positions
        "num_pages": kv.shape.num_pages if kv.paged else None,
        "weight_bytes": runner.weight_bytes,
    }


def build_run(config: RunConfig, model, workload: Workload, traces: Iterable[RequestTrace],
              steps: Iterable[StepTrace], memory: dict[str, Any]) -> Run:
    """The ``Run`` of every mode: ``traces`` in the workload's order (every request must have
    finished), ``steps`` in time order, the workload's facts and the model's in ``config``."""
    by_id = {t.id: t for t in traces}
    missing = [r.id for r in workload if r.id not in by_id or not by_id[r.id].finished]
    if missing:
        raise WorkerError(f"the {config.mode} run ended with requests {missing[:10]} unfinished "
                          f"({len(missing)} of {len(workload)})")
    config = dataclasses.replace(config, num_requests=len(workload), rate=workload.rate,
                                 model_facts=model.facts.to_dict())
    return Run(mode=config.mode, model=model.spec, workload=workload.name, config=config, env=environment(),
               traces=[by_id[r.id] for r in workload], steps=sorted(steps, key=lambda s: (s.start_s, s.worker)),
               memory=memory)


def total_or_none(values: Iterable[int | None]) -> int | None:
    """The sum, or None when any part is unknown (a CPU worker has no device peak)."""
    values = list(values)
    return sum(values) if all(v is not None for v in values) else None


def worker_model_args(model) -> dict[str, Any]:
    """What a worker process needs to load ``model`` itself: (spec, device, dtype, seed)."""
    return {"spec": model.spec, "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
            "seed": int(model.seed)}


def no_mps_env() -> dict[str, str | None]:
    """A worker environment that removes every ``CUDA_MPS_*`` variable of the caller, so no
    process joins an MPS daemon it was not asked to (a daemon's client_env adds them back)."""
    return {k: None for k in os.environ if k.startswith("CUDA_MPS_")}


def mps_clients(daemon, pids: dict[str, int], **extra: Any) -> dict[str, Any]:
    """What an MPS daemon reports while the workers run: its servers, their clients, and
    whether every worker is among them (recorded in the run; a mismatch warns)."""
    info: dict[str, Any] = {"pipe_dir": str(daemon.pipe_dir), **extra}
    try:
        servers = daemon.servers()
        clients = {s: daemon.clients(s) for s in servers}
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        info["query_error"] = str(exc)
        return info
    seen = {pid for listed in clients.values() for pid in listed}
    info["servers"] = servers
    info["clients"] = {str(k): v for k, v in clients.items()}
    info["workers_are_clients"] = {name: pid in seen for name, pid in pids.items()}
    if not all(info["workers_are_clients"].values()):
        warnings.warn(f"the MPS daemon does not list every worker as its client: {info}", stacklevel=3)
    return info


def round_robin(requests: Sequence, n: int) -> list[list]:
    """Requests (sorted by arrival) dealt to ``n`` workers in turn: worker i gets i, i+n, ..."""
    ordered = sorted(requests, key=lambda r: (r.arrival_s, r.id))
    return [ordered[i::n] for i in range(n)]
