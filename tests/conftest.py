"""Shared fixtures: the tiny model, the real SmolLM2 model, and the shared data folder.

The shared data (the Azure LLM inference trace) lives OUTSIDE the repository, in
``../shared/data`` relative to the repository root; it is never copied into the tree.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
AZURE_CSV = "azure-llm-2023/AzureLLMInferenceTrace_code.csv"

# Everything runs offline: a test must never wait on a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _triton_interpreter_without_gpu() -> None:
    """On a machine without a CUDA GPU the Triton kernels run in Triton's CPU interpreter
    (tests/test_kernels.py). Triton reads TRITON_INTERPRET once, when it is first imported
    (HF generate imports it through torch._dynamo), so it is set here, before any test
    module is collected."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_triton_interpreter_without_gpu()


@pytest.fixture(scope="session")
def tiny():
    """The random 2-layer Llama with the byte tokenizer, fp32 on CPU (built in milliseconds)."""
    from splitlab.models import load_model

    return load_model("tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, fp32 on CPU (converted once per machine, then cached)."""
    from splitlab.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository; a missing folder is a failure, not a skip."""
    if not SHARED_DATA.is_dir():
        pytest.fail(
            f"shared data folder not found at {SHARED_DATA}: the tests expect the project's shared/ "
            "folder beside the repository (../shared/data relative to the repo root), holding "
            f"{AZURE_CSV}"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def azure_csv(shared_data) -> Path:
    path = shared_data / AZURE_CSV
    if not path.is_file():
        pytest.fail(f"the Azure trace is missing at {path}; see ../shared/data/azure-llm-2023/README.md")
    return path
