"""Requests and workloads: what arrives, when, and how long it asks to generate.

Builders (fixed batch, Poisson, Azure trace replay) live below the data types. Every
builder is seeded: the same arguments give the same workload.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from splitlab.errors import WorkloadError

#: Most requests one builder makes (fixed_batch, poisson, a trace replay). Beyond this a
#: workload takes minutes to build and gigabytes to hold before the run even starts; the
#: public Azure traces have 8,819 (code) and 19,366 (conversation) rows.
MAX_REQUESTS = 100_000
#: Most tokens one prompt or one output may ask for (2**20, above every model's context).
MAX_TOKENS = 1 << 20
#: Most prompt tokens one synthetic workload may hold in all (2**25: ~1.2 GB as Python ints).
MAX_WORKLOAD_TOKENS = 1 << 25
#: Latest arrival a request may have, seconds after the start (a week): a later one makes
#: the run wait that long (a rate or trace speed-up in the wrong unit, a corrupt timestamp).
MAX_ARRIVAL_S = 7 * 24 * 3600.0


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _token_ids(rid, prompt_ids) -> tuple[int, ...]:
    """``prompt_ids`` as a tuple of Python ints; a float, bool or non-number id is refused."""
    try:
        ids = tuple(prompt_ids)
    except TypeError:
        raise WorkloadError(f"request {rid}: prompt_ids must be a sequence of token ids, got {prompt_ids!r}; "
                            "from_prompts takes a list of prompts, each a list of ids ([[5, 6, 7]])") from None
    if all(type(t) is int for t in ids):  # the common case, kept fast
        return ids
    out = []
    for pos, t in enumerate(ids):
        try:
            if isinstance(t, (bool, np.bool_)):
                raise TypeError
            out.append(operator.index(t))  # ints, numpy and 0-d integer tensors; never a float
        except TypeError:
            raise WorkloadError(f"request {rid}: token id at position {pos} must be an integer, got {t!r}") from None
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Request:
    """One inference request.

    ``arrival_s`` is seconds after the start of the run; the engine does not see the request
    before then, and queueing delay counts in its TTFT. It must be finite, >= 0 and at most
    ``MAX_ARRIVAL_S``.
    """

    id: int
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    arrival_s: float = 0.0

    def __post_init__(self) -> None:
        if not _is_int(self.id) or self.id < 0:
            raise WorkloadError(f"request id must be a non-negative integer, got {self.id!r}")
        object.__setattr__(self, "id", int(self.id))
        object.__setattr__(self, "prompt_ids", _token_ids(self.id, self.prompt_ids))
        if len(self.prompt_ids) == 0:
            raise WorkloadError(f"request {self.id} has an empty prompt; give at least one token")
        if len(self.prompt_ids) > MAX_TOKENS:
            raise WorkloadError(f"request {self.id} has a prompt of {len(self.prompt_ids)} tokens; "
                                f"at most MAX_TOKENS = {MAX_TOKENS} are accepted")
        n = self.max_new_tokens
        if not _is_int(n) or not 0 < n <= MAX_TOKENS:
            raise WorkloadError(
                f"request {self.id}: max_new_tokens must be a positive integer (at most {MAX_TOKENS}), got {n!r}"
            )
        object.__setattr__(self, "max_new_tokens", int(n))
        t = self.arrival_s
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            raise WorkloadError(f"request {self.id}: arrival_s must be a finite number of seconds >= 0, got {t!r}")
        if t > MAX_ARRIVAL_S:
            raise WorkloadError(
                f"request {self.id}: arrival_s is {float(t):.4g} s, later than MAX_ARRIVAL_S = {MAX_ARRIVAL_S:g} s "
                "(a week) after the start; raise the rate or the trace speed-up (rate_scale)"
            )
        object.__setattr__(self, "arrival_s", float(t))

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclasses.dataclass(frozen=True)
class Workload:
    """A named list of requests, sorted by arrival time."""

    name: str
    requests: tuple[Request, ...]
    # requests/s of the arrival process the builder drew (``poisson``); None for a batch or a
    # trace replay. Runs record it (``RunConfig.rate``) so results are selected by rate.
    rate: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise WorkloadError(f"workload name must be a string, got {self.name!r}")
        try:
            given = tuple(self.requests)
        except TypeError:
            raise WorkloadError(f"workload {self.name!r}: requests must be a sequence of Request, "
                                f"got {self.requests!r}") from None
        stray = next((r for r in given if not isinstance(r, Request)), None)
        if stray is not None:
            raise WorkloadError(f"workload {self.name!r}: every request must be a splitlab Request, got {stray!r}")
        reqs = tuple(sorted(given, key=lambda r: (r.arrival_s, r.id)))
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


def _per_request(value, n: int, what: str) -> list:
    """One scalar for every request, or a sequence of ``n`` values (Request judges each)."""
    if isinstance(value, (str, bytes)):
        return [value] * n
    try:
        values = list(value)
    except TypeError:  # a scalar (0-d arrays and tensors too)
        return [value] * n
    if len(values) != n:
        raise WorkloadError(f"{what} has {len(values)} values for {n} prompts; give one per prompt (or one for all)")
    return values


def from_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 arrivals_s: Sequence[float] | None = None, name: str = "prompts") -> Workload:
    """A workload from explicit token-id prompts (all arriving at 0 unless arrivals are given)."""
    try:
        prompts = list(prompts)
    except TypeError:
        raise WorkloadError(f"prompts must be a list of prompts, each a list of token ids; got {prompts!r}") from None
    n = len(prompts)
    news = _per_request(max_new_tokens, n, "max_new_tokens")
    arrivals = [0.0] * n if arrivals_s is None else _per_request(arrivals_s, n, "arrivals_s")
    return Workload(name, tuple(Request(i, p, news[i], arrivals[i]) for i, p in enumerate(prompts)))


# ---- builders ------------------------------------------------------------------------------

#: Ids below this are assumed special (pad/bos/eos/unk) when only a bare ``vocab_size`` is given.
RESERVED_LOW_IDS = 4
#: Largest lognormal sigma: beyond it nearly every draw lands on a clip bound, and sigma**2 overflows.
MAX_SIGMA = 10.0


@dataclasses.dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts (prompt or output lengths); build it with a classmethod.

    - ``LengthDist.fixed(n)``: always ``n``.
    - ``LengthDist.uniform(lo, hi)``: integers uniform in ``[lo, hi]`` (both included).
    - ``LengthDist.lognormal(mean, sigma, lo, hi)``: ``exp(N(mu, sigma))`` rounded, with ``mu``
      chosen so that the unclipped distribution's mean is ``mean`` tokens, then clipped to
      ``[lo, hi]`` (real prompt and output lengths are long-tailed, roughly lognormal).

    Bounds are integers in ``[1, MAX_TOKENS]``; ``mean`` and ``sigma`` finite and positive.
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
            if not _is_int(value) or value <= 0:
                raise WorkloadError(f"length bounds must be positive integers, got {name}={value!r}")
            if value > MAX_TOKENS:
                raise WorkloadError(f"length bound {name}={value} is above MAX_TOKENS = {MAX_TOKENS}")
            object.__setattr__(self, name, int(value))
        if self.lo > self.hi:
            raise WorkloadError(f"length bounds are reversed: lo={self.lo} > hi={self.hi}")
        for name in ("mean", "sigma"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                raise WorkloadError(f"LengthDist {name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.kind == "lognormal" and (not self.mean > 0 or not 0 < self.sigma <= MAX_SIGMA):
            raise WorkloadError(
                f"lognormal lengths need mean > 0 and 0 < sigma <= {MAX_SIGMA:g}, "
                f"got mean={self.mean!r}, sigma={self.sigma!r}"
            )

    @classmethod
    def fixed(cls, n: int) -> "LengthDist":
        return cls("fixed", n, n)

    @classmethod
    def uniform(cls, lo: int, hi: int) -> "LengthDist":
        return cls("uniform", lo, hi)

    @classmethod
    def lognormal(cls, mean: float, sigma: float, lo: int = 1, hi: int = 4096) -> "LengthDist":
        return cls("lognormal", lo, hi, mean, sigma)

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
        # clipped as floats: a far tail draw cast to int64 first would wrap to a negative count
        return np.rint(np.clip(rng.lognormal(mu, self.sigma, size=n), self.lo, self.hi)).astype(np.int64)

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
    if vocab_size is not None and (not _is_int(vocab_size) or vocab_size <= RESERVED_LOW_IDS):
        raise WorkloadError(f"vocab_size must be an integer > {RESERVED_LOW_IDS}, got {vocab_size!r}")
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
        ids = np.arange(RESERVED_LOW_IDS, int(vocab_size))
    else:
        raise WorkloadError("give vocab_size=... or model=... so prompts can be synthesised from real token ids")
    if ids.size == 0:
        raise WorkloadError("the model's vocabulary has no non-special token ids to build prompts from")
    return ids


def _prompts(rng: np.random.Generator, space: np.ndarray, lengths: Sequence[int]) -> list[tuple[int, ...]]:
    total = int(np.sum(lengths, dtype=np.int64))
    if total > MAX_WORKLOAD_TOKENS:
        raise WorkloadError(
            f"this workload asks for {total} prompt tokens in all, more than MAX_WORKLOAD_TOKENS = "
            f"{MAX_WORKLOAD_TOKENS}; use fewer requests or shorter prompts (a trace: limit or max_prompt_len)"
        )
    # tolist(): Python ints in one call, the same ids as converting them one by one
    return [tuple(space[rng.integers(0, space.size, size=int(n))].tolist()) for n in lengths]


def _check_count(value, what: str) -> int:
    if not _is_int(value) or value <= 0:
        raise WorkloadError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _check_requests(value, what: str) -> int:
    """A number of requests: a positive integer, at most ``MAX_REQUESTS``."""
    value = _check_count(value, what)
    if value > MAX_REQUESTS:
        raise WorkloadError(
            f"{what} is {value}; splitlab builds at most MAX_REQUESTS = {MAX_REQUESTS} requests "
            "(more takes minutes and gigabytes before the run starts); ask for fewer"
        )
    return value


def _check_positive(value, what: str) -> float:
    if not _is_real(value) or not math.isfinite(value) or not value > 0:
        raise WorkloadError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


def _rng(seed) -> np.random.Generator:
    if not _is_int(seed) or seed < 0:
        raise WorkloadError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(int(seed))


def _max_positions(model) -> int | None:
    return int(model.facts.max_positions) if model is not None else None


def fixed_batch(n: int, prompt_len: "int | LengthDist" = 128, max_new_tokens: "int | LengthDist" = 32,
                vocab_size: int | None = None, model=None, seed: int = 0,
                name: str | None = None) -> Workload:
    """``n`` requests that all arrive at time 0 (an offline batch), prompts of random token ids.

    ``prompt_len`` / ``max_new_tokens`` are ints or ``LengthDist``. Prompts are drawn from
    ``token_space(vocab_size, model)``; the same arguments give the same workload.
    """
    n = _check_requests(n, "n (number of requests)")
    plen = LengthDist.coerce(prompt_len, "prompt_len")
    olen = LengthDist.coerce(max_new_tokens, "max_new_tokens")
    space = token_space(vocab_size, model)
    rng = _rng(seed)
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
    n = _check_requests(n, "n")
    rate = _check_positive(rate, "rate (requests per second)")
    return [float(a) for a in _poisson_arrivals(_rng(seed), n, rate)]


def poisson(num_requests: int, rate: float, prompt_len: "int | LengthDist" = 128,
            output_len: "int | LengthDist" = 32, seed: int = 0, vocab_size: int | None = None,
            model=None, name: str | None = None) -> Workload:
    """Poisson arrivals at ``rate`` requests/s (exponential gaps; the first arrives at 0)."""
    num_requests = _check_requests(num_requests, "num_requests")
    rate = _check_positive(rate, "rate (requests per second)")
    plen = LengthDist.coerce(prompt_len, "prompt_len")
    olen = LengthDist.coerce(output_len, "output_len")
    space = token_space(vocab_size, model)
    rng = _rng(seed)
    arrivals = _poisson_arrivals(rng, num_requests, rate)
    plens = plen.sample(rng, num_requests)
    olens = olen.sample(rng, num_requests)
    prompts = _prompts(rng, space, plens)
    name = name or f"poisson-r{rate:g}-n{num_requests}-p{plen.describe()}-o{olen.describe()}-s{seed}"
    wl = Workload(name, tuple(
        Request(i, prompts[i], int(olens[i]), float(arrivals[i])) for i in range(num_requests)
    ), rate=rate)
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
    ``context_tokens`` and ``generated_tokens``, in file order, first ``limit`` rows only
    (a file of more than ``MAX_REQUESTS`` rows needs a ``limit``). Timestamps with a UTC
    offset are compared as instants; a file mixing them with timestamps without one is
    refused. Raises ``WorkloadError`` naming the file and row for anything it cannot read.
    """
    import pandas as pd

    path = Path(path).expanduser()
    if not path.is_file():
        raise WorkloadError(
            f"no trace file at {str(path)!r}; download AzureLLMInferenceTrace_code.csv (or _conv.csv) "
            f"from {AZURE_TRACE_SOURCE} and pass its path"
        )
    limit = None if limit is None else _check_requests(limit, "limit")
    try:
        # one row past the bound, so a longer file is seen without reading all of it
        df = pd.read_csv(path, dtype=str, nrows=limit or MAX_REQUESTS + 1, skipinitialspace=True,
                         keep_default_na=False, index_col=False)
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
    if len(df) > MAX_REQUESTS:
        raise WorkloadError(f"trace {str(path)!r} has more than MAX_REQUESTS = {MAX_REQUESTS} rows; "
                            f"replay its first rows with limit=N (splitlab run: --num-requests N)")

    def bad(i: int, what: str, value) -> WorkloadError:
        # i is the 0-based data row; the header is line 1 of the file
        return WorkloadError(f"trace {str(path)!r}, row {i + 1} (line {i + 2}): {what}, got {value!r}")

    ts = _trace_timestamps(df["TIMESTAMP"].str.strip(), bad)
    counts = {key: _trace_counts(df[col], col, bad)
              for col, key in (("ContextTokens", "context_tokens"), ("GeneratedTokens", "generated_tokens"))}
    arrival = (ts - ts.min()).dt.total_seconds().to_numpy()
    return pd.DataFrame({"arrival_s": arrival, **counts})


def _trace_timestamps(text, bad):
    """The TIMESTAMP column as datetimes; ``bad(row, what, value)`` makes the error."""
    import pandas as pd

    try:
        ts = pd.to_datetime(text, errors="coerce", format="mixed")
    except ValueError:  # pandas refuses several UTC offsets in one column unless told utc=True
        _refuse_zoned_and_naive(text, bad)
        try:
            ts = pd.to_datetime(text, errors="coerce", format="mixed", utc=True)
        except (ValueError, TypeError, OverflowError) as exc:
            raise bad(0, f"the TIMESTAMP column cannot be read as date-times ({exc})", text.iloc[0]) from None
    nat = ts.isna().to_numpy().nonzero()[0]
    if nat.size:
        i = int(nat[0])
        raise bad(i, "TIMESTAMP is not a date-time such as '2023-11-16 18:17:03.9799600'", text.iloc[i])
    return ts


def _refuse_zoned_and_naive(text, bad) -> None:
    """Raise unless every readable timestamp has a UTC offset, or none has: a local time
    beside a zoned one has no known order (the gap between them is off by the zone)."""
    import pandas as pd

    zoned: list[bool | None] = []
    for value in text:
        try:
            t = pd.Timestamp(value)
        except (ValueError, TypeError, OverflowError):
            t = pd.NaT
        zoned.append(None if t is pd.NaT else t.tzinfo is not None)
    first = next((i for i, z in enumerate(zoned) if z is not None), None)
    if first is None:
        return
    other = next((i for i, z in enumerate(zoned) if z is not None and z != zoned[first]), None)
    if other is not None:
        has = "has a time zone" if zoned[other] else "has no time zone"
        raise bad(other, f"TIMESTAMP {has} but row {first + 1}'s does not match; give every row "
                         "a UTC offset or none", text.iloc[other])


def _trace_counts(column, name: str, bad) -> np.ndarray:
    """A token-count column as int64; a non-integer, negative or huge count is refused."""
    import pandas as pd

    num = pd.to_numeric(column.str.strip(), errors="coerce").astype("float64")
    # checked before the int64 cast: inf or 1e30 would wrap to a garbage count there
    ok = np.isfinite(num) & (num == num.round()) & (num >= 0) & (num <= MAX_TOKENS)
    badrows = (~ok).to_numpy().nonzero()[0]
    if badrows.size:
        i = int(badrows[0])
        raise bad(i, f"{name} must be a non-negative integer of at most MAX_TOKENS = {MAX_TOKENS}", column.iloc[i])
    return num.astype("int64").to_numpy()


def from_azure_trace(path: str | Path, rate_scale: float = 1.0, limit: int | None = None,
                     max_prompt_len: int | None = None, max_new_tokens: int | None = None,
                     max_total_len: int | None = None, seed: int = 0, vocab_size: int | None = None,
                     model=None, name: str | None = None) -> Workload:
    """Replay an Azure LLM inference trace: real arrival times and token counts, synthetic prompts.

    - arrival = seconds since the first (earliest) row / ``rate_scale`` (2.0 replays twice as fast);
    - ``limit``: only the first ``limit`` rows of the file (at most ``MAX_REQUESTS``);
    - lengths are capped so they fit: output to ``max_new_tokens``, prompt to ``max_prompt_len``,
      then prompt + output to ``max_total_len`` (default: the model's context) by shortening the
      prompt first (never below 1 token), then the output. A trace row with 0 generated tokens
      asks for 1 (every request generates at least one token);
    - prompts are seeded random ids from ``token_space(vocab_size, model)``, exactly as long as
      the (capped) ``ContextTokens``; the output length is forced (EOS ignored) to the (capped)
      ``GeneratedTokens``.

    The trace itself is not shipped: it is from {source}.
    """
    rate_scale = _check_positive(rate_scale, "rate_scale")
    caps = {"max_prompt_len": max_prompt_len, "max_new_tokens": max_new_tokens, "max_total_len": max_total_len}
    for key, value in caps.items():
        if value is not None:
            _check_count(value, key)
    if max_total_len is None and model is not None:
        max_total_len = _max_positions(model)
    if max_total_len is not None and max_total_len < 2:
        raise WorkloadError(f"max_total_len must be at least 2 (one prompt token, one output), got {max_total_len}")
    space = token_space(vocab_size, model)
    rng = _rng(seed)
    table = read_azure_trace(path, limit)
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
    arrivals = table["arrival_s"].to_numpy() / rate_scale
    requests = []
    for i in range(len(table)):
        try:
            requests.append(Request(i, prompts[i], olens[i], float(arrivals[i])))
        except WorkloadError as exc:  # request i is row i + 1 of the file: say which row
            first = int(np.argmin(arrivals))
            raise WorkloadError(f"trace {str(path)!r}, row {i + 1} (line {i + 2}): {exc} (arrivals count "
                                f"from the earliest TIMESTAMP, row {first + 1})") from None
    name = name or f"azure-{Path(path).stem}-x{rate_scale:g}-n{len(table)}-s{seed}"
    return Workload(name, tuple(requests))


from_azure_trace.__doc__ = (from_azure_trace.__doc__ or "").replace("{source}", AZURE_TRACE_SOURCE)
