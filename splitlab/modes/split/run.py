"""The ``split`` mode: a prefill worker and a decode worker at the same time on one device.

The prefill worker takes arrived prompts (never before their ``arrival_s``), runs batched
prefill straight into KV slots and hands (slot, prompt length, first token) to the decode
worker through a queue; the decode worker continuously batches every handed-over sequence
(CUDA-graph steps on GPU) and returns finished sequences' slots to the prefill side's
allocator through a queue of freed slots. No KV byte is copied: both address one pool.
How the two share the device is the backend (``SplitConfig``): ``streams`` and ``green``
(threads, ``threads.py``), ``processes`` and ``mps`` (spawned processes, ``procs.py``).

Timing: every worker measures from one t0, taken after the model is loaded and warmed up
(CUDA graphs captured); requests arrive at ``t0 + arrival_s``; a token's time is the host
time right after the sync that produced it. ``Run.steps`` holds both workers' steps
(worker ``"prefill"`` / ``"decode"``), so a timeline shows where they overlap and
``decode_interference`` measures what the overlap costs decode.

``SplitSession`` keeps the workers (and, for ``mps``, the daemon) up between runs, so a
sweep over workloads pays model loading, sharing and graph capture once::

    with SplitSession(model, backend="mps", prefill_share=70, decode_share=30) as session:
        runs = [session.run(wl) for wl in workloads]
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import shutil
import time
import warnings
from typing import Any

import numpy as np
import torch

from splitlab.config import EngineConfig, SplitConfig
from splitlab.errors import ConfigError, ModeError, WorkerError
from splitlab.measure.metrics import RequestTrace, Run, StepTrace
from splitlab.workload import Workload
from splitlab.modes.common import check_same_model, mps_clients, no_mps_env, worker_model_args
from splitlab.system.procs import ProcessGroup, WorkerSpec

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


def _engine_config(config) -> EngineConfig:
    config = config if config is not None else EngineConfig()
    if not isinstance(config, EngineConfig):
        raise ConfigError(f"config must be a splitlab.config.EngineConfig, got {type(config).__name__}")
    return config


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


def _check_workload(workload: Workload, model, config: EngineConfig) -> None:
    from splitlab.api import validate
    from splitlab.engine.loop import check_requests

    validate(workload, model)
    check_requests(workload, min(config.max_seq_len, model.facts.max_positions), model.facts.max_positions)


# ---- the process backends (parent side) -------------------------------------------------------------

class ProcessSplit:
    """The two children of ``processes`` / ``mps`` (and the MPS daemon), up between runs."""

    def __init__(self, model, config: EngineConfig, split: SplitConfig):
        from splitlab.modes.split.processes import decode_main, prefill_main

        self.model = model
        self.config = config
        self.split = split
        self.runs = 0
        self.mps: dict[str, Any] | None = None
        self.group: ProcessGroup | None = None
        self._closed = False
        self._stack = contextlib.ExitStack()
        try:
            # no MPS unless asked: a CUDA_MPS_* variable of the caller must not leak in
            env: dict[str, dict[str, str | None]] = {"prefill": no_mps_env(), "decode": no_mps_env()}
            daemon = None
            if split.backend == "mps":
                from splitlab.system.mps import MPSDaemon

                daemon = self._stack.enter_context(MPSDaemon())
                env["prefill"].update(daemon.client_env(split.prefill_share))
                env["decode"].update(daemon.client_env(split.decode_share))
            group = ProcessGroup([])
            handoff_q, freed_q = group.queue(), group.queue()
            model_args = worker_model_args(model)
            cfg, sp = config.to_dict(), split.to_dict()
            group.add(WorkerSpec("prefill", prefill_main, (model_args, cfg, sp, handoff_q, freed_q), env["prefill"]))
            group.add(WorkerSpec("decode", decode_main, (cfg, sp, handoff_q, freed_q), env["decode"]))
            del handoff_q, freed_q  # the group owns them (and releases them when it closes)
            self.group = self._stack.enter_context(group)
            self._group_record = group  # kept after close: who ran, where, how it ended
            self.ready = group.wait_for("ready", timeout_s=split.ready_timeout_s,
                                        what="load the model, share it and warm up")
            check_same_model(self.model, self.ready["prefill"], "the prefill worker",
                             "the processes / mps backends load the model by (spec, device, dtype, seed) in "
                             "their own process: pass an unmodified model, or use backend='streams'")
            if daemon is not None:
                self.mps = mps_clients(daemon, group.pids, prefill_share=split.prefill_share,
                                       decode_share=split.decode_share)
        except BaseException:
            self._stack.close()
            raise

    @property
    def pids(self) -> dict[str, int]:
        return self.group.pids if self.group is not None else {}

    @property
    def children(self) -> dict[str, dict[str, Any]]:
        group = getattr(self, "_group_record", None)
        return group.children if group is not None else {}

    def facts(self) -> dict[str, Any]:
        info = dict(self.ready["prefill"])
        for key in ("fingerprint", "facts", "pid"):
            info.pop(key, None)
        info["decode_graphs"] = self.ready["decode"].get("decode_graphs")
        info["decode_weights_shared"] = self.ready["decode"].get("weights_shared")
        info["decode_ready_s"] = self.ready["decode"].get("ready_s")
        return info

    def run(self, workload: Workload, progress: bool = True) -> dict[str, Any]:
        from tqdm.auto import tqdm

        if self._closed or self.group is None:
            raise WorkerError("this split session is closed (a run failed or close() was called); start a new one")
        group, split = self.group, self.split
        self.runs += 1
        run_id = self.runs
        bar = None
        try:
            group.send("prefill", ("arm", run_id, workload))
            group.send("decode", ("arm", run_id))
            group.wait_for("armed", timeout_s=120.0, what="get ready for the run")
            t0 = time.perf_counter()
            for name in ("prefill", "decode"):
                group.send(name, ("go", run_id, t0))
            bar = tqdm(total=workload.total_output_tokens, unit="tok", desc=f"split {split.backend}",
                       disable=not progress, leave=False)
            first: dict[int, tuple[float, float, int]] = {}
            rest: dict[int, list[tuple[float, int]]] = collections.defaultdict(list)
            steps: list[StepTrace] = []
            done: dict[str, Any] = {}
            last_arrival = max(r.arrival_s for r in workload)
            last_event = time.perf_counter()
            while len(done) < 2:
                event = group.next_event(timeout=0.2)
                now = time.perf_counter()
                if event is None:
                    if now - t0 > last_arrival and now - last_event > split.stall_timeout_s:
                        raise WorkerError(
                            f"split run stalled: no worker reported progress for {split.stall_timeout_s:.0f} s "
                            f"({len(first)} of {len(workload)} requests prefilled); stopped the workers"
                        )
                    continue
                last_event = now
                name, kind, payload = event
                if kind == "steps":
                    bar.update(_absorb(payload, steps, first, rest))
                elif kind == "run_done":
                    done[name] = payload
                else:
                    raise WorkerError(f"worker {name} sent {kind!r} during a run")
        except BaseException:
            self.close(graceful=False)
            raise
        finally:
            if bar is not None:
                bar.close()
        traces = _assemble(workload, first, rest)
        peaks = {name: done[name].get("peak_bytes") for name in ("prefill", "decode")}
        total = sum(peaks.values()) if all(v is not None for v in peaks.values()) else None
        steps.sort(key=lambda s: (s.start_s, s.worker))
        return {"traces": traces, "steps": steps, "memory": {"peak_bytes": total, "per_worker": peaks}}

    def close(self, graceful: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if graceful and self.group is not None:
                self.group.ask_to_finish(["decode", "prefill"])  # the decode child lets go of the shared memory first
        except WorkerError as exc:
            warnings.warn(f"a split worker failed while closing: {exc}", stacklevel=2)
        finally:
            self._stack.close()  # terminates what is left, then stops the MPS daemon
            self.group = None


def _absorb(items, steps, first, rest) -> int:
    """Fold one batch of child events into the run; return the number of new tokens."""
    n = 0
    for item in items:
        step = StepTrace(*item[1])
        steps.append(step)
        if item[0] == "p":
            for rid, start, end, tok in item[2]:
                first[rid] = (start, end, tok)
                n += 1
        else:
            for rid, tok in item[2]:
                rest[rid].append((step.end_s, tok))
                n += 1
    return n


def _assemble(workload: Workload, first, rest) -> list[RequestTrace]:
    traces = []
    for r in workload:
        if r.id not in first:
            raise WorkerError(f"split run ended without a prefill for request {r.id}")
        start, end, tok = first[r.id]
        more = rest.get(r.id, [])
        trace = RequestTrace(id=r.id, arrival_s=r.arrival_s, prompt_len=r.prompt_len, max_new_tokens=r.max_new_tokens,
                             prefill_start_s=start, prefill_end_s=end, token_times_s=[end] + [t for t, _ in more],
                             output_ids=[tok] + [x for _, x in more], worker="split")
        if not trace.finished:
            raise WorkerError(f"split run ended with request {r.id} at {len(trace.output_ids)} of "
                              f"{r.max_new_tokens} tokens")
        traces.append(trace)
    return traces


# ---- the public API ---------------------------------------------------------------------------------

class SplitSession:
    """A split engine that stays up between runs (see the module docstring).

    ``model``: a ``LoadedModel``. The ``processes`` / ``mps`` backends reload it by (spec,
    device, dtype, seed) in their prefill process and check the weights match. ``config``:
    the ``EngineConfig`` (KV pool, batch, budget); ``split`` and keywords: ``SplitConfig``.
    A failed run closes the session (its workers are stopped); ``close()`` always cleans up.
    """

    def __init__(self, model, config: EngineConfig | None = None, split: SplitConfig | None = None, **kwargs):
        self.split = split_config(split, **kwargs)
        self.config = _engine_config(config)
        if not hasattr(model, "facts") or not hasattr(model, "model"):
            raise ConfigError(f"model must be a LoadedModel (splitlab.load_model), got {model!r}")
        model.require_engine_support("split")
        self.model = model
        self.device = torch.device(model.device)
        check_backend_here(self.split, self.device)
        self.runs = 0
        if self.split.backend in ("processes", "mps"):
            self._impl: Any = ProcessSplit(model, self.config, self.split)
        else:
            from splitlab.modes.split.threads import ThreadSplit

            self._impl = ThreadSplit(model, self.config, self.split)

    @property
    def pids(self) -> dict[str, int]:
        """The workers' process ids (``{"process": os.getpid()}`` for the thread backends)."""
        return self._impl.pids if hasattr(self._impl, "pids") else {"process": os.getpid()}

    @property
    def streams(self) -> tuple[Any, Any]:
        """The thread backends' (prefill, decode) CUDA streams; (None, None) otherwise."""
        return getattr(self._impl, "streams", (None, None))

    @property
    def green(self) -> dict[str, Any] | None:
        """The green backend's SM split (what the driver gave each context); None otherwise."""
        return getattr(self._impl, "green", None)

    @property
    def children(self) -> dict[str, dict[str, Any]]:
        """The process backends' children: ``{name: {"pid", "tmpdir", "exitcode"}}``, kept
        after ``close()`` (exit code None while running); ``{}`` for the thread backends."""
        return dict(self._children)

    def run(self, workload: Workload, progress: bool = True) -> Run:
        from splitlab.system.env import environment

        _check_workload(workload, self.model, self.config)
        out = self._impl.run(workload, progress=progress)
        self.runs += 1
        facts = self._impl.facts()
        memory = {**out["memory"], "kv_pool_bytes": facts.get("kv_pool_bytes"),
                  "weight_bytes": facts.get("weight_bytes")}
        split = self.split
        green = getattr(self._impl, "green", None)
        run_config: dict[str, Any] = {
            "mode": "split",
            "backend": split.backend,
            "prefill_share": split.prefill_share,
            "decode_share": split.decode_share,
            "prefill_sms": green["prefill_sms"] if green else None,
            "decode_sms": green["decode_sms"] if green else None,
            "split": split.to_dict(),
            **self.config.to_dict(),
            "effective": {k: facts.get(k) for k in ("max_seq_len", "num_slots", "max_batch", "kernels",
                                                    "sdpa_backend", "decode_combine", "cuda_graphs", "device",
                                                    "dtype", "decode_graphs", "decode_weights_shared")},
            "session_run": self.runs,
        }
        if green:
            run_config["green"] = green
        mps = getattr(self._impl, "mps", None)
        if mps:
            run_config["mps"] = mps
        return Run(mode="split", model=self.model.spec, workload=workload.name, config=run_config, env=environment(),
                   traces=out["traces"], steps=out["steps"], memory=memory)

    @property
    def _children(self) -> dict[str, dict[str, Any]]:
        impl = getattr(self, "_impl", None)
        if impl is not None and not isinstance(impl, _Closed):
            self._last_children = getattr(impl, "children", {})
        return getattr(self, "_last_children", {})

    def close(self) -> None:
        impl = getattr(self, "_impl", None)
        if impl is None or isinstance(impl, _Closed):
            return
        try:
            impl.close()
        finally:
            self._last_children = getattr(impl, "children", {})
            self._impl = _Closed()

    def __enter__(self) -> "SplitSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a session dropped without close() still stops its workers
        with contextlib.suppress(Exception):
            self.close()


class _Closed:
    pids: dict[str, int] = {}

    def run(self, *a, **k):
        raise WorkerError("this split session is closed; start a new one")

    def facts(self):
        return {}

    def close(self) -> None:
        pass


def run_split(workload: Workload, model, config: EngineConfig | None = None, progress: bool = True,
              backend: str | None = None, prefill_share: float | None = None, decode_share: float | None = None,
              prefill_sms: int | None = None, split: SplitConfig | None = None, **kwargs) -> Run:
    """Serve ``workload`` with a prefill worker and a decode worker at the same time; return the ``Run``.

    ``backend``: ``"streams"`` (the default: threads + CUDA streams), ``"processes"``, ``"mps"``
    (``prefill_share`` / ``decode_share``: MPS SM percentages) or ``"green"``
    (``prefill_sms``); other ``SplitConfig`` fields as keywords or ``split=SplitConfig(...)``.
    ``config``: the ``EngineConfig``. On CPU ``streams`` and ``processes`` run; ``mps`` and
    ``green`` raise ``ModeError``. A worker that fails raises ``WorkerError`` naming it.
    """
    split = split_config(split, backend=backend, prefill_share=prefill_share, decode_share=decode_share,
                         prefill_sms=prefill_sms, **kwargs)
    config = _engine_config(config)
    model.require_engine_support("split")
    check_backend_here(split, torch.device(model.device))
    _check_workload(workload, model, config)  # before any process starts
    with SplitSession(model, config=config, split=split) as session:
        return session.run(workload, progress=progress)


# ---- what co-location costs decode ----------------------------------------------------------------
