"""Requests and workloads: what arrives, when, and how long it asks to generate.

Builders (fixed batch, Poisson, Azure trace replay) live below the data types. Every
builder is seeded: the same arguments give the same workload.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from splitlab.errors import WorkloadError


@dataclasses.dataclass(frozen=True)
class Request:
    """One inference request.

    ``arrival_s`` is seconds after the start of the run; the engine does not see the request
    before then, and queueing delay counts in its TTFT.
    """

    id: int
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    arrival_s: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))
        if len(self.prompt_ids) == 0:
            raise WorkloadError(f"request {self.id} has an empty prompt; give at least one token")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise WorkloadError(
                f"request {self.id}: max_new_tokens must be a positive integer, got {self.max_new_tokens!r}"
            )
        if self.arrival_s < 0:
            raise WorkloadError(f"request {self.id}: arrival_s must be >= 0, got {self.arrival_s!r}")

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclasses.dataclass(frozen=True)
class Workload:
    """A named list of requests, sorted by arrival time."""

    name: str
    requests: tuple[Request, ...]

    def __post_init__(self) -> None:
        reqs = tuple(sorted(self.requests, key=lambda r: (r.arrival_s, r.id)))
        if not reqs:
            raise WorkloadError(f"workload {self.name!r} has no requests; give at least one")
        ids = [r.id for r in reqs]
        if len(set(ids)) != len(ids):
            raise WorkloadError(f"workload {self.name!r} has duplicate request ids; ids must be unique")
        object.__setattr__(self, "requests", reqs)

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(self.requests)

    @property
    def total_output_tokens(self) -> int:
        return sum(r.max_new_tokens for r in self.requests)

    def check_fits(self, max_positions: int) -> None:
        """Raise a WorkloadError if a request needs more positions than the model has."""
        for r in self.requests:
            need = r.prompt_len + r.max_new_tokens
            if need > max_positions:
                raise WorkloadError(
                    f"request {r.id} needs {need} positions (prompt {r.prompt_len} + "
                    f"{r.max_new_tokens} new) but the model's context is {max_positions}; "
                    "shorten the prompt or max_new_tokens, or cap lengths when building the workload"
                )


def from_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 arrivals_s: Sequence[float] | None = None, name: str = "prompts") -> Workload:
    """A workload from explicit token-id prompts (all arriving at 0 unless arrivals are given)."""
    n = len(prompts)
    news = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    arrivals = [0.0] * n if arrivals_s is None else list(arrivals_s)
    if len(news) != n or len(arrivals) != n:
        raise WorkloadError("prompts, max_new_tokens and arrivals_s must have the same length")
    return Workload(name, tuple(Request(i, tuple(p), news[i], float(arrivals[i])) for i, p in enumerate(prompts)))


# ---- builders ------------------------------------------------------------------------------

#: Ids below this are assumed special (pad/bos/eos/unk) when only a bare ``vocab_size`` is given.
RESERVED_LOW_IDS = 4


@dataclasses.dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts (prompt or output lengths); build it with a classmethod.

    - ``LengthDist.fixed(n)``: always ``n``.
    - ``LengthDist.uniform(lo, hi)``: integers uniform in ``[lo, hi]`` (both included).
    - ``LengthDist.lognormal(mean, sigma, lo, hi)``: ``exp(N(mu, sigma))`` rounded, with ``mu``
      chosen so that the unclipped distribution's mean is ``mean`` tokens, then clipped to
      ``[lo, hi]`` (real prompt and output lengths are long-tailed, roughly lognormal).
    """

    kind: str
    lo: int
    hi: int
    mean: float = 0.0
    sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "lognormal"):
            raise WorkloadError(f"unknown length distribution {self.kind!r}; accepted: fixed, uniform, lognormal")
        for name in ("lo", "hi"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise WorkloadError(f"length bounds must be positive integers, got {name}={value!r}")
            object.__setattr__(self, name, int(value))
        if self.lo > self.hi:
            raise WorkloadError(f"length bounds are reversed: lo={self.lo} > hi={self.hi}")
        if self.kind == "lognormal" and (not self.mean > 0 or not self.sigma > 0):
            raise WorkloadError(
                f"lognormal lengths need mean > 0 and sigma > 0, got mean={self.mean!r}, sigma={self.sigma!r}"
            )

    @classmethod
    def fixed(cls, n: int) -> "LengthDist":
        return cls("fixed", n, n)

    @classmethod
    def uniform(cls, lo: int, hi: int) -> "LengthDist":
        return cls("uniform", lo, hi)

    @classmethod
    def lognormal(cls, mean: float, sigma: float, lo: int = 1, hi: int = 4096) -> "LengthDist":
        return cls("lognormal", lo, hi, float(mean), float(sigma))

    @classmethod
    def coerce(cls, value: "int | LengthDist", what: str = "length") -> "LengthDist":
        """An int means ``fixed(int)``; a LengthDist passes through."""
        if isinstance(value, LengthDist):
            return value
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return cls.fixed(int(value))
        raise WorkloadError(f"{what} must be a positive int or a LengthDist, got {value!r}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` integer lengths drawn with ``rng``."""
        if self.kind == "fixed":
            return np.full(n, self.lo, dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(self.lo, self.hi + 1, size=n, dtype=np.int64)
        mu = math.log(self.mean) - self.sigma**2 / 2
        values = np.rint(rng.lognormal(mu, self.sigma, size=n)).astype(np.int64)
        return np.clip(values, self.lo, self.hi)

    def describe(self) -> str:
        if self.kind == "fixed":
            return str(self.lo)
        if self.kind == "uniform":
            return f"U[{self.lo},{self.hi}]"
        return f"LogN(mean={self.mean:g},sigma={self.sigma:g})[{self.lo},{self.hi}]"


def token_space(vocab_size: int | None = None, model=None) -> np.ndarray:
    """The ids synthetic prompts are drawn from: the vocabulary minus special tokens.

    With a loaded ``model``: ids below both the model's and the tokenizer's vocabulary size
    (so prompts stay decodable), minus every special / added token of the tokenizer. With a
    bare ``vocab_size``: ``[RESERVED_LOW_IDS, vocab_size)``.
    """
    if model is not None:
        facts = getattr(model, "facts", None)
        tok = getattr(model, "tokenizer", None)
        if facts is None:
            raise WorkloadError(f"model must be a splitlab LoadedModel (from load_model), got {type(model).__name__}")
        size = int(facts.vocab_size)
        if vocab_size is not None:
            size = min(size, int(vocab_size))
        if tok is not None:
            size = min(size, len(tok))
        mask = np.ones(size, dtype=bool)
        special: set[int] = set()
        if tok is not None:
            special.update(int(i) for i in getattr(tok, "all_special_ids", []) or [])
            special.update(int(i) for i in (getattr(tok, "added_tokens_decoder", None) or {}))
        special = {i for i in special if 0 <= i < size}
        mask[list(special)] = False
        ids = np.nonzero(mask)[0]
    elif vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) \
                or vocab_size <= RESERVED_LOW_IDS:
            raise WorkloadError(f"vocab_size must be an integer > {RESERVED_LOW_IDS}, got {vocab_size!r}")
        ids = np.arange(RESERVED_LOW_IDS, int(vocab_size))
    else:
        raise WorkloadError("give vocab_size=... or model=... so prompts can be synthesised from real token ids")
    if ids.size == 0:
        raise WorkloadError("the model's vocabulary has no non-special token ids to build prompts from")
    return ids


def _prompts(rng: np.random.Generator, space: np.ndarray, lengths: Sequence[int]) -> list[tuple[int, ...]]:
    return [tuple(int(t) for t in space[rng.integers(0, space.size, size=int(n))]) for n in lengths]


def _check_count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise WorkloadError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _max_positions(model) -> int | None:
    return int(model.facts.max_positions) if model is not None else None


def fixed_batch(n: int, prompt_len: "int | LengthDist" = 128, max_new_tokens: "int | LengthDist" = 32,
                vocab_size: int | None = None, model=None, seed: int = 0,
                name: str | None = None) -> Workload:
    """``n`` requests that all arrive at time 0 (an offline batch), prompts of random token ids.

    ``prompt_len`` / ``max_new_tokens`` are ints or ``LengthDist``. Prompts are drawn from
    ``token_space(vocab_size, model)``; the same arguments give the same workload.
    """
    n = _check_count(n, "n (number of requests)")
    plen = LengthDist.coerce(prompt_len, "prompt_len")
    olen = LengthDist.coerce(max_new_tokens, "max_new_tokens")
    space = token_space(vocab_size, model)
    rng = np.random.default_rng(seed)
    plens = plen.sample(rng, n)
    olens = olen.sample(rng, n)
    prompts = _prompts(rng, space, plens)
    name = name or f"fixed-n{n}-p{plen.describe()}-o{olen.describe()}-s{seed}"
    wl = Workload(name, tuple(Request(i, prompts[i], int(olens[i]), 0.0) for i in range(n)))
    if model is not None:
        wl.check_fits(_max_positions(model))
    return wl


def _poisson_arrivals(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    gaps = rng.exponential(1.0 / rate, size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """``n`` Poisson arrival times at ``rate``/s, the first at 0 (the same as ``poisson`` draws)."""
    n = _check_count(n, "n")
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating)) or not (rate > 0) \
            or not math.isfinite(rate):
        raise WorkloadError(f"rate must be a positive number of requests per second, got {rate!r}")
    return [float(a) for a in _poisson_arrivals(np.random.default_rng(seed), n, float(rate))]


def poisson(num_requests: int, rate: float, prompt_len: "int | LengthDist" = 128,
            output_len: "int | LengthDist" = 32, seed: int = 0, vocab_size: int | None = None,
            model=None, name: str | None = None) -> Workload:
    """Poisson arrivals at ``rate`` requests/s (exponential gaps; the first arrives at 0)."""
    num_requests = _check_count(num_requests, "num_requests")
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating)) or not (rate > 0) \
            or not math.isfinite(rate):
        raise WorkloadError(f"rate must be a positive number of requests per second, got {rate!r}")
    plen = LengthDist.coerce(prompt_len, "prompt_len")
    olen = LengthDist.coerce(output_len, "output_len")
    space = token_space(vocab_size, model)
    rng = np.random.default_rng(seed)
    arrivals = _poisson_arrivals(rng, num_requests, float(rate))
    plens = plen.sample(rng, num_requests)
    olens = olen.sample(rng, num_requests)
    prompts = _prompts(rng, space, plens)
    name = name or f"poisson-r{rate:g}-n{num_requests}-p{plen.describe()}-o{olen.describe()}-s{seed}"
    wl = Workload(name, tuple(
        Request(i, prompts[i], int(olens[i]), float(arrivals[i])) for i in range(num_requests)
    ))
    if model is not None:
        wl.check_fits(_max_positions(model))
    return wl


TRACE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
AZURE_TRACE_SOURCE = (
    "the Azure Public Dataset (AzureLLMInferenceDataset2023, github.com/Azure/AzurePublicDataset; "
    "CC-BY-4.0, cite Patel et al., 'Splitwise', ISCA 2024)"
)


def read_azure_trace(path: str | Path, limit: int | None = None):
    """Parse an Azure LLM inference trace CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``).

    Returns a pandas DataFrame with columns ``arrival_s`` (seconds since the earliest row),
    ``context_tokens`` and ``generated_tokens``, in file order, first ``limit`` rows only.
    Raises ``WorkloadError`` naming the file and row for anything it cannot read.
    """
    import pandas as pd

    path = Path(path).expanduser()
    if not path.is_file():
        raise WorkloadError(
            f"no trace file at {str(path)!r}; download AzureLLMInferenceTrace_code.csv (or _conv.csv) "
            f"from {AZURE_TRACE_SOURCE} and pass its path"
        )
    if limit is not None:
        limit = _check_count(limit, "limit")
    try:
        df = pd.read_csv(path, dtype=str, nrows=limit, skipinitialspace=True, keep_default_na=False,
                         index_col=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise WorkloadError(f"cannot parse trace {str(path)!r} as CSV: {str(exc).strip()[:300]}") from exc
    cols = [str(c).strip() for c in df.columns]
    missing = [c for c in TRACE_COLUMNS if c not in cols]
    extra = [c for c in cols if c not in TRACE_COLUMNS]
    if missing or extra:
        raise WorkloadError(
            f"trace {str(path)!r} has columns {cols}; expected exactly {list(TRACE_COLUMNS)}"
            + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra})" if extra else "")
        )
    df.columns = cols
    if len(df) == 0:
        raise WorkloadError(f"trace {str(path)!r} has a header but no rows")

    def bad(i: int, what: str, value) -> WorkloadError:
        # i is the 0-based data row; the header is line 1 of the file
        return WorkloadError(f"trace {str(path)!r}, row {i + 1} (line {i + 2}): {what}, got {value!r}")

    ts = pd.to_datetime(df["TIMESTAMP"].str.strip(), errors="coerce", format="mixed")
    nat = ts.isna().to_numpy().nonzero()[0]
    if nat.size:
        i = int(nat[0])
        raise bad(i, "TIMESTAMP is not a date-time such as '2023-11-16 18:17:03.9799600'", df["TIMESTAMP"].iloc[i])
    out = {}
    for col, key in (("ContextTokens", "context_tokens"), ("GeneratedTokens", "generated_tokens")):
        num = pd.to_numeric(df[col].str.strip(), errors="coerce")
        ok = num.notna() & (num == num.round()) & (num >= 0)
        badrows = (~ok).to_numpy().nonzero()[0]
        if badrows.size:
            i = int(badrows[0])
            raise bad(i, f"{col} must be a non-negative integer", df[col].iloc[i])
        out[key] = num.astype("int64").to_numpy()
    origin = ts.min()
    arrival = (ts - origin).dt.total_seconds().to_numpy()
    return pd.DataFrame({"arrival_s": arrival, **out})


def from_azure_trace(path: str | Path, rate_scale: float = 1.0, limit: int | None = None,
                     max_prompt_len: int | None = None, max_new_tokens: int | None = None,
                     max_total_len: int | None = None, seed: int = 0, vocab_size: int | None = None,
                     model=None, name: str | None = None) -> Workload:
    """Replay an Azure LLM inference trace: real arrival times and token counts, synthetic prompts.

    - arrival = seconds since the first (earliest) row / ``rate_scale`` (2.0 replays twice as fast);
    - ``limit``: only the first ``limit`` rows of the file;
    - lengths are capped so they fit: output to ``max_new_tokens``, prompt to ``max_prompt_len``,
      then prompt + output to ``max_total_len`` (default: the model's context) by shortening the
      prompt first (never below 1 token), then the output. A trace row with 0 generated tokens
      asks for 1 (every request generates at least one token);
    - prompts are seeded random ids from ``token_space(vocab_size, model)``, exactly as long as
      the (capped) ``ContextTokens``; the output length is forced (EOS ignored) to the (capped)
      ``GeneratedTokens``.

    The trace itself is not shipped: it is from {source}.
    """
    if isinstance(rate_scale, bool) or not isinstance(rate_scale, (int, float, np.floating)) \
            or not (rate_scale > 0) or not math.isfinite(rate_scale):
        raise WorkloadError(f"rate_scale must be a positive number, got {rate_scale!r}")
    caps = {"max_prompt_len": max_prompt_len, "max_new_tokens": max_new_tokens, "max_total_len": max_total_len}
    for key, value in caps.items():
        if value is not None:
            _check_count(value, key)
    if max_total_len is None and model is not None:
        max_total_len = _max_positions(model)
    if max_total_len is not None and max_total_len < 2:
        raise WorkloadError(f"max_total_len must be at least 2 (one prompt token, one output), got {max_total_len}")
    space = token_space(vocab_size, model)
    table = read_azure_trace(path, limit)
    rng = np.random.default_rng(seed)
    plens, olens = [], []
    for ctx, gen in zip(table["context_tokens"], table["generated_tokens"]):
        p, o = max(1, int(ctx)), max(1, int(gen))
        if max_new_tokens is not None:
            o = min(o, max_new_tokens)
        if max_prompt_len is not None:
            p = min(p, max_prompt_len)
        if max_total_len is not None and p + o > max_total_len:
            p = max(1, max_total_len - o)
            o = min(o, max_total_len - p)
        plens.append(p)
        olens.append(o)
    prompts = _prompts(rng, space, plens)
    arrivals = table["arrival_s"].to_numpy() / float(rate_scale)
    name = name or f"azure-{Path(path).stem}-x{rate_scale:g}-n{len(table)}-s{seed}"
    return Workload(name, tuple(
        Request(i, prompts[i], olens[i], float(arrivals[i])) for i in range(len(table))
    ))


from_azure_trace.__doc__ = (from_azure_trace.__doc__ or "").replace("{source}", AZURE_TRACE_SOURCE)
