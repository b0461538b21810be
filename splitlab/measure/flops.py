"""Analytic cost model of one prefill step and one decode step: FLOPs, bytes, intensity.

What is counted, precisely (a model of the *useful* work, not of any one implementation):

FLOPs (a multiply-add counts as 2):
- **matmul**: ``2 * P_layers * tokens`` where ``P_layers`` is the number of weights of every
  linear layer of every decoder block (Q, K, V, O projections and the MLP: 3 matrices for a
  gated MLP (Llama, Qwen2, Mistral: SwiGLU), 2 otherwise (OPT)); ``tokens`` is every token
  the step processes (B * L for a prefill, B for a decode step).
- **lm_head**: ``2 * vocab * hidden * lm_tokens``. A serving engine computes logits only for
  the last position of each prompt (``lm_head="last"``, the default: ``lm_tokens = B``); a
  plain ``model(ids)`` computes them for every position (``lm_head="all"``: ``B * L``).
  A decode step always computes B rows of logits.
- **attention** (QK^T and PV): ``4 * layers * heads * head_dim`` per (query, key) pair.
  A decode step of a sequence with ``C`` tokens already cached attends ``C + 1`` keys
  (its own included). A causal prefill of ``L`` new tokens after ``past`` cached tokens
  attends ``L * past + L * (L + 1) / 2`` pairs (the causal triangle, diagonal included:
  "halved" exactly, not ``L^2 / 2``). Kernels that compute the full square and mask it do
  more work than counted here.
- Not counted: the embedding lookup (a gather, no FLOPs), norms, RoPE, activation
  functions, softmax, residual adds, biases (all O(tokens * hidden), < 1% for these shapes).

Bytes moved to/from device memory:
- **weights read once per step**: every weight of the model, except that an *untied* input
  embedding table is not read in full (the lookup gathers ``tokens`` rows, ignored as
  activation traffic). A tied table is read in full by the lm_head.
- **KV read**: the cache entries of earlier tokens, ``B * C * kv_bytes_per_token`` for a
  decode step at context ``C``, ``B * past * kv_bytes_per_token`` for a prefill after ``past``.
- **KV written**: ``tokens * kv_bytes_per_token`` (every processed token's K and V).
- **Activations are ignored** (hidden states, attention scores, MLP intermediates, logits).
  They matter for a large-batch prefill on a small model, and they make the model a lower
  bound on the bytes really moved.

Arithmetic intensity = FLOPs / bytes; a step is compute-bound when its intensity exceeds
the ridge point ``peak FLOP/s / peak bytes/s`` of the device, memory-bound below it.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping

from splitlab.errors import ConfigError

# Architectures whose MLP is gated (gate, up, down = 3 matrices); others have 2 (up, down).
GATED_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "gemma", "gemma2", "phi3", "olmo", "granite")


@dataclasses.dataclass(frozen=True)
class StepCost:
    """FLOPs and bytes of one forward step (see the module docstring for what is counted)."""

    phase: str  # "prefill" or "decode"
    batch: int
    tokens: int  # tokens processed by the step (B*L for prefill, B for decode)
    matmul_flops: float
    lm_head_flops: float
    attention_flops: float
    weight_bytes: float
    kv_read_bytes: float
    kv_write_bytes: float

    @property
    def flops(self) -> float:
        return self.matmul_flops + self.lm_head_flops + self.attention_flops

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_read_bytes + self.kv_write_bytes

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved."""
        return self.flops / self.bytes if self.bytes else float("inf")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(flops=self.flops, bytes=self.bytes, intensity=self.intensity)
        return out


def layer_matmul_params(facts) -> int:
    """Weights of the linear layers of ONE decoder block (attention projections + MLP)."""
    h, hd = facts.hidden_size, facts.head_dim
    attn = h * facts.num_heads * hd + 2 * h * facts.num_kv_heads * hd + facts.num_heads * hd * h
    mlp_mats = 3 if facts.arch in GATED_ARCHS else 2
    return attn + mlp_mats * h * facts.intermediate_size


def lm_head_params(facts) -> int:
    return facts.vocab_size * facts.hidden_size


def tied_embeddings(facts) -> bool:
    """Whether the input embedding and the lm_head share one matrix, inferred from counts.

    An untied model holds the vocab x hidden matrix twice; what is left over after the
    blocks and ONE such matrix (norms, biases, position tables) is far smaller than it.
    """
    rest = facts.num_params - facts.num_layers * layer_matmul_params(facts) - lm_head_params(facts)
    return rest < 0.5 * lm_head_params(facts)


def weights_read_bytes(facts) -> float:
    """Bytes of weights one step reads: all of them but an untied input embedding table."""
    skip = 0 if tied_embeddings(facts) else lm_head_params(facts) * facts.dtype_bytes
    return float(facts.weight_bytes - skip)


def prefill_cost(facts, batch: int, prompt_len: int, past: int = 0, lm_head: str = "last") -> StepCost:
    """One prefill step: ``batch`` sequences of ``prompt_len`` new tokens after ``past`` cached."""
    _check_positive(batch=batch, prompt_len=prompt_len)
    if past < 0:
        raise ConfigError(f"past must be >= 0, got {past}")
    if lm_head not in ("last", "all"):
        raise ConfigError(f"lm_head must be 'last' or 'all', got {lm_head!r}")
    tokens = batch * prompt_len
    lm_tokens = batch if lm_head == "last" else tokens
    pairs = prompt_len * past + prompt_len * (prompt_len + 1) / 2
    return StepCost(
        phase="prefill",
        batch=batch,
        tokens=tokens,
        matmul_flops=2.0 * facts.num_layers * layer_matmul_params(facts) * tokens,
        lm_head_flops=2.0 * lm_head_params(facts) * lm_tokens,
        attention_flops=4.0 * facts.num_layers * facts.num_heads * facts.head_dim * pairs * batch,
        weight_bytes=weights_read_bytes(facts),
        kv_read_bytes=float(batch * past * facts.kv_bytes_per_token),
        kv_write_bytes=float(tokens * facts.kv_bytes_per_token),
    )


def decode_cost(facts, batch: int, context: int) -> StepCost:
    """One decode step: ``batch`` sequences with ``context`` tokens each already in the cache."""
    _check_positive(batch=batch)
    if context < 0:
        raise ConfigError(f"context must be >= 0, got {context}")
    return StepCost(
        phase="decode",
        batch=batch,
        tokens=batch,
        matmul_flops=2.0 * facts.num_layers * layer_matmul_params(facts) * batch,
        lm_head_flops=2.0 * lm_head_params(facts) * batch,
        attention_flops=4.0 * facts.num_layers * facts.num_heads * facts.head_dim * (context + 1) * batch,
        weight_bytes=weights_read_bytes(facts),
        kv_read_bytes=float(batch * context * facts.kv_bytes_per_token),
        kv_write_bytes=float(batch * facts.kv_bytes_per_token),
    )


def ridge_point(peak_flops_s: float, peak_bytes_s: float) -> float:
    """Intensity (FLOP/byte) where the memory roof meets the compute roof."""
    return peak_flops_s / peak_bytes_s


def attainable_flops_s(intensity: float, peak_flops_s: float, peak_bytes_s: float) -> float:
    """The roofline: min(compute roof, intensity * bandwidth)."""
    return min(peak_flops_s, intensity * peak_bytes_s)


def facts_from_config(config: Mapping[str, Any] | Any, dtype_bytes: int = 2):
    """ModelFacts from config values alone (no weights built): for rooflines of big shapes on CPU.

    ``num_params`` counts the linear layers, the embedding (twice when untied), and the
    RMSNorm weights of a Llama-style block; biases and learned position tables are not
    counted (use ``models.model_facts`` on a built model for exact counts).
    """
    from splitlab.models import ModelFacts

    get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    arch = get("model_type")
    hidden = int(get("hidden_size"))
    heads = int(get("num_attention_heads"))
    kv_heads = int(get("num_key_value_heads") or heads)
    head_dim = int(get("head_dim") or hidden // heads)
    layers = int(get("num_hidden_layers"))
    inter = int(get("intermediate_size") or get("ffn_dim") or 0)
    vocab = int(get("vocab_size"))
    tied = bool(get("tie_word_embeddings", False))
    probe = ModelFacts(arch=arch, num_params=0, weight_bytes=0, num_layers=layers, hidden_size=hidden,
                       intermediate_size=inter, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                       vocab_size=vocab, max_positions=int(get("max_position_embeddings") or 0),
                       dtype_bytes=dtype_bytes, kv_bytes_per_token=2 * layers * kv_heads * head_dim * dtype_bytes)
    norms = (2 * layers + 1) * hidden
    params = layers * layer_matmul_params(probe) + vocab * hidden * (1 if tied else 2) + norms
    return dataclasses.replace(probe, num_params=params, weight_bytes=params * dtype_bytes)


def facts_from_preset(name: str, dtype_bytes: int = 2):
    """ModelFacts of a shipped ``dummy:<name>`` preset, computed from its config values."""
    from splitlab.errors import ModelSpecError
    from splitlab.models import presets

    table = presets()
    key = name.split(":", 1)[1] if name.startswith("dummy:") else name
    if key not in table:
        raise ModelSpecError(f"unknown preset {name!r}; accepted: {sorted(table)}")
    return facts_from_config(table[key], dtype_bytes=dtype_bytes)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
