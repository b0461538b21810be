"""``splitlab.run``: one entry point for every mode; checks the input, then dispatches.

Modes (see README.md):

- ``hf-generate``: Huggingface ``generate()`` on static batches (the paper's baseline and the
  correctness oracle), in ``splitlab.modes.hf_generate``.
- ``serial``: one worker, continuous batching, prefill and decode interleaved on one stream.
- ``chunked``: one worker, decode tokens and a prefill chunk fused in one batch.
- ``split``: a prefill worker and a decode worker at the same time (co-location on).
- ``replicas``: N full engines side by side (the paper's own scheme).

Every mode's module is imported only when that mode runs, so the core works where the
others (or their dependencies) are absent; a mode whose module is not there yet raises a
``ModeError`` that says so.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from splitlab.config import SLO
from splitlab.errors import ConfigError, ModeError, WorkloadError
from splitlab.workload import Workload

MODES = ("hf-generate", "serial", "chunked", "split", "replicas")

# mode -> (module, function)
_TARGETS = {
    "hf-generate": ("splitlab.modes.hf_generate", "run_hf_generate"),
    "serial": ("splitlab.modes.continuous", "run_continuous"),
    "chunked": ("splitlab.modes.continuous", "run_continuous"),
    "split": ("splitlab.modes.split", "run_split"),
    "replicas": ("splitlab.modes.replicas", "run_replicas"),
}
# modes that need a CUDA GPU to run at all: none. On CPU, split runs with backend "streams"
# or "processes" (its "mps" and "green" backends raise ModeError there) and replicas with
# mps=False.
_GPU_ONLY: tuple[str, ...] = ()


def _target(mode: str) -> Callable[..., Any]:
    module_name, func_name = _TARGETS[mode]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module_name or module_name.startswith(exc.name + ".")):
            raise ModeError(
                f"mode {mode!r} is not built yet in this version of splitlab ({module_name} is "
                f"missing); available now: {', '.join(available_modes(gpu=True))}"
            ) from exc
        raise
    func = getattr(module, func_name, None)
    if func is None:
        raise ModeError(
            f"mode {mode!r} is not built yet in this version of splitlab "
            f"({module_name}.{func_name} is missing); available now: {', '.join(available_modes(gpu=True))}"
        )
    return func


def mode_built(mode: str) -> bool:
    """True when the code of ``mode`` is present in this installation."""
    if mode not in _TARGETS:
        return False
    module_name, func_name = _TARGETS[mode]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        return False
    return hasattr(module, func_name)


def available_modes(gpu: bool | None = None) -> tuple[str, ...]:
    """The modes that are built and can run here (every built mode runs on CPU too; ``split``'s
    ``mps`` / ``green`` backends and ``replicas`` with ``mps=True`` need a CUDA GPU).

    ``gpu=None`` asks torch whether a CUDA GPU is visible.
    """
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    return tuple(m for m in MODES if mode_built(m) and (gpu or m not in _GPU_ONLY))


def _check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise ModeError(f"unknown mode {mode!r}; accepted modes: {', '.join(MODES)}")
    return mode


def validate(workload: Workload, model) -> None:
    """Raise a ``WorkloadError`` unless every request fits ``model`` (context and vocabulary)."""
    if not isinstance(workload, Workload):
        raise WorkloadError(
            f"workload must be a splitlab Workload (see splitlab.workload builders), got {type(workload).__name__}"
        )
    if len(workload) == 0:  # Workload refuses this itself; kept for subclasses and duck types
        raise WorkloadError(f"workload {workload.name!r} has no requests; give at least one")
    workload.check_fits(int(model.facts.max_positions))
    vocab = int(model.facts.vocab_size)
    for r in workload:
        top = max(r.prompt_ids)
        low = min(r.prompt_ids)
        if top >= vocab or low < 0:
            raise WorkloadError(
                f"request {r.id} has token id {top if top >= vocab else low} outside the model's "
                f"vocabulary [0, {vocab}); build prompts with model=... so ids come from its vocabulary"
            )


def run(workload: Workload, model, mode: str = "hf-generate", *, batch_size: int = 8,
        config=None, slo: SLO | None = None, progress: bool = True, **mode_kwargs):
    """Run ``workload`` on ``model`` in ``mode``; return a ``splitlab.measure.metrics.Run``.

    ``model`` is a ``LoadedModel`` or a spec string for ``load_model`` (``"tiny"``,
    ``"smollm2-135m"``, ``"dummy:<arch>"``, a folder or HF id). ``batch_size`` is the static
    batch of ``hf-generate`` (and of ``replicas``' generate backend); ``config`` is the
    ``EngineConfig`` of the engine modes (``hf-generate`` does not use it). ``slo`` is stored in
    the run so ``Run.summary()`` reports goodput against it. Extra keywords go to the mode
    (e.g. ``backend="mps", prefill_share=40`` for ``split``).
    """
    mode = _check_mode(mode)
    if slo is not None and not isinstance(slo, SLO):
        raise ConfigError(f"slo must be a splitlab.SLO(ttft_s=..., tpot_s=...), got {slo!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(workload, Workload):
        raise WorkloadError(
            f"workload must be a splitlab Workload (see splitlab.workload builders), got {type(workload).__name__}"
        )
    func = _target(mode)  # before loading a model: an unbuilt mode fails fast
    if isinstance(model, str):
        from splitlab.models import load_model

        model = load_model(model)
    if not hasattr(model, "facts") or not hasattr(model, "model"):
        raise ConfigError(f"model must be a LoadedModel (splitlab.load_model) or a spec string, got {model!r}")
    validate(workload, model)

    if mode == "hf-generate":
        if mode_kwargs:
            raise ConfigError(
                f"mode 'hf-generate' takes no keyword(s) {sorted(mode_kwargs)}; it accepts batch_size only"
            )
        result = func(workload, model, batch_size=batch_size, progress=progress)
    elif mode in ("serial", "chunked"):
        model.require_engine_support(mode)
        cfg = config
        if cfg is None:
            from splitlab import config as config_module

            engine_config = getattr(config_module, "EngineConfig", None)
            if engine_config is None:
                raise ModeError(f"mode {mode!r} is not built yet (splitlab.config.EngineConfig is missing)")
            cfg = engine_config()
        result = func(workload, model, mode, cfg, progress=progress, **mode_kwargs)
    elif mode == "split":
        model.require_engine_support(mode)
        result = func(workload, model, config=config, progress=progress, **mode_kwargs)
    else:  # replicas
        result = func(workload, model, batch_size=batch_size, config=config, progress=progress, **mode_kwargs)
    if slo is not None:
        result.config["slo"] = slo.to_dict()
    return result
