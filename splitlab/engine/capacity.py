"""How much KV fits: positions, pages and concurrent sequences for a model on a GPU.

A KV pool sized from free memory (``EngineConfig.num_slots`` / ``num_pages`` None and no
``kv_budget_bytes``) takes ``kv_memory_fraction`` of the free device memory measured after
the weights are loaded, LESS a reserve for what the engine allocates after the pool: the
activations of its largest prefill step and the decode CUDA-graph pools. ``kv_capacity``
does that arithmetic on numbers (so a CPU can answer "what fits on a 24 GiB card?"), and
``KVPool.for_model`` / ``PagedKVPool.for_model`` apply the same reserve when they measure.

``decode_batch_limit`` is the largest decode batch of a built pool: ``EngineConfig.max_batch``
when given, else derived from the pool (the policy is in its docstring).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from splitlab.config import EngineConfig
from splitlab.errors import ConfigError
from splitlab.engine.graphs import graph_buckets

# max_batch=None: the derived decode batch never exceeds this (the largest graph bucket it captures)
MAX_DERIVED_BATCH = 256
# max_batch=None: sequences are counted at min(max_seq_len, this) positions each
DERIVE_CONTEXT = 2048
LOGITS_BYTES = 4  # fp32: the sampling path upcasts its logits rows
# what a captured decode graph may keep beside its activations: 32 MiB per graph was
# measured on an H200 (a slot-pool capture), the size of cuBLAS's default Hopper workspace
GRAPH_WORKSPACE_BYTES = 32 * 2**20


@dataclasses.dataclass(frozen=True)
class Reserve:
    """Device bytes a pool sized from free memory leaves for the engine's other buffers.

    Estimates, checked once against an H200 (Llama-3.1-8B shapes, bf16: a prefill of 8192
    tokens peaked at 1.31 GB, this formula's activations; the 19 decode graphs up to 256
    rows took 0.71 GB with a slot pool and 0.13 GB with a paged one, this formula 0.74 GB).
    ``row_width``: elements per token row that one layer keeps alive at its peak; ``e``:
    bytes per element of the model's dtype:

    - ``row_width = 4 * hidden + 2 * (q + 2 * kv) + 2 * q + 3 * intermediate`` with
      ``q = heads * head_dim``, ``kv = kv_heads * head_dim``: the residual stream, the normed
      input, the attention projection and the MLP output; the fused QKV projection and its
      padded copy for prompt attention; the attention output twice; the fused gate/up output
      and the SiLU-mul result (each lives until the next layer replaces it).
    - ``activation_bytes = prefill_tokens * e * row_width``, ``prefill_tokens =
      max(token_budget, chunk_size)`` (a serial prompt longer than ``token_budget`` runs
      alone and may need more: not reserved).
    - ``logits_bytes = logits_rows * vocab * 4``, ``logits_rows = min(prefill_tokens, B)``
      (every decode row and each prompt that ends in the step gets a row), ``B`` the
      largest decode batch the config allows (``batch_bound``).
    - ``graph_bytes = B * e * (row_width + vocab) + buckets * GRAPH_WORKSPACE_BYTES``: the
      graphs share one memory pool and are captured largest first, so the largest bucket's
      rows through one layer and its logits bound the shared part; each graph may keep a
      cuBLAS workspace of its own (0 without CUDA graphs).

    Not counted: allocator rounding and fragmentation, the eager steps' cuBLAS workspaces,
    SDPA's scratch; the part of free memory outside ``kv_memory_fraction`` is their margin.
    """

    prefill_tokens: int
    logits_rows: int
    graph_buckets: tuple[int, ...]
    row_width: int
    activation_bytes: int
    logits_bytes: int
    graph_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.activation_bytes + self.logits_bytes + self.graph_bytes

    def describe(self) -> str:
        """The reserve in words: what each part is for."""
        graphs = (f"{_gib(self.graph_bytes)} for {len(self.graph_buckets)} decode graph buckets up to "
                  f"{self.graph_buckets[-1]}" if self.graph_buckets else "no decode graphs")
        return (f"{_gib(self.total_bytes)}: {_gib(self.activation_bytes)} for a prefill step of "
                f"{self.prefill_tokens} tokens, {_gib(self.logits_bytes)} for {self.logits_rows} logits rows, "
                f"{graphs} (estimates)")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes, "why": self.describe()}


def reserve_for(facts: Any, config: EngineConfig) -> Reserve:
    """The reserve (see ``Reserve``) of a model with ``facts`` (a ``ModelFacts``) under
    ``config``; decode graphs count unless ``config.cuda_graphs`` is False (None is on, on CUDA)."""
    if not isinstance(config, EngineConfig):
        raise ConfigError(f"reserve_for needs an EngineConfig, got {config!r}")
    shape = _shape(facts)
    graphs = config.cuda_graphs is not False
    batch = batch_bound(config)
    q, kv = shape["num_heads"] * shape["head_dim"], shape["num_kv_heads"] * shape["head_dim"]
    width = 4 * shape["hidden_size"] + 2 * (q + 2 * kv) + 2 * q + 3 * shape["intermediate_size"]
    e, vocab = shape["dtype_bytes"], shape["vocab_size"]
    tokens = max(config.token_budget, config.chunk_size)
    rows = min(tokens, batch)
    buckets = tuple(graph_buckets(batch)) if graphs else ()
    graph_bytes = buckets[-1] * e * (width + vocab) + len(buckets) * GRAPH_WORKSPACE_BYTES if buckets else 0
    return Reserve(tokens, rows, buckets, width, tokens * e * width, rows * vocab * LOGITS_BYTES, graph_bytes)


@dataclasses.dataclass(frozen=True)
class KVCapacity:
    """What fits in a KV pool (all counts: usable ones, the pool's scratch row or page out).

    ``kv_bytes = floor(free_bytes * memory_fraction) - reserve.total_bytes`` (at least 0).
    ``kv_positions``: positions those bytes hold; ``num_slots``: sequences of ``max_seq_len``
    a slot pool holds; ``num_pages``: pages of ``block_size`` (None: no block size given);
    ``max_sequences``: sequences of ``context_len`` positions held at once (a paged pool's
    pages, else the slots); ``max_batch``: the largest decode batch of the pool the engine
    would build (``decode_batch_limit``: ``config.max_batch``, or derived when it is None).
    The engine caps a pool sized from memory at ``max_batch`` (None: ``MAX_DERIVED_BATCH``)
    full-length sequences; the counts here are what fits, not capped.
    """

    bytes_per_position: int
    free_bytes: int
    memory_fraction: float
    reserve: Reserve
    kv_bytes: int
    kv_positions: int
    max_seq_len: int
    block_size: int | None
    num_slots: int
    num_pages: int | None
    context_len: int
    max_sequences: int
    max_batch: int

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "reserve": self.reserve.to_dict()}


def kv_capacity(facts: Any, free_bytes: int, config: EngineConfig | None = None,
                context_len: int | None = None) -> KVCapacity:
    """The ``KVCapacity`` of a model with ``facts`` (a ``ModelFacts``: layers, KV heads, head
    dim, dtype bytes, and the widths the reserve needs) when ``free_bytes`` of device memory
    are free with its weights loaded (``measured_free_bytes`` on a GPU), under ``config``
    (default ``EngineConfig()``: its ``max_seq_len``, ``kv_block_size``, ``kv_memory_fraction``
    and the reserve's settings). ``context_len`` (default ``max_seq_len``) is the length the
    concurrent sequences are counted at."""
    config = EngineConfig() if config is None else config
    reserve = reserve_for(facts, config)  # checks config and facts
    shape = _shape(facts)
    seq_len, context = config.max_seq_len, _check_sizes(free_bytes, config.max_seq_len, context_len, shape)
    per_pos = 2 * shape["num_layers"] * shape["num_kv_heads"] * shape["head_dim"] * shape["dtype_bytes"]
    kv_bytes = max(0, int(free_bytes * config.kv_memory_fraction) - reserve.total_bytes)
    slots = max(0, kv_bytes // (per_pos * seq_len) - 1)  # one row of the pool is scratch
    block = config.kv_block_size
    if block is None:
        pages, held, at_policy = None, slots, slots
    else:
        pages = max(0, kv_bytes // (per_pos * block) - 1)  # one page is scratch
        held, at_policy = pages // _cdiv(context, block), pages // _cdiv(min(seq_len, DERIVE_CONTEXT), block)
    batch = _limit(config, at_policy, slots if pages is None else pages)
    return KVCapacity(per_pos, free_bytes, float(config.kv_memory_fraction), reserve, kv_bytes, kv_bytes // per_pos,
                      seq_len, block, slots, pages, context, held, batch)


def decode_batch_limit(kv: Any, config: EngineConfig) -> int:
    """The largest decode batch of pool ``kv`` (a ``KVPool`` or ``PagedKVPool``) under ``config``.

    ``config.max_batch`` given: ``min(max_batch, kv.max_sequences)``. ``max_batch`` None: as
    many sequences as the pool holds at ``min(max_seq_len, DERIVE_CONTEXT)`` positions each
    (a slot pool: its slots), at most ``MAX_DERIVED_BATCH`` and below ``chunk_size`` (the rule
    ``EngineConfig`` keeps for a given ``max_batch``), at least 1."""
    if kv.paged:
        at_policy = kv.num_pages // _cdiv(min(kv.max_seq_len, DERIVE_CONTEXT), kv.block_size)
    else:
        at_policy = kv.num_slots
    return _limit(config, at_policy, kv.max_sequences)


def batch_bound(config: EngineConfig) -> int:
    """The largest decode batch ``config`` allows before any pool exists: ``max_batch``, or
    (None) the most the derivation may give, ``min(MAX_DERIVED_BATCH, chunk_size - 1)``."""
    return config.max_batch if config.max_batch is not None else _batch_policy(MAX_DERIVED_BATCH, config.chunk_size)


def measured_free_bytes(device: Any) -> int | None:
    """Free memory of a CUDA ``device`` now (``torch.cuda.mem_get_info``); None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def _batch_policy(sequences: int, chunk_size: int) -> int:
    return max(1, min(MAX_DERIVED_BATCH, chunk_size - 1, sequences))


def _limit(config: EngineConfig, at_policy: int, held: int) -> int:
    """The decode batch: a given ``max_batch`` as far as the ``held`` rows (slots or pages)
    allow, else the policy on the sequences held at the policy's length."""
    if config.max_batch is not None:
        return min(config.max_batch, held)
    return _batch_policy(at_policy, config.chunk_size)


def _check_sizes(free_bytes: Any, seq_len: int, context_len: Any, shape: dict[str, int]) -> int:
    """Refuse bad free bytes, a length beyond the model, a bad context; the context length."""
    if isinstance(free_bytes, bool) or not isinstance(free_bytes, int) or free_bytes <= 0:
        raise ConfigError(f"free_bytes must be a positive integer number of bytes, got {free_bytes!r}")
    if seq_len > shape["max_positions"]:
        raise ConfigError(f"max_seq_len {seq_len} is beyond the model's context of {shape['max_positions']} "
                          "positions; lower max_seq_len")
    context = seq_len if context_len is None else context_len
    if isinstance(context, bool) or not isinstance(context, int) or not 0 < context <= seq_len:
        raise ConfigError(f"context_len must be a positive integer up to max_seq_len ({seq_len}), got {context!r}")
    return context


_SHAPE_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "dtype_bytes", "num_heads", "hidden_size",
                 "intermediate_size", "vocab_size", "max_positions")


def _shape(facts: Any) -> dict[str, int]:
    """The shape fields of ``facts``, each a positive integer, or a ConfigError naming the bad one."""
    out = {}
    for name in _SHAPE_FIELDS:
        value = getattr(facts, name, None)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"model facts need a positive integer {name}, got {value!r}; pass a ModelFacts "
                              "(splitlab.load_model(spec, device='meta').facts gives one without weights)")
        out[name] = value
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
