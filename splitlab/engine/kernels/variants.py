"""The ways to run the decode step's attention, and how split-K partials are combined.

Every variant is exact against the torch reference (tests/test_kernels.py); they differ in
launches and memory traffic only, so on CUDA the runner times them and keeps the fastest
(``splitlab.engine.tuning``).
"""

from __future__ import annotations

import dataclasses

from splitlab.config import DECODE_COMBINE_MODES, DECODE_VARIANT_NAMES


@dataclasses.dataclass(frozen=True)
class DecodeVariant:
    """One way to run the decode step's attention.

    ``rope_fused``: RoPE + the new K/V write inside the attention kernel (``decode_attention_rope``)
    instead of a separate ``rope_kv_write`` launch; ``combine``: split-K partials combined by the
    last program ("atomic", no extra launch) or by a second launch ("kernel"); ``block_n``: KV
    positions per loop iteration (0: 32 for small batches, 64 otherwise; see
    ``TritonKernels.block_n``); ``split_target``: programs with work per SM the split count aims
    for; ``early_v``: V loaded together with K (else after the scores).
    """

    name: str
    rope_fused: bool
    combine: str
    block_n: int
    split_target: float
    early_v: bool


# The candidates the runner times on CUDA (the first is the default where nothing is timed).
# "fused": one kernel per layer, in-kernel combine, 32-key blocks for small batches;
# "split": a separate rope_kv_write, 64-key blocks, V after the scores, a combine launch.
DECODE_VARIANTS: dict[str, DecodeVariant] = {v.name: v for v in (
    DecodeVariant("fused", True, "atomic", 0, 2.0, True),
    DecodeVariant("split", False, "kernel", 64, 2.0, False),
    DecodeVariant("fused-kernel", True, "kernel", 0, 2.0, True),
    DecodeVariant("fused-b64", True, "atomic", 64, 2.0, False),
    DecodeVariant("split-atomic", False, "atomic", 0, 2.0, True),
    DecodeVariant("split-b32", False, "kernel", 32, 2.0, False),
    DecodeVariant("fused-b64-s1", True, "atomic", 64, 1.0, False),
)}

# How split-K partials are combined: "atomic" = the last program of each (row, KV head)
# combines them (a per-(row, KV head) counter; one launch per attention), "kernel" = a second
# kernel launch. ``EngineConfig.decode_combine`` picks one; "kernel" overrides every variant.
COMBINE_MODES = DECODE_COMBINE_MODES

# config.py names the variants without importing torch; the two lists must agree
if tuple(DECODE_VARIANTS) != DECODE_VARIANT_NAMES:
    raise ImportError("splitlab.config.DECODE_VARIANT_NAMES is out of date with DECODE_VARIANTS")
