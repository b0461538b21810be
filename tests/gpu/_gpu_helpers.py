"""What the device checks share: random prompts, the HF oracle, a runner over a fresh KV pool."""

from __future__ import annotations

import random

import torch


def rand_ids(gen: random.Random, vocab: int, n: int) -> list[int]:
    return [gen.randrange(4, vocab) for _ in range(n)]


def hf_greedy(loaded, prompt, n: int) -> list[int]:
    """The oracle: HF generate(do_sample=False), exactly ``n`` new tokens, one prompt."""
    ids = torch.tensor([list(prompt)], device=loaded.device)
    with torch.no_grad():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                    min_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def make_runner(loaded, num_slots: int, max_len: int, kv=None, **config):
    """A ModelRunner of ``loaded`` over ``kv`` (default: a fresh KV pool of ``num_slots`` x
    ``max_len``), every setting from ``EngineConfig(**config)``."""
    from splitlab.config import EngineConfig
    from splitlab.engine.kv import KVPool
    from splitlab.engine.runner import ModelRunner
    from splitlab.engine.weights import extract_arch, extract_weights

    kv = kv if kv is not None else KVPool.for_model(loaded, max_len, num_slots=num_slots)
    cfg = EngineConfig(max_seq_len=max_len, num_slots=num_slots, max_batch=num_slots, **config)
    return ModelRunner.for_config(extract_arch(loaded.model), extract_weights(loaded.model), kv, cfg)
