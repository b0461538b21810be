"""The single-GPU engine: KV pool, runner (weights, forward, CUDA graphs), scheduler and the
``schedule -> run -> postprocess`` loop. Every mode in ``splitlab.modes`` is built from these."""
