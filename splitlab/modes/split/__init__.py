"""Split mode: a prefill worker and a decode worker on one GPU, KV handed over without a copy.

Backends: ``threads`` (streams, green contexts) and ``processes`` (plain or under MPS). A
one-off run goes through ``splitlab.run(..., mode="split")``; ``SplitSession`` serves several."""

from splitlab.modes.split.run import SplitSession

__all__ = ["SplitSession"]
