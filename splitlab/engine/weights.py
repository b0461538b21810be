"""Reading a Huggingface Llama-family model: the facts the forward needs (``extract_arch``) and
its weights as one flat dict (``extract_weights``), q/k/v and gate/up fused into one tensor each.

The HF model stays the loader and the oracle. By default nothing of it changes: the fused
tensors are new, every other tensor is the model's own (read, never written). With
``share_storage=True`` the fused tensors are the ONLY copy: the HF modules are rebound to views
of them, so an 8B model is not held twice on the GPU, and HF ``generate()`` still works (on
the same values).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from splitlab.errors import ModelSpecError

SUPPORTED_ARCHS = ("llama", "qwen2", "mistral")
# rope types whose frequencies do not change with the sequence length (so a table works)
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
# the attribute a model's shared weights are cached under (share_storage=True only)
_CACHE = "_splitlab_weights"


class Layer(NamedTuple):
    """One decoder layer's tensors, as the forward reads them."""

    attn_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


def layers_of(weights: dict[str, torch.Tensor], num_layers: int) -> list[Layer]:
    """The ``Layer`` tuples of a flat weight dict (from ``extract_weights`` or its shared copy)."""
    return [Layer(*(weights.get(f"layers.{i}.{name}") if name.endswith("_bias") else weights[f"layers.{i}.{name}"]
                    for name in Layer._fields))
            for i in range(num_layers)]


def weight_bytes(weights: dict[str, torch.Tensor]) -> int:
    """Bytes of the model's weights (each tensor once; the RoPE frequencies not counted)."""
    seen, total = set(), 0
    for name, t in weights.items():
        if name == "inv_freq" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def extract_arch(hf_model) -> dict[str, Any]:
    """The JSON-able facts the functional forward needs; refuses what it does not implement."""
    cfg = hf_model.config
    model_type = getattr(cfg, "model_type", "?")
    if model_type not in SUPPORTED_ARCHS:
        raise ModelSpecError(
            f"the engine runs Llama-family models ({', '.join(SUPPORTED_ARCHS)}); this one is {model_type!r}. "
            "Use mode='hf-generate' or 'replicas' for it"
        )
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelSpecError(f"the engine implements SwiGLU (silu) MLPs; this model uses {act!r}")
    rotary = hf_model.model.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in STATIC_ROPE:
        raise ModelSpecError(
            f"rope type {rope_type!r} changes its frequencies with the sequence length; the engine supports "
            f"{', '.join(STATIC_ROPE)}"
        )
    attn = hf_model.model.layers[0].self_attn
    mlp = hf_model.model.layers[0].mlp
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {
        "model_type": model_type,
        "num_layers": int(cfg.num_hidden_layers),
        "hidden_size": int(cfg.hidden_size),
        "intermediate_size": int(cfg.intermediate_size),
        "num_heads": int(heads),
        "num_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
        "head_dim": int(head_dim),
        "vocab_size": int(cfg.vocab_size),
        "rms_norm_eps": float(cfg.rms_norm_eps),
        "max_positions": int(cfg.max_position_embeddings),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "qkv_bias": attn.q_proj.bias is not None,
        "o_bias": attn.o_proj.bias is not None,
        "mlp_bias": mlp.gate_proj.bias is not None,
        "rope_type": rope_type,
        "rope_attention_scaling": float(getattr(rotary, "attention_scaling", 1.0)),
        "sliding_window": _sliding_window(cfg, model_type),
        "dtype": str(next(hf_model.parameters()).dtype).replace("torch.", ""),
        # never emitted: outputs have exactly max_new_tokens tokens, as HF generate(min_new_tokens=n)
        "eos_token_ids": _eos_ids(hf_model),
    }


def _sliding_window(cfg, model_type: str) -> int | None:
    """The sliding-window length the model really uses (None: full attention)."""
    if not getattr(cfg, "sliding_window", None):
        return None
    layer_types = getattr(cfg, "layer_types", None)
    uses = (model_type == "mistral") or (layer_types is not None and "sliding_attention" in layer_types)
    if model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False):
        uses = False
    return int(cfg.sliding_window) if uses else None


def _eos_ids(hf_model) -> list[int]:
    """The EOS ids of the generation config (else the model config), inside the vocabulary."""
    cfg = hf_model.config
    gen_cfg = getattr(hf_model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if eos is None:
        eos = getattr(cfg, "eos_token_id", None)
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return sorted({int(e) for e in eos_ids if 0 <= int(e) < int(cfg.vocab_size)})


def _fuse_rows(linears, share_storage: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights (and biases) of ``linears`` concatenated along the output dim (a new tensor).
    ``share_storage``: then rebind each module's parameters to views of the fused tensors, so
    the HF model keeps working and the weights exist once."""
    fused_w = torch.cat([lin.weight.data for lin in linears], dim=0)
    fused_b = None
    if linears[0].bias is not None:
        fused_b = torch.cat([lin.bias.data for lin in linears], dim=0)
    if share_storage:
        row = 0
        for lin in linears:
            n = lin.weight.shape[0]
            lin.weight.data = fused_w[row:row + n]
            if fused_b is not None:
                lin.bias.data = fused_b[row:row + n]
            row += n
    return fused_w, fused_b


def _shared_cache(hf_model) -> dict[str, torch.Tensor] | None:
    """The weights an earlier ``share_storage=True`` call made, while the model still uses them."""
    m = hf_model.model
    cached = getattr(hf_model, _CACHE, None)
    if cached is not None and cached["layers.0.qkv"].data_ptr() == m.layers[0].self_attn.q_proj.weight.data_ptr() \
            and cached["embed"].data_ptr() == m.embed_tokens.weight.data_ptr():
        return dict(cached)
    return None


def extract_weights(hf_model, *, share_storage: bool = False) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` of everything the forward reads. Tied embeddings appear as one
    tensor under both ``embed`` and ``lm_head``.

    ``share_storage=False`` (default): the HF model is left exactly as it was; the fused q/k/v
    and gate/up tensors are new (that much more memory). ``share_storage=True``: the HF q/k/v
    and gate/up parameters become views of the fused tensors (no weight held twice; pass it
    where the memory matters, as ``build_engine`` and the worker processes do). The result is
    cached on the model, so later calls with it reuse the same tensors.
    """
    if share_storage:
        cached = _shared_cache(hf_model)
        if cached is not None:
            return cached
    m = hf_model.model
    w: dict[str, torch.Tensor] = {
        "embed": m.embed_tokens.weight.data,
        "final_norm": m.norm.weight.data,
        "lm_head": hf_model.lm_head.weight.data,
        "inv_freq": m.rotary_emb.inv_freq.data.float(),
    }
    with torch.no_grad():
        for i, layer in enumerate(m.layers):
            w.update(_layer_weights(f"layers.{i}.", layer, share_storage))
    if share_storage:
        setattr(hf_model, _CACHE, dict(w))  # a plain attribute: later runners reuse the fused tensors
    return w


def _layer_weights(prefix: str, layer, share_storage: bool) -> dict[str, torch.Tensor]:
    a, mlp = layer.self_attn, layer.mlp
    qkv, qkv_b = _fuse_rows([a.q_proj, a.k_proj, a.v_proj], share_storage)
    gu, gu_b = _fuse_rows([mlp.gate_proj, mlp.up_proj], share_storage)
    w = {"attn_norm": layer.input_layernorm.weight.data, "qkv": qkv, "o": a.o_proj.weight.data,
         "mlp_norm": layer.post_attention_layernorm.weight.data, "gate_up": gu, "down": mlp.down_proj.weight.data}
    optional = {"qkv_bias": qkv_b, "o_bias": a.o_proj.bias, "gate_up_bias": gu_b, "down_bias": mlp.down_proj.bias}
    for name, t in optional.items():
        if t is not None:
            w[name] = t.data
    return {prefix + name: t for name, t in w.items()}
