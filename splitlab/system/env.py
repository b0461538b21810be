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


def model_capacity(spec: str, max_seq_len: int | None = None, kv_block_size: int | None = None,
                   gpu_memory_gib: float | None = None, dtype: str = "bfloat16") -> dict[str, Any]:
    """How much KV fits for model ``spec`` on this machine's GPU, or on a card of
    ``gpu_memory_gib`` GiB (needed without a GPU): a JSON-able dict of the
    ``splitlab.engine.capacity.KVCapacity`` fields plus where the memory figure came from.

    The model is read on the meta device (shapes only, no weights loaded); the free memory is
    the stated card's total, or the GPU's free memory measured now, less the weights' bytes
    in ``dtype``. A stated card's CUDA context (a few hundred MiB) is not subtracted: the part
    of memory outside ``kv_memory_fraction`` covers it. ``max_seq_len`` defaults to
    ``min(2048, the model's context)``; sequences are counted at that length; the engine
    settings are ``EngineConfig``'s defaults with ``max_batch=None`` (derived)."""
    from splitlab.config import EngineConfig
    from splitlab.engine.capacity import kv_capacity, measured_free_bytes
    from splitlab.errors import ConfigError, DeviceError
    from splitlab.models import load_model

    if gpu_memory_gib is not None and (isinstance(gpu_memory_gib, bool) or not isinstance(gpu_memory_gib, (int, float))
                                       or not 0 < gpu_memory_gib < float("inf")):
        raise ConfigError(f"the GPU memory must be a positive number of GiB (e.g. 24), got {gpu_memory_gib!r}")
    model = load_model(spec, device="meta", dtype=dtype)
    facts = model.facts
    seq_len = min(2048, facts.max_positions) if max_seq_len is None else max_seq_len
    config = EngineConfig(max_seq_len=seq_len, kv_block_size=kv_block_size, max_batch=None)
    if gpu_memory_gib is not None:
        here = "" if torch.cuda.is_available() else "; no GPU on this machine"
        memory, source = int(gpu_memory_gib * 2**30), f"stated{here}"
    elif torch.cuda.is_available():
        memory, source = measured_free_bytes("cuda"), f"free on {torch.cuda.get_device_name(0)}, measured now"
    else:
        raise DeviceError("no GPU on this machine to measure; give --gpu-memory-gib G (in Python gpu_memory_gib=G) "
                          "to compute for a card of G GiB, e.g. 24")
    free = memory - facts.weight_bytes
    if free <= 0:
        raise DeviceError(f"the weights of {spec} take {facts.weight_bytes / 2**30:.2f} GiB in {dtype}, more than "
                          f"the {memory / 2**30:.2f} GiB ({source}); give more memory or a smaller model")
    cap = kv_capacity(facts, free, config)
    return {"model": spec, "dtype": str(model.dtype).replace("torch.", ""), "weight_bytes": facts.weight_bytes,
            "memory_bytes": memory, "memory_source": source, **cap.to_dict()}


def capacity_rows(cap: dict[str, Any]) -> list[tuple[str, str]]:
    """``model_capacity``'s answer as (label, value) rows for people."""
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    pages = (f"{cap['num_pages']:,} of {cap['block_size']} positions" if cap["block_size"] is not None
             else f"none (slot pool: {cap['num_slots']:,} slots of {cap['max_seq_len']} positions)")
    return [
        ("KV capacity of", f"{cap['model']} ({cap['dtype']}, weights {gib(cap['weight_bytes'])})"),
        ("  memory", f"{gib(cap['memory_bytes'])} ({cap['memory_source']})"),
        ("  free after the weights", gib(cap["free_bytes"])),
        ("  reserved", cap["reserve"]["why"]),
        ("  KV pool", f"{gib(cap['kv_bytes'])} ({cap['memory_fraction']:.0%} of the free memory less the reserve)"),
        ("  per position", f"{cap['bytes_per_position']:,} bytes"),
        ("  KV tokens", f"{cap['kv_positions']:,}"),
        ("  pages", pages),
        ("  concurrent sequences", f"{cap['max_sequences']:,} at {cap['context_len']} positions each"),
        ("  derived max_batch", str(cap["max_batch"])),
    ]
