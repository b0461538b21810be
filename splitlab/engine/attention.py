"""The runner's attention: SDPA for prompt chunks, the batched decode kernel for decode rows.

ALL whole-prompt chunks (``start_pos == 0``) of a forward run as ONE batched causal SDPA call
with shared KV heads (``enable_gqa``, no head copies), right-padded to the longest (exact for
the real rows under a causal mask; on CUDA to a multiple of ``PREFILL_PAD_CUDA`` rows, so
cuDNN, PyTorch's choice on Hopper, meets a few shapes instead of building a plan per prompt
length); equal lengths use strided views of the fused qkv rows, ragged ones one row gather.
A chunk that starts at ``start_pos > 0`` runs alone against its sequence's earlier KV
(bottom-right causal; gathered from its pages in a paged pool). Decode rows go to the kernels'
batched decode attention, which reads each sequence's valid KV in place (through its block
table in a paged pool).

``AttentionMixin`` is a part of ``ModelRunner`` (it reads the runner's shapes, ``kv`` and
``kernels``); it is not used alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitlab.config import SDPA_BACKENDS
from splitlab.errors import ConfigError
from splitlab.engine.plan import Fresh, Plan, count_bucket

# SDPA's enable_gqa (torch >= 2.5): query heads share KV heads without copying K/V per head
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
_SDPA_MEMBERS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}


class AttentionMixin:
    """Prompt-chunk and decode attention of ``ModelRunner``."""

    # CUDA: whole prompts are right-padded to a multiple of this many rows before their batched
    # SDPA call when the backend may be cuDNN (``"auto"`` picks it on Hopper with torch >= 2.11),
    # which builds an execution plan per new shape (tens of ms each): ragged prompt lengths then
    # map onto a few shapes, built once (``warm_prefill_attention``), instead of one per prompt.
    PREFILL_PAD_CUDA = 256

    def _init_attention(self, sdpa_backend: str) -> None:
        self._causal_lower_right = None
        if self.device.type == "cuda":  # imported here: the module pulls in dynamo (~2 s)
            from torch.nn.attention.bias import causal_lower_right

            self._causal_lower_right = causal_lower_right
        self.set_sdpa_backend(sdpa_backend)

    def set_sdpa_backend(self, backend: str) -> None:
        """Force the SDPA backend of prompt-chunk attention (see ``EngineConfig.sdpa_backend``)."""
        if backend not in SDPA_BACKENDS:
            raise ConfigError(f"sdpa_backend must be one of {', '.join(SDPA_BACKENDS)}; got {backend!r}")
        self.sdpa_backend = backend
        self._sdpa_ctx = None
        if backend != "auto":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            member = _SDPA_MEMBERS[backend]
            if not hasattr(SDPBackend, member):
                raise ConfigError(f"this torch has no SDPA backend {member}")
            self._sdpa_ctx = lambda: sdpa_kernel([getattr(SDPBackend, member)])
        # cuDNN attention takes no enable_gqa: give it K/V with the query-head count
        self._gqa = _SDPA_GQA and backend != "cudnn"

    def sdpa_effective_backend(self, count: int = 1, length: int = 1024) -> str:
        """The SDPA backend PyTorch picks for a whole-prompt call of this shape under this
        runner's setting (``torch._fused_sdp_choice``), e.g. ``"cudnn"`` for ``"auto"`` on an H200."""
        if self.sdpa_backend != "auto":
            return self.sdpa_backend
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = torch.empty(count, hq, length, d, device=self.device, dtype=self.dtype)
        k = torch.empty(count, hkv, length, d, device=self.device, dtype=self.dtype)
        kw = {"enable_gqa": True} if self._gqa and hq != hkv else {}
        try:
            choice = torch._fused_sdp_choice(q, k, k, is_causal=True, scale=self.scale, **kw)
        except Exception as exc:  # noqa: BLE001  (a private API: report, never fail)
            return f"unknown ({type(exc).__name__})"
        names = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}
        return names.get(int(choice), str(choice))

    def _prefill_pad(self) -> int:
        """Rows whole prompts are padded to a multiple of (see ``PREFILL_PAD_CUDA``); 1 = only
        to the forward's longest prompt."""
        if self.device.type == "cuda" and self.sdpa_backend in ("auto", "cudnn"):
            return self.PREFILL_PAD_CUDA
        return 1

    def warm_prefill_attention(self, token_budget: int | None = None, max_len: int | None = None) -> int:
        """Run the whole-prompt attention once per padded shape a run can meet (every count
        bucket x every multiple of the pad up to ``max_len``, as many prompts as a prefill step
        of ``token_budget`` tokens can hold), so a backend that builds a plan per shape (cuDNN,
        tens of ms each) builds them before the clock starts. CUDA only; returns the shapes."""
        pad = self._prefill_pad()
        if self.device.type != "cuda" or pad == 1:
            return 0
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        top = min(max_len or self.kv.max_seq_len, self.kv.max_seq_len)
        budget = token_budget or top
        shapes = 0
        for length in range(pad, top + 1, pad):
            # as many prompts as a step holds (the shortest padded to it), as many as can be resident
            resident = self.max_batch if self.kv.paged else self.kv.num_slots
            most = min(resident, max(1, budget // (length - pad + 1)))
            for count in sorted({count_bucket(c) for c in range(1, most + 1)}):
                qkv = torch.zeros(count * length, (hq + 2 * hkv) * d, device=self.device, dtype=self.dtype)
                if self._sdpa_ctx is not None:
                    with self._sdpa_ctx():
                        self._fresh_attention(qkv, 0, count, length)
                else:
                    self._fresh_attention(qkv, 0, count, length)
                shapes += 1
        torch.cuda.synchronize(self.device)
        return shapes

    def _attention(self, layer: int, qkv: torch.Tensor, plan: Plan) -> torch.Tensor:
        n = qkv.shape[0]
        hq, d = self.num_heads, self.head_dim
        q_all = qkv[:, : hq * d].view(n, hq, d)
        if plan.num_decode == n and not plan.chunks:
            out = self.kernels.decode_attention(q_all, self.kv.k[layer], self.kv.v[layer], plan.dec_slots,
                                                plan.dec_lens, self.scale,
                                                max_len=plan.dec_max_len if plan.dec_max_len else self.kv.max_seq_len,
                                                variant=plan.variant)
            return out.view(n, hq * d)
        if self._sdpa_ctx is not None:
            with self._sdpa_ctx():
                return self._chunk_attention(layer, qkv, q_all, plan)
        return self._chunk_attention(layer, qkv, q_all, plan)

    def _chunk_attention(self, layer: int, qkv: torch.Tensor, q_all: torch.Tensor, plan: Plan) -> torch.Tensor:
        n = qkv.shape[0]
        hq, d = self.num_heads, self.head_dim
        fresh = plan.fresh
        if fresh is not None and not plan.num_decode and not plan.rest and fresh.row == 0 and fresh.rows == n \
                and fresh.dst is None:
            return self._padded_attention(qkv, fresh).reshape(n, hq * d)  # the forward is whole prompts only
        out = torch.empty((n, hq, d), dtype=qkv.dtype, device=qkv.device)
        if plan.num_decode:
            nd = plan.num_decode
            self.kernels.decode_attention(q_all[:nd], self.kv.k[layer], self.kv.v[layer], plan.dec_slots,
                                          plan.dec_lens, self.scale, max_len=plan.dec_max_len, out=out[:nd],
                                          variant=plan.variant)
        if fresh is not None:
            o = self._padded_attention(qkv, fresh)
            if fresh.dst is None:
                out[fresh.row:fresh.row + fresh.rows] = o
            else:
                out.index_copy_(0, fresh.dst, o)
        for row, rows, where, start in plan.rest:
            out[row:row + rows] = self._slot_attention(layer, q_all[row:row + rows], where, start)
        return out.view(n, hq * d)

    def _slot_attention(self, layer: int, q_rows: torch.Tensor, where, start: int) -> torch.Tensor:
        """``q_rows`` ([rows, H, D], positions ``start ...``) against positions ``0 .. start +
        rows - 1`` of the sequence's KV (just written; ``where``: its slot, or its pages as a
        device tensor, see ``Plan``), causal: [rows, H, D]."""
        rows = q_rows.shape[0]
        group_size = self.num_heads // self.num_kv_heads
        kv_len = start + rows
        k_slot, v_slot = self.kv.sequence(layer, where, kv_len)
        q = q_rows.transpose(0, 1).unsqueeze(0)  # [1, H, rows, D]
        # a later chunk on CUDA goes through CausalBias (bottom-right causal), kept on the
        # query-head-count K/V it was validated with
        bias = start > 0 and rows > 1 and self._causal_lower_right is not None
        if self._gqa and not bias:
            k = k_slot.transpose(0, 1).unsqueeze(0)  # [1, Hkv, kv_len, D], a view
            v = v_slot.transpose(0, 1).unsqueeze(0)
            kw = {"enable_gqa": True} if group_size > 1 else {}
        else:
            k = expand_heads(k_slot, group_size)  # [1, H, kv_len, D]
            v = expand_heads(v_slot, group_size)
            kw = {}
        if rows == 1:
            o = F.scaled_dot_product_attention(q, k, v, scale=self.scale, **kw)
        elif start == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, **kw)
        else:  # a later chunk: row i sees positions 0 .. start + i (bottom-right causal)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self._chunk_mask(rows, kv_len), scale=self.scale,
                                               **kw)
        return o[0].transpose(0, 1)

    def _padded_attention(self, qkv: torch.Tensor, fresh: Fresh) -> torch.Tensor:
        """The real rows of ``fresh``'s prompts after one batched causal SDPA call over them,
        right-padded to ``fresh.length`` rows each: [fresh.rows, H, D], in row order."""
        if fresh.gather is None:  # already adjacent runs of one length: views, no copy
            return self._fresh_attention(qkv, fresh.row, fresh.count, fresh.length)
        padded = qkv.index_select(0, fresh.gather)  # [count * length, (H + 2 Hkv) * D]
        o = self._fresh_attention(padded, 0, fresh.count, fresh.length)
        return o.index_select(0, fresh.select)

    def _fresh_attention(self, qkv: torch.Tensor, row: int, count: int, rows: int) -> torch.Tensor:
        """Causal attention of ``count`` whole prompts of ``rows`` tokens each, packed from
        ``row`` on: one batched SDPA call on strided views of the qkv rows (their K/V are the
        ones just written to the pool). Returns [count * rows, H, D]."""
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        group_size = hq // hkv
        block = qkv[row:row + count * rows]
        q = block[:, : hq * d].view(count, rows, hq, d).transpose(1, 2)  # [count, H, rows, D]
        k = block[:, hq * d:(hq + hkv) * d].view(count, rows, hkv, d).transpose(1, 2)
        v = block[:, (hq + hkv) * d:].view(count, rows, hkv, d).transpose(1, 2)
        kw = {}
        if group_size > 1:
            if self._gqa:
                kw["enable_gqa"] = True
            else:
                k = k[:, :, None].expand(count, hkv, group_size, rows, d).reshape(count, hq, rows, d)
                v = v[:, :, None].expand(count, hkv, group_size, rows, d).reshape(count, hq, rows, d)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, **kw)
        return o.transpose(1, 2).reshape(count * rows, hq, d)  # a view when SDPA returns [B, L, H, D] memory

    def _chunk_mask(self, rows: int, kv_len: int):
        if self._causal_lower_right is not None:  # CUDA: lets SDPA pick flash attention
            return self._causal_lower_right(rows, kv_len)
        start = kv_len - rows
        return (torch.arange(kv_len, device=self.device)[None, :]
                <= torch.arange(start, kv_len, device=self.device)[:, None])


def expand_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """[L, Hkv, D] -> [1, Hkv * group, L, D] (HF's repeat_kv: kv head j serves q heads j*group...)."""
    x = x.transpose(0, 1)
    if group > 1:
        hkv, length, d = x.shape
        x = x[:, None].expand(hkv, group, length, d).reshape(hkv * group, length, d)
    return x.unsqueeze(0)
