"""splitlab: phase-split LLM inference on one GPU, measured and drawn.

The public API is re-exported here; each name lives in the module that owns it.
"""

from .config import SLO
from .errors import SplitlabError
from .metrics import Run, load_run
from .models import LoadedModel, load_model
from .workload import Request, Workload

__version__ = "0.1.0"

__all__ = [
    "SLO",
    "LoadedModel",
    "Request",
    "Run",
    "SplitlabError",
    "Workload",
    "load_model",
    "load_run",
    "__version__",
]
