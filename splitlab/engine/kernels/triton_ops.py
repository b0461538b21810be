"""``TritonKernels``: the launch wrappers of the Triton kernels (``triton_jit``): grids, block
sizes, split-K sizing and scratch buffers. The same operations as ``TorchKernels``, as single
Triton kernels for CUDA, so a decode step is a handful of launches per layer (the decode step
is launch- and bandwidth-bound)."""

from __future__ import annotations

import math

import torch

from splitlab.errors import ConfigError
from splitlab.engine.kernels.variants import COMBINE_MODES, DECODE_VARIANTS, DecodeVariant


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class TritonKernels:
    """The fused operations as Triton kernels (CUDA; or CPU under TRITON_INTERPRET=1)."""

    name = "triton"

    def __init__(self, sm_count: int | None = None, combine: str = "atomic"):
        """``sm_count``: the SMs the split-K grid is sized for (None: the current device's; 8
        without CUDA, the interpreter). ``combine``: how split-K partials are combined
        (``COMBINE_MODES``; ``EngineConfig.decode_combine``): "kernel" forces the second launch
        for every variant, "atomic" lets each variant choose."""
        from splitlab.engine.kernels import triton_jit  # here: importing triton takes seconds

        self.k = triton_jit
        self.gemv_choice: dict[tuple[int, int, int], tuple[int, int, int, int]] = {}
        if sm_count is None:
            sm_count = (torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
                        if torch.cuda.is_available() else 8)
        self.sm_count = sm_count
        if combine not in COMBINE_MODES:
            raise ConfigError(f"combine must be one of {', '.join(COMBINE_MODES)}, got {combine!r}")
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
        block = next_pow2(cols)
        warps = min(16, max(1, block // 256))
        if residual is None:
            self.k.add_rmsnorm_kernel[(n,)](
                x, x, weight, out, x, x, x.stride(0), 0, out.stride(0), 0, cols, float(eps),
                HAS_RES=False, GATHER=False, BLOCK=block, num_warps=warps)
            return out, x
        res = torch.empty_like(x)
        self.k.add_rmsnorm_kernel[(n,)](
            x, residual, weight, out, res, x, x.stride(0), residual.stride(0), out.stride(0), res.stride(0), cols,
            float(eps), HAS_RES=True, GATHER=False, BLOCK=block, num_warps=warps)
        return out, res

    def embed_rmsnorm(self, tokens, embed, weight, eps):
        """``x = embed[tokens]``; ``(rmsnorm(x), x)`` in one launch (no separate gather)."""
        n = tokens.shape[0]
        cols = embed.shape[1]
        assert embed.stride(1) == 1
        out = torch.empty((n, cols), dtype=embed.dtype, device=embed.device)
        res = torch.empty_like(out)
        block = next_pow2(cols)
        if n:
            self.k.add_rmsnorm_kernel[(n,)](
                embed, embed, weight, out, res, tokens, embed.stride(0), 0, out.stride(0), res.stride(0), cols,
                float(eps), HAS_RES=False, GATHER=True, BLOCK=block, num_warps=min(16, max(1, block // 256)))
        return out, res

    ROPE_BLOCK_HEADS = 8

    def rope_kv_write(self, qkv, positions, write_index, cos, sin, k_flat, v_flat, num_heads, num_kv_heads, head_dim):
        n = qkv.shape[0]
        if n == 0:
            return
        assert qkv.stride(1) == 1 and k_flat.stride(2) == 1 and k_flat.stride(1) == head_dim
        bh = self.ROPE_BLOCK_HEADS
        half_block = next_pow2(head_dim // 2)
        self.k.rope_kv_write_kernel[(n, math.ceil((num_heads + num_kv_heads) / bh))](
            qkv, positions, write_index, cos, sin, k_flat, v_flat, qkv.stride(0), cos.stride(0),
            k_flat.stride(0), v_flat.stride(0), NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
            HEAD_DIM=head_dim, HALF_BLOCK=half_block, BLOCK_HEADS=bh,
            num_warps=max(1, min(4, bh * half_block // 128)))

    def silu_mul(self, gate_up):
        n, two_i = gate_up.shape
        inter = two_i // 2
        out = torch.empty((n, inter), dtype=gate_up.dtype, device=gate_up.device)
        block = 1024
        self.k.silu_mul_kernel[(n, math.ceil(inter / block))](
            gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4)
        return out

    GEMV_MAX_ROWS = 4
    # (BLOCK_N, BLOCK_K, num_warps, num_stages) candidates; ``splitlab.engine.tuning.tune_gemv``
    # times them per shape and fills ``gemv_choice``
    GEMV_CONFIGS = ((16, 256, 4, 3), (32, 128, 4, 3), (8, 512, 4, 3), (16, 512, 8, 4), (64, 128, 8, 3),
                    (4, 1024, 4, 3), (32, 256, 8, 3))

    def gemv(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
             config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """``F.linear(x, w, bias)`` for ``x`` of at most ``GEMV_MAX_ROWS`` rows, with the config
        tuned for this shape (``gemv_choice``; or ``config``, or the first candidate)."""
        m, k = x.shape
        n = w.shape[0]
        assert m <= self.GEMV_MAX_ROWS and x.stride(1) == 1 and w.stride(1) == 1
        block_m = next_pow2(m)
        bn, bk, warps, stages = config or self.gemv_choice.get((n, k, block_m), self.GEMV_CONFIGS[0])
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        self.k.gemv_kernel[(math.ceil(n / bn),)](
            x, w, bias if bias is not None else w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        return y

    # Split-K decode attention. A program handles one (sequence, KV head, split); the split
    # length is computed in the kernel from the sequence's own length (rounded up to BLOCK_N),
    # so one launch configuration serves every context length (one CUDA graph per batch).
    MAX_SPLITS = 64  # also stage 2's fixed block: one compiled variant whatever the split count
    SPLIT_TARGET_PER_SM = 2  # aim for this many programs with work per SM

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
        [rows, P, Hkv, D]; ``seq_lens`` [B]; ``slots`` [B] (each row's slot) or [B, blocks]
        (block tables of a paged pool, last dim contiguous; see
        ``TorchKernels.decode_attention``). Returns [B, H, D] (written into ``out`` when given)."""
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
        paged = slots.ndim == 2
        assert not paged or slots.stride(1) == 1
        block_n = (variant.block_n if variant is not None and variant.block_n else 0) or self.block_n(b, hkv)
        combine = self.combine if variant is None or self.combine == "kernel" else variant.combine
        if num_splits is None:
            most = k_layer.shape[1] * (slots.shape[1] if paged else 1)  # positions a table can address
            num_splits = self.num_splits(b, hkv, max_len if max_len is not None else most, block_n,
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
        block_d = next_pow2(d)
        ieee = k_layer.dtype == torch.float32
        cos_t = cos if fused else out  # unused pointers when not fused
        sin_t = sin if fused else out
        atomic = not single and combine == "atomic"
        cnt = self._counter(b * hkv, k_layer.device) if atomic else out
        self.k.decode_attn_stage1[(b, hkv, num_splits)](
            q, k_layer, v_layer, slots, seq_lens, out, mid_o, mid_m, mid_l, cos_t, sin_t, cnt,
            stride_qb, stride_qh, slots.stride(0) if paged else 0, k_layer.stride(0), k_layer.stride(1),
            k_layer.stride(2),
            v_layer.stride(0), v_layer.stride(1), v_layer.stride(2), out.stride(0), out.stride(1),
            smb, smh, sms, slb, slh, cos.stride(0) if fused else 0, num_splits, float(scale),
            GROUP=group, BLOCK_H=max(16, next_pow2(group)), HEAD_DIM=d, BLOCK_D=block_d,
            BLOCK_N=block_n, SINGLE=single, IEEE=ieee, FUSED=fused, NUM_HEADS=h, NUM_KV_HEADS=hkv,
            COMBINE=atomic, BLOCK_S=self.MAX_SPLITS, EARLY_V=True if variant is None else variant.early_v,
            PAGED=paged, PAGE=k_layer.shape[1] if paged else 1, num_warps=4, num_stages=2)
        if not single and not atomic:
            self.k.decode_attn_stage2[(b, h)](
                mid_o, mid_m, mid_l, out, num_splits, smb, smh, sms, slb, slh, out.stride(0), out.stride(1),
                HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=self.MAX_SPLITS, num_warps=4)
        return out

    def compile_decode_kernels(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device,
                               batches: tuple[int, ...] = (1,), variants: tuple[str, ...] | None = None,
                               page_size: int | None = None) -> None:
        """Compile every decode-attention variant a run can launch (fused or not, one split or
        several, both KV block sizes; and each ``DECODE_VARIANTS`` name in ``variants``), so none
        compiles mid-run; ``page_size``: a paged pool's block size (the block-table kernels are
        compiled for it instead of the slot ones). Writes nothing persistent."""
        rows = page_size or 64
        kl = torch.zeros((2, rows, num_kv_heads, head_dim), dtype=dtype, device=device)
        big = max(batches + (math.ceil(self.sm_count / max(1, num_kv_heads)),))
        t = torch.arange(64, dtype=torch.float32, device=device)[:, None].expand(64, head_dim).contiguous()
        for batch in sorted({1, big}):
            self._counter(batch * num_kv_heads, torch.device(device))
            idx = torch.zeros(batch, dtype=torch.int64, device=device)
            where = torch.zeros((batch, 2), dtype=torch.int64, device=device) if page_size else idx
            q = torch.zeros((batch, num_heads, head_dim), dtype=dtype, device=device)
            qkv = torch.zeros((batch, (num_heads + 2 * num_kv_heads) * head_dim), dtype=dtype, device=device)
            for var in [None] + [DECODE_VARIANTS[n] for n in (variants or ())]:
                for splits in (1, 2):
                    self.decode_attention(q, kl, kl.clone(), where, idx + 1, 1.0, num_splits=splits, variant=var)
                    if var is None or var.rope_fused:
                        self.decode_attention_rope(qkv, where, idx + 1, t.cos(), t.sin(), kl, kl.clone(), num_heads,
                                                   num_kv_heads, head_dim, 1.0, num_splits=splits, variant=var)
