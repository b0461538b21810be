"""The single-GPU engine. Every mode in ``splitlab.modes`` is built from these rooms:

- ``kv``: the KV pool (slots x positions) and the slot allocator;
- ``weights``: reading a Huggingface Llama-family model (arch facts, fused weights);
- ``kernels/``: the fused operations (PyTorch reference, Triton kernels, decode variants);
- ``plan``: the inputs of one forward and their host-side plan (one copy to the device);
- ``attention``: prompt-chunk SDPA and batched decode attention;
- ``graphs``: the decode step as CUDA graphs, one per batch bucket;
- ``tuning``: the decode-variant and GEMV choices made by timing;
- ``runner``: ``ModelRunner``, the forward over the pool (built by ``ModelRunner.for_config``);
- ``warmup``: the one warm-up before the clock starts;
- ``scheduler`` and ``loop``: ``schedule -> run -> postprocess``, and the workers.
"""
