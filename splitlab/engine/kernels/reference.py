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

