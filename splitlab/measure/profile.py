"""Prefill vs decode profiling, measured device ceilings, and datasheet peaks.

- ``measure_ceilings()``: this machine's own matmul rate and copy bandwidth (a few seconds,
  cached per device + dtype for the life of the process). A ceiling is the BEST rate seen over
  the repeats (what the hardware demonstrably reaches), not the median; the medians are kept
  beside them (``*_median``) to show the spread.
- ``DATASHEET`` / ``datasheet_for(name)``: vendor peaks of common GPUs, shown beside the
  measured ceilings (``ceilings_table``). Rooflines use the *measured* ceilings.
- ``profile_phases(model, ...)``: times prefill steps (B x L tokens) and decode steps (B
  sequences at context C) and puts each beside the analytic model of ``splitlab.measure.flops``:
  achieved FLOP/s and bytes/s, arithmetic intensity, compute- or memory-bound, fraction of
  the roofline.

Timing: ``time.perf_counter`` around one step, the device synchronised before
each clock read, ``warmup`` untimed steps first, the median of ``repeats`` timed steps.
Set-up work (building inputs and the KV cache a decode step reads) is outside the timed
region; what is inside is one forward step of the backend.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import math
import platform
import re
import statistics
import time
from typing import Any, Callable, Iterable, Sequence

import torch

from splitlab.measure import flops as _flops
from splitlab.errors import ConfigError, DeviceError, ModeError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "hf", "engine")


# ---- device ceilings ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Ceilings:
    """Measured peaks of one device for one dtype.

    ``matmul_flops_s``: FLOP/s of an ``n x n @ n x n`` matmul (2 n^3 FLOPs).
    ``copy_bytes_s``: bytes/s of a device-to-device copy, counting read AND write bytes.
    Both are ceilings: the best (highest) rate of ``repeats`` timings, each timing a burst of
    back-to-back operations (10 matmuls, 20 copies on a GPU). A floor computed from them is
    a true lower bound on the time; a median would put the floor above what the hardware
    was seen to reach, and flatter every "x floor" ratio. ``matmul_flops_s_median`` and
    ``copy_bytes_s_median`` are the medians of the same timings (None in records made
    before they were kept).
    """

    device: str
    device_name: str
    dtype: str
    matmul_flops_s: float
    copy_bytes_s: float
    matmul_n: int
    copy_buffer_bytes: int
    repeats: int
    matmul_flops_s_median: float | None = None
    copy_bytes_s_median: float | None = None

    @property
    def ridge(self) -> float:
        """FLOP/byte where the memory roof meets the compute roof."""
        return _flops.ridge_point(self.matmul_flops_s, self.copy_bytes_s)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["ridge_flop_per_byte"] = self.ridge
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Ceilings":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def __str__(self) -> str:
        return (f"{self.device_name} ({self.dtype}): matmul {self.matmul_flops_s / 1e12:.3g} TFLOP/s, "
                f"copy {self.copy_bytes_s / 1e12:.3g} TB/s, ridge {self.ridge:.3g} FLOP/B")


def measure_ceilings(device: str | torch.device | None = None, dtype: torch.dtype | str | None = None, *,
                     matmul_n: int | None = None, copy_bytes: int | None = None,
                     repeats: int | None = None, refresh: bool = False) -> Ceilings:
    """Measure the matmul FLOP/s and copy bandwidth of ``device`` (default: cuda if present).

    GPU defaults: bf16, 8192^3 matmul, a 1 GiB copy. CPU defaults: fp32, 1024^3 matmul, a
    256 MiB copy. Warmed up, synchronised; each of ``repeats`` timings covers a burst of
    back-to-back operations; the ceiling is the best of them (``Ceilings`` keeps the medians
    too). The result is cached per (device, dtype, sizes) for the process; ``refresh=True``
    measures again.
    """
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("measure_ceilings: device 'cuda' asked for but no CUDA GPU is visible; use 'cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    dt = _parse_dtype(dtype) if dtype is not None else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    gpu = dev.type == "cuda"
    n = int(matmul_n or (8192 if gpu else 1024))
    nbytes = int(copy_bytes or ((1 << 30) if gpu else (256 << 20)))
    reps = int(repeats or (7 if gpu else 5))
    if refresh:
        _measure_cached.cache_clear()
    return _measure_cached(str(dev), str(dt).replace("torch.", ""), n, nbytes, reps)


@functools.lru_cache(maxsize=None)
def _measure_cached(device: str, dtype: str, n: int, nbytes: int, repeats: int) -> Ceilings:
    dev = torch.device(device)
    dt = _parse_dtype(dtype)
    t_mm = _time_matmul(dev, dt, n, repeats)
    real_bytes, t_cp = _time_copy(dev, dt, nbytes, repeats)
    return Ceilings(
        device=device,
        device_name=device_name(dev),
        dtype=dtype,
        matmul_flops_s=2.0 * n ** 3 / min(t_mm),
        copy_bytes_s=2.0 * real_bytes / min(t_cp),
        matmul_n=n,
        copy_buffer_bytes=real_bytes,
        repeats=repeats,
        matmul_flops_s_median=2.0 * n ** 3 / statistics.median(t_mm),
        copy_bytes_s_median=2.0 * real_bytes / statistics.median(t_cp),
    )


def _time_matmul(dev: torch.device, dt: torch.dtype, n: int, repeats: int) -> list[float]:
    """Seconds of one n x n @ n x n matmul, one value per repeat (each the mean of a burst of
    10 back to back on a GPU)."""
    inner = 10 if dev.type == "cuda" else 1
    with torch.inference_mode():
        a = torch.randn(n, n, device=dev, dtype=torch.float32).to(dt)
        b = torch.randn(n, n, device=dev, dtype=torch.float32).to(dt)
        out = torch.empty(n, n, device=dev, dtype=dt)

        def step():
            for _ in range(inner):
                torch.matmul(a, b, out=out)

        return [t / inner for t in _times(step, _sync_fn(dev), warmup=2, repeats=repeats)]


def _time_copy(dev: torch.device, dt: torch.dtype, nbytes: int, repeats: int) -> tuple[int, list[float]]:
    """(buffer bytes, seconds of one device-to-device copy of it per repeat, each the mean of
    a burst of 20 back to back on a GPU)."""
    inner = 20 if dev.type == "cuda" else 1
    with torch.inference_mode():
        src = torch.ones(max(1, nbytes // _elem_size(dt)), device=dev, dtype=dt)
        dst = torch.empty_like(src)

        def step():
            for _ in range(inner):
                dst.copy_(src)

        times = [t / inner for t in _times(step, _sync_fn(dev), warmup=2, repeats=repeats)]
        return src.numel() * src.element_size(), times


def device_name(device: torch.device | str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine() or "cpu"
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


# ---- datasheet peaks ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GPUSpec:
    """Vendor peak numbers of one GPU: dense tensor-core TFLOP/s (bf16 unless noted), TB/s."""

    name: str
    bf16_tflops: float
    mem_tb_s: float
    note: str = ""

    @property
    def flops_s(self) -> float:
        return self.bf16_tflops * 1e12

    @property
    def bytes_s(self) -> float:
        return self.mem_tb_s * 1e12

    @property
    def ridge(self) -> float:
        return self.flops_s / self.bytes_s

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "source": DATASHEET_SOURCE}


DATASHEET_SOURCE = (
    "NVIDIA product datasheets and architecture whitepapers: dense tensor-core rates (the "
    "'with sparsity' figures halved), bf16 with fp32 accumulate, boost clocks; memory TB/s is "
    "the DRAM interface rate. Peaks a kernel rarely reaches: rooflines use measured ceilings."
)

DATASHEET: dict[str, GPUSpec] = {s.name: s for s in (
    GPUSpec("H100 SXM", 989.4, 3.35, "H100 SXM5 80GB HBM3"),
    GPUSpec("H100 PCIe", 756.0, 2.0, "H100 PCIe 80GB HBM2e"),
    GPUSpec("H200", 989.4, 4.8, "H200 SXM 141GB HBM3e (H200 NVL: lower clocks)"),
    GPUSpec("A100 80GB SXM", 312.0, 2.039, "A100 SXM4 80GB; the 80GB PCIe card has 1.935 TB/s"),
    GPUSpec("A100 40GB", 312.0, 1.555, "A100 40GB (SXM4 and PCIe)"),
    GPUSpec("L4", 121.0, 0.300, "L4 24GB GDDR6"),
    GPUSpec("T4", 65.0, 0.320, "T4 has no bf16: figure is fp16 tensor (mixed precision)"),
    GPUSpec("RTX 4090", 165.2, 1.008, "GeForce: bf16 with fp32 accumulate (fp16 accumulate: 330)"),
    GPUSpec("RTX 3090", 71.0, 0.936, "GeForce: bf16 with fp32 accumulate (fp16 accumulate: 142)"),
    GPUSpec("A10G", 70.0, 0.600, "AWS variant of A10 (A10: 125); AWS publishes no tensor figure, "
            "70 is the commonly quoted value: approximate"),
    GPUSpec("L40S", 362.05, 0.864, "L40S 48GB GDDR6"),
    GPUSpec("V100", 125.0, 0.900, "V100 SXM2 has no bf16: figure is fp16 tensor (PCIe: 112, 0.9 TB/s)"),
)}


def datasheet_for(gpu_name: str | None) -> GPUSpec | None:
    """The DATASHEET entry matching a device name such as torch/NVML report it, or None.

    ``"NVIDIA H100 80GB HBM3"`` -> H100 SXM, ``"NVIDIA A100-SXM4-40GB"`` -> A100 40GB,
    ``"Tesla T4"`` -> T4, ``"NVIDIA GeForce RTX 4090"`` -> RTX 4090, ``"NVIDIA L4"`` -> L4
    (and ``"NVIDIA L40S"`` -> L40S, not L4).
    """
    if not gpu_name:
        return None
    tokens = set(re.split(r"[^a-z0-9]+", gpu_name.lower())) - {""}
    text = " ".join(sorted(tokens))

    def has(*words: str) -> bool:
        return all(w in tokens for w in words)

    if has("h200"):
        return DATASHEET["H200"]
    if has("h100"):
        return DATASHEET["H100 PCIe" if "pcie" in tokens else "H100 SXM"]
    if has("a100"):
        return DATASHEET["A100 80GB SXM" if re.search(r"\b80(gb)?\b", text) else "A100 40GB"]
    if has("l40s"):
        return DATASHEET["L40S"]
    if has("l4"):
        return DATASHEET["L4"]
    if has("t4"):
        return DATASHEET["T4"]
    if has("a10g"):
        return DATASHEET["A10G"]
    if "4090" in tokens:
        return DATASHEET["RTX 4090"]
    if "3090" in tokens:
        return DATASHEET["RTX 3090"]
    if any(t.startswith("v100") for t in tokens):
        return DATASHEET["V100"]
    return None


def ceilings_table(ceilings: Ceilings, datasheet: GPUSpec | None | str = "auto"):
    """Measured vs datasheet, one row per ceiling (pandas DataFrame).

    ``datasheet="auto"`` looks the device name up with ``datasheet_for``.
    """
    import pandas as pd

    spec = datasheet_for(ceilings.device_name) if datasheet == "auto" else datasheet
    rows = [
        ("matmul", f"FLOP/s ({ceilings.dtype}, {ceilings.matmul_n}^3)", ceilings.matmul_flops_s,
         spec.flops_s if spec else math.nan),
        ("copy", "bytes/s (read + write)", ceilings.copy_bytes_s, spec.bytes_s if spec else math.nan),
        ("ridge", "FLOP/byte", ceilings.ridge, spec.ridge if spec else math.nan),
    ]
    table = pd.DataFrame(rows, columns=["ceiling", "unit", "measured", "datasheet"])
    table["measured_over_datasheet"] = table["measured"] / table["datasheet"]
    table.attrs["device_name"] = ceilings.device_name
    table.attrs["datasheet"] = spec.name if spec else None
    return table


# ---- phase profiling ------------------------------------------------------------------

PROFILE_COLUMNS = (
    "model", "backend", "device", "dtype", "phase", "batch", "tokens", "time_s", "tokens_per_s",
    "flops", "bytes", "achieved_flops_s", "achieved_bytes_s", "intensity", "bound", "roof_time_s",
    "frac_of_roof",
)


def profile_phases(model, batch_sizes: Sequence[int] = (1, 4, 16), prompt_lens: Sequence[int] = (128, 512),
                   context_lens: Sequence[int] = (128, 512), repeats: int = 5, warmup: int = 2,
                   backend: str = "auto", *, decode_batch_sizes: Sequence[int] | None = None,
                   ceilings: Ceilings | None = None, lm_head: str = "last", progress: bool = True,
                   seed: int = 0):
    """Time prefill and decode steps of ``model`` and set them against the roofline.

    Prefill: every ``batch in batch_sizes`` x ``prompt_len in prompt_lens`` (B sequences of
    L new tokens, empty cache). Decode: every ``batch in decode_batch_sizes`` (default:
    ``batch_sizes``) x ``context in context_lens`` (one new token for each of B sequences
    with C tokens already cached). Returns a pandas DataFrame with the columns of
    ``PROFILE_COLUMNS``; ``tokens`` is the prompt length (prefill) or the context (decode);
    ``tokens_per_s`` counts every processed token (B*L for prefill, B for decode).

    What the numbers mean: FLOPs and bytes are the analytic model of ``splitlab.measure.flops``
    (useful work; activations ignored), so ``frac_of_roof`` is the step's roofline time over
    its measured time. The hf backend's decode also pays what the model does not count:
    ``DynamicCache`` concatenates the whole cache every step and every layer is a separate
    Python launch, which is why HF decode lands far under the memory roof on a GPU.

    ``backend``: ``"hf"`` (the Huggingface forward with a ``DynamicCache``), ``"engine"``
    (splitlab's ``ModelRunner`` over a ``KVPool``) or ``"auto"`` (engine where it imports and
    the architecture is Llama-family, else hf). ``ceilings`` default to ``measure_ceilings``
    of the model's device and dtype. ``lm_head="last"`` computes (and counts) logits of the
    last prompt position only, as a serving engine does.
    """
    import pandas as pd

    records = profile_records(model, batch_sizes, prompt_lens, context_lens, repeats, warmup, backend,
                              decode_batch_sizes=decode_batch_sizes, ceilings=ceilings, lm_head=lm_head,
                              progress=progress, seed=seed)
    return pd.DataFrame(records, columns=list(PROFILE_COLUMNS) + _extra_columns(records))


def profile_records(model, batch_sizes: Sequence[int] = (1, 4, 16), prompt_lens: Sequence[int] = (128, 512),
                    context_lens: Sequence[int] = (128, 512), repeats: int = 5, warmup: int = 2,
                    backend: str = "auto", *, decode_batch_sizes: Sequence[int] | None = None,
                    ceilings: Ceilings | None = None, lm_head: str = "last", progress: bool = True,
                    seed: int = 0, deadline: float | None = None) -> list[dict[str, Any]]:
    """``profile_phases`` as a list of dicts (no pandas needed: for bare GPU machines).

    ``deadline``: a ``time.perf_counter()`` value; cases not started by then are recorded
    with ``time_s`` NaN and ``error`` "skipped: time budget" (keeps a GPU sweep in budget).
    """
    loaded = _as_loaded(model)
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if lm_head not in ("last", "all"):
        raise ConfigError(f"lm_head must be 'last' or 'all', got {lm_head!r}")
    name = resolve_backend(loaded, backend)
    ceil = ceilings or measure_ceilings(loaded.device, loaded.dtype)
    facts = loaded.facts
    dec_batches = list(decode_batch_sizes) if decode_batch_sizes is not None else list(batch_sizes)
    cases = [("prefill", int(b), int(n)) for b in batch_sizes for n in prompt_lens]
    cases += [("decode", int(b), int(c)) for b in dec_batches for c in context_lens]
    max_len = max([n for p, _, n in cases if p == "prefill"] + [c + 1 for p, _, c in cases if p == "decode"])
    if facts.max_positions and max_len > facts.max_positions:
        raise ConfigError(
            f"the sweep needs {max_len} positions (longest prompt, or context + 1 for decode) but "
            f"{loaded.spec} has a context of {facts.max_positions}; lower prompt_lens / context_lens"
        )
    runner = _make_backend(name, loaded, max_batch=max(b for _, b, _ in cases), max_len=max_len,
                           lm_head=lm_head, seed=seed)
    sync = _sync_fn(loaded.device)
    records = []
    for phase, batch, n in _progress(cases, progress, desc=f"profile {loaded.spec} ({name})"):
        cost = (_flops.prefill_cost(facts, batch, n, lm_head=lm_head) if phase == "prefill"
                else _flops.decode_cost(facts, batch, n))
        rec: dict[str, Any] = {"model": loaded.spec, "backend": name, "device": str(loaded.device),
                               "dtype": str(loaded.dtype).replace("torch.", ""), "phase": phase,
                               "batch": batch, "tokens": n}
        if deadline is not None and time.perf_counter() > deadline:
            rec["error"] = "skipped: time budget"
            rec.update(_roofline_numbers(cost, math.nan, ceil))
            records.append(rec)
            continue
        try:
            step, reset = runner.prefill(batch, n) if phase == "prefill" else runner.decode(batch, n)
            t = _median_time(step, sync, warmup=warmup, repeats=repeats, reset=reset)
        except torch.cuda.OutOfMemoryError as exc:  # record the hole, keep sweeping
            log.warning("profile: %s B=%d n=%d ran out of memory (%s)", phase, batch, n, str(exc)[:120])
            rec["error"] = "out of memory"
            t = math.nan
        finally:
            runner.release()
        rec.update(_roofline_numbers(cost, t, ceil))
        records.append(rec)
    return records


def roofline_numbers(flops: float, nbytes: float, time_s: float, ceilings: Ceilings) -> dict[str, Any]:
    """Achieved rates, intensity, bound and fraction of the roof of one timed step."""
    intensity = flops / nbytes if nbytes else math.inf
    roof_time = max(flops / ceilings.matmul_flops_s, nbytes / ceilings.copy_bytes_s)
    ok = time_s > 0 and math.isfinite(time_s)
    return {
        "flops": float(flops),
        "bytes": float(nbytes),
        "achieved_flops_s": flops / time_s if ok else math.nan,
        "achieved_bytes_s": nbytes / time_s if ok else math.nan,
        "intensity": intensity,
        "bound": "compute" if intensity >= ceilings.ridge else "memory",
        "roof_time_s": roof_time,
        "frac_of_roof": roof_time / time_s if ok else math.nan,
    }


def _roofline_numbers(cost: _flops.StepCost, time_s: float, ceilings: Ceilings) -> dict[str, Any]:
    out = {"time_s": time_s,
           "tokens_per_s": cost.tokens / time_s if time_s > 0 and math.isfinite(time_s) else math.nan}
    out.update(roofline_numbers(cost.flops, cost.bytes, time_s, ceilings))
    return out


def resolve_backend(loaded, backend: str = "auto") -> str:
    """``"auto"`` -> ``"engine"`` when splitlab.engine.runner imports and the arch is Llama-family, else ``"hf"``."""
    if backend not in BACKENDS:
        raise ModeError(f"unknown profiling backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    from splitlab.models import ENGINE_ARCHS

    if backend == "hf":
        return "hf"
    engine_ok = _engine_importable() and loaded.facts.arch in ENGINE_ARCHS
    if backend == "engine":
        if not _engine_importable():
            raise ModeError("backend='engine' needs splitlab.engine.runner and splitlab.engine.kv, which do not import "
                            "here; use backend='hf'")
        loaded.require_engine_support("profile (engine backend)")
        return "engine"
    return "engine" if engine_ok else "hf"


def _engine_importable() -> bool:
    try:
        importlib.import_module("splitlab.engine.runner")
        importlib.import_module("splitlab.engine.kv")
    except Exception:  # ImportError, or a half-written module of another engineer
        return False
    return True


# ---- backends -------------------------------------------------------------------------

class _HFBackend:
    """The Huggingface forward: prefill = model(ids[B, L]); decode = one token per sequence
    on top of a ``DynamicCache`` holding C tokens (random K/V: values do not change speed)."""

    name = "hf"

    def __init__(self, loaded, lm_head: str, seed: int):
        self.loaded = loaded
        self.model = loaded.model
        self.lm_head = lm_head
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        params = _forward_params(self.model)
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_kw = "logits_to_keep" if "logits_to_keep" in params else None
        self._held: list[Any] = []

    def _ids(self, batch: int, length: int) -> torch.Tensor:
        ids = torch.randint(4, self.loaded.facts.vocab_size, (batch, length), generator=self.gen)
        return ids.to(self.loaded.device)

    def prefill(self, batch: int, length: int):
        ids = self._ids(batch, length)
        kwargs: dict[str, Any] = {"use_cache": True}
        if self.lm_head == "last" and self.keep_kw:
            kwargs[self.keep_kw] = 1

        def step():
            with torch.inference_mode():
                return self.model(input_ids=ids, **kwargs).logits

        self._held = [ids]
        return step, None

    def decode(self, batch: int, context: int):
        from transformers import DynamicCache

        f = self.loaded.facts
        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:  # older signature
            cache = DynamicCache()
        with torch.inference_mode():
            for layer in range(f.num_layers):
                k = torch.randn(batch, f.num_kv_heads, context, f.head_dim, device=self.loaded.device,
                                dtype=self.loaded.dtype)
                cache.update(k, torch.randn_like(k), layer)
        ids = self._ids(batch, 1)
        kwargs = {"use_cache": True, self.cache_kw: cache}

        def step():
            with torch.inference_mode():
                return self.model(input_ids=ids, **kwargs).logits

        def reset():
            extra = cache.get_seq_length() - context
            if extra > 0:
                cache.crop(-extra)  # negative = drop that many tokens, in every transformers 5.x

        self._held = [ids, cache]
        return step, reset

    def release(self) -> None:
        self._held = []


class _EngineBackend:
    """splitlab's ModelRunner over one KVPool sized for the whole sweep.

    Prefill: ``runner.prefill([(slot, ids, 0) for slot in range(B)])``. Decode: each timed
    step is ``runner.decode_step(slots, tokens, [C] * B)``, reading the C (random) K/V
    entries of each slot and rewriting position C every time.
    """

    name = "engine"

    def __init__(self, loaded, max_batch: int, max_len: int, seed: int):
        from splitlab.config import EngineConfig
        from splitlab.engine.kv import KVPool
        from splitlab.engine.runner import ModelRunner
        from splitlab.engine.weights import extract_arch, extract_weights

        self.loaded = loaded
        self.kv = KVPool.for_model(loaded, max_len, num_slots=max_batch)
        with torch.no_grad():  # random K/V, like the hf backend's cache: values do not change speed
            gen = torch.Generator(device=self.kv.device).manual_seed(seed)
            for t in self.kv.tensors():
                t.normal_(0.0, 1.0, generator=gen)
        m = loaded.model  # its q/k/v and gate/up become views of the fused tensors: held once
        self.runner = ModelRunner.for_config(extract_arch(m), extract_weights(m, share_storage=True), self.kv,
                                             EngineConfig(), max_batch=self.kv.num_slots)
        self.gen = torch.Generator(device="cpu").manual_seed(seed)

    def _ids(self, length: int) -> list[int]:
        return torch.randint(4, self.loaded.facts.vocab_size, (length,), generator=self.gen).tolist()

    def prefill(self, batch: int, length: int):
        chunks = [(slot, self._ids(length), 0) for slot in range(batch)]

        def step():
            return self.runner.prefill(chunks)

        return step, None

    def decode(self, batch: int, context: int):
        # Positions 0..C-1 of every slot already hold (random) K/V: the runner keeps no
        # per-slot state beyond the pool, so no untimed prefill is needed to reach context C.
        slots = list(range(batch))
        tokens = self._ids(batch)
        positions = [context] * batch

        def step():
            return self.runner.decode_step(slots, tokens, positions)

        return step, None

    def release(self) -> None:
        pass


def _make_backend(name: str, loaded, max_batch: int, max_len: int, lm_head: str, seed: int):
    if name == "hf":
        return _HFBackend(loaded, lm_head, seed)
    if lm_head != "last":
        raise ConfigError("the engine backend computes logits of the last prompt position only; use lm_head='last'")
    return _EngineBackend(loaded, max_batch, max_len, seed)


# ---- helpers ----------------------------------------------------------------------------

def _median_time(step: Callable[[], Any], sync: Callable[[], None], warmup: int, repeats: int,
                 reset: Callable[[], None] | None = None) -> float:
    """Median seconds of ``step()`` over ``repeats`` (after ``warmup``), synchronised around it."""
    return statistics.median(_times(step, sync, warmup, repeats, reset))


def _times(step: Callable[[], Any], sync: Callable[[], None], warmup: int, repeats: int,
           reset: Callable[[], None] | None = None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``step()`` (after ``warmup``), synchronised around it."""
    times = []
    for i in range(warmup + repeats):
        if reset is not None:
            reset()
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        t1 = time.perf_counter()
        if i >= warmup:
            times.append(t1 - t0)
    if reset is not None:
        reset()
    return times


def _sync_fn(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _forward_params(model) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _as_loaded(model):
    from splitlab.models import LoadedModel, load_model

    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, str):
        return load_model(model)
    raise ConfigError(f"profile_phases needs a LoadedModel or a model spec string, got {type(model).__name__}")


def _parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    from splitlab.models import _parse_dtype as parse

    return parse(str(dtype).replace("torch.", ""))


def _elem_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _progress(items: list, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False)


def _extra_columns(records: list[dict[str, Any]]) -> list[str]:
    extra: list[str] = []
    for rec in records:
        extra += [k for k in rec if k not in PROFILE_COLUMNS and k not in extra]
    return extra
