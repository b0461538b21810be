"""Frozen configuration dataclasses that reject unknown keys and bad values."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

from .errors import ConfigError

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
