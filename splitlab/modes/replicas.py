"""The ``replicas`` mode: the paper's own scheme, N data-parallel engines side by side.

N spawned processes (``replica-0`` ... ``replica-{N-1}``), each a full engine serving its
share of the requests (dealt round-robin in arrival order), all measured from one t0:

- ``engine="serial"`` / ``"chunked"``: the continuous-batching worker loop of those modes
  (``splitlab.engine.loop.drive``) over the process's own KV pool;
- ``engine="generate"``: Huggingface ``generate()`` on static batches of ``batch_size``
  (``splitlab.modes.hf_generate.serve_static_batches``), as the paper's HF pipeline did.

Weights exist once: ``replica-0`` loads the model by (spec, device, dtype, seed) and shares
its weight tensors with the others through a ``torch.multiprocessing`` queue (CUDA IPC on
GPU, as the paper's vLLM fork did; shared memory on CPU); it keeps them alive until every
other replica said ``bye``. The KV cache does NOT: each engine replica allocates its own
pool with 1/N of the budget (``num_slots // N`` slots when ``num_slots`` is given, else
``kv_budget_bytes / N``, else ``kv_memory_fraction / N`` of the free memory replica 0 sees
after loading; on CPU ``min(max_batch, 8) // N``), the paper's ``0.9 / N`` memory split. So
each replica batches at most 1/N of the sequences one engine could, and ``Run.memory``
lists every replica's peak (``per_worker``) and their sum (``peak_bytes``).

``mps=True`` runs the replicas as clients of a private MPS daemon (no SM percentages, as the
paper); ``mps=False`` leaves them time-sliced by the driver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import queue
import shutil
import time
import warnings
from typing import Any

import torch

from splitlab.config import EngineConfig
from splitlab.errors import ConfigError, ModeError, WorkerError
from splitlab.measure.metrics import RequestTrace, Run, StepTrace
from splitlab.workload import Workload
from splitlab.modes.common import (Outbox, check_same_model, cpu_threads_per_worker, decode_runner, fault_hook, mapped_not_owned, mps_clients, no_mps_env, peak_bytes, reset_peak, round_robin, step_tuple, weight_fingerprint, worker_model_args)
from splitlab.system.procs import ProcessGroup, WorkerSpec

ENGINES = ("serial", "chunked", "generate")
MPS_HINT = ("replicas with mps=True needs an NVIDIA GPU with nvidia-cuda-mps-control; "
            "use mps=False")


# ==== child side ====================================================================================

@dataclasses.dataclass(frozen=True)
class _Shape:
    """What ``KVPool.for_model`` reads of a model: facts, dtype, device."""

    facts: Any
    dtype: torch.dtype
    device: torch.device


def _hf_tensors(model, share_cpu: bool) -> list[tuple[list[str], torch.Tensor, bool]]:
    """Every parameter and buffer of an HF model, grouped by tensor object (tied weights once):
    ``[(names, tensor, is_parameter), ...]``."""
    groups: dict[int, tuple[list[str], torch.Tensor, bool]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), ([], p.data, True))[0].append(name)
    for name, b in model.named_buffers(remove_duplicate=False):
        if b is not None:
            groups.setdefault(id(b), ([], b, False))[0].append(name)
    out = list(groups.values())
    if share_cpu:
        for _, t, _ in out:
            t.share_memory_()
    return out


def _rebuild_hf(cls, config, tensors, dtype: torch.dtype):
    """The HF model around shared tensors: built on ``meta`` (no memory), then every parameter
    and buffer assigned (a tied group becomes one Parameter under all its names)."""
    from transformers import initialization

    with initialization.no_init_weights(), torch.device("meta"):
        model = cls(config)
    model = model.to(dtype)
    for names, tensor, is_param in tensors:
        value = torch.nn.Parameter(tensor, requires_grad=False) if is_param else tensor
        for name in names:
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            if is_param:
                owner._parameters[leaf] = value
            else:
                owner._buffers[leaf] = value
    left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"replica: tensors not shared by replica 0: {left[:5]}")
    model.eval()
    return model


def _kv_plan(config: EngineConfig, n: int, device: torch.device) -> dict[str, Any]:
    """Each engine replica's share of the KV budget (see the module docstring)."""
    if config.num_slots is not None:
        return {"num_slots": max(1, config.num_slots // n)}
    if config.kv_budget_bytes is not None:
        return {"memory_budget_bytes": config.kv_budget_bytes // n}
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return {"memory_budget_bytes": int(free * config.kv_memory_fraction / n)}
    return {"num_slots": max(1, min(config.max_batch, 8) // n)}


def replica_main(channel, index: int, n: int, model_args: dict[str, Any], engine: str, engine_cfg: dict[str, Any],
                 batch_size: int, share_q, bye_q, flush_s: float, ready_timeout_s: float) -> None:
    from splitlab.engine.kv import KVPool, SlotAllocator
    from splitlab.models import LoadedModel, load_model
    from splitlab.engine.weights import extract_arch, extract_weights
    from splitlab.engine.scheduler import Scheduler
    from splitlab.engine.loop import Worker, drive
    from splitlab.engine.warmup import warm_up

    name = channel.name
    config = EngineConfig.from_dict(engine_cfg)
    device = torch.device(model_args["device"])
    if device.type == "cpu":
        cpu_threads_per_worker(n)
    started = time.perf_counter()
    info: dict[str, Any] = {"pid": os.getpid()}
    loaded = None
    if index == 0:
        loaded = load_model(model_args["spec"], device=device, dtype=model_args["dtype"], seed=model_args["seed"])
        info["fingerprint"] = weight_fingerprint(loaded.model)
        info["facts"] = loaded.facts.to_dict()
        if engine == "generate":
            payload = {"cls": type(loaded.model), "config": loaded.model.config,
                       "tensors": _hf_tensors(loaded.model, device.type == "cpu"), "tokenizer": loaded.tokenizer}
        else:
            loaded.require_engine_support(engine)
            weights = extract_weights(loaded.model, share_storage=True)  # shared with the others, held once
            if device.type == "cpu":
                for t in weights.values():
                    t.share_memory_()
            payload = {"arch": extract_arch(loaded.model), "weights": weights}
        payload.update({"facts": loaded.facts, "dtype": loaded.dtype, "kv": _kv_plan(config, n, device)})
        for _ in range(n - 1):
            share_q.put(("setup", payload))
    else:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                msg = share_q.get(timeout=0.2)
                break
            except queue.Empty:
                channel.check_parent()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name}: no weights from replica-0 within {ready_timeout_s:.0f} s") from None
        payload = msg[1]
        received = payload["weights"].values() if "weights" in payload else [t for _, t, _ in payload["tensors"]]
        info["weights_shared"] = mapped_not_owned(received, device)
        del received
    facts, dtype = payload["facts"], payload["dtype"]
    runner = kv = None
    if engine == "generate":
        if loaded is None:
            hf = _rebuild_hf(payload["cls"], payload["config"], payload["tensors"], dtype)
            loaded = LoadedModel(model_args["spec"], hf, payload["tokenizer"], facts, device, dtype,
                                 model_args["seed"])
    else:
        kv = KVPool.for_model(_Shape(facts, dtype, device), min(config.max_seq_len, facts.max_positions),
                              max_slots=config.max_batch, memory_fraction=config.kv_memory_fraction,
                              **payload["kv"])
        runner = decode_runner(payload["arch"], payload["weights"], kv, config, min(config.max_batch, kv.num_slots))
        if config.warmup:
            warm_up(runner, token_budget=config.token_budget)
        info.update({"num_slots": kv.num_slots, "kv_pool_bytes": kv.nbytes, "max_batch": runner.max_batch,
                     "kernels": runner.kernels.name, "cuda_graphs": runner.cuda_graphs,
                     "weight_bytes": runner.weight_bytes})
    del payload
    info["ready_s"] = time.perf_counter() - started
    channel.send("ready", info)

    class _Reporting(Worker):
        """The engine worker, reporting progress and honouring the fault hook per step."""

        def __init__(self, *args, on_step):
            super().__init__(*args)
            self._on_step = on_step

        def step(self):
            outcome = super().step()
            if outcome is not None:
                self._on_step(outcome.num_new_tokens)
            return outcome

    def serve() -> None:
        while True:
            cmd = channel.recv()
            if cmd[0] == "close":
                return
            if cmd[0] != "arm":
                raise RuntimeError(f"{name}: unexpected command {cmd!r}")
            _, run_id, requests = cmd
            if engine == "generate" and requests and config.warmup:
                from splitlab.modes.hf_generate import warm_up_static

                warm_up_static(loaded, requests, batch_size)  # this run's first batch shapes, off the clock
            reset_peak(device)
            channel.send("armed", run_id)
            go = channel.recv()
            if not (isinstance(go, tuple) and go[0] == "go" and go[1] == run_id):
                raise RuntimeError(f"{name}: expected ('go', {run_id}, t0), got {go!r}")
            t0 = float(go[2])

            def clock(t0=t0) -> float:
                return time.perf_counter() - t0

            outbox = Outbox(channel.send, "progress", flush_s)
            fault = fault_hook(name)
            count = [0]

            def on_step(tokens: int) -> None:
                outbox.add(tokens)
                count[0] += 1
                if fault is not None:
                    fault(count[0])

            traces: dict[int, RequestTrace] = {}
            steps: list[StepTrace] = []
            if requests and engine == "generate":
                from splitlab.modes.hf_generate import serve_static_batches

                traces, steps = serve_static_batches(loaded, requests, batch_size, t0, worker=name,
                                                     on_batch=lambda batch: on_step(sum(r.max_new_tokens
                                                                                        for r in batch)))
            elif requests:
                scheduler = Scheduler(engine, SlotAllocator(kv.num_slots), runner.max_batch, config.token_budget,
                                      config.chunk_size)
                worker = _Reporting(name, runner, scheduler, clock, on_step=on_step)
                traces = drive(worker, Workload(f"{name}-share", tuple(requests)), clock, progress=False)
                steps = worker.steps
            outbox.flush()
            channel.send("run_done", {"run": run_id, "peak_bytes": peak_bytes(device),
                                      "traces": [dataclasses.asdict(t) for t in traces.values()],
                                      "steps": [step_tuple(s) for s in steps]})

    try:
        serve()
    finally:
        if index != 0:
            runner = kv = loaded = None  # noqa: F841 - let go of replica 0's memory, then say so
            with contextlib.suppress(Exception):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                gc.collect()
            bye_q.put(("bye", index))
    if index == 0:  # keep the shared weights alive until every other replica let go
        deadline = time.monotonic() + 60.0
        byes = 0
        while byes < n - 1 and time.monotonic() < deadline:
            try:
                bye_q.get(timeout=0.2)
                byes += 1
            except queue.Empty:
                channel.check_parent()


# ==== parent side ===================================================================================

class ReplicaSession:
    """N replica processes (and, with ``mps=True``, the daemon), up between runs.

    ``model``: a ``LoadedModel`` (replica 0 reloads it by spec, device, dtype and seed in its
    own process and the weights are checked against it). ``engine``: ``"serial"``,
    ``"chunked"`` or ``"generate"``; ``batch_size``: generate's static batch; ``config``:
    the ``EngineConfig`` of the engine replicas (its KV budget is split N ways).
    """

    def __init__(self, model, num_replicas: int = 2, engine: str = "serial", mps: bool = False, batch_size: int = 8,
                 config: EngineConfig | None = None, ready_timeout_s: float = 900.0, event_flush_s: float = 0.1,
                 stall_timeout_s: float = 600.0):
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
            raise ConfigError(f"num_replicas must be a positive integer, got {num_replicas!r}")
        if engine not in ENGINES:
            raise ConfigError(f"replicas engine must be one of {', '.join(ENGINES)}; got {engine!r}")
        if not isinstance(mps, bool):
            raise ConfigError(f"mps must be True or False, got {mps!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        config = config if config is not None else EngineConfig()
        if not isinstance(config, EngineConfig):
            raise ConfigError(f"config must be a splitlab.config.EngineConfig, got {type(config).__name__}")
        if not hasattr(model, "facts") or not hasattr(model, "model"):
            raise ConfigError(f"model must be a LoadedModel (splitlab.load_model), got {model!r}")
        if engine != "generate":
            model.require_engine_support("replicas")
        device = torch.device(model.device)
        if mps:
            from splitlab.system.env import MPS_CONTROL

            if device.type != "cuda" or not torch.cuda.is_available():
                raise ModeError(MPS_HINT)
            if shutil.which(MPS_CONTROL) is None:
                raise ModeError(f"{MPS_HINT} ({MPS_CONTROL} is not on PATH)")
        self.model, self.num_replicas, self.engine, self.mps_on = model, num_replicas, engine, mps
        self.batch_size, self.config = batch_size, config
        self.stall_timeout_s = stall_timeout_s
        self.names = [f"replica-{i}" for i in range(num_replicas)]
        self.runs = 0
        self.mps: dict[str, Any] | None = None
        self.group: ProcessGroup | None = None
        self._closed = False
        self._stack = contextlib.ExitStack()
        try:
            env: dict[str, str | None] = no_mps_env()
            daemon = None
            if mps:
                from splitlab.system.mps import MPSDaemon

                daemon = self._stack.enter_context(MPSDaemon())
                env.update(daemon.client_env())
            group = ProcessGroup([])
            share_q, bye_q = group.queue(), group.queue()
            model_args = worker_model_args(model)
            for i, name in enumerate(self.names):
                group.add(WorkerSpec(name, replica_main, (i, num_replicas, model_args, engine, config.to_dict(),
                                                          batch_size, share_q, bye_q, event_flush_s,
                                                          ready_timeout_s), dict(env)))
            del share_q, bye_q
            self.group = self._stack.enter_context(group)
            self._group_record = group  # kept after close: who ran, where, how it ended
            self.ready = group.wait_for("ready", timeout_s=ready_timeout_s, what="load the model, share it and warm up")
            check_same_model(self.model, self.ready[self.names[0]], "replica-0",
                             "replicas load the model by (spec, device, dtype, seed) in their own processes")
            if daemon is not None:
                self.mps = mps_clients(daemon, group.pids, active_thread_percentage=None)
        except BaseException:
            self._stack.close()
            raise

    @property
    def pids(self) -> dict[str, int]:
        return self.group.pids if self.group is not None else {}

    @property
    def children(self) -> dict[str, dict[str, Any]]:
        """Each replica process: ``{"pid", "tmpdir", "exitcode"}``, kept after ``close()``."""
        group = getattr(self, "_group_record", None)
        return group.children if group is not None else {}

    def run(self, workload: Workload, progress: bool = True) -> Run:
        from tqdm.auto import tqdm

        from splitlab.api import validate
        from splitlab.system.env import environment

        validate(workload, self.model)
        if self.engine != "generate":
            from splitlab.engine.loop import check_requests

            check_requests(workload, min(self.config.max_seq_len, self.model.facts.max_positions),
                           self.model.facts.max_positions)
        if self._closed or self.group is None:
            raise WorkerError("this replicas session is closed (a run failed or close() was called); start a new one")
        group = self.group
        self.runs += 1
        run_id = self.runs
        shares = round_robin(workload.requests, self.num_replicas)
        bar = None
        try:
            for name, share in zip(self.names, shares):
                group.send(name, ("arm", run_id, share))
            group.wait_for("armed", timeout_s=600.0, what="get ready for the run")
            t0 = time.perf_counter()
            for name in self.names:
                group.send(name, ("go", run_id, t0))
            bar = tqdm(total=workload.total_output_tokens, unit="tok", desc=f"replicas x{self.num_replicas}",
                       disable=not progress, leave=False)
            done: dict[str, Any] = {}
            last_arrival = max(r.arrival_s for r in workload)
            last_event = time.perf_counter()
            while len(done) < self.num_replicas:
                event = group.next_event(timeout=0.2)
                now = time.perf_counter()
                if event is None:
                    if now - t0 > last_arrival and now - last_event > self.stall_timeout_s:
                        raise WorkerError(f"replicas run stalled: no progress for {self.stall_timeout_s:.0f} s; "
                                          "stopped the replicas")
                    continue
                last_event = now
                name, kind, payload = event
                if kind == "progress":
                    bar.update(sum(payload))
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
        traces: dict[int, RequestTrace] = {}
        steps: list[StepTrace] = []
        for name in self.names:
            for t in done[name]["traces"]:
                traces[t["id"]] = RequestTrace(**t)
            steps.extend(StepTrace(*s) for s in done[name]["steps"])
        missing = [r.id for r in workload if r.id not in traces or not traces[r.id].finished]
        if missing:
            raise WorkerError(f"replicas run ended with requests {missing[:10]} unfinished")
        steps.sort(key=lambda s: (s.start_s, s.worker))
        peaks = {name: done[name].get("peak_bytes") for name in self.names}
        kv_bytes = [self.ready[name].get("kv_pool_bytes") for name in self.names]
        memory = {
            "peak_bytes": sum(peaks.values()) if all(v is not None for v in peaks.values()) else None,
            "per_worker": peaks,
            "kv_pool_bytes": sum(kv_bytes) if all(v is not None for v in kv_bytes) else None,
            "kv_pools": self.num_replicas if self.engine != "generate" else 0,
            "weight_bytes": self.ready[self.names[0]].get("weight_bytes") or self.model.facts.weight_bytes,
        }
        run_config: dict[str, Any] = {
            "mode": "replicas",
            "replicas": self.num_replicas,
            "engine": self.engine,
            "mps": self.mps_on,
            "backend": f"{self.engine}+mps" if self.mps_on else self.engine,
            "assignment": "round-robin in arrival order",
            "batch_size": self.batch_size if self.engine == "generate" else None,
            **(self.config.to_dict() if self.engine != "generate" else {}),
            "per_replica": [{k: self.ready[n].get(k) for k in ("num_slots", "kv_pool_bytes", "max_batch",
                                                                  "kernels", "cuda_graphs", "weights_shared")}
                            for n in self.names],
            "device": str(self.model.device),
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "session_run": self.runs,
        }
        if self.mps:
            run_config["mps_daemon"] = self.mps
        return Run(mode="replicas", model=self.model.spec, workload=workload.name, config=run_config,
                   env=environment(), traces=[traces[r.id] for r in workload], steps=steps, memory=memory)

    def close(self, graceful: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if graceful and self.group is not None:
                self.group.ask_to_finish(list(reversed(self.names)))  # replica 0, the owner of the weights, last
        except WorkerError as exc:
            warnings.warn(f"a replica failed while closing: {exc}", stacklevel=2)
        finally:
            self._stack.close()
            self.group = None

    def __enter__(self) -> "ReplicaSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def run_replicas(workload: Workload, model, batch_size: int = 8, config: EngineConfig | None = None,
                 progress: bool = True, num_replicas: int = 2, engine: str = "serial", mps: bool = False,
                 **unknown) -> Run:
    """Serve ``workload`` with ``num_replicas`` full engines side by side (the paper's scheme).

    ``engine``: ``"serial"`` / ``"chunked"`` (continuous batching, each replica its own KV
    pool of 1/N of the budget) or ``"generate"`` (HF static batches of ``batch_size``);
    ``mps``: run the replicas under a private MPS daemon. Requests are dealt round-robin in
    arrival order. A replica that fails raises ``WorkerError`` naming it.
    """
    if unknown:
        raise ConfigError(f"mode 'replicas' got unknown keyword(s) {sorted(unknown)}; accepted: batch_size, config, "
                          "progress, num_replicas, engine, mps")
    from splitlab.api import validate

    validate(workload, model)
    if engine in ("serial", "chunked") and hasattr(model, "require_engine_support"):
        from splitlab.engine.loop import check_requests

        model.require_engine_support("replicas")
        cfg = config if isinstance(config, EngineConfig) else EngineConfig()
        check_requests(workload, min(cfg.max_seq_len, model.facts.max_positions), model.facts.max_positions)
    with ReplicaSession(model, num_replicas=num_replicas, engine=engine, mps=mps, batch_size=batch_size,
                        config=config) as session:
        return session.run(workload, progress=progress)
