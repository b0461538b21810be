"""Frozen configuration dataclasses that reject unknown keys and bad values."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, TypeVar

from splitlab.errors import ConfigError

T = TypeVar("T", bound="FrozenConfig")


@dataclasses.dataclass(frozen=True)
class FrozenConfig:
    """Base for config dataclasses: ``from_dict`` refuses keys the class does not know."""

    @classmethod
    def from_dict(cls: type[T], values: Mapping[str, Any]) -> T:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{cls.__name__} got unknown key(s) {unknown}; accepted keys: {sorted(known)}"
            )
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self: T, **changes: Any) -> T:
        return self.from_dict({**self.to_dict(), **changes})


@dataclasses.dataclass(frozen=True)
class SLO(FrozenConfig):
    """Latency objectives a request must meet to count towards goodput.

    ``ttft_s``: bound on time to first token (arrival -> first token), seconds.
    ``tpot_s``: bound on time per output token after the first, seconds.
    """

    ttft_s: float = 1.0
    tpot_s: float = 0.05

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"SLO.{name} must be a positive number of seconds, got {value!r}")


# prefill-attention backends of the engine ("auto": PyTorch's own choice)
SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
# decode-attention variants (splitlab.engine.kernels.DECODE_VARIANTS holds what each one is)
DECODE_VARIANT_NAMES = ("fused", "split", "fused-kernel", "fused-b64", "split-atomic", "split-b32", "fused-b64-s1")


@dataclasses.dataclass(frozen=True)
class EngineConfig(FrozenConfig):
    """Settings of the continuous-batching engine (``serial`` and ``chunked`` modes).

    ``max_seq_len``: positions per KV slot (prompt + output must fit).
    ``num_slots``: KV slots (sequences resident at once); None sizes the pool from free GPU
    memory (``kv_memory_fraction`` of it, or ``kv_budget_bytes``), capped at ``max_batch``;
    on CPU None means ``min(max_batch, 8)`` unless ``kv_budget_bytes`` is given.
    ``max_batch``: most sequences decoding at once (the largest CUDA-graph batch bucket).
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
    """

    max_seq_len: int = 2048
    num_slots: int | None = None
    max_batch: int = 64
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

    def __post_init__(self) -> None:
        def positive_int(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"EngineConfig.{name} must be a positive integer, got {value!r}")

        for name in ("max_seq_len", "max_batch", "token_budget", "chunk_size"):
            positive_int(name)
        positive_int("num_slots", allow_none=True)
        positive_int("kv_budget_bytes", allow_none=True)
        if self.chunk_size <= self.max_batch:
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
        for name in ("warmup", "gemv"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"EngineConfig.{name} must be True or False, got {getattr(self, name)!r}")


SPLIT_BACKENDS = ("streams", "processes", "mps", "green")


@dataclasses.dataclass(frozen=True)
class SplitConfig(FrozenConfig):
    """How the ``split`` mode's prefill worker and decode worker share one device.

    ``backend``:
      - ``"streams"``: one process, two threads; on CUDA each thread on its own stream (no SM
        partition: FACTS.md section 3 measured decode starving behind prefill GEMMs this way).
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
    stream priority (FACTS.md: priorities alone do not protect decode; kept on, harmless).
    ``poll_s``: how long a worker blocked on its queue waits before it re-checks arrivals
    and stop requests. A handoff or a freed slot wakes the waiting worker at once, so this
    is not a latency added to the handoff.
    ``event_flush_s``: ``processes`` / ``mps``: a child batches its events (step traces,
    tokens) to the parent at most this often; the parent only assembles them.
    ``ready_timeout_s``: seconds allowed to load the model, share it and warm up (CUDA-graph
    capture) before the run starts. ``stall_timeout_s``: a run fails (``WorkerError``) when
    no worker reported progress for this long after the last request arrived.
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

    def __post_init__(self) -> None:
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
