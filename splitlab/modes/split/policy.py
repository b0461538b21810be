"""How the SMs follow the load: per-step SM-split policies of the ``green`` split backend.

A policy is a pure function of what the two workers see at a step (``SplitState``) to an
``SMChoice``: how many SMs the decode worker's partition has and how many the prefill
worker's. The partitions themselves are made once, at start-up, for a fixed set of decode SM
counts (``SplitConfig.decode_sm_choices``); a policy only picks among them.

- ``static``: one split, always (the backend's behaviour before policies).
- ``table``: decode SMs from the decode batch size alone (a ``(min_batch, decode_sms)``
  table, as SGLang's pdmux does); by default derived from a measured profile as the fewest
  SMs that reach ``efficiency`` of the whole GPU's decode rate at that batch.
- ``slo``: decode gets the fewest SMs whose predicted step time, beside a running prefill,
  meets the gap bound for this batch and context; prefill gets the rest.

Both adaptive policies give the whole GPU to decode when no prompt waits, and to prefill
when nothing decodes.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from splitlab.errors import ConfigError

POLICIES = ("static", "table", "slo")


@dataclasses.dataclass(frozen=True)
class SplitState:
    """What a policy sees: the decode batch (sequences decoding), their mean context length
    in tokens, and the prompt tokens waiting for (or in) prefill."""

    decode_batch: int
    decode_context: int
    prefill_tokens: int


@dataclasses.dataclass(frozen=True)
class SMChoice:
    """SMs given to each worker; 0 means that worker has nothing to run and the other has
    the whole GPU (its graphs/streams outside any green context)."""

    decode_sms: int
    prefill_sms: int


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear in x, clamped at the ends (a profile is measured on a grid)."""
    if len(xs) == 1 or x <= xs[0]:
        return float(ys[0])
    if x >= xs[-1]:
        return float(ys[-1])
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclasses.dataclass(frozen=True)
class SMProfile:
    """Measured step times on SM partitions of one GPU for one model.

    ``decode_s[(sms, batch, context)]``: a decode step (graph replay + host sync) alone on a
    partition of ``sms`` SMs; ``decode_corun_s``: the same while a prefill runs on the
    other SMs (bandwidth and L2 are shared, so this is what a token gap sees);
    ``prefill_s[(sms, tokens)]``: one prefill step of ``tokens`` prompt tokens. ``sms ==
    total_sms`` is the whole GPU, no green context.
    """

    total_sms: int
    decode_s: Mapping[tuple[int, int, int], float]
    prefill_s: Mapping[tuple[int, int], float]
    decode_corun_s: Mapping[tuple[int, int, int], float] = dataclasses.field(default_factory=dict)
    facts: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.decode_s or not self.prefill_s:
            raise ConfigError("an SMProfile needs measured decode and prefill times")
        for table in (self.decode_s, self.prefill_s, self.decode_corun_s):
            for key, value in table.items():
                if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                    raise ConfigError(f"SMProfile time at {key} must be a positive number of seconds, got {value!r}")

    @property
    def decode_sms(self) -> list[int]:
        return sorted({k[0] for k in self.decode_s})

    def predict_decode(self, sms: int, batch: int, context: int, corun: bool = True) -> float:
        """Seconds of one decode step on ``sms`` SMs (beside a prefill if ``corun`` and the
        profile measured it), interpolated in batch then context on the measured grid."""
        table = self.decode_corun_s if corun and any(k[0] == sms for k in self.decode_corun_s) else self.decode_s
        points = sorted((b, c, t) for (s, b, c), t in table.items() if s == sms)
        if not points:
            raise ConfigError(f"the profile has no decode times on {sms} SMs; measured: {self.decode_sms}")
        contexts = sorted({c for _, c, _ in points})
        per_context = []
        for c in contexts:
            row = [(b, t) for b, cc, t in points if cc == c]
            per_context.append(_interp([b for b, _ in row], [t for _, t in row], batch))
        return _interp(contexts, per_context, context)

    def predict_prefill(self, sms: int, tokens: int) -> float:
        points = sorted((n, t) for (s, n), t in self.prefill_s.items() if s == sms)
        if not points:
            raise ConfigError(f"the profile has no prefill times on {sms} SMs")
        return _interp([n for n, _ in points], [t for _, t in points], tokens)

    def to_dict(self) -> dict[str, Any]:
        def rows(table, names):
            return [dict(zip(names, k), seconds=v) for k, v in sorted(table.items())]

        return {"total_sms": self.total_sms, "facts": dict(self.facts),
                "decode": rows(self.decode_s, ("sms", "batch", "context")),
                "decode_corun": rows(self.decode_corun_s, ("sms", "batch", "context")),
                "prefill": rows(self.prefill_s, ("sms", "tokens"))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SMProfile":
        try:
            dec = {(int(r["sms"]), int(r["batch"]), int(r["context"])): float(r["seconds"]) for r in data["decode"]}
            cor = {(int(r["sms"]), int(r["batch"]), int(r["context"])): float(r["seconds"])
                   for r in data.get("decode_corun", [])}
            pre = {(int(r["sms"]), int(r["tokens"])): float(r["seconds"]) for r in data["prefill"]}
            return cls(int(data["total_sms"]), dec, pre, cor, dict(data.get("facts", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"not an SM profile ({exc!r}); make one with splitlab.measure.sm_profile") from exc

    @classmethod
    def load(cls, path: str | Path) -> "SMProfile":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the SM profile {path}: {exc}") from exc
        return cls.from_dict(data.get("profile", data))


def _idle_rules(state: SplitState, total: int) -> SMChoice | None:
    """The adaptive policies' shared rule: one side idle -> the other gets the whole GPU."""
    if state.prefill_tokens <= 0:
        return SMChoice(total, 0)
    if state.decode_batch <= 0:
        return SMChoice(0, total)
    return None


@dataclasses.dataclass(frozen=True)
class StaticPolicy:
    decode_sms: int
    total_sms: int
    name: str = "static"

    def choose(self, state: SplitState) -> SMChoice:
        return SMChoice(self.decode_sms, self.total_sms - self.decode_sms)


@dataclasses.dataclass(frozen=True)
class TablePolicy:
    """``table``: ``(min_batch, decode_sms)`` rows; the last row whose ``min_batch`` the
    decode batch reaches wins (rows sorted, decode SMs non-decreasing)."""

    table: tuple[tuple[int, int], ...]
    total_sms: int
    name: str = "table"

    def __post_init__(self) -> None:
        rows = tuple(sorted((int(b), int(s)) for b, s in self.table))
        if not rows or rows[0][0] > 1:
            raise ConfigError(f"a table policy needs a row for batch 1, got {self.table!r}")
        if any(s1 > s2 for (_, s1), (_, s2) in zip(rows, rows[1:])):
            raise ConfigError(f"decode SMs must not shrink as the batch grows: {rows}")
        object.__setattr__(self, "table", rows)

    def choose(self, state: SplitState) -> SMChoice:
        idle = _idle_rules(state, self.total_sms)
        if idle is not None:
            return idle
        i = bisect.bisect_right([b for b, _ in self.table], state.decode_batch) - 1
        sms = self.table[max(i, 0)][1]
        return SMChoice(sms, self.total_sms - sms)

    @classmethod
    def from_profile(cls, profile: SMProfile, choices: Sequence[int], efficiency: float = 0.85,
                     context: int = 1024) -> "TablePolicy":
        """Per measured batch, the fewest SMs of ``choices`` whose solo decode step is within
        ``1 / efficiency`` of the whole GPU's; made monotone in the batch."""
        batches = sorted({b for (_, b, _) in profile.decode_s})
        rows, floor = [], 0
        for b in batches:
            full = profile.predict_decode(profile.total_sms, b, context, corun=False)
            fit = [s for s in sorted(choices)
                   if profile.predict_decode(s, b, context, corun=False) * efficiency <= full]
            floor = max(floor, fit[0] if fit else max(choices))
            rows.append((b, floor))
        rows[0] = (1, rows[0][1])
        return cls(tuple(rows), profile.total_sms)


@dataclasses.dataclass(frozen=True)
class SLOPolicy:
    """``slo``: the fewest decode SMs of ``choices`` whose predicted co-running step time is
    at most ``gap_s * headroom``; the most of them when none is fast enough."""

    profile: SMProfile
    choices: tuple[int, ...]
    gap_s: float
    headroom: float = 0.8
    name: str = "slo"

    def __post_init__(self) -> None:
        if not (isinstance(self.gap_s, (int, float)) and math.isfinite(self.gap_s) and self.gap_s > 0):
            raise ConfigError(f"the slo policy needs a positive gap bound in seconds, got {self.gap_s!r}")
        if not 0 < self.headroom <= 1:
            raise ConfigError(f"headroom must be in (0, 1], got {self.headroom!r}")
        object.__setattr__(self, "choices", tuple(sorted(int(c) for c in self.choices)))

    def choose(self, state: SplitState) -> SMChoice:
        total = self.profile.total_sms
        idle = _idle_rules(state, total)
        if idle is not None:
            return idle
        budget = self.gap_s * self.headroom
        for sms in self.choices:
            if self.profile.predict_decode(sms, state.decode_batch, state.decode_context) <= budget:
                return SMChoice(sms, total - sms)
        return SMChoice(self.choices[-1], total - self.choices[-1])


def make_policy(name: str, *, total_sms: int, choices: Sequence[int], static_decode_sms: int,
                profile: SMProfile | None = None, gap_s: float | None = None):
    """The policy called ``name`` over partitions of ``choices`` decode SMs."""
    if name == "static":
        return StaticPolicy(static_decode_sms, total_sms)
    if profile is None:
        raise ConfigError(f"policy {name!r} needs a measured SM profile (SplitConfig.sm_profile); "
                          "measure one with splitlab.measure.sm_profile.measure_sm_profile")
    if profile.total_sms != total_sms:
        raise ConfigError(f"the SM profile is of a {profile.total_sms}-SM GPU; this one has {total_sms}")
    if name == "table":
        return TablePolicy.from_profile(profile, choices)
    if name == "slo":
        if gap_s is None:
            raise ConfigError("policy 'slo' needs a gap bound: SplitConfig(gap_s=...) or an SLO with itl_s")
        return SLOPolicy(profile, tuple(choices), gap_s)
    raise ConfigError(f"unknown SM policy {name!r}; choose one of {', '.join(POLICIES)}")
