"""Split mode: a prefill worker and a decode worker on one GPU, KV handed over without a copy.

Backends: ``threads`` (streams, green contexts) and ``processes`` (plain or under MPS)."""

from splitlab.modes.split.run import SplitSession, run_split

__all__ = ["SplitSession", "run_split"]
