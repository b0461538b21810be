"""ModelRunner: a functional Llama-family forward over the KV pool, with explicit batch metadata.

The Huggingface model stays the loader and the oracle; the runner reads its weights (q/k/v
and gate/up fused once, the HF modules rebound to views of the fused tensors so no weight is
held twice) and owns the KV layout and the kernel launches:

- ``prefill(chunks)``: prompt chunks of several sequences (ragged lengths) packed into ONE
  token dimension; every projection is one GEMM over all rows. Attention (SDPA): ALL whole-
  prompt chunks (``start_pos == 0``) of a forward run as ONE batched causal call with shared KV
  heads (``enable_gqa``, no head copies), right-padded to the longest (exact for the real rows
  under a causal mask; on CUDA to a multiple of ``PREFILL_PAD_CUDA`` rows, so cuDNN, PyTorch's
  choice on Hopper, meets a few shapes instead of building a plan per prompt length); equal
  lengths use strided views of the fused qkv rows, ragged ones one row gather, the indices
  riding the forward's single host-to-device copy. A chunk that starts at ``start_pos > 0``
  runs alone against its slot's earlier KV (bottom-right causal).
- ``decode_step(slots, tokens, positions)``: one token for every running sequence. On CUDA
  it replays a CUDA graph captured per batch-size bucket (batch padded to the bucket; the
  padded rows write the pool's scratch row); attention reads each sequence's valid KV only.
  The host side is one numpy fill of a pinned staging buffer and ONE host-to-device copy.
- ``mixed_step(decode, chunks)``: decode rows and prompt chunks in one forward (chunked mode).

Greedy argmax runs on the device, with the model's EOS ids masked (so every request gets
exactly ``max_new_tokens`` tokens, the same ones HF ``generate(min_new_tokens=n)`` gives);
each call syncs once to return Python ints.

Nothing here is module-global: two threads may drive one runner at once (prefill on one CUDA
stream, decode on another): eager calls allocate their own scratch, graph replays use the
decode-only static buffers, and everything is launched on the caller's current stream.

A runner can be rebuilt in another process from ``runner.export()`` (a JSON-able arch dict
and a flat dict of tensors, shareable through CUDA IPC) plus the shared ``KVPool``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from splitlab.config import DECODE_VARIANT_NAMES, SDPA_BACKENDS
from splitlab.errors import ConfigError, ModelSpecError, WorkloadError
from splitlab.engine.kernels import DECODE_VARIANTS, DecodeVariant, TorchKernels, make_kernels
from splitlab.engine.kv import KVPool

SUPPORTED_ARCHS = ("llama", "qwen2", "mistral")
# rope types whose frequencies do not change with the sequence length (so a table works)
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
# CUDA-graph batch buckets; a batch is padded up to the next one
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# SDPA's enable_gqa (torch >= 2.5): query heads share KV heads without copying K/V per head
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens ``token_ids`` of the sequence in ``slot``, at positions ``start_pos ...``.

    ``last``: this chunk ends the prompt, so the runner returns the first output token for it.
    A plain tuple ``(slot, token_ids, start_pos)`` (or with ``last`` as a fourth item) is
    accepted wherever a chunk is.
    """

    slot: int
    token_ids: Sequence[int]
    start_pos: int = 0
    last: bool = True


class DecodeBatch(NamedTuple):
    slots: Sequence[int]
    tokens: Sequence[int]
    positions: Sequence[int]


@dataclasses.dataclass
class _Fresh:
    """The whole prompts (``start_pos == 0``) of one forward, attended in ONE batched causal
    SDPA call: ``count`` prompts right-padded to ``length`` rows each (right padding is exact
    for the real rows under a causal mask; the pad rows' outputs are dropped).

    ``row``: the first row of the first prompt; the prompts' rows are contiguous from it
    (``rows`` in all) unless ``dst`` is given. ``gather``: the qkv row of each of the
    ``count * length`` padded rows (None: the prompts are already ``count`` adjacent runs of
    ``length`` rows, so views of the qkv rows serve, no copy); ``select``: the padded row of
    each real row, in order. All index tensors come from the forward's one host-to-device copy.
    """

    row: int
    rows: int
    count: int
    length: int
    gather: torch.Tensor | None = None
    select: torch.Tensor | None = None
    dst: torch.Tensor | None = None


@dataclasses.dataclass
class _Plan:
    """Attention metadata of one forward (rows: decode rows first, then chunk rows)."""

    num_decode: int  # rows handled by the batched decode-attention kernel
    dec_slots: torch.Tensor | None
    dec_lens: torch.Tensor | None
    dec_max_len: int | None  # None inside a CUDA graph (the kernel reads lengths itself)
    chunks: list[tuple[int, int, int, int]]  # (first row, rows, slot, start_pos)
    # whole prompts: one batched SDPA call (None: no chunk starts at position 0)
    fresh: _Fresh | None = None
    # every other chunk (start_pos > 0, or a reference-path decode row): one SDPA call each
    # against its slot's KV, as (first row, rows, slot, start_pos)
    rest: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)
    variant: DecodeVariant | None = None  # the decode rows' attention variant

    @property
    def decode_only(self) -> bool:
        return not self.chunks and self.num_decode > 0


class _Layer(NamedTuple):
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


# ---- reading a Huggingface model ------------------------------------------------------------

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
    sliding = None
    if getattr(cfg, "sliding_window", None):
        layer_types = getattr(cfg, "layer_types", None)
        uses = (model_type == "mistral") or (layer_types is not None and "sliding_attention" in layer_types)
        if model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False):
            uses = False
        sliding = int(cfg.sliding_window) if uses else None
    dtype = next(hf_model.parameters()).dtype
    gen_cfg = getattr(hf_model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if eos is None:
        eos = getattr(cfg, "eos_token_id", None)
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
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
        "sliding_window": sliding,
        "dtype": str(dtype).replace("torch.", ""),
        # never emitted: outputs have exactly max_new_tokens tokens, as HF generate(min_new_tokens=n)
        "eos_token_ids": sorted({int(e) for e in eos_ids if 0 <= int(e) < int(cfg.vocab_size)}),
    }


def _fuse_rows(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of ``linears`` along the output dim, then rebind
    each module's parameters to views of the fused tensors: the HF model keeps working and
    the weights exist once."""
    fused_w = torch.cat([lin.weight.data for lin in linears], dim=0)
    fused_b = None
    if linears[0].bias is not None:
        fused_b = torch.cat([lin.bias.data for lin in linears], dim=0)
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = fused_w[row:row + n]
        if fused_b is not None:
            lin.bias.data = fused_b[row:row + n]
        row += n
    return fused_w, fused_b


def extract_weights(hf_model) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` of everything the forward reads (fused once, then cached on
    the model). Tied embeddings appear as one tensor under both ``embed`` and ``lm_head``."""
    m = hf_model.model
    cached = getattr(hf_model, "_splitlab_weights", None)
    if cached is not None and cached["layers.0.qkv"].data_ptr() == m.layers[0].self_attn.q_proj.weight.data_ptr() \
            and cached["embed"].data_ptr() == m.embed_tokens.weight.data_ptr():
        return dict(cached)
    w: dict[str, torch.Tensor] = {
        "embed": m.embed_tokens.weight.data,
        "final_norm": m.norm.weight.data,
        "lm_head": hf_model.lm_head.weight.data,
        "inv_freq": m.rotary_emb.inv_freq.data.float(),
    }
    with torch.no_grad():
        for i, layer in enumerate(m.layers):
            a, mlp = layer.self_attn, layer.mlp
            qkv, qkv_b = _fuse_rows([a.q_proj, a.k_proj, a.v_proj])
            gu, gu_b = _fuse_rows([mlp.gate_proj, mlp.up_proj])
            p = f"layers.{i}."
            w[p + "attn_norm"] = layer.input_layernorm.weight.data
            w[p + "qkv"] = qkv
            w[p + "o"] = a.o_proj.weight.data
            w[p + "mlp_norm"] = layer.post_attention_layernorm.weight.data
            w[p + "gate_up"] = gu
            w[p + "down"] = mlp.down_proj.weight.data
            if qkv_b is not None:
                w[p + "qkv_bias"] = qkv_b
            if a.o_proj.bias is not None:
                w[p + "o_bias"] = a.o_proj.bias.data
            if gu_b is not None:
                w[p + "gate_up_bias"] = gu_b
            if mlp.down_proj.bias is not None:
                w[p + "down_bias"] = mlp.down_proj.bias.data
    hf_model._splitlab_weights = dict(w)  # a plain attribute: later runners reuse the fused tensors
    return w


def bucket_for(batch: int, buckets: Sequence[int]) -> int | None:
    for b in buckets:
        if b >= batch:
            return b
    return None


def graph_buckets(max_batch: int) -> list[int]:
    """The CUDA-graph batch sizes for ``max_batch``: the standard buckets below it, and itself."""
    return [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]


# ---- the runner -------------------------------------------------------------------------------

class ModelRunner:
    """Functional forward of a Llama-family model over a ``KVPool``.

    ``arch``: from ``extract_arch``; ``weights``: from ``extract_weights`` (or their IPC-shared
    copies); ``max_batch``: the largest decode batch (default: the pool's slot count);
    ``cuda_graphs``: None = on for CUDA; ``kernels``: "auto" | "triton" | "torch";
    ``gemv``: run the linear layers of batches of at most 4 rows through the Triton GEMV kernel
    (tuned per weight shape on first capture) instead of cuBLAS; needs Triton kernels.
    ``sdpa_backend``: the SDPA backend of prompt-chunk attention: ``"auto"`` (PyTorch's
    choice), or ``"flash"`` / ``"cudnn"`` / ``"efficient"`` / ``"math"`` to force one
    (``torch.nn.attention.sdpa_kernel``; its flags are process-wide while a forward runs).
    ``"cudnn"`` gets K/V with the query-head count (copied), the others share KV heads
    (``enable_gqa``). ``benchmarks/engine_floor.py`` times each on the prefill shapes.
    ``decode_variant``: how the decode step's attention runs (``kernels.DECODE_VARIANTS``:
    ``"fused"`` = RoPE, KV write and attention in one kernel with the in-kernel split combine;
    ``"split"`` = a separate RoPE/KV-write launch, attention, a combine launch; and a few
    block-size / split-count variants). ``"auto"``: on CUDA with Triton kernels and graphs,
    ``select_decode_variant()`` (run by ``capture_graphs()``) captures each candidate's graph
    for a small and a large representative batch bucket, times replays and keeps the fastest
    per batch class; elsewhere ``"fused"`` (no timing). A name fixes it; ``"small:large"``
    fixes one per class (batches with ``batch * kv_heads`` below the SM count are "small").
    All variants are exact against the torch reference (tests/test_kernels.py).
    """

    # CUDA: whole prompts are right-padded to a multiple of this many rows before their batched
    # SDPA call when the backend may be cuDNN (``"auto"`` picks it on Hopper with torch >= 2.11),
    # which builds an execution plan per new shape (tens of ms each): ragged prompt lengths then
    # map onto a few shapes, built once (``warm_prefill_attention``), instead of one per prompt.
    PREFILL_PAD_CUDA = 256

    def __init__(self, arch: dict[str, Any], weights: dict[str, torch.Tensor], kv: KVPool, *,
                 max_batch: int | None = None, cuda_graphs: bool | None = None, kernels: str = "auto",
                 gemv: bool = False, sdpa_backend: str = "auto", decode_variant: str = "auto"):
        self.arch = dict(arch)
        self.kv = kv
        a = self.arch
        self.num_layers = a["num_layers"]
        self.num_heads = a["num_heads"]
        self.num_kv_heads = a["num_kv_heads"]
        self.head_dim = a["head_dim"]
        self.eps = a["rms_norm_eps"]
        self.scale = self.head_dim ** -0.5
        self.dtype = _DTYPES[a["dtype"]]
        self.device = weights["embed"].device
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
        self.embed = weights["embed"]
        self.final_norm = weights["final_norm"]
        self.lm_head = weights["lm_head"]
        self.layers = [
            _Layer(
                weights[f"layers.{i}.attn_norm"], weights[f"layers.{i}.qkv"], weights.get(f"layers.{i}.qkv_bias"),
                weights[f"layers.{i}.o"], weights.get(f"layers.{i}.o_bias"), weights[f"layers.{i}.mlp_norm"],
                weights[f"layers.{i}.gate_up"], weights.get(f"layers.{i}.gate_up_bias"),
                weights[f"layers.{i}.down"], weights.get(f"layers.{i}.down_bias"),
            )
            for i in range(self.num_layers)
        ]
        self._weights = dict(weights)
        self._kv_flat = [kv.layer_flat(i) for i in range(self.num_layers)]
        # RoPE table exactly as HF computes it per position: fp32 freqs, cat, cos/sin * scaling
        inv_freq = weights["inv_freq"].to(self.device, torch.float32)
        pos = torch.arange(kv.max_seq_len, device=self.device, dtype=torch.int64).float()
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scaling = a.get("rope_attention_scaling", 1.0)
        self.cos = (emb.cos() * scaling).contiguous()
        self.sin = (emb.sin() * scaling).contiguous()

        eos = a.get("eos_token_ids") or []
        self._suppress = torch.tensor(eos, dtype=torch.int64, device=self.device) if eos else None
        self.kernels = make_kernels(kernels, self.device)
        if gemv and not hasattr(self.kernels, "gemv"):
            raise ConfigError("gemv=True needs the Triton kernels (kernels='triton' or 'auto' on CUDA)")
        self._gemv = self.kernels if gemv else None
        self.gemv_report: dict | None = None
        self._causal_lower_right = None
        if self.device.type == "cuda":  # imported here: the module pulls in dynamo (~2 s)
            from torch.nn.attention.bias import causal_lower_right

            self._causal_lower_right = causal_lower_right
        self.sdpa_backend = "auto"
        self._sdpa_ctx = None
        self.set_sdpa_backend(sdpa_backend)
        self.max_batch = int(max_batch) if max_batch is not None else kv.num_slots
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise ConfigError("cuda_graphs=True needs the model on a CUDA device")
        self.cuda_graphs = bool(cuda_graphs)
        self.buckets = graph_buckets(self.max_batch)
        self._graphs: dict[tuple[int, int | None], tuple[Any, torch.Tensor]] = {}
        self._graph_pool = None
        # The stream decode graphs are captured on (None: PyTorch's capture stream). The green-
        # context split backend sets its decode stream here, so captured kernels belong to it.
        self.capture_stream = None
        if self.cuda_graphs:
            self._init_static_inputs()
        self._set_decode_variant(decode_variant)

    # ---- decode variants ---------------------------------------------------------------------
    def _set_decode_variant(self, spec: str) -> None:
        if not isinstance(spec, str) or not spec:
            raise ConfigError(f"decode_variant must be 'auto', one of {', '.join(DECODE_VARIANT_NAMES)}, or "
                              f"'small:large'; got {spec!r}")
        timed = self.device.type == "cuda" and self.cuda_graphs and self.kernels.name == "triton"
        self._decode_auto = spec == "auto" and timed
        self.decode_variant_report: dict[str, Any] | None = None
        if spec == "auto":
            names = ["fused", "fused"]
        else:
            names = spec.split(":") if ":" in spec else [spec, spec]
        if len(names) != 2 or any(n not in DECODE_VARIANTS for n in names):
            raise ConfigError(f"decode_variant must be 'auto', one of {', '.join(DECODE_VARIANT_NAMES)}, or "
                              f"'small:large' of those; got {spec!r}")
        self._variant_choice = {"small": names[0], "large": names[1]}
        self._variant_how = "timed" if self._decode_auto else ("default" if spec == "auto" else "fixed")

    @property
    def decode_variant(self) -> str:
        """The decode variant in use: one name, or ``"small:large"`` when the classes differ."""
        a, b = self._variant_choice["small"], self._variant_choice["large"]
        return a if a == b else f"{a}:{b}"

    def decode_variant_info(self) -> dict[str, Any]:
        """What ``Run.config['effective']`` and the benchmark JSON record about the choice."""
        return {"decode_variant": self.decode_variant, "decode_variant_how": self._variant_how,
                "decode_variant_timings": self.decode_variant_report}

    def _small_batch(self, batch: int) -> bool:
        return batch * self.num_kv_heads < getattr(self.kernels, "sm_count", 0)

    def _variant_for(self, batch: int) -> DecodeVariant:
        return DECODE_VARIANTS[self._variant_choice["small" if self._small_batch(batch) else "large"]]

    def select_decode_variant(self, candidates: Sequence[str] | None = None, context: int = 1024,
                              iters: int = 20) -> dict[str, Any] | None:
        """Time each candidate's decode graph and keep the fastest per batch class (CUDA, Triton
        kernels, graphs, ``decode_variant="auto"``; once). The representative buckets: 1 (small)
        and the first large bucket from 32 on (else the largest). Their static inputs point at
        slots 0.. with ``context`` tokens each; replays write one K/V position of those slots
        (garbage that any later request overwrites before reading it, as ``workers.warm_up``'s
        writes): run it before serving. Timing: CUDA events around each replay, median of
        ``iters`` after 3 warm-up replays. Graphs captured before are dropped (recaptured on use).
        """
        if not self._decode_auto or self.decode_variant_report is not None:
            return self.decode_variant_report
        forced_kernel = getattr(self.kernels, "combine", "atomic") == "kernel"
        names, seen = [], set()
        for n in candidates or DECODE_VARIANT_NAMES:
            v = DECODE_VARIANTS[n]
            key = (v.rope_fused, "kernel" if forced_kernel else v.combine, v.block_n, v.split_target, v.early_v)
            if key not in seen:  # with the combine forced to "kernel", some candidates coincide
                seen.add(key)
                names.append(n)
        reps: dict[str, int] = {}
        small = [b for b in self.buckets if self._small_batch(b)]
        large = [b for b in self.buckets if not self._small_batch(b)]
        if small:
            reps["small"] = small[0]
        if large:
            reps["large"] = next((b for b in large if b >= 32), large[-1])
        t = self.kv.max_seq_len
        ctx = max(2, min(int(context), t - 1))
        report: dict[str, Any] = {"context": ctx, "iters": iters, "statistic": "median CUDA-event ms per replay"}
        for cls, bucket in reps.items():
            times: dict[str, float] = {}
            for name in names:
                self._variant_choice[cls] = name
                graph, out = self._capture_graph(bucket, None, private_pool=True)
                slots = torch.arange(bucket, device=self.device, dtype=torch.int64) % self.kv.num_slots
                d = self._static_inputs(bucket)
                d[0].zero_()
                d[1].fill_(ctx - 1)
                d[2].copy_(slots * t + ctx - 1)
                d[3].copy_(slots)
                d[4].fill_(ctx)
                for _ in range(3):
                    graph.replay()
                ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(iters)]
                for a, b in ev:
                    a.record()
                    graph.replay()
                    b.record()
                torch.cuda.synchronize(self.device)
                times[name] = float(np.median([a.elapsed_time(b) for a, b in ev]))
                del graph, out
            best = min(times, key=times.get)
            self._variant_choice[cls] = best
            report[cls] = {"bucket": bucket, "ms": times, "chosen": best}
        if "small" not in reps:
            self._variant_choice["small"] = self._variant_choice["large"]
        if "large" not in reps:
            self._variant_choice["large"] = self._variant_choice["small"]
        self.drop_graphs()
        self.decode_variant_report = report
        return report

    def drop_graphs(self) -> None:
        """Forget every captured decode graph (they are recaptured on use)."""
        self._graphs.clear()
        # the dropped graphs may have been the last users of the shared pool: start a new one
        self._graph_pool = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def set_sdpa_backend(self, backend: str) -> None:
        """Force the SDPA backend of prompt-chunk attention (see the class docstring)."""
        if backend not in SDPA_BACKENDS:
            raise ConfigError(f"sdpa_backend must be one of {', '.join(SDPA_BACKENDS)}; got {backend!r}")
        self.sdpa_backend = backend
        self._sdpa_ctx = None
        if backend != "auto":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            member = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                      "math": "MATH"}[backend]
            if not hasattr(SDPBackend, member):
                raise ConfigError(f"this torch has no SDPA backend {member}")
            self._sdpa_ctx = lambda: sdpa_kernel([getattr(SDPBackend, member)])
        # cuDNN attention takes no enable_gqa: give it K/V with the query-head count
        self._gqa = _SDPA_GQA and backend != "cudnn"

    def _init_static_inputs(self) -> None:
        """Decode-only static inputs of the graphs: for batch bucket ``b`` the first ``5 * b``
        int64 of one flat device buffer, read as [5, b] (tokens, positions, write index, slot,
        length), so every bucket's inputs are contiguous; and a pinned host staging copy of
        the same layout with a numpy view (filled without torch ops, copied in one transfer)."""
        top = self.buckets[-1]
        self._dec_in = torch.zeros(5 * top, dtype=torch.int64, device=self.device)
        stage = torch.zeros(5 * top, dtype=torch.int64)
        self._dec_stage = stage.pin_memory() if self.device.type == "cuda" else stage
        self._dec_stage_np = self._dec_stage.numpy()

    def _static_inputs(self, bucket: int) -> torch.Tensor:
        return self._dec_in[: 5 * bucket].view(5, bucket)

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_model(cls, loaded, kv: KVPool, **kwargs) -> "ModelRunner":
        """A runner over ``loaded`` (a ``LoadedModel``); fuses its weights in place once."""
        loaded.require_engine_support("engine")
        return cls(extract_arch(loaded.model), extract_weights(loaded.model), kv, **kwargs)

    @classmethod
    def for_config(cls, arch: dict[str, Any], weights: dict[str, torch.Tensor], kv: KVPool, config,
                   max_batch: int | None = None) -> "ModelRunner":
        """THE way every mode builds a runner: every runner setting comes from ``config`` (an
        ``EngineConfig``), so no mode can forget one. ``max_batch`` defaults to
        ``min(config.max_batch, kv.num_slots)``."""
        if max_batch is None:
            max_batch = min(config.max_batch, kv.num_slots)
        return cls(arch, weights, kv, max_batch=max_batch, cuda_graphs=config.cuda_graphs,
                   kernels=config.kernels, gemv=config.gemv, sdpa_backend=config.sdpa_backend,
                   decode_variant=config.decode_variant)

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(arch, weights)``: enough, with the shared KV pool, to rebuild this runner elsewhere."""
        return dict(self.arch), dict(self._weights)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's weights (each tensor once; the RoPE frequencies not counted)."""
        seen, total = set(), 0
        for name, t in self._weights.items():
            if name == "inv_freq" or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total

    # ---- public steps ----------------------------------------------------------------------
    def prefill(self, chunks: Iterable[PrefillChunk | tuple]) -> list[int | None]:
        """Run prompt chunks of several sequences in one forward; write their KV into their
        slots; return the greedy next token of each chunk that ends its prompt (else None)."""
        _, out = self.mixed_step(None, chunks)
        return out

    def decode_step(self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int]) -> list[int]:
        """Feed ``tokens[i]`` at ``positions[i]`` to the sequence in ``slots[i]``; return the
        next greedy token of each. CUDA-graph replay on CUDA (batch padded to its bucket)."""
        b = len(slots)
        if b == 0:
            return []
        if not (len(tokens) == len(positions) == b):
            raise ConfigError("decode_step: slots, tokens and positions must have the same length")
        bucket = bucket_for(b, self.buckets) if self.cuda_graphs else None
        if bucket is None:
            self._check_rows(slots, positions, [1] * b)
            out, _ = self._eager(DecodeBatch(slots, tokens, positions), [])
            return out
        key = (bucket, self._ctx_bucket(max(positions) + 1))
        graph, out = self._graphs.get(key) or self._capture(*key)
        t = self.kv.max_seq_len
        st = self._dec_stage_np[: 5 * bucket].reshape(5, bucket)
        st[0, :b] = tokens
        st[1, :b] = positions
        st[3, :b] = slots
        pos, slot = st[1, :b], st[3, :b]
        if pos.min() < 0 or pos.max() >= t or slot.min() < 0 or slot.max() >= self.kv.num_slots:
            self._check_rows(slots, positions, [1] * b)  # raises with the offending row
        np.multiply(slot, t, out=st[2, :b])
        st[2, :b] += pos
        np.add(pos, 1, out=st[4, :b])
        if bucket > b:  # padded rows: token 0 at position 0 of the scratch row
            pad = self.kv.pad_slot
            st[:, b:] = np.array([[0], [0], [pad * t], [pad], [1]], dtype=np.int64)
        self._dec_in[: 5 * bucket].copy_(self._dec_stage[: 5 * bucket], non_blocking=True)
        graph.replay()
        return out[:b].tolist()

    def mixed_step(self, decode: DecodeBatch | tuple | None, chunks: Iterable[PrefillChunk | tuple]
                   ) -> tuple[list[int], list[int | None]]:
        """Decode rows and prompt chunks in one eager forward: ``(decode tokens, chunk tokens)``."""
        chunks = [as_chunk(c) for c in chunks]
        if decode is not None and not isinstance(decode, DecodeBatch):
            decode = DecodeBatch(*decode)
        if decode is not None and len(decode.slots) == 0:
            decode = None
        if decode is None and not chunks:
            return [], []
        if decode is not None:
            if not (len(decode.tokens) == len(decode.positions) == len(decode.slots)):
                raise ConfigError("mixed_step: decode slots, tokens and positions must have the same length")
            self._check_rows(decode.slots, decode.positions, [1] * len(decode.slots))
        if chunks:
            self._check_rows([c.slot for c in chunks], [c.start_pos for c in chunks],
                             [len(c.token_ids) for c in chunks])
        return self._eager(decode, chunks)

    def forward_logits(self, chunks: Iterable[PrefillChunk | tuple]) -> torch.Tensor:
        """Logits (fp32) of every row of ``chunks`` (writes their KV like ``prefill``); for tests."""
        chunks = [as_chunk(c) for c in chunks]
        self._check_rows([c.slot for c in chunks], [c.start_pos for c in chunks], [len(c.token_ids) for c in chunks])
        return self._eager(None, chunks, all_logits=True)

    def decode_logits(self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Logits (fp32, [B, vocab]) of an eager decode step through this runner's decode-attention
        path (the batched kernel for Triton runners); writes KV like ``decode_step``. For checks."""
        self._check_rows(slots, positions, [1] * len(slots))
        return self._eager(DecodeBatch(slots, tokens, positions), [], all_logits=True)

    # ---- CUDA graphs -----------------------------------------------------------------------
    def capture_graphs(self, batch_sizes: Iterable[int] | None = None) -> list[int]:
        """Capture the decode graphs of these batch buckets (default: all), largest first."""
        if not self.cuda_graphs:
            return []
        self.select_decode_variant()
        want = sorted({bucket_for(b, self.buckets) for b in (batch_sizes or self.buckets)} - {None}, reverse=True)
        ctx = self._ctx_bucket(1)
        for b in want:
            if (b, ctx) not in self._graphs:
                self._capture(b, ctx)
        return want

    def _ctx_bucket(self, length: int) -> int | None:
        """Triton's decode attention reads each sequence's own length inside the graph (None:
        one graph per batch bucket). The PyTorch fallback gathers a fixed KV length, so its
        graphs are also keyed by a power-of-two context bucket (captured on first use)."""
        if not isinstance(self.kernels, TorchKernels):
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
        t = self.kv.max_seq_len
        pad = self.kv.pad_slot
        self._static_inputs(bucket).copy_(torch.tensor([[0], [0], [pad * t], [pad], [1]], dtype=torch.int64,
                                                       device=self.device).expand(5, bucket))
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
        plan = _Plan(bucket, d[3], d[4], ctx, [], variant=self._variant_for(bucket))
        h, residual = self._hidden(d[0], d[1], d[2], plan)
        x, _ = self.kernels.add_rmsnorm(h, residual, self.final_norm, self.eps)
        return self._greedy(self._linear(x, self.lm_head))

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """Argmax over the vocabulary with EOS masked (HF ``min_new_tokens`` does the same)."""
        if self._suppress is not None:
            logits.index_fill_(1, self._suppress, float("-inf"))
        return logits.argmax(dim=-1)

    # ---- the forward -----------------------------------------------------------------------
    def _eager(self, decode: DecodeBatch | None, chunks: list[PrefillChunk], all_logits: bool = False):
        t = self.kv.max_seq_len
        tokens: list[int] = []
        positions: list[int] = []
        windex: list[int] = []
        logit_rows: list[int] = []
        plan_chunks: list[tuple[int, int, int, int]] = []
        nd = 0
        dec_max = None
        batched_decode = decode is not None and not isinstance(self.kernels, TorchKernels)
        if decode is not None:
            for i, (slot, tok, pos) in enumerate(zip(decode.slots, decode.tokens, decode.positions)):
                tokens.append(int(tok))
                positions.append(int(pos))
                windex.append(int(slot) * t + int(pos))
                logit_rows.append(i)
                if not batched_decode:  # exact per-sequence attention (the CPU / reference path)
                    plan_chunks.append((i, 1, int(slot), int(pos)))
            if batched_decode:
                nd = len(decode.slots)
                dec_max = max(positions) + 1
        for c in chunks:
            row = len(tokens)
            n = len(c.token_ids)
            tokens.extend(c.token_ids)
            positions.extend(range(c.start_pos, c.start_pos + n))
            base = c.slot * t
            windex.extend(range(base + c.start_pos, base + c.start_pos + n))
            plan_chunks.append((row, n, c.slot, c.start_pos))
            if c.last:
                logit_rows.append(row + n - 1)
        n_rows = len(tokens)
        # whole prompts -> one batched causal SDPA call (right-padded); the rest one call each
        first_chunk = len(plan_chunks) - len(chunks)
        fresh_chunks = [pc for pc, c in zip(plan_chunks[first_chunk:], chunks) if c.start_pos == 0]
        rest = plan_chunks[:first_chunk] + [pc for pc, c in zip(plan_chunks[first_chunk:], chunks)
                                            if c.start_pos != 0]
        fresh_idx: list[int] = []
        fresh = None
        if fresh_chunks:
            fresh, fresh_idx = self._fresh_plan(fresh_chunks)
        # every index the forward needs, in ONE host-to-device copy (pinned on CUDA)
        parts = [tokens, positions, windex, logit_rows]
        if batched_decode:
            parts += [[int(s) for s in decode.slots], [p + 1 for p in positions[:nd]]]
        fresh_names = []
        if fresh is not None and fresh_idx:
            o = 0
            for name in ("gather", "select", "dst"):
                k = getattr(fresh, name)  # a count, set by _fresh_plan; becomes the tensor
                if k:
                    parts.append(fresh_idx[o:o + k])
                    fresh_names.append(name)
                    o += k
                else:
                    setattr(fresh, name, None)
        views = _index_tensors(self.device, parts)
        tok_t, pos_t, widx_t, rows = views[:4]
        dec_slots, dec_lens = views[4:6] if batched_decode else (None, None)
        for name, view in zip(fresh_names, views[6 if batched_decode else 4:]):
            setattr(fresh, name, view)
        plan = _Plan(nd, dec_slots, dec_lens, dec_max, plan_chunks, fresh, rest,
                     variant=self._variant_for(nd) if nd else None)
        h, residual = self._hidden(tok_t, pos_t, widx_t, plan)
        if all_logits:
            x, _ = self.kernels.add_rmsnorm(h, residual, self.final_norm, self.eps)
            return F.linear(x, self.lm_head).float()
        # the final norm and lm_head only on the rows whose next token is wanted
        x, _ = self.kernels.add_rmsnorm(h.index_select(0, rows), residual.index_select(0, rows), self.final_norm,
                                        self.eps)
        next_tokens = self._greedy(self._linear(x, self.lm_head)).tolist()
        nd_out = len(decode.slots) if decode is not None else 0
        dec_out = next_tokens[:nd_out]
        chunk_out: list[int | None] = []
        k = nd_out
        for c in chunks:
            if c.last:
                chunk_out.append(next_tokens[k])
                k += 1
            else:
                chunk_out.append(None)
        return dec_out, chunk_out

    def _prefill_pad(self) -> int:
        """Rows whole prompts are padded to a multiple of (see ``PREFILL_PAD_CUDA``); 1 = only
        to the forward's longest prompt."""
        if self.device.type == "cuda" and self.sdpa_backend in ("auto", "cudnn"):
            return self.PREFILL_PAD_CUDA
        return 1

    def _fresh_plan(self, fresh_chunks: list[tuple[int, int, int, int]]) -> tuple[_Fresh, list[int]]:
        """The ``_Fresh`` of these whole-prompt chunks and the host index list it needs (its
        ``gather`` / ``select`` / ``dst`` hold the lengths of their parts until the forward's
        one copy turns them into tensors)."""
        lengths = [n for _, n, _, _ in fresh_chunks]
        real = len(fresh_chunks)
        pad = self._prefill_pad()
        length = -(-max(lengths) // pad) * pad
        count = _count_bucket(real) if pad > 1 else real
        row0 = fresh_chunks[0][0]
        contiguous = all(fresh_chunks[i + 1][0] == r + n for i, (r, n, _, _) in enumerate(fresh_chunks[:-1]))
        total = sum(lengths)
        fresh = _Fresh(row0, total, count, length)
        if contiguous and count == real and all(n == length for n in lengths):
            return fresh, []  # count adjacent runs of `length` rows: views of the qkv rows
        gather: list[int] = []
        select: list[int] = []
        for i, (r, n, _, _) in enumerate(fresh_chunks):
            gather.extend(range(r, r + n))
            gather.extend([r + n - 1] * (length - n))  # pad rows: any real row (their output is dropped)
            select.extend(range(i * length, i * length + n))
        # pad prompts up to the count bucket: copies of a real row, attended and dropped
        gather.extend([fresh_chunks[0][0]] * ((count - real) * length))
        dst: list[int] = [] if contiguous else [x for r, n, _, _ in fresh_chunks for x in range(r, r + n)]
        fresh.gather, fresh.select, fresh.dst = len(gather), len(select), len(dst)
        return fresh, gather + select + dst

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
            most = min(self.kv.num_slots, max(1, budget // (length - pad + 1)))  # shortest prompt padded to it
            for count in sorted({_count_bucket(c) for c in range(1, most + 1)}):
                qkv = torch.zeros(count * length, (hq + 2 * hkv) * d, device=self.device, dtype=self.dtype)
                if self._sdpa_ctx is not None:
                    with self._sdpa_ctx():
                        self._fresh_attention(qkv, 0, count, length)
                else:
                    self._fresh_attention(qkv, 0, count, length)
                shapes += 1
        torch.cuda.synchronize(self.device)
        return shapes

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

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if self._gemv is not None and x.shape[0] <= self._gemv.GEMV_MAX_ROWS:
            return self._gemv.gemv(x, w, b)
        return F.linear(x, w, b)

    def tune_gemv(self) -> dict | None:
        """Pick the Triton GEMV config per weight shape by timing (CUDA, ``gemv=True`` only);
        run before capturing graphs. Returns the per-shape timings (GEMV vs cuBLAS, µs)."""
        if self._gemv is None or self.device.type != "cuda" or self.gemv_report is not None:
            return self.gemv_report
        first = self.layers[0]
        report = self._gemv.tune_gemv([first.qkv, first.o, first.gate_up, first.down, self.lm_head])
        self.gemv_report = {f"{n}x{k}@{m}": v for (n, k, m), v in report.items()}
        return self.gemv_report

    def _hidden(self, tokens: torch.Tensor, positions: torch.Tensor, write_index: torch.Tensor,
                plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, residual)`` after the last layer: the final norm is ``add_rmsnorm(h, residual)``
        (left to the caller, which may need it on a few rows only)."""
        kern = self.kernels
        # decode-only forwards with the batched decode kernel (every CUDA-graph step): RoPE,
        # the KV write and attention in one kernel per layer
        fused = plan.decode_only and plan.num_decode == tokens.shape[0] and hasattr(kern, "decode_attention_rope") \
            and (plan.variant is None or plan.variant.rope_fused)
        hq, d = self.num_heads, self.head_dim
        x, residual = kern.embed_rmsnorm(tokens, self.embed, self.layers[0].attn_norm, self.eps)
        h = None
        for i, layer in enumerate(self.layers):
            if h is not None:
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

    def _attention(self, layer: int, qkv: torch.Tensor, plan: _Plan) -> torch.Tensor:
        n = qkv.shape[0]
        hq, d = self.num_heads, self.head_dim
        q_all = qkv[:, : hq * d].view(n, hq, d)
        k_layer, v_layer = self.kv.k[layer], self.kv.v[layer]
        if plan.num_decode == n and not plan.chunks:
            out = self.kernels.decode_attention(q_all, k_layer, v_layer, plan.dec_slots, plan.dec_lens, self.scale,
                                                max_len=plan.dec_max_len if plan.dec_max_len else self.kv.max_seq_len,
                                                variant=plan.variant)
            return out.view(n, hq * d)
        if plan.fresh is None and not plan.rest:  # a plan built elsewhere: every chunk alone
            plan.rest = list(plan.chunks)
        if self._sdpa_ctx is not None:
            with self._sdpa_ctx():
                return self._chunk_attention(layer, qkv, q_all, plan)
        return self._chunk_attention(layer, qkv, q_all, plan)

    def _chunk_attention(self, layer: int, qkv: torch.Tensor, q_all: torch.Tensor, plan: _Plan) -> torch.Tensor:
        n = qkv.shape[0]
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        group_size = hq // hkv
        fresh = plan.fresh
        if fresh is not None and not plan.num_decode and not plan.rest and fresh.row == 0 and fresh.rows == n \
                and fresh.dst is None:
            return self._padded_attention(qkv, fresh).reshape(n, hq * d)  # the forward is whole prompts only
        k_layer, v_layer = self.kv.k[layer], self.kv.v[layer]
        out = torch.empty((n, hq, d), dtype=qkv.dtype, device=qkv.device)
        if plan.num_decode:
            nd = plan.num_decode
            self.kernels.decode_attention(q_all[:nd], k_layer, v_layer, plan.dec_slots, plan.dec_lens, self.scale,
                                          max_len=plan.dec_max_len, out=out[:nd], variant=plan.variant)
        if fresh is not None:
            o = self._padded_attention(qkv, fresh)
            if fresh.dst is None:
                out[fresh.row:fresh.row + fresh.rows] = o
            else:
                out.index_copy_(0, fresh.dst, o)
        for row, rows, slot, start in plan.rest:
            kv_len = start + rows
            q = q_all[row:row + rows].transpose(0, 1).unsqueeze(0)  # [1, H, rows, D]
            # a later chunk on CUDA goes through CausalBias (bottom-right causal), kept on the
            # query-head-count K/V it was validated with
            bias = start > 0 and rows > 1 and self._causal_lower_right is not None
            if self._gqa and not bias:
                k = k_layer[slot, :kv_len].transpose(0, 1).unsqueeze(0)  # [1, Hkv, kv_len, D], a view
                v = v_layer[slot, :kv_len].transpose(0, 1).unsqueeze(0)
                kw = {"enable_gqa": True} if group_size > 1 else {}
            else:
                k = _expand_heads(k_layer[slot, :kv_len], group_size)  # [1, H, kv_len, D]
                v = _expand_heads(v_layer[slot, :kv_len], group_size)
                kw = {}
            if rows == 1:
                o = F.scaled_dot_product_attention(q, k, v, scale=self.scale, **kw)
            elif start == 0:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, **kw)
            else:  # a later chunk: row i sees positions 0 .. start + i (bottom-right causal)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=self._chunk_mask(rows, kv_len),
                                                   scale=self.scale, **kw)
            out[row:row + rows] = o[0].transpose(0, 1)
        return out.view(n, hq * d)

    def _padded_attention(self, qkv: torch.Tensor, fresh: _Fresh) -> torch.Tensor:
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

    # ---- checks ------------------------------------------------------------------------------
    def _check_rows(self, slots, starts, lengths) -> None:
        t = self.kv.max_seq_len
        for slot, start, n in zip(slots, starts, lengths):
            if not 0 <= int(slot) < self.kv.num_slots:
                raise ConfigError(f"slot {slot} is outside the KV pool's {self.kv.num_slots} slots")
            if n < 1:
                raise ConfigError(f"an empty chunk for slot {slot}; give at least one token")
            if start < 0 or start + n > t:
                raise WorkloadError(
                    f"slot {slot}: positions {start}..{start + n - 1} do not fit a KV slot of {t} positions; "
                    "raise max_seq_len or shorten the request"
                )


def as_chunk(c) -> PrefillChunk:
    if isinstance(c, PrefillChunk):
        return c
    if isinstance(c, (tuple, list)) and len(c) in (3, 4):
        return PrefillChunk(int(c[0]), list(c[1]), int(c[2]), bool(c[3]) if len(c) == 4 else True)
    raise ConfigError(f"a prefill chunk is a PrefillChunk or (slot, token_ids, start_pos[, last]); got {c!r}")


def _count_bucket(count: int) -> int:
    """The prompt count a whole-prompt attention call is padded to: the next power of two, so
    a plan-per-shape backend meets a handful of shapes, not one per count."""
    return 1 << max(0, count - 1).bit_length()


def _expand_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """[L, Hkv, D] -> [1, Hkv * group, L, D] (HF's repeat_kv: kv head j serves q heads j*group...)."""
    x = x.transpose(0, 1)
    if group > 1:
        hkv, length, d = x.shape
        x = x[:, None].expand(hkv, group, length, d).reshape(hkv * group, length, d)
    return x.unsqueeze(0)


def _index_tensors(device: torch.device, parts: list[list[int]]) -> list[torch.Tensor]:
    """Int lists -> int64 views of ONE tensor on ``device`` (one copy), each view starting on
    a 16-byte boundary: Triton specializes a pointer argument on 16-byte alignment, so an
    index list at an odd int64 offset would compile another kernel variant mid-run."""
    flat: list[int] = []
    offsets = []
    for part in parts:
        offsets.append(len(flat))
        flat.extend(part)
        if len(flat) % 2:
            flat.append(0)
    t = _to_device(device, flat)
    return [t[o:o + len(part)] for o, part in zip(offsets, parts)]


def _to_device(device: torch.device, values: list[int]) -> torch.Tensor:
    """An int list -> one int64 tensor on ``device`` (one copy, from pinned memory on CUDA)."""
    t = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t
