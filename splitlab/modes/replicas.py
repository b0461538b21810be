"""The ``replicas`` mode: the paper's own scheme, N data-parallel engines side by side.

N spawned processes (``replica-0`` ... ``replica-{N-1}``), each a full engine serving its
share of the requests (dealt round-robin in arrival order), all measured from one t0:

- ``engine="serial"`` / ``"chunked"``: the online engine's step loop of those modes (the
  child loop an online replica runs, ``splitlab.modes.online_child.ChildLoop``) over the
  process's own KV pool;
- ``engine="generate"``: Huggingface ``generate()`` on static batches of ``batch_size``
  (``splitlab.modes.hf_generate.serve_static_batches``), as the paper's HF pipeline did.

Weights exist once: ``replica-0`` loads the model by (spec, device, dtype, seed) and shares
its weight tensors with the others through a ``torch.multiprocessing`` queue (CUDA IPC on
GPU, as the paper's vLLM fork did; shared memory on CPU); it keeps them alive until every
other replica said ``Bye``. The KV cache does NOT: each engine replica allocates its own
pool with 1/N of the budget (``num_slots // N`` slots, or on a paged pool ``num_pages // N``
pages, when given; else ``kv_budget_bytes / N``, else ``1 / N`` of ``kv_memory_fraction`` of
the free memory replica 0 sees after loading less N times the reserve one engine leaves for
its activations and decode graphs (``splitlab.engine.capacity.reserve_for``); on CPU
``min(max_batch, 8) // N`` slots, or those sequences' full-length pages), the paper's
``0.9 / N`` memory split. So each replica batches
at most 1/N of the sequences one engine could, and ``Run.memory`` lists every replica's peak
(``per_worker``) and their sum (``peak_bytes``). A paged replica admits, grows and preempts
as the ``serial`` / ``chunked`` engine does; ``Run.memory`` sums their preemptions.

``mps=True`` runs the replicas as clients of a private MPS daemon (no SM percentages, as the
paper); ``mps=False`` leaves them time-sliced by the driver. The processes' life cycle is
``splitlab.modes.session``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import queue
import shutil
import time
from typing import Any, Callable

import torch

from splitlab.config import EngineConfig, FrozenConfig, RunConfig
from splitlab.engine.capacity import measured_free_bytes, reserve_for
from splitlab.engine.kv import new_allocator
from splitlab.engine.sampling import GREEDY
from splitlab.engine.scheduler import Scheduler
from splitlab.errors import ConfigError, ModeError, WorkerError
from splitlab.measure.metrics import Run
from splitlab.modes.common import (Fault, build_run, check_faults, check_workload, cpu_threads_per_worker,
                                   engine_config, fault_for, mapped_not_owned, round_robin, total_or_none,
                                   weight_fingerprint, worker_facts, worker_model_args)
from splitlab.modes.online_child import ChildLoop, Submit, online_worker
from splitlab.modes.session import (Arm, OnSession, ProcessSession, Ready, clock_from, get_checking_parent,
                                    serve_runs)
from splitlab.modes.worker_kv import check_pages_fit, merged_counters, warn_preemptions
from splitlab.system.env import synchronize
from splitlab.workload import Workload

ENGINES = ("serial", "chunked", "generate")
MPS_HINT = ("replicas with mps=True needs an NVIDIA GPU with nvidia-cuda-mps-control; "
            "use mps=False")


@dataclasses.dataclass(frozen=True)
class ReplicaConfig(FrozenConfig):
    """How the ``replicas`` mode runs: ``num_replicas`` engines of kind ``engine``
    (``"serial"``, ``"chunked"`` or ``"generate"``), under a private MPS daemon when ``mps``;
    ``batch_size``: generate's static batch. ``ready_timeout_s``: seconds allowed to load,
    share and warm up (and to get ready for each run); ``stall_timeout_s``: a run fails
    (``WorkerError``) when no replica reported progress for this long after the last
    arrival; ``event_flush_s``: a replica reports its progress at most this often."""

    num_replicas: int = 2
    engine: str = "serial"
    mps: bool = False
    batch_size: int = 8
    ready_timeout_s: float = 900.0
    stall_timeout_s: float = 600.0
    event_flush_s: float = 0.1

    def __post_init__(self) -> None:
        for name in ("num_replicas", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.engine not in ENGINES:
            raise ConfigError(f"replicas engine must be one of {', '.join(ENGINES)}; got {self.engine!r}")
        if not isinstance(self.mps, bool):
            raise ConfigError(f"mps must be True or False, got {self.mps!r}")
        for name in ("ready_timeout_s", "stall_timeout_s", "event_flush_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")


REPLICA_KEYS = tuple(f.name for f in dataclasses.fields(ReplicaConfig))


def replica_config(options: ReplicaConfig | None = None, **kwargs: Any) -> ReplicaConfig:
    """A ``ReplicaConfig`` from an existing one (``options``) and/or keywords."""
    unknown = sorted(set(kwargs) - set(REPLICA_KEYS))
    if unknown:
        raise ConfigError(f"mode 'replicas' got unknown keyword(s) {unknown}; accepted: config, progress, "
                          f"options, {', '.join(REPLICA_KEYS)}")
    if options is None:
        return ReplicaConfig(**kwargs)
    if not isinstance(options, ReplicaConfig):
        raise ConfigError(f"options must be a splitlab.modes.replicas.ReplicaConfig, got {type(options).__name__}")
    return dataclasses.replace(options, **kwargs) if kwargs else options


# ==== child side ====================================================================================

@dataclasses.dataclass(frozen=True)
class Shared:
    """What replica 0 gives every other replica: the model's facts and dtype, each engine
    replica's KV share (``kv_plan``: the ``EngineConfig`` fields that size its pool), and the
    weights: the engine's (``arch``, ``weights``) or, for ``generate``, the HF model's class,
    config, tensors and tokenizer."""

    facts: Any
    dtype: torch.dtype
    kv_plan: dict[str, int | None]
    arch: dict[str, Any] | None = None
    weights: dict[str, torch.Tensor] | None = None
    hf_class: type | None = None
    hf_config: Any = None
    hf_tensors: list | None = None
    tokenizer: Any = None

    def tensors(self) -> list[torch.Tensor]:
        return list(self.weights.values()) if self.weights is not None else [t for _, t, _ in self.hf_tensors]


@dataclasses.dataclass(frozen=True)
class Bye:
    """A replica let go of replica 0's memory."""

    index: int


@dataclasses.dataclass(frozen=True)
class _Shape:
    """What ``build_kv`` reads of a model: facts, dtype, device."""

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


def _kv_plan(config: EngineConfig, n: int, device: torch.device, max_seq_len: int, facts) -> dict[str, int | None]:
    """Each engine replica's share of the KV budget (see the module docstring), as the
    ``EngineConfig`` fields its pool is built from (``facts``: the model's ``ModelFacts``)."""
    block = config.kv_block_size
    count, given = ("num_slots", config.num_slots) if block is None else ("num_pages", config.num_pages)
    if given is not None:
        return {count: max(1, given // n)}
    if config.kv_budget_bytes is not None:
        return {count: None, "kv_budget_bytes": max(1, config.kv_budget_bytes // n)}
    if device.type == "cuda":  # as one engine sizes its pool, but every replica has its own reserve
        reserve = reserve_for(facts, config)
        usable = int(measured_free_bytes(device) * config.kv_memory_fraction) - n * reserve.total_bytes
        if usable < n:
            raise ConfigError(
                f"{n} replicas leave no memory for KV: {config.kv_memory_fraction:g} of the free memory, less "
                f"each replica's reserve of {reserve.describe()}, is nothing; use fewer replicas, a smaller "
                "token_budget or max_batch, or give num_slots / num_pages / kv_budget_bytes")
        return {count: None, "kv_budget_bytes": usable // n}
    sequences = max(1, min(config.max_batch or 8, 8) // n)  # the CPU default of one engine, split N ways
    return {count: sequences if block is None else sequences * -(-max_seq_len // block)}


def _load_and_share(model_args: dict[str, Any], engine: str, config: EngineConfig, n: int, share_q):
    """Replica 0: load the model, make its weights shareable, put one ``Shared`` per other
    replica on ``share_q``; ``(loaded model, shared)``."""
    from splitlab.engine.weights import extract_arch, extract_weights
    from splitlab.models import load_model

    device = torch.device(model_args["device"])
    loaded = load_model(model_args["spec"], device=device, dtype=model_args["dtype"], seed=model_args["seed"])
    max_seq_len = min(config.max_seq_len, loaded.facts.max_positions)
    common = {"facts": loaded.facts, "dtype": loaded.dtype, "kv_plan": _kv_plan(config, n, device, max_seq_len, loaded.facts)}
    if engine == "generate":
        shared = Shared(**common, hf_class=type(loaded.model), hf_config=loaded.model.config,
                        hf_tensors=_hf_tensors(loaded.model, device.type == "cpu"), tokenizer=loaded.tokenizer)
    else:
        loaded.require_engine_support(engine)
        weights = extract_weights(loaded.model, share_storage=True)  # shared with the others, held once
        if device.type == "cpu":
            for t in weights.values():
                t.share_memory_()
        shared = Shared(**common, arch=extract_arch(loaded.model), weights=weights)
    for _ in range(n - 1):
        share_q.put(shared)
    return loaded, shared


def _counting(report: Callable[[int], None], fault: Fault | None) -> Callable[[int], None]:
    """Per step (or batch): report its tokens, then let an injected fault fire."""
    steps = [0]

    def on_step(tokens: int) -> None:
        report(tokens)
        steps[0] += 1
        if fault is not None:
            fault(steps[0])
    return on_step


def _engine_server(name: str, runner, policy: str, config: EngineConfig, fault: Fault | None):
    """``serve`` of an engine replica: its share through the online engine's child loop (the
    loop an online replica runs: one engine loop), each request at its arrival on the run's clock,
    exactly ``max_new_tokens`` greedy tokens (EOS ignored)."""
    def serve(arm: Arm, t0: float, report: Callable[[int], None]):
        if not arm.requests:
            return [], [], {}
        clock = clock_from(t0)
        scheduler = Scheduler(policy, new_allocator(runner.kv, config), runner.max_batch, config.token_budget,
                              config.chunk_size)
        loop = ChildLoop(online_worker(name, runner, scheduler, clock), (), runner.device, fault=fault)
        for r in arm.requests:
            loop.submit(Submit(r, r.arrival_s, GREEDY, ignore_eos=True))
        seqs, steps = list(loop.held.values()), []
        while loop.held:
            outcome, wait = loop.turn()
            failed = [d for d in loop.deltas if d.finish_reason == "error"]
            if failed:  # a failed step, or a request the pool can never hold: the run is not whole
                raise WorkerError(f"request {failed[0].request_id} failed: {failed[0].error}")
            if outcome is not None:
                report(outcome.num_new_tokens)
            elif not scheduler.has_work():
                if wait is None:
                    raise WorkerError(f"{len(loop.held)} requests unfinished with nothing pending or running")
                time.sleep(wait)
            steps.extend(loop.steps)
            loop.steps.clear()
            loop.deltas.clear()
            loop.released.clear()
        return [s.trace for s in seqs], steps, scheduler.counters()
    return serve


def _generate_server(name: str, loaded, batch_size: int, fault: Fault | None):
    """``serve`` of a generate replica: its share through HF ``generate()`` static batches."""
    from splitlab.modes.hf_generate import serve_static_batches

    def serve(arm: Arm, t0: float, report: Callable[[int], None]):
        if not arm.requests:
            return [], [], {}
        on_step = _counting(report, fault)
        traces, steps = serve_static_batches(loaded, arm.requests, batch_size, t0, worker=name,
                                             on_batch=lambda batch: on_step(sum(r.max_new_tokens for r in batch)))
        return list(traces.values()), steps, {}
    return serve


def replica_weights(channel, index: int, n: int, model_args: dict[str, Any], options: ReplicaConfig,
                    config: EngineConfig, share_q):
    """A replica's start (offline and online alike): replica 0 loads the model and shares it,
    the others map what it shared. ``(device, loaded or None, shared, owner facts, facts)``."""
    device = torch.device(model_args["device"])
    if device.type == "cpu":
        cpu_threads_per_worker(n)
    if index == 0:
        loaded, shared = _load_and_share(model_args, options.engine, config, n, share_q)
        owner = {"model_facts": loaded.facts.to_dict(), "fingerprint": weight_fingerprint(loaded.model)}
        return device, loaded, shared, owner, {"weights_shared": None}  # its own
    shared = get_checking_parent(share_q, channel, options.ready_timeout_s,
                                 f"{channel.name}: no weights from replica-0")
    return device, None, shared, {}, {"weights_shared": mapped_not_owned(shared.tensors(), device)}


def engine_runner(shared: Shared, device: torch.device, config: EngineConfig):
    """An engine replica's runner over its share of the KV budget (built as one engine builds
    its whole pool), warmed up; ``(runner, worker_facts)``."""
    from splitlab.engine.kv import build_kv
    from splitlab.engine.runner import ModelRunner
    from splitlab.engine.warmup import warm_up

    kv, _ = build_kv(_Shape(shared.facts, shared.dtype, device), config.replace(**shared.kv_plan),
                     min(config.max_seq_len, shared.facts.max_positions))
    runner = ModelRunner.for_config(shared.arch, shared.weights, kv, config)
    if config.warmup:
        warm_up(runner, token_budget=config.token_budget)
    return runner, worker_facts(runner, config.warmup)


def say_bye(index: int, device: torch.device, bye_q) -> None:
    """A replica other than 0, having dropped what maps replica 0's memory: say so."""
    with contextlib.suppress(Exception):
        synchronize(device)
        gc.collect()
    bye_q.put(Bye(index))


def replica_main(channel, index: int, n: int, model_args: dict[str, Any], options: ReplicaConfig,
                 config: EngineConfig, fault: Fault | None, share_q, bye_q) -> None:
    from splitlab.models import LoadedModel

    started = time.perf_counter()
    device, loaded, shared, owner, facts = replica_weights(channel, index, n, model_args, options, config, share_q)
    prepare = None
    if options.engine == "generate":
        if loaded is None:
            hf = _rebuild_hf(shared.hf_class, shared.hf_config, shared.hf_tensors, shared.dtype)
            loaded = LoadedModel(model_args["spec"], hf, shared.tokenizer, shared.facts, device, shared.dtype,
                                 model_args["seed"])
        facts.update(device=str(device), dtype=str(shared.dtype).replace("torch.", ""), warmed_up=config.warmup)
        serve = _generate_server(channel.name, loaded, options.batch_size, fault)
        if config.warmup:
            from splitlab.modes.hf_generate import warm_up_static

            def prepare(arm: Arm) -> None:  # this run's first batch shapes, off the clock
                if arm.requests:
                    warm_up_static(loaded, arm.requests, options.batch_size)
    else:
        runner, more = engine_runner(shared, device, config)
        facts.update(more)
        serve = _engine_server(channel.name, runner, options.engine, config, fault)
        runner = None
    del shared
    facts["ready_s"] = time.perf_counter() - started
    channel.send(Ready(facts, **owner))
    try:
        serve_runs(channel, device, serve, options.event_flush_s, prepare)
    finally:
        if index != 0:
            serve = prepare = loaded = None  # let go of replica 0's memory, then say so
            say_bye(index, device, bye_q)
    if index == 0:  # keep the shared weights alive until every other replica let go
        wait_byes(channel, bye_q, n - 1)


def wait_byes(channel, bye_q, count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    byes = 0
    while byes < count and time.monotonic() < deadline:
        try:
            bye_q.get(timeout=0.2)
            byes += 1
        except queue.Empty:
            channel.check_parent()


# ==== parent side ===================================================================================

class ReplicaSession(OnSession):
    """N replica processes (and, with ``mps=True``, the daemon), up between runs.

    ``model``: a ``LoadedModel`` (replica 0 reloads it by spec, device, dtype and seed in its
    own process and the weights are checked against it). ``config``: the ``EngineConfig`` of
    the engine replicas (its KV budget is split N ways). ``options`` and keywords
    (``num_replicas``, ``engine``, ``mps``, ``batch_size``, the timeouts): ``ReplicaConfig``.
    ``faults``: ``splitlab.modes.common.Fault`` s to inject (tests).
    """

    def __init__(self, model, config: EngineConfig | None = None, options: ReplicaConfig | None = None,
                 faults: tuple[Fault, ...] = (), **kwargs):
        self.options = options = replica_config(options, **kwargs)
        self.config = engine_config(config)
        if not hasattr(model, "facts") or not hasattr(model, "model"):
            raise ConfigError(f"model must be a LoadedModel (splitlab.load_model), got {model!r}")
        if options.engine != "generate":
            model.require_engine_support("replicas")
        if options.mps:
            _check_mps_here(torch.device(model.device))
        faults = check_faults(faults)
        self.model = model
        self.names = [f"replica-{i}" for i in range(options.num_replicas)]

        def build(group):
            share_q, bye_q = group.queue(), group.queue()  # the group owns them and releases them
            args = worker_model_args(model)
            return [(name, replica_main, (i, options.num_replicas, args, options, self.config,
                                          fault_for(faults, name), share_q, bye_q))
                    for i, name in enumerate(self.names)]

        self.session = ProcessSession(
            model, build, label=f"replicas x{options.num_replicas}", owner=self.names[0],
            how="replicas load the model by (spec, device, dtype, seed) in their own processes",
            close_order=list(reversed(self.names)),  # replica 0, the owner of the weights, last
            ready_timeout_s=options.ready_timeout_s, stall_timeout_s=options.stall_timeout_s,
            mps_shares={name: None for name in self.names} if options.mps else None)

    def run(self, workload: Workload, progress: bool = True) -> Run:
        """Serve ``workload`` (checked first: it must fit the model and each replica's KV slots or pages)."""
        check_workload(workload, self.model, self.config if self.options.engine != "generate" else None)
        return self._serve(workload, progress)

    def _serve(self, workload: Workload, progress: bool) -> Run:
        options, names = self.options, self.names
        facts = {name: dict(ready.facts) for name, ready in self.session.ready.items()}
        shares = round_robin(workload.requests, options.num_replicas)
        for name, share in zip(names, shares):
            check_pages_fit(share, facts[name], headroom=1)  # a serial / chunked engine keeps a page to grow into
        done = self.session.run({name: tuple(share) for name, share in zip(names, shares)},
                                workload.total_output_tokens, workload.requests[-1].arrival_s, progress)
        counters = merged_counters(done[name].counters for name in names)
        warn_preemptions(f"replicas x{options.num_replicas}", counters)
        peaks = {name: done[name].peak_bytes for name in names}
        generate = options.engine == "generate"
        memory = {
            "peak_bytes": total_or_none(peaks.values()),
            "per_worker": peaks,
            "kv_pool_bytes": total_or_none(facts[n].get("kv_pool_bytes") for n in names),
            "kv_pools": 0 if generate else options.num_replicas,
            "weight_bytes": facts[names[0]].get("weight_bytes") or self.model.facts.weight_bytes,
            **counters,
        }
        config = RunConfig(
            mode="replicas", backend=f"{options.engine}+mps" if options.mps else options.engine,
            replicas=options.num_replicas, replica_engine=options.engine, mps=options.mps,
            mps_daemon=self.session.mps, batch_size=options.batch_size if generate else None,
            engine=None if generate else self.config, session_run=self.session.runs,
            effective=facts[names[0]], workers=facts)
        traces = [t for name in names for t in done[name].traces]
        steps = [s for name in names for s in done[name].steps]
        return build_run(config, self.model, workload, traces, steps, memory)

    def close(self, graceful: bool = True) -> None:
        self.session.close(graceful)

    def __enter__(self) -> "ReplicaSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _check_mps_here(device: torch.device) -> None:
    from splitlab.system.env import MPS_CONTROL

    if device.type != "cuda" or not torch.cuda.is_available():
        raise ModeError(MPS_HINT)
    if shutil.which(MPS_CONTROL) is None:
        raise ModeError(f"{MPS_HINT} ({MPS_CONTROL} is not on PATH)")


def _run_replicas(workload: Workload, model, config: EngineConfig, options: ReplicaConfig, progress: bool = True,
                  faults: tuple[Fault, ...] = ()) -> Run:
    """One replicas run (``splitlab.run(..., mode="replicas")``, which checked the input): a
    session started for it and closed after it. A replica that fails raises ``WorkerError``
    naming it."""
    with ReplicaSession(model, config, options, faults=faults) as session:
        return session._serve(workload, progress)

