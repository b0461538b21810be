"""What this machine has: device, GPU name, MPS and NVML availability, package versions."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
from importlib import metadata
from typing import Any, Iterator

import torch

PACKAGES = ("torch", "transformers", "numpy", "pandas", "plotly", "ipywidgets", "nvidia-ml-py", "papermill")
MPS_CONTROL = "nvidia-cuda-mps-control"


def synchronize(device) -> None:
    """Wait for every kernel queued on ``device`` (a no-op off CUDA): the one device sync of
    the modes, before a clock is read or a result is handed to another worker."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def nvml_available() -> bool:
    """True when nvidia-ml-py imports and NVML initialises (a driver is present)."""
    try:
        import pynvml
    except ImportError:
        return False
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound and friends on machines without a driver
        return False
    try:
        pynvml.nvmlShutdown()
    except Exception:
        pass
    return True


def environment() -> dict[str, Any]:
    """A JSON-able description of the machine, stored in every Run and results file."""
    cuda = torch.cuda.is_available()
    env: dict[str, Any] = {
        "device": "cuda" if cuda else "cpu",
        "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count if cuda else None,
        "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
        "cuda_version": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mps_control_binary": shutil.which(MPS_CONTROL),
        "nvml": nvml_available(),
        "versions": package_versions(),
    }
    return env


@contextlib.contextmanager
def patched_environ(env: dict[str, str | None]) -> Iterator[None]:
    """``env`` in ``os.environ`` for the block (``None`` removes a variable), then restored.

    For spawned children, which copy the parent's environment when they start. Not
    thread-safe (os.environ is process-wide): keep the block short.
    """
    saved = {k: os.environ.get(k) for k in env}
    try:
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
