"""How a workload is run: ``hf_generate`` (the oracle), ``continuous`` (serial, chunked),
``split`` (a prefill and a decode worker side by side) and ``replicas`` (the paper's scheme)."""
