"""The decode step as CUDA graphs: one graph per batch-size bucket, replayed from static inputs.

A batch is padded up to its bucket (the padded rows write the pool's scratch row, or its
scratch page; a paged pool's block tables are static inputs too, ``max_blocks`` wide). The host
side of a replay is one numpy fill of a pinned staging buffer and ONE host-to-device copy;
attention reads each sequence's valid KV only (Triton kernels read the lengths inside the
graph; the PyTorch fallback gathers a fixed KV length, so its graphs are also keyed by a
context bucket). Graph replays use these decode-only static buffers, so a thread running
eager prefills on the same runner never races them.

``GraphsMixin`` is a part of ``ModelRunner``; it is not used alone.
"""

from __future__ import annotations

import time

from typing import Any, Iterable, Sequence

import numpy as np
import torch

from splitlab.errors import ConfigError
from splitlab.engine.plan import Plan

# CUDA-graph batch buckets; a batch is padded up to the next one
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def bucket_for(batch: int, buckets: Sequence[int]) -> int | None:
    for b in buckets:
        if b >= batch:
            return b
    return None


def graph_buckets(max_batch: int) -> list[int]:
    """The CUDA-graph batch sizes for ``max_batch``: the standard buckets below it, and itself."""
    return [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]


class GraphsMixin:
    """CUDA-graph capture and replay of ``ModelRunner``'s decode step."""

    def _init_graphs(self, cuda_graphs: bool | None) -> None:
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise ConfigError("cuda_graphs=True needs the model on a CUDA device")
        self.cuda_graphs = bool(cuda_graphs)
        self.buckets = graph_buckets(self.max_batch)
        self._graphs: dict[tuple[int, int | None], tuple[Any, torch.Tensor]] = {}
        self._graph_pool = None
        self.graph_capture_s = 0.0  # seconds spent capturing the graphs kept (variant timing aside)
        # The stream decode graphs are captured on (None: PyTorch's capture stream). The green-
        # context split backend sets its decode stream here, so captured kernels belong to it.
        self.capture_stream = None
        if self.cuda_graphs:
            self._init_static_inputs()

    def _init_static_inputs(self) -> None:
        """Decode-only static inputs of the graphs: for batch bucket ``b`` the first ``5 * b``
        int64 of one flat device buffer, read as [5, b] (tokens, positions, write index, slot,
        length), so every bucket's inputs are contiguous; a paged pool adds each row's block
        table right after, [b, max_blocks] (from an even offset: 16-byte aligned for Triton).
        And a pinned host staging copy of the same layout with a numpy view (filled without
        torch ops, copied in one transfer)."""
        self._table_width = self.kv.max_blocks if self.kv.paged else 0
        n = self._static_len(self.buckets[-1])
        self._dec_in = torch.zeros(n, dtype=torch.int64, device=self.device)
        stage = torch.zeros(n, dtype=torch.int64)
        self._dec_stage = stage.pin_memory() if self.device.type == "cuda" else stage
        self._dec_stage_np = self._dec_stage.numpy()

    def _static_head(self, bucket: int) -> int:
        return 5 * bucket + (5 * bucket) % 2 if self._table_width else 5 * bucket

    def _static_len(self, bucket: int) -> int:
        return self._static_head(bucket) + bucket * self._table_width

    def _static_inputs(self, bucket: int) -> torch.Tensor:
        return self._dec_in[: 5 * bucket].view(5, bucket)

    def _static_where(self, bucket: int) -> torch.Tensor:
        """What the graph's attention reads each row's KV through: the slot row of the static
        inputs, or (paged) the [bucket, max_blocks] block tables."""
        if not self._table_width:
            return self._static_inputs(bucket)[3]
        head = self._static_head(bucket)
        return self._dec_in[head: head + bucket * self._table_width].view(bucket, self._table_width)

    def _pad_row(self) -> list[int]:
        """The static inputs of a padded row: token 0 at position 0 of the scratch row (slot
        pool) or the scratch page (paged pool; its table is the scratch page throughout)."""
        if self.kv.paged:
            return [0, 0, self.kv.pad_page * self.kv.block_size, 0, 1]
        return [0, 0, self.kv.pad_slot * self.kv.max_seq_len, self.kv.pad_slot, 1]

    def _replay_decode(self, bucket: int, slots: Sequence[int | None], tokens: Sequence[int],
                       positions: Sequence[int], blocks: Sequence[Sequence[int]] | None = None) -> list[int]:
        """One decode step through the graph of ``bucket`` (captured on first use)."""
        b = len(slots)
        key = (bucket, self._ctx_bucket(max(positions) + 1))
        graph, out = self._graphs.get(key) or self._capture(*key)
        n = self._static_len(bucket)
        flat = self._dec_stage_np[:n]
        st = flat[: 5 * bucket].reshape(5, bucket)
        st[0, :b] = tokens
        st[1, :b] = positions
        if self.kv.paged:
            self._stage_tables(bucket, flat, slots, positions, blocks)
        else:
            t = self.kv.max_seq_len
            st[3, :b] = slots
            pos, slot = st[1, :b], st[3, :b]
            if pos.min() < 0 or pos.max() >= t or slot.min() < 0 or slot.max() >= self.kv.num_slots:
                self._check_rows(slots, positions, [1] * b)  # raises with the offending row
            np.multiply(slot, t, out=st[2, :b])
            st[2, :b] += st[1, :b]
        np.add(st[1, :b], 1, out=st[4, :b])
        if bucket > b:
            st[:, b:] = np.array(self._pad_row(), dtype=np.int64)[:, None]
        self._dec_in[:n].copy_(self._dec_stage[:n], non_blocking=True)
        graph.replay()
        return out[:b].tolist()

    def _stage_tables(self, bucket: int, flat: np.ndarray, slots, positions, blocks) -> None:
        """Paged pool: each row's block table (the pages its position needs; the rest of the
        row is the scratch page, never read) and write index into the staging buffer."""
        kv = self.kv
        b, page, width = len(positions), kv.block_size, self._table_width
        head = self._static_head(bucket)
        tab = flat[head: head + bucket * width].reshape(bucket, width)
        tab.fill(kv.pad_page)
        st = flat[: 5 * bucket].reshape(5, bucket)
        pos = st[1, :b]
        if blocks is None or len(blocks) != b or pos.min() < 0 or pos.max() >= kv.max_seq_len:
            self._check_rows(slots, positions, [1] * b, blocks)  # raises with the offending row
        need = pos // page + 1
        for i, table in enumerate(blocks):
            if len(table) < need[i]:
                self._check_rows(slots, positions, [1] * b, blocks)
            tab[i, : need[i]] = table[: need[i]]
        real = tab[:b]
        if real.min() < 0 or (real[np.arange(width)[None, :] < need[:, None]] >= kv.num_pages).any():
            self._check_rows(slots, positions, [1] * b, blocks)
        st[2, :b] = real[np.arange(b), pos // page] * page + pos % page
        st[3, :b] = 0

    def _timing_inputs(self, bucket: int, ctx: int) -> None:
        """Static inputs of ``bucket`` rows at ``ctx`` tokens each, for timing a graph's replay:
        rows on slots ``0..`` (wrapping), or (paged) on consecutive pages (wrapping)."""
        d = self._static_inputs(bucket)
        d[0].zero_()
        d[1].fill_(ctx - 1)
        d[4].fill_(ctx)
        rows = torch.arange(bucket, device=self.device, dtype=torch.int64)
        if not self.kv.paged:
            slots = rows % self.kv.num_slots
            d[2].copy_(slots * self.kv.max_seq_len + ctx - 1)
            d[3].copy_(slots)
            return
        page, width = self.kv.block_size, self._table_width
        tables = (rows[:, None] * width + torch.arange(width, device=self.device)[None, :]) % self.kv.num_pages
        self._static_where(bucket).copy_(tables)
        d[2].copy_(tables[:, (ctx - 1) // page] * page + (ctx - 1) % page)
        d[3].zero_()

    def capture_graphs(self, batch_sizes: Iterable[int] | None = None) -> list[int]:
        """Capture the decode graphs of these batch buckets (default: all), largest first."""
        if not self.cuda_graphs:
            return []
        self.select_decode_variant()
        want = sorted({bucket_for(b, self.buckets) for b in (batch_sizes or self.buckets)} - {None}, reverse=True)
        ctx = self._ctx_bucket(1)
        start, new = time.perf_counter(), [b for b in want if (b, ctx) not in self._graphs]
        for b in new:
            self._capture(b, ctx)
        if new:
            self.graph_capture_s += time.perf_counter() - start  # each capture ends with a device sync
        return want

    @property
    def num_graphs(self) -> int:
        """Decode graphs captured so far."""
        return len(self._graphs)

    def graph_pool_bytes(self) -> int | None:
        """Bytes the allocator holds for the shared decode-graph pool (its segments), or None
        where no pool exists or this PyTorch's memory snapshot does not name segment pools."""
        if self._graph_pool is None:
            return None
        try:  # a fact a run records, never a reason for it to fail (checked on CPU only so far)
            segments = torch.cuda.memory_snapshot()
            pool = tuple(self._graph_pool)
            owned = [seg["total_size"] for seg in segments if "segment_pool_id" in seg
                     and tuple(seg["segment_pool_id"]) == pool]
        except (RuntimeError, TypeError, KeyError):
            return None
        return sum(owned) if owned or all("segment_pool_id" in seg for seg in segments) else None

    def _ctx_bucket(self, length: int) -> int | None:
        """Triton's decode attention reads each sequence's own length inside the graph (None:
        one graph per batch bucket). The PyTorch fallback gathers a fixed KV length, so its
        graphs are also keyed by a power-of-two context bucket (captured on first use)."""
        if self.kernels.name != "torch":
            return None
        return min(self.kv.max_seq_len, max(256, 1 << (int(length) - 1).bit_length()))

    def _capture(self, bucket: int, ctx: int | None = None):
        graph, out = self._capture_graph(bucket, ctx)
        self._graphs[(bucket, ctx)] = (graph, out)
        return graph, out

    def _capture_graph(self, bucket: int, ctx: int | None = None, private_pool: bool = False):
        """Capture one decode graph. ``private_pool``: its own memory pool (a throw-away timing
        candidate), so freeing it never leaves the shared pool without users while its handle
        lives on (capturing into such a pool trips an allocator assert)."""
        self.tune_gemv()
        self._static_inputs(bucket).copy_(torch.tensor(self._pad_row(), dtype=torch.int64,
                                                       device=self.device)[:, None].expand(5, bucket))
        if self.kv.paged:
            self._static_where(bucket).fill_(self.kv.pad_page)
        if self._graph_pool is None and not private_pool:
            self._graph_pool = torch.cuda.graph_pool_handle()
        side = self.capture_stream if self.capture_stream is not None else torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # compile kernels, create cuBLAS workspaces, outside the graph
                self._graph_body(bucket, ctx)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=None if private_pool else self._graph_pool, stream=self.capture_stream,
                              capture_error_mode="thread_local"):
            out = self._graph_body(bucket, ctx)
        torch.cuda.synchronize(self.device)
        return graph, out

    def graph(self, batch: int, context: int = 1):
        """The captured CUDA graph that ``decode_step`` replays for this batch and context
        (None if not captured yet); for timing replays alone."""
        bucket = bucket_for(batch, self.buckets)
        entry = self._graphs.get((bucket, self._ctx_bucket(context)))
        return entry[0] if entry else None

    def _graph_body(self, bucket: int, ctx: int | None = None) -> torch.Tensor:
        d = self._static_inputs(bucket)
        plan = Plan(bucket, self._static_where(bucket), d[4], ctx, variant=self._variant_for(bucket))
        h, residual = self._hidden(d[0], d[1], d[2], plan)
        x, _ = self.kernels.add_rmsnorm(h, residual, self.final_norm, self.eps)
        return self._greedy(self._linear(x, self.lm_head))

    def drop_graphs(self) -> None:
        """Forget every captured decode graph (they are recaptured on use)."""
        self._graphs.clear()
        # the dropped graphs may have been the last users of the shared pool: start a new one
        self._graph_pool = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
