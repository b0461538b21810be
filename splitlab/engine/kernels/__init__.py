"""The few fused kernels of the model runner, in two interchangeable implementations.

- ``reference.TorchKernels``: plain PyTorch ops, rounding where Huggingface's Llama rounds;
  the CPU path and the reference.
- ``triton_ops.TritonKernels``: the same operations as single Triton kernels
  (``triton_jit``) for CUDA, so a decode step is a handful of launches per layer:

  - ``add_rmsnorm``: residual add + RMSNorm, one pass; ``embed_rmsnorm``: the embedding
    gather fused into the first layer's RMSNorm.
  - ``rope_kv_write``: RoPE on q and k in place inside the fused qkv projection output, and
    the K/V write of every row into its KV-pool position (inside the CUDA graph, from static
    index tensors).
  - ``silu_mul``: SwiGLU's ``silu(gate) * up`` over the fused gate/up output.
  - ``decode_attention``: one query per sequence against that sequence's valid KV only, read
    in place from the pool through a slot index (no gather, no padding to the longest
    sequence): split-K ("flash-decoding") with an in-kernel split length, so a batch-size
    bucket is one CUDA graph whatever the context lengths; GQA-aware (each KV head is read
    once for its group of query heads).
  - ``decode_attention_rope``: the decode step's ``rope_kv_write`` and ``decode_attention`` in
    one launch (each program rotates its query heads and the new key itself, attends to the
    cached positions and the new key, and one program per KV head stores the new K/V).
  - ``gemv``: a small-M GEMV for decode batches of at most 4 rows (opt-in).

  Split-K attention combines its per-split partials in the same launch by default (each
  (row, KV head) has a counter, and the program that finishes last combines: ``combine=
  "atomic"``); ``EngineConfig.decode_combine="kernel"`` uses a second launch instead. The
  decode CUDA graph of a Llama layer is then 8 launches: RMSNorm, qkv GEMM, fused
  RoPE/KV-write/attention, o GEMM, RMSNorm, gate/up GEMM, SiLU-mul, down GEMM.
- ``variants.DECODE_VARIANTS``: the ways to run decode attention (fused or separate RoPE/KV
  write, in-kernel or second-launch combine, KV block size, split count, K/V load order); all
  exact against the reference; the runner times them on CUDA and keeps the fastest.

Triton is imported lazily, only when a runner asks for Triton kernels. They also run under
Triton's CPU interpreter (``TRITON_INTERPRET=1``, fp32), which is how tests check them on a
machine without a GPU.
"""

from __future__ import annotations

import importlib.util

import torch

from splitlab.errors import ConfigError
from splitlab.engine.kernels.reference import TorchKernels
from splitlab.engine.kernels.triton_ops import TritonKernels
from splitlab.engine.kernels.variants import COMBINE_MODES, DECODE_VARIANTS, DecodeVariant

__all__ = ["COMBINE_MODES", "DECODE_VARIANTS", "DecodeVariant", "TorchKernels", "TritonKernels", "make_kernels",
           "triton_importable"]


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def make_kernels(choice: str, device: torch.device, combine: str = "atomic") -> TorchKernels | TritonKernels:
    """``choice``: "auto" (Triton on CUDA when it imports, else torch), "triton" or "torch";
    ``combine``: the split-K combine of the Triton kernels (``COMBINE_MODES``)."""
    if choice == "torch":
        return TorchKernels()
    if choice == "auto":
        if device.type == "cuda" and triton_importable():
            return TritonKernels(combine=combine)
        return TorchKernels()
    if choice == "triton":
        if not triton_importable():
            raise ConfigError("kernels='triton' needs the triton package (it ships with CUDA builds of torch); "
                              "use kernels='torch'")
        return TritonKernels(combine=combine)
    raise ConfigError(f"kernels must be 'auto', 'triton' or 'torch', got {choice!r}")
