"""How two workers share one GPU: processes (with or without MPS), streams, green contexts."""
