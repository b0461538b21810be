"""What every notebook does first, in one call: ``ENV = start()``.

Quiets the libraries' progress bars and logs, makes plotly save figures as JSON that
JupyterLab draws offline (Colab has its own renderer), and prints what this machine is:
versions, device, GPU, and on a CPU what the notebook will do there.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

NO_GPU = ("NO GPU HERE: this notebook runs its CPU path live (small real model, small sizes) and shows the "
          "recorded H200 results from results/, each labelled with its GPU, date and command.")


def start() -> dict[str, Any]:
    """Set up a notebook's kernel and print the machine; returns ``splitlab.environment()``."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also in worker processes started later
    import plotly.io as pio
    import torch
    import transformers

    import splitlab
    from splitlab.system.env import environment

    pio.renderers.default = "colab" if "google.colab" in sys.modules else "plotly_mimetype"
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    env = environment()
    print(f"python {platform.python_version()} | torch {torch.__version__} | transformers {transformers.__version__} "
          f"| splitlab {splitlab.__version__}")
    print(f"device: {env['device']} | GPU: {env['gpu_name'] or 'none'} | CPU threads: {env['cpu_threads']}")
    if env["device"] != "cuda":
        print(NO_GPU)
    return env
