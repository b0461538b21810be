"""The Triton kernels themselves (JIT functions). Imported only by ``TritonKernels`` when a
runner asks for Triton, so importing splitlab never imports triton; under
``TRITON_INTERPRET=1`` (set before this import) they run in Triton's CPU interpreter.

Each kernel is one fused operation; the launch wrappers (grids, strides, block sizes) are in
``splitlab.engine.kernels.triton_ops``. ``decode_attn_stage1`` is long on purpose: one
kernel body, with the RoPE/KV-write prologue, the in-kernel split combine and the paged
addressing as compile-time branches (``FUSED``, ``COMBINE``, ``PAGED``), so each variant is
one launch.
"""

from __future__ import annotations

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


# num_splits varies with the batch, stride_tb (the block-table width of an eager step) with the
# context: neither is specialised, so a new value never recompiles mid-run.
# PAGED: SLOTS is a [B, blocks] block table (row stride stride_tb) and position n of row b is
# at row SLOTS[b, n // PAGE], offset n % PAGE of K/V; else SLOTS[b] is the row's slot.
@triton.jit(do_not_specialize=["num_splits", "stride_tb"])
def decode_attn_stage1(Q, K, V, SLOTS, LENS, O, MID_O, MID_M, MID_L, COS, SIN, CNT,
                       stride_qb, stride_qh, stride_tb, stride_ks, stride_kt, stride_kh,
                       stride_vs, stride_vt, stride_vh, stride_ob, stride_oh,
                       stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_cos,
                       num_splits, sm_scale,
                       GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
                       IEEE: tl.constexpr, FUSED: tl.constexpr, NUM_HEADS: tl.constexpr,
                       NUM_KV_HEADS: tl.constexpr, COMBINE: tl.constexpr, BLOCK_S: tl.constexpr,
                       EARLY_V: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
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
    if PAGED:
        table = SLOTS + b * stride_tb
        k_base = K + kvh * stride_kh
        v_base = V + kvh * stride_vh
    else:
        slot = tl.load(SLOTS + b).to(tl.int64)
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
            if PAGED:
                pg = tl.load(table + pos // PAGE).to(tl.int64)
                k_dst = k_base + pg * stride_ks + (pos % PAGE).to(tl.int64) * stride_kt
                v_dst = v_base + pg * stride_vs + (pos % PAGE).to(tl.int64) * stride_vt
            else:
                k_dst = k_base + pos.to(tl.int64) * stride_kt
                v_dst = v_base + pos.to(tl.int64) * stride_vt
            tl.store(k_dst + offs_d, k_new, mask=dmask)
            tl.store(v_dst + offs_d, v_new, mask=dmask)
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
        if PAGED:  # each key's page from the block table (a block of keys may span pages)
            pg = tl.load(table + offs_n // PAGE, mask=nmask, other=0).to(tl.int64)
            k_rows = pg * stride_ks + (offs_n % PAGE).to(tl.int64) * stride_kt
            v_rows = pg * stride_vs + (offs_n % PAGE).to(tl.int64) * stride_vt
        else:
            k_rows = offs_n.to(tl.int64) * stride_kt
            v_rows = offs_n.to(tl.int64) * stride_vt
        # EARLY_V: K and V issued together (one DRAM round trip per block, more registers
        # live); else V is loaded after the scores
        k = tl.load(k_base + k_rows[:, None] + offs_d[None, :], mask=kvmask, other=0.0)
        if EARLY_V:
            v = tl.load(v_base + v_rows[:, None] + offs_d[None, :], mask=kvmask, other=0.0)
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
            v = tl.load(v_base + v_rows[:, None] + offs_d[None, :], mask=kvmask, other=0.0)
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
