"""The ``split`` mode: a prefill worker and a decode worker at the same time on one device.

The prefill worker takes arrived prompts (never before their ``arrival_s``), runs batched
prefill straight into the KV pool and hands (slot, prompt length, first token) to the decode
worker through a queue; the decode worker continuously batches every handed-over sequence
(CUDA-graph steps on GPU) and returns finished sequences' slots to the prefill side's
allocator through a queue of freed slots. On a paged pool (``EngineConfig.kv_block_size``)
the prefill side reserves the pages of every position a sequence will write, the handoff
carries their ids (``Handoff.blocks``) and the decode side frees them one id at a time, so
the decode side never allocates and nothing is preempted. No KV byte is copied: both
address one pool.
How the two share the device is the backend (``SplitConfig``): ``streams`` and ``green``
(threads, ``threads.py``), ``processes`` and ``mps`` (spawned processes, ``processes.py``).
On every backend a run is a replay (``splitlab.engine.replay``) through the online split
engine the session started once (``online_threads.py``, ``online_processes.py``): one loop
for a server and an offline run.

Timing: every worker measures from one clock, started after the model is loaded and warmed
up (CUDA graphs captured); a run's t0 is a moment after all its requests were submitted,
they arrive at ``t0 + arrival_s`` and every time is recorded in seconds since t0; a token's
time is the host time right after the sync that produced it. ``Run.steps`` holds both workers' steps
(worker ``"prefill"`` / ``"decode"``), so a timeline shows where they overlap and
``decode_interference`` measures what the overlap costs decode.

``SplitSession`` keeps the workers (and, for ``mps``, the daemon) up between runs, so a
sweep over workloads pays model loading, sharing and graph capture once::

    with SplitSession(model, backend="mps", prefill_share=70, decode_share=30) as session:
        runs = [session.run(wl) for wl in workloads]
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from typing import Any

import torch

from splitlab.config import EngineConfig, RunConfig, SplitConfig
from splitlab.errors import ConfigError, ModeError, WorkerError
from splitlab.measure.metrics import Run
from splitlab.modes.common import Fault, build_run, check_faults, check_workload, engine_config
from splitlab.modes.worker_kv import check_pages_fit
from splitlab.workload import Workload

MPS_HINT = ("split backend mps needs an NVIDIA GPU with nvidia-cuda-mps-control; "
            "use backend='processes' or 'streams'")
SPLIT_KEYS = tuple(f.name for f in dataclasses.fields(SplitConfig))


def split_config(split: SplitConfig | None = None, **kwargs: Any) -> SplitConfig:
    """A ``SplitConfig`` from an existing one and/or keywords (None values are left out)."""
    given = {k: v for k, v in kwargs.items() if v is not None}
    unknown = sorted(set(given) - set(SPLIT_KEYS))
    if unknown:
        raise ConfigError(f"mode 'split' got unknown keyword(s) {unknown}; accepted: config, progress, "
                          f"split, {', '.join(SPLIT_KEYS)}")
    if split is None:
        return SplitConfig.from_dict(given)
    if not isinstance(split, SplitConfig):
        raise ConfigError(f"split must be a splitlab.config.SplitConfig, got {type(split).__name__}")
    if not given:
        return split
    values = split.to_dict()
    if "backend" in given and given["backend"] != split.backend:  # shares belong to one backend
        for key in ("prefill_share", "decode_share", "prefill_sms"):
            values[key] = None
    return SplitConfig.from_dict({**values, **given})


def check_backend_here(split: SplitConfig, device: torch.device) -> None:
    """Refuse, with what to do instead, a backend this machine / device cannot run."""
    if split.backend == "mps":
        from splitlab.system.env import MPS_CONTROL

        if device.type != "cuda" or not torch.cuda.is_available():
            raise ModeError(MPS_HINT)
        if shutil.which(MPS_CONTROL) is None:
            raise ModeError(f"{MPS_HINT} ({MPS_CONTROL} is not on PATH)")
    if split.backend == "green" and (device.type != "cuda" or not torch.cuda.is_available()):
        from splitlab.modes.split.threads import GREEN_HINT

        raise ModeError(GREEN_HINT)


class SplitSession:
    """A split engine that stays up between runs (see the module docstring).

    ``model``: a ``LoadedModel``. The ``processes`` / ``mps`` backends reload it by (spec,
    device, dtype, seed) in their prefill process and check the weights match. ``config``:
    the ``EngineConfig`` (KV pool, batch, budget); ``split`` and keywords: ``SplitConfig``.
    ``faults``: ``splitlab.modes.common.Fault`` s to inject (tests). A failed run closes the
    session (its workers are stopped); ``close()`` always cleans up.
    """

    def __init__(self, model, config: EngineConfig | None = None, split: SplitConfig | None = None,
                 faults: tuple[Fault, ...] = (), **kwargs):
        self.split = split_config(split, **kwargs)
        self.config = engine_config(config)
        if not hasattr(model, "facts") or not hasattr(model, "model"):
            raise ConfigError(f"model must be a LoadedModel (splitlab.load_model), got {model!r}")
        model.require_engine_support("split")
        self.model = model
        self.device = torch.device(model.device)
        check_backend_here(self.split, self.device)
        faults = check_faults(faults)
        self.runs = 0
        self._closed = False
        if self.split.backend in ("processes", "mps"):
            from splitlab.modes.split.processes import ProcessSplit

            self._impl: Any = ProcessSplit(model, self.config, self.split, faults)
        else:
            from splitlab.modes.split.threads import ThreadSplit

            self._impl = ThreadSplit(model, self.config, self.split, faults)

    @property
    def pids(self) -> dict[str, int]:
        """The workers' process ids (``{"process": os.getpid()}`` for the thread backends)."""
        return self._impl.pids

    @property
    def streams(self) -> tuple[Any, Any]:
        """The thread backends' (prefill, decode) CUDA streams; (None, None) otherwise."""
        return self._impl.streams

    @property
    def green(self) -> dict[str, Any] | None:
        """The green backend's SM split (what the driver gave each context); None otherwise."""
        return self._impl.green

    @property
    def children(self) -> dict[str, dict[str, Any]]:
        """The process backends' children: ``{name: {"pid", "tmpdir", "exitcode"}}``, kept
        after ``close()`` (exit code None while running); ``{}`` for the thread backends."""
        return dict(self._impl.children)

    def run(self, workload: Workload, progress: bool = True) -> Run:
        """Serve ``workload`` (checked first: it must fit the model and the KV slots or pages)."""
        check_workload(workload, self.model, self.config)
        return self._serve(workload, progress)

    def _serve(self, workload: Workload, progress: bool) -> Run:
        if self._closed:
            raise WorkerError("this split session is closed; start a new one")
        facts = self._impl.facts()
        check_pages_fit(workload, facts["prefill"])  # the pool's size is known once it is built
        traces, steps, memory = self._impl.run(workload, progress=progress)
        self.runs += 1
        memory = {**memory, "kv_pool_bytes": facts["prefill"].get("kv_pool_bytes"),
                  "weight_bytes": facts["prefill"].get("weight_bytes")}
        split, green = self.split, self._impl.green
        effective = {**facts["prefill"], "decode_graphs": facts["decode"].get("decode_graphs"),
                     "decode_weights_shared": facts["decode"].get("weights_shared")}
        config = RunConfig(
            mode="split", backend=split.backend, prefill_share=split.prefill_share, decode_share=split.decode_share,
            prefill_sms=(green or {}).get("prefill_sms"), decode_sms=(green or {}).get("decode_sms"),
            mps=split.backend == "mps", mps_daemon=self._impl.mps, green=green, engine=self.config, split=split,
            session_run=self.runs, effective=effective, workers=facts)
        return build_run(config, self.model, workload, traces, steps, memory)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._impl.close()

    def __enter__(self) -> "SplitSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a session dropped without close() still stops its workers
        with contextlib.suppress(Exception):
            self.close()


def _run_split(workload: Workload, model, config: EngineConfig, split: SplitConfig, progress: bool = True,
               faults: tuple[Fault, ...] = ()) -> Run:
    """One split run (``splitlab.run(..., mode="split")``, which checked the input): a session
    started for it and closed after it. A worker that fails raises ``WorkerError`` naming it."""
    with SplitSession(model, config=config, split=split, faults=faults) as session:
        return session._serve(workload, progress)
