"""The inputs of one forward and their host-side plan.

``PrefillChunk`` / ``DecodeBatch`` are what callers hand the runner. ``plan_forward`` turns
them into the flat rows of ONE forward (decode rows first, then chunk rows), every index list
the forward needs in ONE host-to-device copy, and the attention ``Plan``: decode rows for the
batched decode kernel, whole prompts (``start_pos == 0``) for ONE batched causal SDPA call
(``Fresh``), and every other chunk alone against its sequence's KV.

A sequence's KV is addressed through its block table: in a slot pool the table is ``[slot]``
(one page of ``seq_len`` positions), in a paged pool the page ids the caller passes as
``blocks``. Position ``p`` is written at flat row ``table[p // page] * page + p % page``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import torch

from splitlab.errors import ConfigError
from splitlab.engine.kernels import DecodeVariant


@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens ``token_ids`` of the sequence in ``slot``, at positions ``start_pos ...``.

    ``last``: this chunk ends the prompt, so the runner returns the first output token for it.
    ``blocks``: a paged pool's block table of the sequence (its page ids, covering at least
    positions ``0 .. start_pos + len(token_ids) - 1``); ``slot`` is then not read (None). A
    plain tuple ``(slot, token_ids, start_pos)`` (with ``last`` and ``blocks`` as optional
    fourth and fifth items) is accepted wherever a chunk is.
    """

    slot: int | None
    token_ids: Sequence[int]
    start_pos: int = 0
    last: bool = True
    blocks: Sequence[int] | None = None


class DecodeBatch(NamedTuple):
    """One decode token per sequence. ``blocks``: a paged pool's block tables, one per row
    (each covering its row's position); None for a slot pool."""

    slots: Sequence[int | None]
    tokens: Sequence[int]
    positions: Sequence[int]
    blocks: Sequence[Sequence[int]] | None = None


def as_chunk(c) -> PrefillChunk:
    if isinstance(c, PrefillChunk):
        return c
    if isinstance(c, (tuple, list)) and len(c) in (3, 4, 5):
        blocks = tuple(int(b) for b in c[4]) if len(c) == 5 and c[4] is not None else None
        return PrefillChunk(None if c[0] is None else int(c[0]), list(c[1]), int(c[2]),
                            bool(c[3]) if len(c) >= 4 else True, blocks)
    raise ConfigError(f"a prefill chunk is a PrefillChunk or (slot, token_ids, start_pos[, last[, blocks]]); "
                      f"got {c!r}")


@dataclasses.dataclass(frozen=True)
class Fresh:
    """The whole prompts (``start_pos == 0``) of one forward, attended in ONE batched causal
    SDPA call: ``count`` prompts right-padded to ``length`` rows each (right padding is exact
    for the real rows under a causal mask; the pad rows' outputs are dropped).

    ``row``: the first row of the first prompt; the prompts' rows are contiguous from it
    (``rows`` in all) unless ``dst`` is given. ``gather``: the qkv row of each of the
    ``count * length`` padded rows (None: the prompts are already ``count`` adjacent runs of
    ``length`` rows, so views of the qkv rows serve, no copy); ``select``: the padded row of
    each real row, in order; ``dst``: each real row's row in the forward (None: contiguous).
    """

    row: int
    rows: int
    count: int
    length: int
    gather: torch.Tensor | None = None
    select: torch.Tensor | None = None
    dst: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """Attention metadata of one forward (rows: decode rows first, then chunk rows).

    A sequence's KV is named by its *where*: the slot (an int) in a slot pool, a device tensor
    of its page ids in a paged pool (``KVPool.sequence`` / ``PagedKVPool.sequence`` read it).
    """

    num_decode: int  # rows handled by the batched decode-attention kernel
    dec_slots: torch.Tensor | None  # [B] slots, or [B, blocks] block tables of a paged pool
    dec_lens: torch.Tensor | None
    dec_max_len: int | None  # None inside a CUDA graph (the kernel reads lengths itself)
    chunks: tuple[tuple[int, int, Any, int], ...] = ()  # (first row, rows, where, start_pos)
    # whole prompts: one batched SDPA call (None: no chunk starts at position 0)
    fresh: Fresh | None = None
    # every other chunk (start_pos > 0, or a reference-path decode row): one SDPA call each
    # against its sequence's KV, as (first row, rows, where, start_pos)
    rest: tuple[tuple[int, int, Any, int], ...] = ()
    variant: DecodeVariant | None = None  # the decode rows' attention variant

    @property
    def decode_only(self) -> bool:
        return not self.chunks and self.num_decode > 0


class Forward(NamedTuple):
    """One planned forward: its rows' inputs on the device, and its attention plan."""

    tokens: torch.Tensor
    positions: torch.Tensor
    write_index: torch.Tensor  # each row's row in the flat KV pool (table[pos // page] * page + pos % page)
    logit_rows: torch.Tensor  # the rows whose next token is wanted: decode rows, last chunk rows
    plan: Plan


def plan_forward(decode: DecodeBatch | None, chunks: list[PrefillChunk], *, seq_len: int, batched_decode: bool,
                 prefill_pad: int, device: torch.device,
                 variant_for: Callable[[int], DecodeVariant], block_size: int | None = None) -> Forward:
    """Plan decode rows and prompt chunks as one forward over a pool of ``seq_len`` positions
    per slot, or (``block_size``) of pages of that many positions, every sequence then naming
    its pages in ``blocks``. ``batched_decode``: the kernels have a batched decode attention
    (else each decode row attends alone, the exact reference path); ``prefill_pad``: whole
    prompts are padded to a multiple of this many rows (see ``ModelRunner.PREFILL_PAD_CUDA``)."""
    page = block_size or seq_len
    tokens: list[int] = []
    positions: list[int] = []
    windex: list[int] = []
    logit_rows: list[int] = []
    alone: list[tuple[int, int, Any, int]] = []  # decode rows on the reference path
    tables: list[list[int]] = []  # paged: the pages each `alone` / `later` entry reads
    batched = decode is not None and batched_decode
    dec_tables: list[list[int]] = []
    if decode is not None:
        for i, (slot, tok, pos) in enumerate(zip(decode.slots, decode.tokens, decode.positions)):
            table = list(decode.blocks[i]) if block_size else [int(slot)]
            tokens.append(int(tok))
            positions.append(int(pos))
            windex.extend(write_rows(table, page, int(pos), 1))
            logit_rows.append(i)
            dec_tables.append(table[: int(pos) // page + 1])
            if not batched:
                alone.append((i, 1, _where(table, page, int(pos) + 1, tables, block_size), int(pos)))
    nd = len(decode.slots) if batched else 0
    fresh_chunks: list[tuple[int, int, Any, int]] = []  # whole prompts: one batched causal SDPA call
    later: list[tuple[int, int, Any, int]] = []  # the other chunks: one call each
    for c in chunks:
        row, n = len(tokens), len(c.token_ids)
        table = list(c.blocks) if block_size else [int(c.slot)]
        tokens.extend(c.token_ids)
        positions.extend(range(c.start_pos, c.start_pos + n))
        windex.extend(write_rows(table, page, c.start_pos, n))
        if c.start_pos == 0:
            fresh_chunks.append((row, n, None if block_size else c.slot, 0))
        else:
            later.append((row, n, _where(table, page, c.start_pos + n, tables, block_size), c.start_pos))
        if c.last:
            logit_rows.append(row + n - 1)
    # every index the forward needs, in ONE host-to-device copy (pinned on CUDA)
    parts = [tokens, positions, windex, logit_rows]
    width = max(map(len, dec_tables[:nd]), default=0)
    if batched:
        dec_where = [t + t[-1:] * (width - len(t)) for t in dec_tables] if block_size else dec_tables
        parts += [[x for t in dec_where for x in t], [p + 1 for p in positions[:nd]]]
    layout = _fresh_layout(fresh_chunks, prefill_pad) if fresh_chunks else None
    fresh_names = [name for name, idx in (layout[4].items() if layout else ()) if idx]
    parts += [layout[4][name] for name in fresh_names] + tables
    views = index_tensors(device, parts)
    tok_t, pos_t, widx_t, rows = views[:4]
    dec_slots, dec_lens = views[4:6] if batched else (None, None)
    if batched and block_size:
        dec_slots = dec_slots.view(nd, width)
    first = 6 if batched else 4
    fresh = None
    if layout is not None:
        fresh = Fresh(*layout[:4], **dict(zip(fresh_names, views[first:first + len(fresh_names)])))
    if block_size:  # each table placeholder -> its view of the index copy
        table_views = views[first + len(fresh_names):]
        alone = [(r, n, table_views[w], p) for r, n, w, p in alone]
        later = [(r, n, table_views[w], p) for r, n, w, p in later]
    chunk_rows = sorted(fresh_chunks + later, key=lambda e: e[0])
    plan = Plan(nd, dec_slots, dec_lens, max(positions[:nd]) + 1 if nd else None, tuple(alone + chunk_rows), fresh,
                tuple(alone + later), variant=variant_for(nd) if nd else None)
    return Forward(tok_t, pos_t, widx_t, rows, plan)


def _where(table: list[int], page: int, length: int, tables: list[list[int]], block_size: int | None):
    """A sequence's KV name for ``Plan.rest``: its slot, or (paged) a placeholder index of
    the page list covering ``length`` positions, appended to ``tables``."""
    if not block_size:
        return table[0]
    tables.append(table[: -(-length // page)])
    return len(tables) - 1


def write_rows(table: Sequence[int], page: int, start: int, n: int) -> list[int]:
    """The flat KV rows of positions ``start .. start + n - 1`` of a sequence whose block
    table is ``table`` (pages of ``page`` positions): one ``range`` per page touched."""
    out: list[int] = []
    pos, end = start, start + n
    while pos < end:
        blk, off = divmod(pos, page)
        take = min(page - off, end - pos)
        base = int(table[blk]) * page + off
        out.extend(range(base, base + take))
        pos += take
    return out


def _fresh_layout(fresh_chunks: list[tuple[int, int, int, int]], pad: int
                  ) -> tuple[int, int, int, int, dict[str, list[int]]]:
    """``(row, rows, count, length, {"gather", "select", "dst": index list})`` of the ``Fresh``
    of these whole-prompt chunks (empty lists: not needed; see ``Fresh``)."""
    lengths = [n for _, n, _, _ in fresh_chunks]
    real = len(fresh_chunks)
    length = -(-max(lengths) // pad) * pad
    count = count_bucket(real) if pad > 1 else real
    row0 = fresh_chunks[0][0]
    contiguous = all(fresh_chunks[i + 1][0] == r + n for i, (r, n, _, _) in enumerate(fresh_chunks[:-1]))
    dims = (row0, sum(lengths), count, length)
    if contiguous and count == real and all(n == length for n in lengths):
        return (*dims, {})  # count adjacent runs of `length` rows: views of the qkv rows
    gather: list[int] = []
    select: list[int] = []
    for i, (r, n, _, _) in enumerate(fresh_chunks):
        gather.extend(range(r, r + n))
        gather.extend([r + n - 1] * (length - n))  # pad rows: any real row (their output is dropped)
        select.extend(range(i * length, i * length + n))
    # pad prompts up to the count bucket: copies of a real row, attended and dropped
    gather.extend([row0] * ((count - real) * length))
    dst = [] if contiguous else [x for r, n, _, _ in fresh_chunks for x in range(r, r + n)]
    return (*dims, {"gather": gather, "select": select, "dst": dst})


def split_outputs(next_tokens: list[int], decode: DecodeBatch | None, chunks: list[PrefillChunk]
                  ) -> tuple[list[int], list[int | None]]:
    """The greedy tokens of ``logit_rows`` -> ``(decode tokens, one per chunk or None)``."""
    nd = len(decode.slots) if decode is not None else 0
    chunk_out: list[int | None] = []
    k = nd
    for c in chunks:
        if c.last:
            chunk_out.append(next_tokens[k])
            k += 1
        else:
            chunk_out.append(None)
    return next_tokens[:nd], chunk_out


def count_bucket(count: int) -> int:
    """The prompt count a whole-prompt attention call is padded to: the next power of two, so
    a plan-per-shape backend meets a handful of shapes, not one per count."""
    return 1 << max(0, count - 1).bit_length()


def index_tensors(device: torch.device, parts: list[list[int]]) -> list[torch.Tensor]:
    """Int lists -> int64 views of ONE tensor on ``device`` (one copy), each view starting on
    a 16-byte boundary: Triton specializes a pointer argument on 16-byte alignment, so an
    index list at an odd int64 offset would compile another kernel variant mid-run."""
    flat: list[int] = []
    offsets = []
    for part in parts:
        offsets.append(len(flat))
        flat.extend(part)
        if len(flat) % 2:
            flat.append(0)
    t = to_device(device, flat)
    return [t[o:o + len(part)] for o, part in zip(offsets, parts)]


def to_device(device: torch.device, values: list[int]) -> torch.Tensor:
    """An int list -> one int64 tensor on ``device`` (one copy, from pinned memory on CUDA)."""
    t = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t
