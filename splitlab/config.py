"""Frozen configuration dataclasses that reject unknown keys and bad values."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar, Mapping, Sequence, TypeVar

from splitlab.errors import ConfigError

T = TypeVar("T", bound="FrozenConfig")


@dataclasses.dataclass(frozen=True)
class FrozenConfig:
    """Base for config dataclasses: the constructor and ``from_dict`` refuse keys the class
    does not know with a ConfigError naming the accepted ones (a bare dataclass raises TypeError)."""

    def __new__(cls, *args: Any, **kwargs: Any):
        # runs before the dataclass __init__, so a wrong keyword never reaches its TypeError
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ConfigError(f"{cls.__name__} got unknown key(s) {unknown}; accepted keys: {sorted(names)}")
        if len(args) > len(names):
            raise ConfigError(f"{cls.__name__} takes at most {len(names)} positional values ({', '.join(names)}), "
                              f"got {len(args)}; pass them by name")
        twice = sorted(set(names[:len(args)]) & set(kwargs))
        if twice:
            raise ConfigError(f"{cls.__name__} got {twice} both by position and by name; give each once")
        return super().__new__(cls)

    @classmethod
    def from_dict(cls: type[T], values: Mapping[str, Any]) -> T:
        if not isinstance(values, Mapping):
            raise ConfigError(f"{cls.__name__}.from_dict needs a mapping of field names to values, got {values!r}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self: T, **changes: Any) -> T:
        return self.from_dict({**self.to_dict(), **changes})


@dataclasses.dataclass(frozen=True)
class SLO(FrozenConfig):
    """Latency bounds a request must meet, all of them, to count towards goodput.

    Every bound is in seconds; ``None`` leaves that metric unbounded.

    ``ttft_s``: time to first token (arrival -> first token).
    ``tpot_s``: time per output token after the first, (E2E - TTFT) / (tokens - 1): a
    request's MEAN gap, blind to one long stall between two tokens.
    ``itl_s``: the inter-token gaps of each request. By default (``itl_quantile`` 1.0) the
    request's LARGEST gap must be within it: every gap is bounded. ``itl_quantile`` q < 1
    judges the q-quantile of the request's own gaps instead (numpy's linear interpolation,
    as the ``itl_p99_s`` column of ``Run.requests``), e.g. 0.99 lets about 1% of them run over.
    ``e2e_s``: end-to-end latency (arrival -> last token).

    A one-token request has no gaps and no TPOT: it is judged on TTFT and E2E only. The
    defaults (TTFT 1 s, TPOT 50 ms) are the SLO every recorded run was scored with.
    ``SLO.from_vllm("ttft:1000 tpot:50 itl:30 e2el:5000")`` takes vLLM's ``--goodput``
    syntax (milliseconds).
    """

    ttft_s: float | None = 1.0
    tpot_s: float | None = 0.05
    itl_s: float | None = None
    itl_quantile: float = 1.0
    e2e_s: float | None = None

    BOUNDS: ClassVar[tuple[str, ...]] = ("ttft_s", "tpot_s", "itl_s", "e2e_s")
    # vLLM's --goodput names (its own: ttft, tpot, e2el; itl is splitlab's addition)
    VLLM_NAMES: ClassVar[dict[str, str]] = {"ttft": "ttft_s", "tpot": "tpot_s", "itl": "itl_s", "e2el": "e2e_s"}

    def __post_init__(self) -> None:
        for name in self.BOUNDS:
            value = getattr(self, name)
            if value is None:
                continue
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"SLO.{name} must be a positive, finite number of seconds "
                                  f"(or None to leave it unbounded), got {value!r}")
            object.__setattr__(self, name, float(value))
        if all(getattr(self, name) is None for name in self.BOUNDS):
            raise ConfigError("an SLO needs at least one bound: give ttft_s, tpot_s, itl_s or e2e_s (seconds)")
        q = self.itl_quantile
        if not _is_real(q) or not 0 < q <= 1:
            raise ConfigError(f"SLO.itl_quantile must be in (0, 1] (1 = the largest gap of a request, "
                              f"0.99 = its p99 gap), got {q!r}")
        object.__setattr__(self, "itl_quantile", float(q))
        if q != 1 and self.itl_s is None:
            raise ConfigError(f"SLO.itl_quantile={q!r} applies to a gap bound: give itl_s too, "
                              "or leave itl_quantile at 1.0")

    @classmethod
    def from_vllm(cls, spec: str | Sequence[str], itl_quantile: float = 1.0) -> "SLO":
        """The SLO of vLLM's ``bench serve --goodput`` syntax: ``"ttft:1000 tpot:50 e2el:5000"``.

        Values are milliseconds; ``spec`` is one string (tokens separated by spaces or commas)
        or a list of tokens. Only the named bounds apply (the others are None), as in vLLM.
        Names: ``ttft``, ``tpot``, ``e2el`` (vLLM's) and ``itl`` (every gap, or the
        ``itl_quantile`` of a request's gaps).
        """
        if isinstance(spec, str):
            tokens = spec.replace(",", " ").split()
        elif isinstance(spec, Sequence) and all(isinstance(t, str) for t in spec):
            tokens = [t for item in spec for t in item.replace(",", " ").split()]
        else:
            raise ConfigError(f"SLO.from_vllm takes a string like 'ttft:1000 tpot:50' or a list of such "
                              f"tokens, got {spec!r}")
        names = ", ".join(f"{n}:MS" for n in cls.VLLM_NAMES)
        if not tokens:
            raise ConfigError(f"an empty goodput SLO; give at least one of {names} (milliseconds)")
        bounds: dict[str, float] = {}
        for token in tokens:
            name, sep, text = token.partition(":")
            if not sep or name not in cls.VLLM_NAMES:
                raise ConfigError(f"goodput SLO token {token!r} is not NAME:MILLISECONDS; names: {names}")
            if cls.VLLM_NAMES[name] in bounds:
                raise ConfigError(f"goodput SLO names {name!r} twice; give each bound once")
            try:
                ms = float(text)
            except ValueError:
                ms = math.nan
            if not math.isfinite(ms) or ms <= 0:
                raise ConfigError(f"goodput SLO token {token!r}: the bound must be a positive number of "
                                  "milliseconds, e.g. ttft:1000")
            bounds[cls.VLLM_NAMES[name]] = ms / 1000.0
        return cls(**{name: bounds.get(name) for name in cls.BOUNDS}, itl_quantile=itl_quantile)

    def scaled(self, factor: float) -> "SLO":
        """This SLO with every bound multiplied by ``factor`` (DistServe's SLO scale)."""
        if not _is_real(factor) or not math.isfinite(factor) or factor <= 0:
            raise ConfigError(f"an SLO scale must be a positive, finite number, got {factor!r}")
        return self.replace(**{n: getattr(self, n) * factor for n in self.BOUNDS if getattr(self, n) is not None})

    def describe(self) -> str:
        """The bounds in words, e.g. ``"TTFT ≤ 1 s, every gap ≤ 30 ms"``."""
        parts = []
        for name, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", None), ("e2e_s", "E2E")):
            value = getattr(self, name)
            if value is None:
                continue
            if label is None:
                label = "every gap" if self.itl_quantile == 1 else f"p{self.itl_quantile * 100:.4g} gap"
            parts.append(f"{label} ≤ {_duration(value)}")
        return ", ".join(parts)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _duration(seconds: float) -> str:
    """``0.03`` -> ``"30 ms"``, ``2.0`` -> ``"2 s"``."""
    return f"{seconds * 1000:.4g} ms" if seconds < 1 else f"{seconds:.4g} s"


# prefill-attention backends of the engine ("auto": PyTorch's own choice)
SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
# decode-attention variants (splitlab.engine.kernels.DECODE_VARIANTS holds what each one is)
DECODE_VARIANT_NAMES = ("fused", "split", "fused-kernel", "fused-b64", "split-atomic", "split-b32", "fused-b64-s1")
# how the split-K decode attention combines its partials (splitlab.engine.kernels.variants)
DECODE_COMBINE_MODES = ("atomic", "kernel")
# the largest page of a paged KV pool (positions)
MAX_KV_BLOCK_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class EngineConfig(FrozenConfig):
    """Settings of the continuous-batching engine (``serial`` and ``chunked`` modes).

    ``max_seq_len``: positions per KV slot (prompt + output must fit).
    ``num_slots``: KV slots (sequences resident at once); None sizes the pool from free GPU
    memory, capped at ``max_batch`` (256 when it is None): ``kv_budget_bytes`` if given, else
    ``kv_memory_fraction`` of the memory free after the weights less a reserve for the
    activations of the largest prefill step and the decode graph pools (estimates, stated in
    ``splitlab.engine.capacity.Reserve``; ``splitlab env --model M`` prints them); on CPU
    None means ``min(max_batch, 8)`` unless ``kv_budget_bytes`` is given.
    ``max_batch``: most sequences decoding at once (the largest CUDA-graph batch bucket).
    None derives it from the pool built: as many sequences as it holds at
    ``min(max_seq_len, 2048)`` positions each (a slot pool: its slots), at most 256 and below
    ``chunk_size``, at least 1 (``splitlab.engine.capacity.decode_batch_limit``).
    ``token_budget``: ``serial`` mode, most prompt tokens in one prefill step (a single
    prompt longer than this still runs alone).
    ``chunk_size``: ``chunked`` mode, most tokens in one step, decode tokens included
    (Sarathi-Serve's token budget); must exceed ``max_batch`` so a step always has room
    for a prompt chunk beside a full decode batch. How to choose it: every step that carries
    a prompt chunk is an eager forward (no CUDA graph) that re-reads all the weights and
    pays its kernel launches from Python, so a chunk must be large enough for its GEMMs to
    be compute-bound AND for that fixed cost to be a small part of the step: several times
    the GPU's ridge point in tokens (H200, bf16: ~180 FLOP/byte -> a few hundred tokens is
    the bare minimum) and well above ``max_batch`` (with 64 decode rows a 512 budget leaves
    448 prompt tokens). For an 8B model on an H200, 1024-2048 is the range to start from;
    a smaller chunk lowers the decode stall a prompt causes (TPOT) and costs throughput and
    TTFT. ``benchmarks/engine_floor.py`` sweeps 512/1024/2048 on its Poisson workload and
    reports each. Steps with no prompt chunk replay the decode CUDA graph in both modes.
    The default 512 suits small models and CPU runs.
    ``cuda_graphs``: replay decode steps as CUDA graphs; None = on when the model is on CUDA.
    ``kernels``: ``"triton"`` (fused RMSNorm, RoPE + KV write, SiLU-mul and split-K decode
    attention), ``"torch"`` (plain PyTorch ops, the CPU path), or ``"auto"`` (Triton on
    CUDA when it imports, else torch).
    ``gemv``: decode batches of at most 4 rows run their linear layers through a Triton GEMV
    kernel (tuned per weight shape at start-up) instead of cuBLAS; off by default until the
    GPU benchmark shows it faster (``benchmarks/engine_floor.py`` measures both).
    ``warmup``: run one throw-away step (and capture graphs) before the clock starts.
    ``sdpa_backend``: SDPA backend of prompt-chunk attention: ``"auto"`` (PyTorch's choice)
    or ``"flash"`` / ``"cudnn"`` / ``"efficient"`` / ``"math"`` (see ``ModelRunner``);
    ``benchmarks/engine_floor.py`` times each on the prefill shapes.
    ``decode_variant``: the decode attention variant (``ModelRunner``): ``"auto"`` times the
    candidates at warm-up on CUDA and keeps the fastest; a name of ``DECODE_VARIANT_NAMES``
    (or ``"small:large"``, one per batch class) fixes it, e.g. to reuse an earlier run's choice.
    ``decode_combine``: how the Triton split-K decode attention combines its partial results:
    ``"atomic"`` (the last program of each row and KV head combines them, in the same launch;
    each decode variant may choose) or ``"kernel"`` (a second launch, for every variant: the
    fallback if the in-kernel combine ever misbehaves on a GPU).
    ``kv_block_size``: None keeps the slot pool (one ``max_seq_len`` row per sequence); a
    power of two (16, 32 or 64 are the usual sizes) makes the KV pool paged: pages of that
    many positions, each sequence holding a block table of the pages it fills
    (``splitlab.engine.kv.PagedKVPool``; the scheduler admits by free pages and preempts the
    newest sequence when the pool runs out, see ``splitlab.engine.scheduler``).
    ``num_pages``: pages of a paged pool; None sizes it as ``num_slots`` None does (from the
    budget, the free GPU memory, or on CPU the memory of ``min(max_batch, 8)`` full slots),
    capped at ``max_batch`` (256 when None) full-length sequences' pages.
    ``kv_prefix_cache``: a paged pool keeps the full blocks of every fill by content, and a
    new request whose prompt starts with cached blocks shares their pages instead of
    computing them (``splitlab.engine.kv.PageAllocator``; its hit rate is a scheduler counter).
    """

    max_seq_len: int = 2048
    num_slots: int | None = None
    max_batch: int | None = 64
    token_budget: int = 8192
    chunk_size: int = 512
    cuda_graphs: bool | None = None
    kv_memory_fraction: float = 0.9
    kv_budget_bytes: int | None = None
    kernels: str = "auto"
    gemv: bool = False
    warmup: bool = True
    sdpa_backend: str = "auto"
    decode_variant: str = "auto"
    decode_combine: str = "atomic"
    kv_block_size: int | None = None
    num_pages: int | None = None
    kv_prefix_cache: bool = False

    def __post_init__(self) -> None:
        def positive_int(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"EngineConfig.{name} must be a positive integer, got {value!r}")

        for name in ("max_seq_len", "token_budget", "chunk_size"):
            positive_int(name)
        for name in ("max_batch", "num_slots", "kv_budget_bytes"):
            positive_int(name, allow_none=True)
        if self.max_batch is not None and self.chunk_size <= self.max_batch:
            raise ConfigError(
                f"EngineConfig.chunk_size ({self.chunk_size}) must be larger than max_batch "
                f"({self.max_batch}) so a chunked step has room for prompt tokens beside a full "
                "decode batch; raise chunk_size or lower max_batch"
            )
        frac = self.kv_memory_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
            raise ConfigError(f"EngineConfig.kv_memory_fraction must be in (0, 1], got {frac!r}")
        if self.cuda_graphs not in (None, True, False):
            raise ConfigError(f"EngineConfig.cuda_graphs must be True, False or None (auto), got {self.cuda_graphs!r}")
        if self.kernels not in ("auto", "triton", "torch"):
            raise ConfigError(f"EngineConfig.kernels must be 'auto', 'triton' or 'torch', got {self.kernels!r}")
        if self.sdpa_backend not in SDPA_BACKENDS:
            raise ConfigError(f"EngineConfig.sdpa_backend must be one of {', '.join(SDPA_BACKENDS)}; "
                              f"got {self.sdpa_backend!r}")
        parts = self.decode_variant.split(":") if isinstance(self.decode_variant, str) else [None]
        if not (self.decode_variant == "auto" or (len(parts) in (1, 2) and all(p in DECODE_VARIANT_NAMES
                                                                                for p in parts))):
            raise ConfigError(f"EngineConfig.decode_variant must be 'auto', one of {', '.join(DECODE_VARIANT_NAMES)} "
                              f"or 'small:large' of those; got {self.decode_variant!r}")
        if self.decode_combine not in DECODE_COMBINE_MODES:
            raise ConfigError(f"EngineConfig.decode_combine must be one of {', '.join(DECODE_COMBINE_MODES)}; "
                              f"got {self.decode_combine!r}")
        for name in ("warmup", "gemv"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"EngineConfig.{name} must be True or False, got {getattr(self, name)!r}")
        self._check_paging(positive_int)

    def _check_paging(self, positive_int) -> None:
        positive_int("kv_block_size", allow_none=True)
        positive_int("num_pages", allow_none=True)
        if not isinstance(self.kv_prefix_cache, bool):
            raise ConfigError(f"EngineConfig.kv_prefix_cache must be True or False, got {self.kv_prefix_cache!r}")
        block = self.kv_block_size
        if block is None:
            for name in ("num_pages", "kv_prefix_cache"):
                if getattr(self, name):
                    raise ConfigError(f"EngineConfig.{name} applies to a paged KV pool: give kv_block_size too "
                                      "(e.g. 16), or leave it out for the slot pool")
            return
        if block & (block - 1) or block > MAX_KV_BLOCK_SIZE:
            raise ConfigError(f"EngineConfig.kv_block_size must be a power of two up to {MAX_KV_BLOCK_SIZE} "
                              f"(16, 32 or 64 are usual), got {block!r}")
        if self.num_slots is not None:
            raise ConfigError("EngineConfig.num_slots sizes the slot pool; a paged pool (kv_block_size) is sized "
                              "by num_pages: give num_pages instead")


SPLIT_BACKENDS = ("streams", "processes", "mps", "green")


@dataclasses.dataclass(frozen=True)
class SplitConfig(FrozenConfig):
    """How the ``split`` mode's prefill worker and decode worker share one device.

    ``backend``:
      - ``"streams"``: one process, two threads; on CUDA each thread on its own stream (no SM
        partition: co-running decode starves behind prefill GEMMs this way; see the
        ``split-streams`` rows of ``results/colocation_h200.json``).
      - ``"processes"``: two spawned processes, time-sliced by the driver (no MPS).
      - ``"mps"``: the same two processes as clients of a private MPS daemon, each with its
        own ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (``prefill_share`` / ``decode_share``).
      - ``"green"``: one process, two threads, each on a stream of its own green context;
        the two contexts hold DISJOINT sets of SMs (``prefill_sms`` + the rest).
    ``prefill_share`` / ``decode_share``: ``mps`` only, percent of the SMs each process may
    use (1..100; the two may sum to more than 100: they are caps, not a partition). ``None``
    takes the defaults ``DEFAULT_PREFILL_SHARE`` / ``DEFAULT_DECODE_SHARE`` = 60 / 40, the
    choice of the SM-share sweep of ``benchmarks/colocation.py`` on an H200
    (``results/colocation_h200.json``, Llama-3.1-8B shapes, Poisson at 21 req/s): goodput
    within 5% of the best share (100 / 100 had 4% more) at the lowest decode stall; 100 / 100
    slowed co-running decode steps 2.4x (p99 ITL 38 ms against 16 ms), 30 / 70 starved
    prefill (TTFT p50 1.4 s at 16 req/s), 70 / 30 slowed decode so that sequences held their
    KV slots longer and new requests queued (a third missed the TTFT bound).
    ``prefill_sms``: ``green`` only, SMs of the prefill context (the driver rounds it up to
    its granularity, multiples of 8 on Hopper); the decode context gets every other SM.
    ``None``: half the device's SMs, rounded down to the granularity.
    ``high_priority_decode``: ``streams`` / ``green``: the decode stream gets the highest
    stream priority (priorities alone do not protect decode; kept on, harmless).
    ``poll_s``: how long a worker blocked on its queue waits before it re-checks arrivals
    and stop requests. A handoff or a freed slot wakes the waiting worker at once, so this
    is not a latency added to the handoff.
    ``event_flush_s``: no effect any more (the online children of ``processes`` / ``mps``
    send one message per step); kept so that run files which record it still load.
    ``ready_timeout_s``: seconds allowed to load the model, share it and warm up (CUDA-graph
    capture) before the run starts. ``stall_timeout_s``: a run fails (``WorkerError``) when
    no worker reported progress for this long after the last request arrived.
    ``sm_policy``: how the SMs follow the load (``splitlab.modes.split.policy``): ``"static"``
    (one split, above); ``"table"`` (decode SMs from the decode batch) or ``"slo"`` (the
    fewest decode SMs whose predicted step meets ``gap_s``) choose per step among green
    partitions of ``decode_sm_choices`` decode SMs (plus the whole GPU when one side is
    idle), predicting from the measured ``sm_profile`` (a JSON file of
    ``benchmarks/sm_profile.py``). ``backend="green"`` partitions for real; under
    ``backend="streams"`` the policy decides and records every step but nothing is
    partitioned (a CPU check of the decisions).
    ``prefill_layer_group``: an adaptive ``sm_policy`` asks again every this many layers of a
    prefill, so a re-partition can land inside a long prompt (None: once per prefill step).
    """

    DEFAULT_PREFILL_SHARE: ClassVar[float] = 60
    DEFAULT_DECODE_SHARE: ClassVar[float] = 40

    backend: str = "streams"
    prefill_share: float | None = None
    decode_share: float | None = None
    prefill_sms: int | None = None
    high_priority_decode: bool = True
    poll_s: float = 0.02
    event_flush_s: float = 0.05
    ready_timeout_s: float = 900.0
    stall_timeout_s: float = 600.0
    sm_policy: str = "static"
    decode_sm_choices: tuple[int, ...] = (16, 32, 48, 64, 96)
    sm_profile: str | None = None
    gap_s: float | None = None
    prefill_layer_group: int | None = 8

    def __post_init__(self) -> None:
        self._check_sm_policy()
        if self.backend not in SPLIT_BACKENDS:
            raise ConfigError(f"SplitConfig.backend must be one of {', '.join(SPLIT_BACKENDS)}; got {self.backend!r}")
        for name in ("prefill_share", "decode_share"):
            value = getattr(self, name)
            if value is None:
                continue
            if self.backend != "mps":
                raise ConfigError(
                    f"SplitConfig.{name} is an MPS SM percentage and applies to backend='mps' only "
                    f"(got backend={self.backend!r}); for green contexts give prefill_sms"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 100:
                raise ConfigError(f"SplitConfig.{name} must be a percentage in [1, 100], got {value!r}")
        if self.backend == "mps":
            if self.prefill_share is None:
                object.__setattr__(self, "prefill_share", self.DEFAULT_PREFILL_SHARE)
            if self.decode_share is None:
                object.__setattr__(self, "decode_share", self.DEFAULT_DECODE_SHARE)
        if self.prefill_sms is not None:
            if self.backend != "green":
                raise ConfigError(
                    f"SplitConfig.prefill_sms applies to backend='green' only (got backend={self.backend!r}); "
                    "for MPS give prefill_share / decode_share"
                )
            if isinstance(self.prefill_sms, bool) or not isinstance(self.prefill_sms, int) or self.prefill_sms < 1:
                raise ConfigError(f"SplitConfig.prefill_sms must be a positive integer, got {self.prefill_sms!r}")
        if not isinstance(self.high_priority_decode, bool):
            raise ConfigError(f"SplitConfig.high_priority_decode must be True or False, got {self.high_priority_decode!r}")
        for name in ("poll_s", "event_flush_s", "ready_timeout_s", "stall_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"SplitConfig.{name} must be a positive number of seconds, got {value!r}")

    def _check_sm_policy(self) -> None:
        policies = ("static", "table", "slo")
        if self.sm_policy not in policies:
            raise ConfigError(f"SplitConfig.sm_policy must be one of {', '.join(policies)}; got {self.sm_policy!r}")
        group = self.prefill_layer_group
        if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
            raise ConfigError(f"SplitConfig.prefill_layer_group must be a positive number of layers or None, "
                              f"got {group!r}")
        if self.sm_policy == "static":
            return
        if self.backend not in ("green", "streams"):
            raise ConfigError(f"sm_policy={self.sm_policy!r} re-partitions green contexts per step: use "
                              f"backend='green' (or 'streams' to check the decisions without partitions); "
                              f"backend={self.backend!r} keeps one split")
        if self.prefill_sms is not None:
            raise ConfigError("prefill_sms fixes one split; an adaptive sm_policy chooses among decode_sm_choices")
        choices = self.decode_sm_choices
        if (isinstance(choices, (str, bytes)) or not isinstance(choices, (tuple, list)) or not choices
                or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in choices)):
            raise ConfigError(f"SplitConfig.decode_sm_choices must be positive SM counts, got {choices!r}")
        object.__setattr__(self, "decode_sm_choices", tuple(sorted(set(choices))))
        if not isinstance(self.sm_profile, str) or not self.sm_profile:
            raise ConfigError(f"sm_policy={self.sm_policy!r} predicts from a measured SM profile: give "
                              "sm_profile='results/sm_profile_h200.json' (or measure one: benchmarks/sm_profile.py)")
        gap = self.gap_s
        if gap is not None and (isinstance(gap, bool) or not isinstance(gap, (int, float)) or not 0 < gap < 10):
            raise ConfigError(f"SplitConfig.gap_s must be a token-gap bound in seconds (0, 10), got {gap!r}")
        if self.sm_policy == "slo" and gap is None:
            raise ConfigError("sm_policy='slo' needs the gap bound it keeps decode steps under: gap_s=0.03, say")


@dataclasses.dataclass(frozen=True)
class RunConfig(FrozenConfig):
    """What a run was made with and ran on: every mode records one in ``Run.config``.

    ``mode``. ``backend``: split's backend; replicas' engine (``"serial+mps"`` under MPS);
    None for the one-worker modes. ``prefill_share`` / ``decode_share``: MPS SM percentages.
    ``prefill_sms`` / ``decode_sms``: the SMs the driver gave each green context.
    ``replicas`` / ``replica_engine``: replicas' count and engine. ``mps``: the workers were
    clients of a private MPS daemon; ``mps_daemon``: what the daemon reported about them.
    ``green``: the green partition. ``batch_size``: the static batch of ``generate()``.
    ``engine`` / ``split``: the configs the run was given. ``slo``: the SLO it is judged by.
    ``num_requests`` / ``rate``: the workload's size and arrival rate (None without one; the
    workload's name is ``Run.workload``). ``session_run``: which run of a session this was.
    ``effective``: what the engine really ran with (its runner's settings, as
    ``splitlab.modes.common.worker_facts`` reads them); ``workers``: the same per worker,
    for the modes with several. ``model_facts``: the model's shapes. ``extra``: what an
    older record held that has no field here.
    """

    mode: str
    backend: str | None = None
    prefill_share: float | None = None
    decode_share: float | None = None
    prefill_sms: int | None = None
    decode_sms: int | None = None
    replicas: int | None = None
    replica_engine: str | None = None
    mps: bool = False
    mps_daemon: dict[str, Any] | None = None
    green: dict[str, Any] | None = None
    batch_size: int | None = None
    engine: EngineConfig | None = None
    split: SplitConfig | None = None
    slo: SLO | None = None
    num_requests: int | None = None
    rate: float | None = None
    session_run: int | None = None
    effective: dict[str, Any] = dataclasses.field(default_factory=dict)
    workers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    model_facts: dict[str, Any] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    NESTED: ClassVar[dict[str, type]] = {"engine": EngineConfig, "split": SplitConfig, "slo": SLO}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RunConfig":
        """The inverse of ``to_dict`` (the nested configs come back as their classes)."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"RunConfig.from_dict needs a mapping of field names to values, got {values!r}")
        values = dict(values)
        for key, kind in cls.NESTED.items():
            if isinstance(values.get(key), Mapping):
                values[key] = kind.from_dict(values[key])
        return cls(**values)

    @classmethod
    def from_legacy(cls, old: Mapping[str, Any], mode: str, workload: str, num_requests: int | None = None
                    ) -> "RunConfig":
        """A run config from the untyped dict older runs recorded (run format
        ``splitlab.run/1``), whose keys depended on the mode; keys with no field here are kept
        in ``extra``. Such records held no arrival rate: it is read from the name their
        workload builders gave (``poisson-r21.2-n160`` -> 21.2)."""
        import re

        left = {k: v for k, v in old.items() if v is not None}  # a None said nothing
        take = left.pop
        out: dict[str, Any] = {"mode": take("mode", mode), "num_requests": num_requests}
        for key in ("backend", "prefill_share", "decode_share", "prefill_sms", "decode_sms", "replicas",
                    "batch_size", "session_run", "effective", "green", "mps_daemon"):
            if left.get(key) is not None:
                out[key] = take(key)
        # hf-generate's own "warmup" is not an engine setting
        engine_keys = {f.name for f in dataclasses.fields(EngineConfig)} & set(left) if out["mode"] != "hf-generate" \
            else set()
        out["engine"] = _legacy_part(EngineConfig, {k: take(k) for k in engine_keys}, left, "engine")
        out["split"] = _legacy_part(SplitConfig, take("split", None), left, "split")
        out["slo"] = _legacy_part(SLO, take("slo", None), left, "slo")
        mps = take("mps", None)
        if isinstance(mps, Mapping):  # split recorded the daemon's report under "mps"
            out["mps_daemon"], out["mps"] = dict(mps), True
        elif isinstance(mps, bool):
            out["mps"] = mps
        if out["mode"] == "replicas":
            out["replica_engine"] = take("engine", None)
            out["workers"] = {f"replica-{i}": dict(p) for i, p in enumerate(take("per_replica", []) or [])}
        if out["mode"] == "split" and out.get("backend") == "mps":
            out["mps"] = True
        facts = {k: take(k) for k in ("device", "dtype", "warmup") if k in left}
        if facts:  # hf-generate and replicas kept these at the top
            out["effective"] = {**facts, **out.get("effective", {})}
        out["model_facts"] = take("facts", None)
        rate = take("rate", None)
        if rate is None:
            m = re.search(r"(?:^|[-_])(?:rate|r)[=_]?(\d+(?:\.\d+)?)(?=$|[-_])", str(workload))
            rate = float(m.group(1)) if m else None
        out["rate"] = rate
        return cls(**out, extra=left)


def _legacy_part(kind: type, values: Any, left: dict[str, Any], key: str):
    """``kind.from_dict(values)``, or None (the values kept in ``left[key]``) when an old
    record's values are not a valid ``kind`` any more."""
    if not values:
        return None
    try:
        return kind.from_dict(values)
    except ConfigError:
        left[key] = values
        return None
