"""The PyTorch reference kernels: plain PyTorch ops, written to round exactly where
Huggingface's Llama rounds (so fp32 and bf16 outputs follow HF's own numerics). The CPU path,
and what every Triton kernel is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitlab.engine.kernels.variants import DecodeVariant


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

        ``q``: [B, H, D]; ``k_layer``/``v_layer``: [rows, P, Hkv, D]; ``slots``: [B] row of each
        sequence (a slot pool: P is the slot length), or [B, blocks] block tables (a paged
        pool: position p is in row ``table[p // P]`` at ``p % P``). Returns [B, H, D] (copied
        into ``out`` when given).
        """
        b, h, d = q.shape
        hkv = k_layer.shape[2]
        if max_len is None:
            max_len = int(seq_lens.max())
        k, v = gather_kv(k_layer, slots, max_len), gather_kv(v_layer, slots, max_len)  # [B, L, Hkv, D]
        k = k.transpose(1, 2).float().repeat_interleave(h // hkv, dim=1)  # [B, H, L, D]
        v = v.transpose(1, 2).float().repeat_interleave(h // hkv, dim=1)
        scores = torch.einsum("bhd,bhld->bhl", q.float(), k) * scale
        valid = torch.arange(k.shape[2], device=q.device)[None, :] < seq_lens[:, None]
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
        stored at that position of each row's sequence, then attention over ``seq_lens``
        positions.

        ``qkv``: [B, (H + 2 Hkv) * D] (rotated in place, as ``rope_kv_write`` does);
        ``k_layer``/``v_layer``/``slots`` as in ``decode_attention``. Returns [B, H, D]. The
        reference is the two separate operations, composed.
        """
        b = qkv.shape[0]
        page = k_layer.shape[1]
        positions = seq_lens - 1
        n = k_layer.shape[0] * page
        cls.rope_kv_write(qkv, positions, write_rows(slots, positions, page), cos, sin,
                          k_layer.view(n, num_kv_heads, head_dim), v_layer.view(n, num_kv_heads, head_dim),
                          num_heads, num_kv_heads, head_dim)
        q = qkv[:, : num_heads * head_dim].view(b, num_heads, head_dim)
        return cls.decode_attention(q, k_layer, v_layer, slots, seq_lens, scale, max_len=max_len)


def gather_kv(layer: torch.Tensor, slots: torch.Tensor, length: int) -> torch.Tensor:
    """Positions ``0 .. length - 1`` of each row's sequence: [B, L, Hkv, D], L = ``length``
    (fewer when the block tables cover fewer positions). ``slots``: [B] rows or [B, blocks]
    block tables (see ``decode_attention``)."""
    if slots.ndim == 1:
        return layer[slots, :length]
    pages = min(-(-length // layer.shape[1]), slots.shape[1])
    return layer[slots[:, :pages]].flatten(1, 2)[:, :length]


def write_rows(slots: torch.Tensor, positions: torch.Tensor, page: int) -> torch.Tensor:
    """The flat row (``row * page + offset``, as ``KVPool.layer_flat`` numbers them) of each
    sequence's ``positions``; ``slots``: [B] rows or [B, blocks] block tables."""
    if slots.ndim == 1:
        return slots * page + positions
    return slots.gather(1, (positions // page)[:, None])[:, 0] * page + positions % page


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

