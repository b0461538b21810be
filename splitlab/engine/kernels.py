"""The few fused kernels of the model runner, in two interchangeable implementations.

``TorchKernels``: plain PyTorch ops, written to round exactly where Huggingface's Llama rounds
(so fp32 and bf16 outputs follow HF's own numerics); the CPU path and the reference.
``TritonKernels``: the same operations as single Triton kernels for CUDA, so a decode
step is a handful of launches per layer (the decode step is launch- and bandwidth-bound):

- ``add_rmsnorm``: residual add + RMSNorm, one pass.
- ``rope_kv_write``: RoPE on q and k in place inside the fused qkv projection output, and
  the K/V write of every row into its KV-pool position (the write happens inside the CUDA
  graph, from static index tensors).
- ``silu_mul``: SwiGLU's ``silu(gate) * up`` over the fused gate/up output.
- ``decode_attention``: one query per sequence against that sequence's valid KV only,
  read in place from the pool through a slot index (no gather, no padding to the longest
  sequence): split-K ("flash-decoding") with an in-kernel split length, so a batch-size
  bucket is one CUDA graph whatever the context lengths; GQA-aware (each KV head is read
  once for its group of query heads).
- ``decode_attention_rope``: the decode step's ``rope_kv_write`` and ``decode_attention``
  in one launch (each program rotates its query heads and the new key itself, attends to
  the cached positions and the new key, and one program per KV head stores the new K/V):
  one kernel launch fewer per layer on the launch-bound decode path.
- ``embed_rmsnorm``: the embedding gather fused into the first layer's RMSNorm.

Split-K attention combines its per-split partials in the same launch by default: each
(row, KV head) has a counter, and the program that finishes last combines (``combine=
"atomic"``); ``combine="kernel"`` (or ``SPLITLAB_DECODE_COMBINE=kernel``) uses a second
launch instead. The decode CUDA graph of a Llama layer is then 8 launches: RMSNorm, qkv GEMM,
fused RoPE/KV-write/attention, o GEMM, RMSNorm, gate/up GEMM, SiLU-mul, down GEMM.

``DECODE_VARIANTS`` names the ways to run decode attention (fused or separate RoPE/KV write,
in-kernel or second-launch combine, KV block size, split count, K/V load order); all are exact
against the reference, and ``ModelRunner`` times them on CUDA and keeps the fastest.

Triton is imported lazily and only when a CUDA runner asks for it. The kernels also run under
Triton's CPU interpreter (``TRITON_INTERPRET=1``, fp32), which is how tests check them on a
machine without a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class DecodeVariant:
    """One way to run the decode step's attention (all exact against the torch reference; they
    differ in launches and memory traffic only, so the fastest is picked by timing on CUDA).

    ``rope_fused``: RoPE + the new K/V write inside the attention kernel (``decode_attention_rope``)
    instead of a separate ``rope_kv_write`` launch; ``combine``: split-K partials combined by the
    last program ("atomic", no extra launch) or by a second launch ("kernel"); ``block_n``: KV
    positions per loop iteration (0: 32 for small batches, 64 otherwise; see ``block_n``);
    ``split_target``: programs with work per SM the split count aims for; ``early_v``: V loaded
    together with K (else after the scores, the round-1 order).
    """

    name: str
    rope_fused: bool
    combine: str
    block_n: int
    split_target: float
    early_v: bool


# The candidates ModelRunner times on CUDA (the first is the default where nothing is timed).
# "fused" is round 2 (one kernel per layer, in-kernel combine, 32-key blocks for small batches);
# "split" is round 1 (separate rope_kv_write, 64-key blocks, V after the scores, a combine launch).
DECODE_VARIANTS: dict[str, DecodeVariant] = {v.name: v for v in (
    DecodeVariant("fused", True, "atomic", 0, 2.0, True),
    DecodeVariant("split", False, "kernel", 64, 2.0, False),
    DecodeVariant("fused-kernel", True, "kernel", 0, 2.0, True),
    DecodeVariant("fused-b64", True, "atomic", 64, 2.0, False),
    DecodeVariant("split-atomic", False, "atomic", 0, 2.0, True),
    DecodeVariant("split-b32", False, "kernel", 32, 2.0, False),
    DecodeVariant("fused-b64-s1", True, "atomic", 64, 1.0, False),
)}


def _check_names() -> None:
    from splitlab.config import DECODE_VARIANT_NAMES

    assert tuple(DECODE_VARIANTS) == DECODE_VARIANT_NAMES, "config.DECODE_VARIANT_NAMES is out of date"


_check_names()


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


# ---- the PyTorch reference ------------------------------------------------------------------

class TorchKernels:
    """Plain PyTorch implementations (any device); HF's rounding points, op for op."""

    name = "torch"

    @staticmethod
    def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual' = x + residual`` (or ``x`` when None); return ``(rmsnorm(residual'), residual')``."""
        if residual is not None:
            x = x + residual
        h = x.to(torch.float32)
        var = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(var + eps)
        return weight * h.to(x.dtype), x

    @classmethod
    def embed_rmsnorm(cls, tokens: torch.Tensor, embed: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``x = embed[tokens]``; return ``(rmsnorm(x), x)`` (the first layer's input norm)."""
        return cls.add_rmsnorm(F.embedding(tokens, embed), None, weight, eps)

    @staticmethod
    def rope_kv_write(qkv: torch.Tensor, positions: torch.Tensor, write_index: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor,
                      num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        """Rotate q and k of ``qkv`` ([N, (H + 2 Hkv) * D]) in place; write k and v rows to
        ``k_flat``/``v_flat`` ([rows, Hkv, D]) at ``write_index`` ([N])."""
        n = qkv.shape[0]
        q_end = num_heads * head_dim
        k_end = q_end + num_kv_heads * head_dim
        c = cos.index_select(0, positions).to(qkv.dtype)[:, None, :]
        s = sin.index_select(0, positions).to(qkv.dtype)[:, None, :]
        q = qkv[:, :q_end].view(n, num_heads, head_dim)
        k = qkv[:, q_end:k_end].view(n, num_kv_heads, head_dim)
        q.copy_(q * c + _rotate_half(q) * s)
        k.copy_(k * c + _rotate_half(k) * s)
        v = qkv[:, k_end:].view(n, num_kv_heads, head_dim)
        k_flat.index_copy_(0, write_index, k)
        v_flat.index_copy_(0, write_index, v)

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        inter = gate_up.shape[-1] // 2
        return F.silu(gate_up[:, :inter]) * gate_up[:, inter:]

    @staticmethod
    def decode_attention(q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor,
                         slots: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                         max_len: int | None = None, num_splits: int = 1,
                         out: torch.Tensor | None = None, variant: DecodeVariant | None = None) -> torch.Tensor:
        """Batched reference: gather each sequence's KV (padded to ``max_len``), masked softmax.

        ``q``: [B, H, D]; ``k_layer``/``v_layer``: [slots, T, Hkv, D]; returns [B, H, D]
        (copied into ``out`` when given).
        """
        b, h, d = q.shape
        hkv = k_layer.shape[2]
        if max_len is None:
            max_len = int(seq_lens.max())
        k = k_layer[slots, :max_len].transpose(1, 2).float()  # [B, Hkv, L, D]
        v = v_layer[slots, :max_len].transpose(1, 2).float()
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
        scores = torch.einsum("bhd,bhld->bhl", q.float(), k) * scale
        valid = torch.arange(max_len, device=q.device)[None, :] < seq_lens[:, None]
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        p = torch.softmax(scores, dim=-1)
        res = torch.einsum("bhl,bhld->bhd", p, v).to(q.dtype)
        if out is not None:
            out.copy_(res)
            return out
        return res


    @classmethod
    def decode_attention_rope(cls, qkv: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor,
                              cos: torch.Tensor, sin: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor,
                              num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                              max_len: int | None = None, variant: DecodeVariant | None = None) -> torch.Tensor:
        """One decode token per row: RoPE on q and k at position ``seq_lens - 1``, the new K/V
        stored at that position of each row's slot, then attention over ``seq_lens`` positions.

        ``qkv``: [B, (H + 2 Hkv) * D] (rotated in place, as ``rope_kv_write`` does);
        ``k_layer``/``v_layer``: [slots, T, Hkv, D]. Returns [B, H, D]. The reference is the
        two separate operations, composed.
        """
        b = qkv.shape[0]
        t = k_layer.shape[1]
        positions = seq_lens - 1
        n = k_layer.shape[0] * t
        cls.rope_kv_write(qkv, positions, slots * t + positions, cos, sin, k_layer.view(n, num_kv_heads, head_dim),
                          v_layer.view(n, num_kv_heads, head_dim), num_heads, num_kv_heads, head_dim)
        q = qkv[:, : num_heads * head_dim].view(b, num_heads, head_dim)
        return cls.decode_attention(q, k_layer, v_layer, slots, seq_lens, scale, max_len=max_len)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ---- Triton ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _triton_kernels():
    """Define the Triton kernels on first use (so importing splitlab never imports triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def add_rmsnorm_kernel(X, R, W, OUT, ROUT, IDX, stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
                           HAS_RES: tl.constexpr, GATHER: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        dt = OUT.dtype.element_ty
        if GATHER:  # X is the embedding table: this row's input is X[IDX[row]], stored to ROUT
            src = tl.load(IDX + row).to(tl.int64)
            xg = tl.load(X + src * stride_x + cols, mask=mask, other=0.0)
            tl.store(ROUT + row * stride_ro + cols, xg, mask=mask)
            x = xg.to(tl.float32)
        else:
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            xs = (x + r).to(dt)
            tl.store(ROUT + row * stride_ro + cols, xs, mask=mask)
            x = xs.to(tl.float32)
        var = tl.sum(x * x, axis=0) / n_cols
        y = (x * (1.0 / tl.sqrt(var + eps))).to(dt).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + row * stride_o + cols, (w * y).to(dt), mask=mask)

    @triton.jit
    def rope_kv_write_kernel(QKV, POS, WIDX, COS, SIN, KC, VC, stride_row, stride_cos, stride_kc, stride_vc,
                             NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                             HALF_BLOCK: tl.constexpr, BLOCK_HEADS: tl.constexpr):
        # one program: BLOCK_HEADS of the row's q and k heads (a prefill of N rows launches
        # N * cdiv(H + Hkv, BLOCK_HEADS) programs, not N * (H + Hkv) one-warp programs)
        i = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
        hmask = heads < NUM_HEADS + NUM_KV_HEADS
        half = HEAD_DIM // 2
        offs = tl.arange(0, HALF_BLOCK)
        m = offs < half
        mask = hmask[:, None] & m[None, :]
        dt = QKV.dtype.element_ty
        pos = tl.load(POS + i).to(tl.int64)
        c = tl.load(COS + pos * stride_cos + offs, mask=m, other=0.0).to(dt).to(tl.float32)[None, :]
        s = tl.load(SIN + pos * stride_cos + offs, mask=m, other=0.0).to(dt).to(tl.float32)[None, :]
        base = QKV + i * stride_row + heads[:, None] * HEAD_DIM + offs[None, :]
        x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + half, mask=mask, other=0.0).to(tl.float32)
        # HF: q * cos + rotate_half(q) * sin, each product and the sum rounded to the dtype
        o1 = ((x1 * c).to(dt).to(tl.float32) + (-x2 * s).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)).to(dt)
        tl.store(base, o1, mask=mask)
        tl.store(base + half, o2, mask=mask)
        is_k = (heads >= NUM_HEADS) & hmask
        kmask = is_k[:, None] & m[None, :]
        j = tl.where(is_k, heads - NUM_HEADS, 0)  # kv head of each k row (0 for q rows: masked)
        w = tl.load(WIDX + i).to(tl.int64)
        kdst = KC + w * stride_kc + j[:, None] * HEAD_DIM + offs[None, :]
        tl.store(kdst, o1, mask=kmask)
        tl.store(kdst + half, o2, mask=kmask)
        vsrc = QKV + i * stride_row + (NUM_HEADS + NUM_KV_HEADS + j)[:, None] * HEAD_DIM + offs[None, :]
        vdst = VC + w * stride_vc + j[:, None] * HEAD_DIM + offs[None, :]
        tl.store(vdst, tl.load(vsrc, mask=kmask, other=0.0), mask=kmask)
        tl.store(vdst + half, tl.load(vsrc + half, mask=kmask, other=0.0), mask=kmask)

    @triton.jit
    def silu_mul_kernel(GU, OUT, stride_gu, stride_o, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < inter
        dt = OUT.dtype.element_ty
        g = tl.load(GU + row * stride_gu + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(GU + row * stride_gu + inter + cols, mask=m, other=0.0).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        tl.store(OUT + row * stride_o + cols, (a * u).to(dt), mask=m)

    # num_splits varies with the batch: not specialised, so a new value never recompiles mid-run
    @triton.jit(do_not_specialize=["num_splits"])
    def decode_attn_stage1(Q, K, V, SLOTS, LENS, O, MID_O, MID_M, MID_L, COS, SIN, CNT,
                           stride_qb, stride_qh, stride_ks, stride_kt, stride_kh,
                           stride_vs, stride_vt, stride_vh, stride_ob, stride_oh,
                           stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_cos,
                           num_splits, sm_scale,
                           GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
                           IEEE: tl.constexpr, FUSED: tl.constexpr, NUM_HEADS: tl.constexpr,
                           NUM_KV_HEADS: tl.constexpr, COMBINE: tl.constexpr, BLOCK_S: tl.constexpr,
                           EARLY_V: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        slot = tl.load(SLOTS + b).to(tl.int64)
        seq_len = tl.load(LENS + b).to(tl.int32)
        split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        start = sp * split_len
        end = tl.minimum(start + split_len, seq_len)

        offs_h = tl.arange(0, BLOCK_H)
        hmask = offs_h < GROUP
        heads = kvh * GROUP + offs_h
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        qmask = hmask[:, None] & dmask[None, :]
        k_base = K + slot * stride_ks + kvh * stride_kh
        v_base = V + slot * stride_vs + kvh * stride_vh
        if FUSED:
            # Q is the fused qkv output: q heads, then k heads, then v heads, HEAD_DIM apart.
            # RoPE exactly as rope_kv_write rounds it: q * cos + rotate_half(q) * sin.
            dt = K.dtype.element_ty
            pos = seq_len - 1
            half = HEAD_DIM // 2
            rot_d = tl.where(offs_d < half, offs_d + half, offs_d - half)
            sign = tl.where(offs_d < half, -1.0, 1.0)
            c = tl.load(COS + pos.to(tl.int64) * stride_cos + offs_d, mask=dmask, other=0.0).to(dt).to(tl.float32)
            s = tl.load(SIN + pos.to(tl.int64) * stride_cos + offs_d, mask=dmask, other=0.0).to(dt).to(tl.float32)
            row = Q + b * stride_qb
            qx = tl.load(row + heads[:, None] * stride_qh + offs_d[None, :], mask=qmask, other=0.0).to(tl.float32)
            qr = tl.load(row + heads[:, None] * stride_qh + rot_d[None, :], mask=qmask, other=0.0).to(tl.float32)
            q = ((qx * c[None, :]).to(dt).to(tl.float32)
                 + (qr * sign[None, :] * s[None, :]).to(dt).to(tl.float32)).to(dt)
            k_row = row + (NUM_HEADS + kvh) * stride_qh
            kx = tl.load(k_row + offs_d, mask=dmask, other=0.0).to(tl.float32)
            kr = tl.load(k_row + rot_d, mask=dmask, other=0.0).to(tl.float32)
            k_new = ((kx * c).to(dt).to(tl.float32) + (kr * sign * s).to(dt).to(tl.float32)).to(dt)
            v_new = tl.load(row + (NUM_HEADS + NUM_KV_HEADS + kvh) * stride_qh + offs_d, mask=dmask, other=0.0)
            if sp == 0:  # one program per (row, kv head) stores the new position; nobody reads it from the pool
                tl.store(k_base + pos.to(tl.int64) * stride_kt + offs_d, k_new, mask=dmask)
                tl.store(v_base + pos.to(tl.int64) * stride_vt + offs_d, v_new, mask=dmask)
            end_cache = tl.minimum(end, pos)  # cached positions; the new one comes from registers
        else:
            q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=qmask, other=0.0)
            end_cache = end

        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        for n0 in range(start, end_cache, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < end_cache
            kvmask = nmask[:, None] & dmask[None, :]
            # EARLY_V: K and V issued together (one DRAM round trip per block, more registers
            # live); else V is loaded after the scores (the round-1 order)
            k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :], mask=kvmask, other=0.0)
            if EARLY_V:
                v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :], mask=kvmask,
                            other=0.0)
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            qk = tl.where(nmask[None, :], qk * sm_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp(qk - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            if not EARLY_V:
                v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :], mask=kvmask,
                            other=0.0)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        if FUSED:
            if (start <= pos) & (pos < end):  # this split holds the new position
                qk_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * sm_scale
                m_new = tl.maximum(m_i, qk_new)
                p_new = tl.exp(qk_new - m_new)
                alpha = tl.exp(m_i - m_new)
                l_i = l_i * alpha + p_new
                acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
                m_i = m_new

        if SINGLE:
            out = acc / l_i[:, None]
            tl.store(O + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(O.dtype.element_ty), mask=qmask)
        else:
            tl.store(MID_O + b * stride_mb + heads[:, None] * stride_mh + sp * stride_ms + offs_d[None, :],
                     acc, mask=qmask)
            tl.store(MID_M + b * stride_lb + heads * stride_lh + sp, m_i, mask=hmask)
            tl.store(MID_L + b * stride_lb + heads * stride_lh + sp, l_i, mask=hmask)
            if COMBINE:
                # The last program of this (row, KV head) to finish combines every split's
                # partials (no second launch). Its partial stores are ordered before the
                # counter increment by the CTA barrier and the release half of the atomic;
                # the last one's acquire half orders its loads after all of them.
                tl.debug_barrier()
                cnt = CNT + b * NUM_KV_HEADS + kvh
                done = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
                if done == num_splits - 1:
                    offs_s = tl.arange(0, BLOCK_S)
                    smask = offs_s < num_splits
                    hs_mask = hmask[:, None] & smask[None, :]
                    ms = tl.load(MID_M + b * stride_lb + heads[:, None] * stride_lh + offs_s[None, :], mask=hs_mask,
                                 other=float("-inf"), cache_modifier=".cg")
                    ls = tl.load(MID_L + b * stride_lb + heads[:, None] * stride_lh + offs_s[None, :], mask=hs_mask,
                                 other=0.0, cache_modifier=".cg")
                    m_max = tl.where(hmask, tl.max(ms, 1), 0.0)
                    w = tl.where(hs_mask, tl.exp(ms - m_max[:, None]), 0.0)
                    denom = tl.where(hmask, tl.sum(ls * w, 1), 1.0)
                    total = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
                    for s_i in range(0, num_splits):
                        m_s = tl.load(MID_M + b * stride_lb + heads * stride_lh + s_i, mask=hmask,
                                      other=float("-inf"), cache_modifier=".cg")
                        a_s = tl.load(MID_O + b * stride_mb + heads[:, None] * stride_mh + s_i * stride_ms
                                      + offs_d[None, :], mask=qmask, other=0.0, cache_modifier=".cg")
                        total += a_s * tl.where(hmask, tl.exp(m_s - m_max), 0.0)[:, None]
                    tl.store(O + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                             (total / denom[:, None]).to(O.dtype.element_ty), mask=qmask)
                    tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")  # ready for the next launch

    @triton.jit(do_not_specialize=["num_splits"])
    def decode_attn_stage2(MID_O, MID_M, MID_L, O, num_splits,
                           stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        smask = offs_s < num_splits
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        m = tl.load(MID_M + b * stride_lb + h * stride_lh + offs_s, mask=smask, other=float("-inf"))
        l = tl.load(MID_L + b * stride_lb + h * stride_lh + offs_s, mask=smask, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(smask, tl.exp(m - m_max), 0.0)
        denom = tl.sum(l * w, 0)
        acc = tl.load(MID_O + b * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms + offs_d[None, :],
                      mask=smask[:, None] & dmask[None, :], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / denom
        tl.store(O + b * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=dmask)

    # Small-M GEMV: y[m, n] = sum_k x[m, k] * w[n, k] (+ b[n]) for decode batches of <= 4 rows.
    # Each program streams BLOCK_N full rows of W (K contiguous) once; memory-bound by design.
    @triton.jit
    def gemv_kernel(X, W, BIAS, Y, M, N, K, stride_xm, stride_wn, stride_ym,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)
        mmask = offs_m < M
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        w_rows = W + offs_n[:, None].to(tl.int64) * stride_wn
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < K
            w = tl.load(w_rows + offs_k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mmask[:, None] & kmask[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])

    return {
        "triton": triton,
        "gemv": gemv_kernel,
        "add_rmsnorm": add_rmsnorm_kernel,
        "rope_kv_write": rope_kv_write_kernel,
        "silu_mul": silu_mul_kernel,
        "decode_stage1": decode_attn_stage1,
        "decode_stage2": decode_attn_stage2,
    }


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class TritonKernels:
    """The fused operations as Triton kernels (CUDA; or CPU under TRITON_INTERPRET=1)."""

    name = "triton"

    def __init__(self, sm_count: int | None = None, combine: str | None = None):
        self.k = _triton_kernels()
        self.gemv_choice: dict[tuple[int, int, int], tuple[int, int, int, int]] = {}
        if sm_count is None:
            sm_count = (torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
                        if torch.cuda.is_available() else 8)
        self.sm_count = sm_count
        combine = combine or os.environ.get("SPLITLAB_DECODE_COMBINE") or "atomic"
        if combine not in self.COMBINE_MODES:
            raise ValueError(f"combine must be one of {self.COMBINE_MODES}, got {combine!r}")
        self.combine = combine
        # split-K counters, per device: zero between launches (the combining program resets its
        # own); one instance's kernels run one at a time per stream, so one set suffices
        self._counters: dict[str, torch.Tensor] = {}

    def _counter(self, n: int, device: torch.device) -> torch.Tensor:
        key = str(device)
        cnt = self._counters.get(key)
        if cnt is None or cnt.numel() < n:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("decode attention: split-K counters must exist before CUDA-graph capture "
                                   "(run the step once eagerly first, as ModelRunner does)")
            cnt = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
            self._counters[key] = cnt
        return cnt

    def add_rmsnorm(self, x, residual, weight, eps):
        n, cols = x.shape
        out = torch.empty_like(x)
        block = _next_pow2(cols)
        warps = min(16, max(1, block // 256))
        if residual is None:
            self.k["add_rmsnorm"][(n,)](x, x, weight, out, x, x, x.stride(0), 0, out.stride(0), 0, cols, float(eps),
                                        HAS_RES=False, GATHER=False, BLOCK=block, num_warps=warps)
            return out, x
        res = torch.empty_like(x)
        self.k["add_rmsnorm"][(n,)](x, residual, weight, out, res, x, x.stride(0), residual.stride(0), out.stride(0),
                                    res.stride(0), cols, float(eps), HAS_RES=True, GATHER=False, BLOCK=block,
                                    num_warps=warps)
        return out, res

    def embed_rmsnorm(self, tokens, embed, weight, eps):
        """``x = embed[tokens]``; ``(rmsnorm(x), x)`` in one launch (no separate gather)."""
        n = tokens.shape[0]
        cols = embed.shape[1]
        assert embed.stride(1) == 1
        out = torch.empty((n, cols), dtype=embed.dtype, device=embed.device)
        res = torch.empty_like(out)
        block = _next_pow2(cols)
        if n:
            self.k["add_rmsnorm"][(n,)](embed, embed, weight, out, res, tokens, embed.stride(0), 0, out.stride(0),
                                        res.stride(0), cols, float(eps), HAS_RES=False, GATHER=True, BLOCK=block,
                                        num_warps=min(16, max(1, block // 256)))
        return out, res

    ROPE_BLOCK_HEADS = 8

    def rope_kv_write(self, qkv, positions, write_index, cos, sin, k_flat, v_flat, num_heads, num_kv_heads, head_dim):
        n = qkv.shape[0]
        if n == 0:
            return
        assert qkv.stride(1) == 1 and k_flat.stride(2) == 1 and k_flat.stride(1) == head_dim
        bh = self.ROPE_BLOCK_HEADS
        half_block = _next_pow2(head_dim // 2)
        self.k["rope_kv_write"][(n, math.ceil((num_heads + num_kv_heads) / bh))](
            qkv, positions, write_index, cos, sin, k_flat, v_flat, qkv.stride(0), cos.stride(0),
            k_flat.stride(0), v_flat.stride(0), NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
            HEAD_DIM=head_dim, HALF_BLOCK=half_block, BLOCK_HEADS=bh,
            num_warps=max(1, min(4, bh * half_block // 128)))

    def silu_mul(self, gate_up):
        n, two_i = gate_up.shape
        inter = two_i // 2
        out = torch.empty((n, inter), dtype=gate_up.dtype, device=gate_up.device)
        block = 1024
        self.k["silu_mul"][(n, math.ceil(inter / block))](gate_up, out, gate_up.stride(0), out.stride(0), inter,
                                                          BLOCK=block, num_warps=4)
        return out

    GEMV_MAX_ROWS = 4
    # (BLOCK_N, BLOCK_K, num_warps, num_stages) candidates; tune_gemv() times them per shape
    GEMV_CONFIGS = ((16, 256, 4, 3), (32, 128, 4, 3), (8, 512, 4, 3), (16, 512, 8, 4), (64, 128, 8, 3),
                    (4, 1024, 4, 3), (32, 256, 8, 3))

    def gemv(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
             config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """``F.linear(x, w, bias)`` for ``x`` of at most ``GEMV_MAX_ROWS`` rows, with the config
        ``tune_gemv`` picked for this shape (or ``config``, or the first candidate)."""
        m, k = x.shape
        n = w.shape[0]
        assert m <= self.GEMV_MAX_ROWS and x.stride(1) == 1 and w.stride(1) == 1
        block_m = _next_pow2(m)
        bn, bk, warps, stages = config or self.gemv_choice.get((n, k, block_m), self.GEMV_CONFIGS[0])
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        self.k["gemv"][(math.ceil(n / bn),)](x, w, bias if bias is not None else w, y, m, n, k, x.stride(0),
                                             w.stride(0), y.stride(0), HAS_BIAS=bias is not None, BLOCK_M=block_m,
                                             BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        return y

    def tune_gemv(self, weights: list[torch.Tensor], rows=(1, 2, 4), iters: int = 20) -> dict:
        """Time every candidate config on each distinct weight shape (CUDA events) and keep the
        fastest per (N, K, rows bucket); also time F.linear, reported for comparison. Call before
        graph capture. Returns ``{(N, K, rows): {"config", "gemv_us", "cublas_us"}}``."""
        report = {}
        seen = set()
        for w in weights:
            n, k = w.shape
            for m in rows:
                key = (n, k, _next_pow2(m))
                if key in seen:
                    continue
                seen.add(key)
                x = torch.randn(m, k, dtype=w.dtype, device=w.device)
                best, best_t = None, float("inf")
                for cfg in self.GEMV_CONFIGS:
                    t = cuda_time(lambda: self.gemv(x, w, config=cfg), iters)
                    if t < best_t:
                        best, best_t = cfg, t
                self.gemv_choice[key] = best
                report[key] = {"config": best, "gemv_us": best_t * 1e6,
                               "cublas_us": cuda_time(lambda: F.linear(x, w), iters) * 1e6}
        return report

    # Split-K decode attention. A program handles one (sequence, KV head, split); the split
    # length is computed in the kernel from the sequence's own length (rounded up to BLOCK_N),
    # so one launch configuration serves every context length (one CUDA graph per batch).
    MAX_SPLITS = 64  # also stage 2's fixed block: one compiled variant whatever the split count
    SPLIT_TARGET_PER_SM = 2  # aim for this many programs with work per SM
    # How split-K partials are combined: "atomic" = the last program of each (row, KV head)
    # combines them (a per-(row, KV head) counter; one launch per attention), "kernel" = a
    # second kernel launch. SPLITLAB_DECODE_COMBINE overrides the default ("atomic").
    COMBINE_MODES = ("atomic", "kernel")

    def block_n(self, batch: int, num_kv_heads: int) -> int:
        """KV positions per loop iteration: 32 when (sequence, KV head) pairs are fewer than the
        SMs (small batches: more, shorter splits keep every SM loading), else 64."""
        return 32 if batch * num_kv_heads < self.sm_count else 64

    def num_splits(self, batch: int, num_kv_heads: int, max_len: int, block_n: int | None = None,
                   split_target: float | None = None) -> int:
        """Splits of the KV length per (sequence, KV head).

        Enough programs for ``SPLIT_TARGET_PER_SM`` per SM, at most ``MAX_SPLITS``, at most one
        per ``block_n`` positions of ``max_len``. Inside a CUDA graph ``max_len`` is the pool's
        slot length, and the kernel shortens each split to the sequence's real length
        (``cdiv(cdiv(len, splits), BLOCK_N) * BLOCK_N``), so splits beyond it exit at once.
        Llama-3.1-8B (8 KV heads) on 132 SMs at 1k context: batch 1 -> 33 splits of 32 keys
        with work (264 programs, 2 per SM; the previous fixed 64-key blocks gave 17 splits,
        136 programs, one per SM); batch 8 -> 5 splits; 32 -> 2; 64 -> 1 (512 programs).
        """
        block_n = block_n or self.block_n(batch, num_kv_heads)
        target = self.SPLIT_TARGET_PER_SM if split_target is None else split_target
        want = math.ceil(target * self.sm_count / max(1, batch * num_kv_heads))
        by_len = max(1, math.ceil(max_len / block_n))
        return int(max(1, min(want, self.MAX_SPLITS, by_len)))

    def decode_attention(self, q, k_layer, v_layer, slots, seq_lens, scale, max_len=None, num_splits=None,
                         out=None, variant: DecodeVariant | None = None):
        """``q`` [B, H, D] (any row/head strides, last dim contiguous); ``k_layer``/``v_layer``
        [slots, T, Hkv, D]; ``slots``/``seq_lens`` [B] int tensors. Returns [B, H, D] (written
        into ``out`` when given)."""
        b, h, d = q.shape
        return self._decode(q, q.stride(0), q.stride(1), None, None, k_layer, v_layer, slots, seq_lens, scale,
                            max_len, num_splits, out, b, h, d, fused=False, variant=variant)

    def decode_attention_rope(self, qkv, slots, seq_lens, cos, sin, k_layer, v_layer, num_heads, num_kv_heads,
                              head_dim, scale, max_len=None, num_splits=None, variant: DecodeVariant | None = None):
        """``TorchKernels.decode_attention_rope`` in one launch (plus the split combine): RoPE of
        q and the new k at ``seq_lens - 1``, the new K/V stored into the pool, attention over
        the cached positions and the new one. ``qkv`` is read, not modified."""
        b = qkv.shape[0]
        assert qkv.stride(1) == 1 and cos.stride(1) == 1 and cos.shape[1] == head_dim
        assert k_layer.shape[2] == num_kv_heads
        return self._decode(qkv, qkv.stride(0), head_dim, cos, sin, k_layer, v_layer, slots, seq_lens, scale,
                            max_len, num_splits, None, b, num_heads, head_dim, fused=True, variant=variant)

    def _decode(self, q, stride_qb, stride_qh, cos, sin, k_layer, v_layer, slots, seq_lens, scale, max_len,
                num_splits, out, b, h, d, fused, variant=None):
        """``variant`` (a ``DecodeVariant``) overrides the block size, split target, combine
        mode and load order; None: this instance's defaults (``combine``, ``block_n``)."""
        hkv = k_layer.shape[2]
        group = h // hkv
        block_n = (variant.block_n if variant is not None and variant.block_n else 0) or self.block_n(b, hkv)
        combine = self.combine if variant is None or self.combine == "kernel" else variant.combine
        if num_splits is None:
            num_splits = self.num_splits(b, hkv, max_len if max_len is not None else k_layer.shape[1], block_n,
                                         variant.split_target if variant is not None else None)
        if not 1 <= num_splits <= self.MAX_SPLITS:
            raise ValueError(f"num_splits must be in 1..{self.MAX_SPLITS}, got {num_splits}")
        if out is None:
            out = torch.empty((b, h, d), dtype=k_layer.dtype, device=k_layer.device)
        single = num_splits == 1
        if single:
            mid_o = mid_m = mid_l = out  # unused
            smb = smh = sms = slb = slh = 0
        else:
            mid_o = torch.empty((b, h, num_splits, d), dtype=torch.float32, device=k_layer.device)
            mid_m = torch.empty((b, h, num_splits), dtype=torch.float32, device=k_layer.device)
            mid_l = torch.empty((b, h, num_splits), dtype=torch.float32, device=k_layer.device)
            smb, smh, sms = mid_o.stride(0), mid_o.stride(1), mid_o.stride(2)
            slb, slh = mid_m.stride(0), mid_m.stride(1)
        block_d = _next_pow2(d)
        ieee = k_layer.dtype == torch.float32
        cos_t = cos if fused else out  # unused pointers when not fused
        sin_t = sin if fused else out
        atomic = not single and combine == "atomic"
        cnt = self._counter(b * hkv, k_layer.device) if atomic else out
        self.k["decode_stage1"][(b, hkv, num_splits)](
            q, k_layer, v_layer, slots, seq_lens, out, mid_o, mid_m, mid_l, cos_t, sin_t, cnt,
            stride_qb, stride_qh, k_layer.stride(0), k_layer.stride(1), k_layer.stride(2),
            v_layer.stride(0), v_layer.stride(1), v_layer.stride(2), out.stride(0), out.stride(1),
            smb, smh, sms, slb, slh, cos.stride(0) if fused else 0, num_splits, float(scale),
            GROUP=group, BLOCK_H=max(16, _next_pow2(group)), HEAD_DIM=d, BLOCK_D=block_d,
            BLOCK_N=block_n, SINGLE=single, IEEE=ieee, FUSED=fused, NUM_HEADS=h, NUM_KV_HEADS=hkv,
            COMBINE=atomic, BLOCK_S=self.MAX_SPLITS, EARLY_V=True if variant is None else variant.early_v,
            num_warps=4, num_stages=2)
        if not single and not atomic:
            self.k["decode_stage2"][(b, h)](
                mid_o, mid_m, mid_l, out, num_splits, smb, smh, sms, slb, slh, out.stride(0), out.stride(1),
                HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=self.MAX_SPLITS, num_warps=4)
        return out

    def warm_up(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device,
                batches: tuple[int, ...] = (1,), variants: tuple[str, ...] | None = None) -> None:
        """Compile every decode-attention variant a run can launch (fused or not, one split or
        several, both KV block sizes; and each ``DECODE_VARIANTS`` name in ``variants``), so none
        compiles mid-run. Writes nothing persistent."""
        kl = torch.zeros((2, 64, num_kv_heads, head_dim), dtype=dtype, device=device)
        big = max(batches + (math.ceil(self.sm_count / max(1, num_kv_heads)),))
        t = torch.arange(64, dtype=torch.float32, device=device)[:, None].expand(64, head_dim).contiguous()
        for batch in sorted({1, big}):
            self._counter(batch * num_kv_heads, torch.device(device))
            idx = torch.zeros(batch, dtype=torch.int64, device=device)
            q = torch.zeros((batch, num_heads, head_dim), dtype=dtype, device=device)
            qkv = torch.zeros((batch, (num_heads + 2 * num_kv_heads) * head_dim), dtype=dtype, device=device)
            for var in [None] + [DECODE_VARIANTS[n] for n in (variants or ())]:
                for splits in (1, 2):
                    self.decode_attention(q, kl, kl.clone(), idx, idx + 1, 1.0, num_splits=splits, variant=var)
                    if var is None or var.rope_fused:
                        self.decode_attention_rope(qkv, idx, idx + 1, t.cos(), t.sin(), kl, kl.clone(), num_heads,
                                                   num_kv_heads, head_dim, 1.0, num_splits=splits, variant=var)


def cuda_time(fn, iters: int) -> float:
    """Mean seconds per call of ``fn`` run back to back on the current CUDA stream."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def make_kernels(choice: str, device: torch.device):
    """``choice``: "auto" (Triton on CUDA when it imports, else torch), "triton" or "torch"."""
    from splitlab.errors import ConfigError

    if choice == "torch":
        return TorchKernels()
    if choice == "auto":
        if device.type == "cuda" and triton_importable():
            return TritonKernels()
        return TorchKernels()
    if choice == "triton":
        if not triton_importable():
            raise ConfigError("kernels='triton' needs the triton package (it ships with CUDA builds of torch); "
                              "use kernels='torch'")
        return TritonKernels()
    raise ConfigError(f"kernels must be 'auto', 'triton' or 'torch', got {choice!r}")
