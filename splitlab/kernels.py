"""The few fused kernels of the model runner, in two interchangeable implementations.

``TorchKernels``: plain PyTorch ops, written to round exactly where Huggingface's Llama rounds
(so fp32 and bf16 outputs follow HF's own numerics); the CPU path and the reference.
``TritonKernels``: the same four operations as single Triton kernels for CUDA, so a decode
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

Triton is imported lazily and only when a CUDA runner asks for it. The kernels also run under
Triton's CPU interpreter (``TRITON_INTERPRET=1``, fp32), which is how tests check them on a
machine without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F


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
                         max_len: int | None = None, num_splits: int = 1) -> torch.Tensor:
        """Batched reference: gather each sequence's KV (padded to ``max_len``), masked softmax.

        ``q``: [B, H, D]; ``k_layer``/``v_layer``: [slots, T, Hkv, D]; returns [B, H, D].
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
        return torch.einsum("bhl,bhld->bhd", p, v).to(q.dtype)


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
    def add_rmsnorm_kernel(X, R, W, OUT, ROUT, stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
                           HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        dt = OUT.dtype.element_ty
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
                             HALF_BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        half = HEAD_DIM // 2
        offs = tl.arange(0, HALF_BLOCK)
        m = offs < half
        dt = QKV.dtype.element_ty
        pos = tl.load(POS + i).to(tl.int64)
        c = tl.load(COS + pos * stride_cos + offs, mask=m, other=0.0).to(dt).to(tl.float32)
        s = tl.load(SIN + pos * stride_cos + offs, mask=m, other=0.0).to(dt).to(tl.float32)
        base = QKV + i * stride_row + h * HEAD_DIM
        x1 = tl.load(base + offs, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(base + half + offs, mask=m, other=0.0).to(tl.float32)
        # HF: q * cos + rotate_half(q) * sin, each product and the sum rounded to the dtype
        o1 = ((x1 * c).to(dt).to(tl.float32) + (-x2 * s).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)).to(dt)
        tl.store(base + offs, o1, mask=m)
        tl.store(base + half + offs, o2, mask=m)
        if h >= NUM_HEADS:
            j = h - NUM_HEADS
            w = tl.load(WIDX + i).to(tl.int64)
            kdst = KC + w * stride_kc + j * HEAD_DIM
            tl.store(kdst + offs, o1, mask=m)
            tl.store(kdst + half + offs, o2, mask=m)
            vsrc = QKV + i * stride_row + (NUM_HEADS + NUM_KV_HEADS + j) * HEAD_DIM
            vdst = VC + w * stride_vc + j * HEAD_DIM
            tl.store(vdst + offs, tl.load(vsrc + offs, mask=m, other=0.0), mask=m)
            tl.store(vdst + half + offs, tl.load(vsrc + half + offs, mask=m, other=0.0), mask=m)

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
    def decode_attn_stage1(Q, K, V, SLOTS, LENS, O, MID_O, MID_M, MID_L,
                           stride_qb, stride_qh, stride_ks, stride_kt, stride_kh,
                           stride_vs, stride_vt, stride_vh, stride_ob, stride_oh,
                           stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                           num_splits, sm_scale,
                           GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
                           IEEE: tl.constexpr):
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
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=qmask, other=0.0)

        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        k_base = K + slot * stride_ks + kvh * stride_kh
        v_base = V + slot * stride_vs + kvh * stride_vh
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < end
            kvmask = nmask[:, None] & dmask[None, :]
            k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :], mask=kvmask, other=0.0)
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            qk = tl.where(nmask[None, :], qk * sm_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp(qk - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :], mask=kvmask, other=0.0)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
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
    """The four fused operations as Triton kernels (CUDA; or CPU under TRITON_INTERPRET=1)."""

    name = "triton"
    BLOCK_N = 64

    def __init__(self, sm_count: int | None = None):
        self.k = _triton_kernels()
        self.gemv_choice: dict[tuple[int, int, int], tuple[int, int, int, int]] = {}
        if sm_count is None:
            sm_count = (torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
                        if torch.cuda.is_available() else 8)
        self.sm_count = sm_count

    def add_rmsnorm(self, x, residual, weight, eps):
        n, cols = x.shape
        out = torch.empty_like(x)
        block = _next_pow2(cols)
        warps = min(16, max(1, block // 256))
        if residual is None:
            self.k["add_rmsnorm"][(n,)](x, x, weight, out, x, x.stride(0), 0, out.stride(0), 0, cols, float(eps),
                                        HAS_RES=False, BLOCK=block, num_warps=warps)
            return out, x
        res = torch.empty_like(x)
        self.k["add_rmsnorm"][(n,)](x, residual, weight, out, res, x.stride(0), residual.stride(0), out.stride(0),
                                    res.stride(0), cols, float(eps), HAS_RES=True, BLOCK=block, num_warps=warps)
        return out, res

    def rope_kv_write(self, qkv, positions, write_index, cos, sin, k_flat, v_flat, num_heads, num_kv_heads, head_dim):
        n = qkv.shape[0]
        if n == 0:
            return
        assert qkv.stride(1) == 1 and k_flat.stride(2) == 1 and k_flat.stride(1) == head_dim
        self.k["rope_kv_write"][(n, num_heads + num_kv_heads)](
            qkv, positions, write_index, cos, sin, k_flat, v_flat, qkv.stride(0), cos.stride(0),
            k_flat.stride(0), v_flat.stride(0), NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
            HEAD_DIM=head_dim, HALF_BLOCK=_next_pow2(head_dim // 2), num_warps=1)

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
                    t = _cuda_time(lambda: self.gemv(x, w, config=cfg), iters)
                    if t < best_t:
                        best, best_t = cfg, t
                self.gemv_choice[key] = best
                report[key] = {"config": best, "gemv_us": best_t * 1e6,
                               "cublas_us": _cuda_time(lambda: F.linear(x, w), iters) * 1e6}
        return report

    def num_splits(self, batch: int, num_kv_heads: int, max_len: int) -> int:
        """Splits of the KV length per (sequence, KV head): enough programs to fill the GPU twice."""
        want = math.ceil(2 * self.sm_count / max(1, batch * num_kv_heads))
        by_len = max(1, math.ceil(max_len / self.BLOCK_N))
        return int(max(1, min(want, 32, by_len)))

    def decode_attention(self, q, k_layer, v_layer, slots, seq_lens, scale, max_len=None, num_splits=None):
        """``q`` [B, H, D] (any row/head strides, last dim contiguous); ``k_layer``/``v_layer``
        [slots, T, Hkv, D]; ``slots``/``seq_lens`` [B] int tensors. Returns [B, H, D]."""
        b, h, d = q.shape
        hkv = k_layer.shape[2]
        group = h // hkv
        if num_splits is None:
            num_splits = self.num_splits(b, hkv, max_len if max_len is not None else k_layer.shape[1])
        out = torch.empty((b, h, d), dtype=q.dtype, device=q.device)
        single = num_splits == 1
        if single:
            mid_o = mid_m = mid_l = out  # unused
            smb = smh = sms = slb = slh = 0
        else:
            mid_o = torch.empty((b, h, num_splits, d), dtype=torch.float32, device=q.device)
            mid_m = torch.empty((b, h, num_splits), dtype=torch.float32, device=q.device)
            mid_l = torch.empty((b, h, num_splits), dtype=torch.float32, device=q.device)
            smb, smh, sms = mid_o.stride(0), mid_o.stride(1), mid_o.stride(2)
            slb, slh = mid_m.stride(0), mid_m.stride(1)
        block_d = _next_pow2(d)
        ieee = q.dtype == torch.float32
        self.k["decode_stage1"][(b, hkv, num_splits)](
            q, k_layer, v_layer, slots, seq_lens, out, mid_o, mid_m, mid_l,
            q.stride(0), q.stride(1), k_layer.stride(0), k_layer.stride(1), k_layer.stride(2),
            v_layer.stride(0), v_layer.stride(1), v_layer.stride(2), out.stride(0), out.stride(1),
            smb, smh, sms, slb, slh, num_splits, float(scale),
            GROUP=group, BLOCK_H=max(16, _next_pow2(group)), HEAD_DIM=d, BLOCK_D=block_d,
            BLOCK_N=self.BLOCK_N, SINGLE=single, IEEE=ieee, num_warps=4, num_stages=2)
        if not single:
            self.k["decode_stage2"][(b, h)](
                mid_o, mid_m, mid_l, out, num_splits, smb, smh, sms, slb, slh, out.stride(0), out.stride(1),
                HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=max(2, _next_pow2(num_splits)), num_warps=4)
        return out


def _cuda_time(fn, iters: int) -> float:
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
    from .errors import ConfigError

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
