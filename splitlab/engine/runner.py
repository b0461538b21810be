"""ModelRunner: a functional Llama-family forward over the KV pool, with explicit batch metadata.

The runner reads a model's weights (``splitlab.engine.weights``: q/k/v and gate/up fused) and
owns the KV layout and the kernel launches:

- ``prefill(chunks)``: prompt chunks of several sequences (ragged lengths) packed into ONE
  token dimension; every projection is one GEMM over all rows; whole prompts share one
  batched causal attention call (``splitlab.engine.attention``).
- ``decode_step(slots, tokens, positions)``: one token for every running sequence; on CUDA a
  replay of the CUDA graph of the batch's bucket (``splitlab.engine.graphs``).
- ``mixed_step(decode, chunks)``: decode rows and prompt chunks in one forward (chunked mode).

The pool is a ``KVPool`` (a sequence is a slot) or a ``PagedKVPool`` (a sequence is its block
table: chunks and decode batches then carry ``blocks``, and ``slot`` is not read).

Each forward's host side is planned once (``splitlab.engine.plan``: rows, the KV write index,
the attention plan) and crosses to the device in ONE copy. Greedy argmax runs on the device,
with the model's EOS ids masked (so every request gets exactly ``max_new_tokens`` tokens, the
same ones HF ``generate(min_new_tokens=n)`` gives); each call syncs once to return Python ints.

Nothing here is module-global: two threads may drive one runner at once (prefill on one CUDA
stream, decode on another): eager calls allocate their own scratch, graph replays use the
decode-only static buffers, and everything is launched on the caller's current stream.

A runner can be rebuilt in another process from ``runner.export()`` (a JSON-able arch dict
and a flat dict of tensors, shareable through CUDA IPC) plus the shared ``KVPool``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from splitlab.config import EngineConfig
from splitlab.errors import ConfigError, ModelSpecError, WorkloadError
from splitlab.engine.attention import AttentionMixin
from splitlab.engine.capacity import decode_batch_limit
from splitlab.engine.graphs import GraphsMixin, bucket_for
from splitlab.engine.kernels import make_kernels
from splitlab.engine.kv import KVPool, PagedKVPool
from splitlab.engine.plan import DecodeBatch, Plan, PrefillChunk, as_chunk, plan_forward, split_outputs
from splitlab.engine.tuning import TuningMixin
from splitlab.engine.weights import layers_of, weight_bytes

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelRunner(AttentionMixin, GraphsMixin, TuningMixin):
    """Functional forward of a Llama-family model over a ``KVPool``.

    Build it with ``ModelRunner.for_config(arch, weights, kv, config, max_batch=None)``:
    ``arch`` from ``extract_arch``, ``weights`` from ``extract_weights`` (or their IPC-shared
    copies), and every setting from ``config``, an ``EngineConfig``: ``cuda_graphs``,
    ``kernels``, ``gemv``, ``sdpa_backend``, ``decode_variant``, ``decode_combine`` (each
    documented there). ``max_batch``: the largest decode batch (default
    ``splitlab.engine.capacity.decode_batch_limit``: ``config.max_batch`` within what the pool
    holds, or derived from the pool when ``config.max_batch`` is None).

    ``decode_variant="auto"``: on CUDA with Triton kernels and graphs, ``select_decode_variant()``
    (run by ``capture_graphs()``) captures each candidate's graph for a small and a large
    representative batch bucket, times replays and keeps the fastest per batch class; elsewhere
    ``"fused"`` (no timing). All variants are exact against the torch reference.
    """

    def __init__(self, arch: dict[str, Any], weights: dict[str, torch.Tensor], kv: KVPool | PagedKVPool,
                 config: EngineConfig, max_batch: int | None = None):
        if not isinstance(config, EngineConfig):
            raise ConfigError(f"a ModelRunner takes its settings from an EngineConfig, got {config!r}")
        self.arch = dict(arch)
        self.kv = kv
        self.num_layers = arch["num_layers"]
        self.num_heads = arch["num_heads"]
        self.num_kv_heads = arch["num_kv_heads"]
        self.head_dim = arch["head_dim"]
        self.eps = arch["rms_norm_eps"]
        self.scale = self.head_dim ** -0.5
        self.dtype = _DTYPES[arch["dtype"]]
        self.device = weights["embed"].device
        self._check_pool()
        self.embed = weights["embed"]
        self.final_norm = weights["final_norm"]
        self.lm_head = weights["lm_head"]
        self.layers = layers_of(weights, self.num_layers)
        self._weights = dict(weights)
        self._kv_flat = [kv.layer_flat(i) for i in range(self.num_layers)]
        self.cos, self.sin = self._rope_tables(weights["inv_freq"])
        eos = arch.get("eos_token_ids") or []
        self._suppress = torch.tensor(eos, dtype=torch.int64, device=self.device) if eos else None
        self.kernels = make_kernels(config.kernels, self.device, combine=config.decode_combine)
        if config.gemv and self.kernels.name != "triton":
            raise ConfigError("gemv=True needs the Triton kernels (kernels='triton' or 'auto' on CUDA)")
        self._gemv = self.kernels if config.gemv else None
        self.max_batch = int(max_batch) if max_batch is not None else decode_batch_limit(kv, config)
        self._init_attention(config.sdpa_backend)
        self._init_graphs(config.cuda_graphs)
        self._init_tuning(config.decode_variant)

    @classmethod
    def for_config(cls, arch: dict[str, Any], weights: dict[str, torch.Tensor], kv: KVPool | PagedKVPool,
                   config: EngineConfig, max_batch: int | None = None) -> "ModelRunner":
        """THE way every mode builds a runner: every runner setting comes from ``config`` (an
        ``EngineConfig``), so no mode can forget one. ``max_batch`` defaults to
        ``decode_batch_limit(kv, config)``."""
        return cls(arch, weights, kv, config, max_batch=max_batch)

    def _check_pool(self) -> None:
        kv, a = self.kv, self.arch
        if (kv.num_layers, kv.num_kv_heads, kv.head_dim) != (self.num_layers, self.num_kv_heads, self.head_dim):
            raise ConfigError(
                f"KV pool shape (layers {kv.num_layers}, kv heads {kv.num_kv_heads}, head dim {kv.head_dim}) "
                f"does not match the model ({self.num_layers}, {self.num_kv_heads}, {self.head_dim})"
            )
        if kv.dtype != self.dtype or kv.device != self.device:
            raise ConfigError(f"KV pool is {kv.dtype} on {kv.device}; the model is {self.dtype} on {self.device}")
        if a.get("sliding_window") and kv.max_seq_len > a["sliding_window"]:
            raise ModelSpecError(
                f"this model uses sliding-window attention ({a['sliding_window']} positions), which the engine "
                f"does not implement; use max_seq_len <= {a['sliding_window']}"
            )

    def _rope_tables(self, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin per position, exactly as HF computes them: fp32 freqs, cat, times the scaling."""
        inv_freq = inv_freq.to(self.device, torch.float32)
        pos = torch.arange(self.kv.max_seq_len, device=self.device, dtype=torch.int64).float()
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scaling = self.arch.get("rope_attention_scaling", 1.0)
        return (emb.cos() * scaling).contiguous(), (emb.sin() * scaling).contiguous()

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(arch, weights)``: enough, with the shared KV pool, to rebuild this runner elsewhere."""
        return dict(self.arch), dict(self._weights)

    @property
    def gemv(self) -> bool:
        """Small decode batches run their linear layers through the Triton GEMV (``EngineConfig.gemv``)."""
        return self._gemv is not None

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's weights (each tensor once; the RoPE frequencies not counted)."""
        return weight_bytes(self._weights)

    # ---- public steps ----------------------------------------------------------------------
    def prefill(self, chunks: Iterable[PrefillChunk | tuple],
                between_layers: Callable[[int], Any] | None = None) -> list[int | None]:
        """Run prompt chunks of several sequences in one forward; write their KV into their
        slots; return the greedy next token of each chunk that ends its prompt (else None).

        ``between_layers(i)``: called before every layer ``i > 0``; a CUDA stream it returns
        becomes the stream the rest of the forward runs on (after the work so far, which the
        new stream waits for). The adaptive split moves a long prefill to a new SM partition
        this way, between layer groups."""
        chunks = [as_chunk(c) for c in chunks]
        if not chunks:
            return []
        self._check_chunks(chunks)
        _, out = self._eager(None, chunks, between_layers=between_layers)
        return out

    def decode_step(self, slots: Sequence[int | None], tokens: Sequence[int], positions: Sequence[int],
                    blocks: Sequence[Sequence[int]] | None = None) -> list[int]:
        """Feed ``tokens[i]`` at ``positions[i]`` to the sequence in ``slots[i]`` (paged pool:
        the sequence of block table ``blocks[i]``); return the next greedy token of each.
        CUDA-graph replay on CUDA (batch padded to its bucket)."""
        b = len(slots)
        if b == 0:
            return []
        if not (len(tokens) == len(positions) == b) or (blocks is not None and len(blocks) != b):
            raise ConfigError("decode_step: slots, tokens, positions (and blocks) must have the same length")
        bucket = bucket_for(b, self.buckets) if self.cuda_graphs else None
        if bucket is None:
            self._check_rows(slots, positions, [1] * b, blocks)
            out, _ = self._eager(DecodeBatch(slots, tokens, positions, blocks), [])
            return out
        return self._replay_decode(bucket, slots, tokens, positions, blocks)

    def mixed_step(self, decode: DecodeBatch | tuple | None, chunks: Iterable[PrefillChunk | tuple]
                   ) -> tuple[list[int], list[int | None]]:
        """Decode rows and prompt chunks in one eager forward: ``(decode tokens, chunk tokens)``."""
        decode, chunks = _step_parts(decode, chunks)
        if decode is None and not chunks:
            return [], []
        if decode is not None:
            if not (len(decode.tokens) == len(decode.positions) == len(decode.slots)):
                raise ConfigError("mixed_step: decode slots, tokens and positions must have the same length")
            self._check_decode(decode)
        self._check_chunks(chunks)
        return self._eager(decode, chunks)

    def forward_logits(self, chunks: Iterable[PrefillChunk | tuple]) -> torch.Tensor:
        """Logits (fp32) of every row of ``chunks`` (writes their KV like ``prefill``); for tests."""
        chunks = [as_chunk(c) for c in chunks]
        self._check_chunks(chunks)
        return self._eager(None, chunks, all_logits=True)

    def decode_logits(self, slots: Sequence[int | None], tokens: Sequence[int], positions: Sequence[int],
                      blocks: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """Logits (fp32, [B, vocab]) of an eager decode step through this runner's decode-attention
        path (the batched kernel for Triton runners); writes KV like ``decode_step``. For checks."""
        self._check_rows(slots, positions, [1] * len(slots), blocks)
        return self._eager(DecodeBatch(slots, tokens, positions, blocks), [], all_logits=True)

    def step_logits(self, decode: DecodeBatch | tuple | None, chunks: Iterable[PrefillChunk | tuple]) -> torch.Tensor:
        """The forward of ``mixed_step`` (eager, never a CUDA graph) returning, instead of greedy
        tokens, the fp32 logits (EOS not masked) of the rows that would get one: every decode
        row, then each chunk that ends its prompt, in order ([rows, vocab]). For sampling."""
        decode, chunks = _step_parts(decode, chunks)
        if decode is None and not chunks:
            return torch.empty(0, self.lm_head.shape[0], device=self.device)
        if decode is not None:
            self._check_decode(decode)
        self._check_chunks(chunks)
        return self._eager(decode, chunks, row_logits=True)

    # ---- the forward -----------------------------------------------------------------------
    def _eager(self, decode: DecodeBatch | None, chunks: list[PrefillChunk], all_logits: bool = False,
               row_logits: bool = False, between_layers: Callable[[int], Any] | None = None):
        fwd = plan_forward(decode, chunks, seq_len=self.kv.max_seq_len, batched_decode=self.kernels.name != "torch",
                           prefill_pad=self._prefill_pad(), device=self.device, variant_for=self._variant_for,
                           block_size=self.kv.block_size if self.kv.paged else None)
        h, residual = self._hidden(fwd.tokens, fwd.positions, fwd.write_index, fwd.plan, between_layers)
        if all_logits:
            x, _ = self.kernels.add_rmsnorm(h, residual, self.final_norm, self.eps)
            return F.linear(x, self.lm_head).float()
        # the final norm and lm_head only on the rows whose next token is wanted
        rows = fwd.logit_rows
        x, _ = self.kernels.add_rmsnorm(h.index_select(0, rows), residual.index_select(0, rows), self.final_norm,
                                        self.eps)
        logits = self._linear(x, self.lm_head)
        if row_logits:  # step_logits: those rows' logits, EOS not masked
            return logits.float()
        return split_outputs(self._greedy(logits).tolist(), decode, chunks)

    def _hidden(self, tokens: torch.Tensor, positions: torch.Tensor, write_index: torch.Tensor,
                plan: Plan, between_layers: Callable[[int], Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, residual)`` after the last layer: the final norm is ``add_rmsnorm(h, residual)``
        (left to the caller, which may need it on a few rows only)."""
        kern = self.kernels
        # decode-only forwards with the batched decode kernel (every CUDA-graph step): RoPE,
        # the KV write and attention in one kernel per layer
        fused = plan.decode_only and plan.num_decode == tokens.shape[0] \
            and (plan.variant is None or plan.variant.rope_fused)
        hq, d = self.num_heads, self.head_dim
        x, residual = kern.embed_rmsnorm(tokens, self.embed, self.layers[0].attn_norm, self.eps)
        h = None
        for i, layer in enumerate(self.layers):
            if h is not None:
                if between_layers is not None:
                    _move_to(between_layers(i))
                x, residual = kern.add_rmsnorm(h, residual, layer.attn_norm, self.eps)
            qkv = self._linear(x, layer.qkv, layer.qkv_bias)
            if fused:
                attn = kern.decode_attention_rope(
                    qkv, plan.dec_slots, plan.dec_lens, self.cos, self.sin, self.kv.k[i], self.kv.v[i], hq,
                    self.num_kv_heads, d, self.scale,
                    max_len=plan.dec_max_len if plan.dec_max_len else self.kv.max_seq_len,
                    variant=plan.variant).view(-1, hq * d)
            else:
                k_flat, v_flat = self._kv_flat[i]
                kern.rope_kv_write(qkv, positions, write_index, self.cos, self.sin, k_flat, v_flat,
                                   hq, self.num_kv_heads, d)
                attn = self._attention(i, qkv, plan)
            h = self._linear(attn, layer.o, layer.o_bias)
            x, residual = kern.add_rmsnorm(h, residual, layer.mlp_norm, self.eps)
            gu = self._linear(x, layer.gate_up, layer.gate_up_bias)
            h = self._linear(kern.silu_mul(gu), layer.down, layer.down_bias)
        return h, residual

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if self._gemv is not None and x.shape[0] <= self._gemv.GEMV_MAX_ROWS:
            return self._gemv.gemv(x, w, b)
        return F.linear(x, w, b)

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """Argmax over the vocabulary with EOS masked (HF ``min_new_tokens`` does the same)."""
        if self._suppress is not None:
            logits.index_fill_(1, self._suppress, float("-inf"))
        return logits.argmax(dim=-1)

    def _check_decode(self, decode: DecodeBatch) -> None:
        self._check_rows(decode.slots, decode.positions, [1] * len(decode.slots), decode.blocks)

    def _check_chunks(self, chunks: list[PrefillChunk]) -> None:
        if chunks:
            self._check_rows([c.slot for c in chunks], [c.start_pos for c in chunks],
                             [len(c.token_ids) for c in chunks], [c.blocks for c in chunks])

    def _check_rows(self, slots, starts, lengths, blocks=None) -> None:
        """Every row names a sequence of this pool (a slot, or a block table covering its
        positions in a paged pool) and fits ``max_seq_len``."""
        t = self.kv.max_seq_len
        paged = self.kv.paged
        for i, (slot, start, n) in enumerate(zip(slots, starts, lengths)):
            table = blocks[i] if blocks is not None else None
            name = f"row {i}" if paged else f"slot {slot}"
            if not paged:
                if table is not None:
                    raise ConfigError("block tables (blocks) were given to a runner over a slot pool; pass slots "
                                      "only, or build the pool paged (EngineConfig.kv_block_size)")
                if slot is None or not 0 <= int(slot) < self.kv.num_slots:
                    raise ConfigError(f"slot {slot} is outside the KV pool's {self.kv.num_slots} slots")
            if n < 1:
                raise ConfigError(f"an empty chunk for {name}; give at least one token")
            if start < 0 or start + n > t:
                raise WorkloadError(
                    f"{name}: positions {start}..{start + n - 1} do not fit a KV slot of {t} positions; "
                    "raise max_seq_len or shorten the request"
                )
            if paged:
                self._check_table(table, start + n, name)

    def _check_table(self, table, positions: int, name: str) -> None:
        kv = self.kv
        if table is None:
            raise ConfigError(f"{name}: a paged KV pool needs each sequence's block table (blocks=[page ids])")
        need = kv.pages_for(positions)
        if len(table) < need:
            raise ConfigError(f"{name}: positions up to {positions - 1} need {need} pages of {kv.block_size} "
                              f"positions, its block table holds {len(table)}")
        bad = [p for p in table[:need] if not 0 <= int(p) < kv.num_pages]
        if bad:
            raise ConfigError(f"{name}: pages {bad} are outside the KV pool's {kv.num_pages} pages")


def _move_to(stream) -> None:
    """Continue the forward on ``stream`` (None: stay). It waits for what the current stream
    queued; no tensor made so far is freed to the old stream's pool before the step's closing
    host sync, so nothing the new stream reads can be reused under it."""
    if stream is None or stream == torch.cuda.current_stream():
        return
    stream.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_stream(stream)


def _step_parts(decode: DecodeBatch | tuple | None, chunks: Iterable[PrefillChunk | tuple]
                ) -> tuple[DecodeBatch | None, list[PrefillChunk]]:
    """A mixed step's decode rows (a ``DecodeBatch``; None when it has none) and its chunks
    (``PrefillChunk`` s), from the tuples or objects a caller passes."""
    chunks = [as_chunk(c) for c in chunks]
    if decode is not None and not isinstance(decode, DecodeBatch):
        decode = DecodeBatch(*decode)
    if decode is not None and len(decode.slots) == 0:
        decode = None
    return decode, chunks
