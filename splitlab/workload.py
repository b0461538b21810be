"""Requests and workloads: what arrives, when, and how long it asks to generate.

Builders (fixed batch, Poisson, Azure trace replay) live below the data types. Every
builder is seeded: the same arguments give the same workload.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

from .errors import WorkloadError


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
