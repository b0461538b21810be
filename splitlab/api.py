"""``splitlab.run``: one entry point for every mode; checks the input once, then dispatches.
``splitlab.online_engine``: the long-lived engine of a mode, for a server or a caller that
submits requests while it runs.

Modes (see README.md):

- ``hf-generate``: Huggingface ``generate()`` on static batches (the paper's baseline and the
  correctness oracle), in ``splitlab.modes.hf_generate``.
- ``serial``: one worker, continuous batching, prefill and decode interleaved on one stream.
- ``chunked``: one worker, decode tokens and a prefill chunk fused in one batch.
- ``split``: a prefill worker and a decode worker at the same time (co-location on).
- ``replicas``: N full engines side by side (the paper's own scheme).

Every check of a run's input happens here, before anything is built (the sessions,
``SplitSession`` and ``ReplicaSession``, are the other entry and check their own); the
modes' functions below assume valid input. Each mode's module is imported when it runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from splitlab.config import SLO
from splitlab.errors import ConfigError, ModeError, WorkloadError
from splitlab.workload import Workload

MODES = ("hf-generate", "serial", "chunked", "split", "replicas")
#: The modes with an online engine (``hf-generate`` serves static batches of a known workload).
ONLINE_MODES = ("serial", "chunked", "split", "replicas")


def available_modes(gpu: bool | None = None) -> tuple[str, ...]:
    """The modes that run here: every mode, on CPU and GPU alike (``split``'s ``mps`` /
    ``green`` backends and ``replicas`` with ``mps=True`` need a CUDA GPU and say so).
    ``gpu`` is accepted for callers that ask per kind of machine; the answer is the same."""
    return MODES


def _check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise ModeError(f"unknown mode {mode!r}; accepted modes: {', '.join(MODES)}")
    return mode


def _mode_options(mode: str, batch_size: int, config, mode_kwargs: dict[str, Any]):
    """``(engine config or None, the mode's own options)``, checked; before any model loads."""
    from splitlab.modes.common import engine_config

    if mode == "hf-generate":
        if mode_kwargs:
            raise ConfigError(
                f"mode 'hf-generate' takes no keyword(s) {sorted(mode_kwargs)}; it accepts batch_size only"
            )
        return None, None
    if mode in ("serial", "chunked"):
        if mode_kwargs:
            raise ConfigError(f"mode {mode!r} takes no keyword(s) {sorted(mode_kwargs)}")
        return engine_config(config), None
    if mode == "split":
        from splitlab.modes.split.run import split_config

        return engine_config(config), split_config(**mode_kwargs)
    from splitlab.modes.replicas import replica_config

    options = replica_config(batch_size=batch_size, **mode_kwargs)
    return (engine_config(config) if options.engine != "generate" else None), options


def run(workload: Workload, model, mode: str = "hf-generate", *, batch_size: int = 8,
        config=None, slo: SLO | None = None, progress: bool = True, **mode_kwargs):
    """Run ``workload`` on ``model`` in ``mode``; return a ``splitlab.measure.metrics.Run``.

    ``model`` is a ``LoadedModel`` or a spec string for ``load_model`` (``"tiny"``,
    ``"smollm2-135m"``, ``"dummy:<arch>"``, a folder or HF id). ``batch_size`` is the static
    batch of ``hf-generate`` (and of ``replicas``' generate engine); ``config`` is the
    ``EngineConfig`` of the engine modes (``hf-generate`` does not use it). ``slo`` is stored in
    the run so ``Run.summary()`` reports goodput against it. Extra keywords go to the mode
    (e.g. ``backend="mps", prefill_share=40`` for ``split``; ``num_replicas=2, engine="serial",
    mps=False, stall_timeout_s=600`` for ``replicas``).
    """
    from splitlab.modes.common import check_workload

    mode = _check_mode(mode)
    if slo is not None and not isinstance(slo, SLO):
        raise ConfigError(f"slo must be a splitlab.SLO(ttft_s=..., tpot_s=...), got {slo!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(workload, Workload):
        raise WorkloadError(
            f"workload must be a splitlab Workload (see splitlab.workload builders), got {type(workload).__name__}"
        )
    engine, options = _mode_options(mode, batch_size, config, mode_kwargs)
    if isinstance(model, str):
        from splitlab.models import load_model

        model = load_model(model)
    if not hasattr(model, "facts") or not hasattr(model, "model"):
        raise ConfigError(f"model must be a LoadedModel (splitlab.load_model) or a spec string, got {model!r}")
    if mode in ("serial", "chunked"):  # the split and replicas sessions check their own
        model.require_engine_support(mode)
    check_workload(workload, model, engine)
    result = _dispatch(mode, workload, model, engine, options, batch_size, progress)
    if slo is not None:
        result.config = dataclasses.replace(result.config, slo=slo)
    return result


def _dispatch(mode: str, workload: Workload, model, engine, options, batch_size: int, progress: bool):
    if mode == "hf-generate":
        from splitlab.modes.hf_generate import _run_hf_generate

        return _run_hf_generate(workload, model, batch_size=batch_size, progress=progress)
    if mode in ("serial", "chunked"):
        from splitlab.modes.continuous import _run_continuous

        return _run_continuous(workload, model, mode, engine, progress=progress)
    if mode == "split":
        from splitlab.modes.split.run import _run_split

        return _run_split(workload, model, engine, options, progress=progress)
    from splitlab.modes.replicas import _run_replicas

    return _run_replicas(workload, model, engine, options, progress=progress)


def online_engine(model, mode: str = "serial", config=None, *, split=None, replicas=None, **kwargs):
    """The online engine of ``mode`` (``ONLINE_MODES``), started and ready: ``serial`` /
    ``chunked``: ``splitlab.engine.online.OnlineEngine``; ``split`` with ``split=SplitConfig``
    (None: the default, ``streams``): backend ``streams`` / ``green`` an ``OnlineSplitEngine``
    (two threads), ``processes`` / ``mps`` an ``OnlineProcessSplit`` (two spawned children);
    ``replicas`` with ``replicas=ReplicaConfig``: ``OnlineReplicas``. ``kwargs`` go to the engine
    (``keep_steps``, ``max_queued``, ``ready_timeout_s``, ...); close it, or use it as a context
    manager."""
    from splitlab.config import SplitConfig

    if mode not in ONLINE_MODES:
        raise ModeError(f"no online engine for mode {mode!r}; online modes: {', '.join(ONLINE_MODES)}")
    if split is not None and mode != "split":
        raise ConfigError(f"split=... is for mode 'split', not {mode!r}")
    if replicas is not None and mode != "replicas":
        raise ConfigError(f"replicas=... is for mode 'replicas', not {mode!r}")
    if mode == "split":
        if split is not None and not isinstance(split, SplitConfig):
            raise ConfigError(f"split must be a splitlab.config.SplitConfig, got {type(split).__name__}")
        if split is not None and split.backend in ("processes", "mps"):  # two spawned children
            from splitlab.modes.split.online_processes import OnlineProcessSplit

            return OnlineProcessSplit(model, config, split=split, **kwargs)
        from splitlab.modes.split.online_threads import OnlineSplitEngine

        return OnlineSplitEngine(model, "split", config, split=split, **kwargs)
    if mode == "replicas":
        from splitlab.modes.online_replicas import OnlineReplicas

        return OnlineReplicas(model, config, replicas=replicas, **kwargs)
    from splitlab.engine.online import OnlineEngine

    return OnlineEngine(model, mode, config, **kwargs)
