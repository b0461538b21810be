"""How two workers share one GPU: processes (with or without MPS), streams, green contexts."""

from .replicas import ReplicaSession, run_replicas
from .split import SplitSession, decode_interference, run_split

__all__ = ["ReplicaSession", "SplitSession", "decode_interference", "run_replicas", "run_split"]
