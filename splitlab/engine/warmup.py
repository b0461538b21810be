"""The engine's one warm-up: everything that would otherwise happen on the clock, done first.

Kernels compile on first launch, cuBLAS creates its handles and workspaces, cuDNN builds an
attention plan per shape (and keeps them per thread), the allocator grows its pools, and the
decode CUDA graphs are captured. ``warm_up`` does all of it for the paths a runner will run,
on the calling thread and its current CUDA stream, before any request arrives.
"""

from __future__ import annotations

import torch

from splitlab.errors import ConfigError
from splitlab.engine.plan import DecodeBatch, PrefillChunk
from splitlab.engine.runner import ModelRunner


def warm_up(runner: ModelRunner, *, prefill: bool = True, decode: bool = True,
            token_budget: int | None = None) -> list[int]:
    """Warm ``runner``'s prompt path (``prefill``), decode path (``decode``), or both (a
    runner that serves whole requests). Returns the batch buckets whose decode graphs were
    captured (empty without graphs, or with ``decode=False``).

    Both paths: one prompt of up to 128 tokens (16 on CPU) prefilled into slot 0.
    ``prefill``: then two whole prompts in one forward (the batched attention path), and every
    padded whole-prompt attention shape a prefill step of ``token_budget`` tokens can meet
    (``ModelRunner.warm_prefill_attention``; cuDNN builds a plan per shape).
    ``decode``: with ``prefill`` too, a mixed step (a decode row of slot 0 beside a partial
    prompt in slot 1); then the decode-variant timing (CUDA, ``decode_variant="auto"``),
    every Triton decode-attention variant the run may launch, the CUDA graphs of every batch
    bucket, and one decode step of slot 0 through them.

    Writes only slots 0 and 1 (paged pool: the first pages), whose positions every later
    request overwrites before reading.
    """
    if not (prefill or decode):
        raise ConfigError("warm_up: nothing to warm; pass prefill=True, decode=True or both")
    kv = runner.kv
    n = max(1, min(128 if runner.device.type == "cuda" else 16, kv.max_seq_len - 1))
    ids = [1] * n
    first = runner.prefill([_chunk(runner, 0, ids)])[0]
    buckets: list[int] = []
    if prefill:
        half = max(1, n // 2)
        runner.prefill([_chunk(runner, 0, ids[:half]), _chunk(runner, 0, ids[:half])])
        runner.warm_prefill_attention(token_budget)
    if decode:
        if prefill and kv.max_sequences > 1:
            runner.mixed_step(DecodeBatch([0], [first], [n], _tables(runner, [0])),
                              [_chunk(runner, 1, ids[:8], last=False)])
        buckets = _warm_decode(runner, first, n)
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return buckets


def _warm_decode(runner: ModelRunner, token: int, position: int) -> list[int]:
    """The decode path after slot 0 holds ``position`` tokens: variants, graphs, one step."""
    # CUDA + Triton + graphs, decode_variant="auto": time the decode variants, keep the fastest
    runner.select_decode_variant()
    if runner.kernels.name == "triton":
        # every variant of the split-K kernels (fused or not, one split or several, both KV
        # block sizes), whatever batches come later (scratch tensors: the pool is not written)
        runner.kernels.compile_decode_kernels(runner.num_heads, runner.num_kv_heads, runner.head_dim, runner.dtype,
                                              runner.device, batches=(1, runner.max_batch),
                                              variants=tuple(sorted(set(runner.decode_variant.split(":")))),
                                              page_size=runner.kv.block_size if runner.kv.paged else None)
    buckets = runner.capture_graphs()
    runner.decode_step([0], [token], [position], _tables(runner, [0]))
    return buckets


def _tables(runner: ModelRunner, seqs: list[int]) -> list[list[int]] | None:
    """Paged pool: warm-up sequence ``i``'s block table, ``max_blocks`` consecutive pages
    from page ``i * max_blocks`` (wrapping; warm-up writes are garbage that every request
    overwrites before reading, wherever they land). Slot pool: None (sequence ``i`` is slot ``i``)."""
    kv = runner.kv
    if not kv.paged:
        return None
    return [[(i * kv.max_blocks + j) % kv.num_pages for j in range(kv.max_blocks)] for i in seqs]


def _chunk(runner: ModelRunner, seq: int, ids: list[int], last: bool = True) -> PrefillChunk:
    tables = _tables(runner, [seq])
    return PrefillChunk(None, ids, 0, last, tables[0]) if tables else PrefillChunk(seq, ids, 0, last)


def warm_chunk(kv, n: int) -> PrefillChunk:
    """A throw-away prompt of ``n`` tokens at the pool's first rows: slot 0, or pages 0, 1, ...
    (wrapping on a pool with fewer). Only before a run, when every slot and page is free: a
    request writes each position before it reads it."""
    if not kv.paged:
        return PrefillChunk(0, [1] * n, 0)
    return PrefillChunk(None, [1] * n, 0, True, [j % kv.num_pages for j in range(kv.pages_for(n))])


def warm_decode_step(runner) -> None:
    """A throw-away decode step of one row at position 0 of the pool's last slot or page (the
    other end from ``warm_chunk``, which the prefill side may run at the same time)."""
    kv = runner.kv
    last = kv.max_sequences - 1
    if kv.paged:
        runner.decode_step([None], [1], [0], [[last]])
    else:
        runner.decode_step([last], [1], [0])
