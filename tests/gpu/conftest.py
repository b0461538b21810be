"""The device checks: every engine path on a real GPU, against the oracle.

Run them on a machine with an NVIDIA GPU (about 4-6 minutes on an H200)::

    python -m pytest tests/gpu -m gpu -q

Everywhere else they are deselected (``pyproject.toml``: ``addopts = -m 'not gpu'``), so a
plain ``pytest tests`` never counts them. With ``-m gpu`` on a machine without CUDA every one
of them FAILS (nothing passes by not running). They need torch, transformers, numpy, pandas
and pytest only (no plotly, ipywidgets, nvidia-ml-py or papermill); the green-context checks
also need ``cuda.bindings``.

``SPLITLAB_GPU_TEST_MODEL`` picks the model (default ``dummy:llama-3.2-1b``: real Llama
shapes, random weights, no download). Every test stops what it starts; at the end the session
fails if a splitlab MPS daemon is still up or a new ``/dev/shm`` entry is left that no other
process maps.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

MODEL = os.environ.get("SPLITLAB_GPU_TEST_MODEL", "dummy:llama-3.2-1b")


@pytest.hookimpl(tryfirst=True)  # before -m selects: a test of this folder is a gpu test, marked or not
def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _cuda_or_fail():
    if not torch.cuda.is_available():
        pytest.fail("tests/gpu need a CUDA GPU and none is visible here (torch.cuda.is_available() is False): "
                    "run them on a GPU machine; on this one, run the CPU suite (pytest tests)")


def _splitlab_mps() -> list[int]:
    from splitlab.system.mps import find_mps_processes

    return sorted(p.pid for p in find_mps_processes() if p.pipe_dir and "splitlab-mps-" in p.pipe_dir)


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_behind():
    from tqdm.auto import tqdm

    tqdm(disable=True).close()  # tqdm's one multiprocessing lock per process: not a leftover
    shm_before, mps_before = _shm(), set(_splitlab_mps())
    yield
    from splitlab.system.procs import shm_mapped_elsewhere

    deadline = time.monotonic() + 10.0
    while True:
        mps = sorted(set(_splitlab_mps()) - mps_before)
        shm = sorted(_shm() - shm_before - shm_mapped_elsewhere())
        if not (mps or shm) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not mps, f"splitlab MPS daemon processes left running: {mps}"
    assert not shm, f"/dev/shm entries left behind: {shm}"


@pytest.fixture(scope="session")
def model_spec() -> str:
    return MODEL


@pytest.fixture(scope="session")
def fp32_model():
    from splitlab.models import load_model

    if not torch.cuda.is_available():
        pytest.fail("no CUDA GPU")
    return load_model(MODEL, device="cuda", dtype="float32")


@pytest.fixture(scope="session")
def bf16_model():
    from splitlab.models import load_model

    if not torch.cuda.is_available():
        pytest.fail("no CUDA GPU")
    return load_model(MODEL, device="cuda", dtype="bfloat16")
