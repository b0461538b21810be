"""How a request picks its tokens outside the CUDA graph: temperature, top-k, top-p and a
per-request seed, on one row of fp32 logits. Greedy (temperature 0) is the argmax, the oracle
path every mode must match."""

from __future__ import annotations

import dataclasses
import math
import secrets

import torch

from splitlab.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. ``temperature`` 0: greedy (argmax). ``top_k`` 0 (or
    -1): off. ``top_p`` 1: off. ``seed``: the request's own ``torch.Generator`` seed (None: a
    random one), so a seeded request draws the same tokens every time."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        t, p, k, seed = self.temperature, self.top_p, self.top_k, self.seed
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ConfigError(f"temperature must be a finite number >= 0, got {t!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {p!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < -1:
            raise ConfigError(f"top_k must be an integer >= -1 (0 or -1: off), got {k!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        object.__setattr__(self, "top_k", max(0, k))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """The next token from one row of logits (``[vocab]``, fp32; masked ids already -inf).

    Greedy: the argmax. Otherwise HF's order: divide by the temperature, keep the ``top_k``
    largest, then the smallest set of most likely tokens whose probability reaches ``top_p``
    (at least one), and draw from the softmax of what is left with ``generator``.
    """
    if params.greedy:
        return int(torch.argmax(logits))
    x = logits / params.temperature
    if 0 < params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        ascending, order = torch.sort(x)
        drop = ascending.softmax(-1).cumsum(-1) <= 1.0 - params.top_p
        drop[-1] = False  # the most likely token always stays
        x = x.index_fill(0, order[drop], float("-inf"))
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def request_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own generator (None for greedy): seeded by ``params.seed`` or at random."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)
