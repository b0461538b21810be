"""splitlab: phase-split LLM inference on one GPU, measured and drawn.

The public API is re-exported here; each name lives in the module that owns it::

    import splitlab as sl
    model = sl.load_model("smollm2-135m")            # or "tiny", "dummy:llama-3.1-8b", a folder
    wl = sl.poisson(16, rate=2.0, prompt_len=128, output_len=32, model=model)
    run = sl.run(wl, model, mode="hf-generate", slo=sl.SLO(ttft_s=1.0, tpot_s=0.1))
    run.summary(); run.requests; run.save("out/run.json")

Names from modules that may be absent on a given machine or version (``profile_phases``,
``mps``, ``report``) are imported lazily, on first use.
"""

from importlib import import_module as _import_module

from splitlab.config import SLO
from splitlab.api import MODES, available_modes, online_engine, run
from splitlab.system.env import environment
from splitlab.errors import (ConfigError, DeviceError, ModelSpecError, ModeError, MPSError, RunFileError, SplitlabError,
                             WorkerError, WorkloadError)
from splitlab.measure.metrics import Run, load_run, summaries_table
from splitlab.models import LoadedModel, load_model
from splitlab.workload import LengthDist, Request, Workload, fixed_batch, from_azure_trace, from_prompts, poisson

__version__ = "0.1.0"

# name -> (module, attribute or None for the module itself)
_LAZY = {
    "profile_phases": ("splitlab.measure.profile", "profile_phases"),
    "mps": ("splitlab.system.mps", None),
    "report": ("splitlab.present.report", None),
    "plots": ("splitlab.present.plots", None),
    "widgets": ("splitlab.present.widgets", None),
    "results": ("splitlab.present.results", None),
    "measure_ceilings": ("splitlab.measure.profile", "measure_ceilings"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = _import_module(module_name)
        return module if attr is None else getattr(module, attr)
    raise AttributeError(f"module 'splitlab' has no attribute {name!r}")


__all__ = [
    "MODES",
    "SLO",
    "ConfigError",
    "DeviceError",
    "LengthDist",
    "LoadedModel",
    "MPSError",
    "ModeError",
    "ModelSpecError",
    "Request",
    "Run",
    "RunFileError",
    "SplitlabError",
    "WorkerError",
    "Workload",
    "WorkloadError",
    "available_modes",
    "environment",
    "fixed_batch",
    "from_azure_trace",
    "from_prompts",
    "load_model",
    "load_run",
    "online_engine",
    "poisson",
    "run",
    "summaries_table",
    "__version__",
]
