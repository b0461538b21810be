"""What the device checks share: random prompts, the ragged workload, the HF oracle, a runner
over a fresh KV pool."""

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


LENS = [37, 120, 5, 64, 90, 17, 48, 3]
NEWS = [16, 12, 16, 8, 14, 1, 10, 12]
ARRIVALS = [0.0, 0.0, 0.0, 0.0, 0.05, 0.1, 0.15, 0.2]


def ragged_workload(loaded, name: str):
    """Ragged prompts (3..120 tokens) and outputs (1..16 tokens; one request asks for a single
    token), arriving over 0.2 s: the same prompts (seed 11) for every check that uses it."""
    from splitlab.workload import Request, Workload

    gen = random.Random(11)
    vocab = loaded.facts.vocab_size
    return Workload(name, tuple(Request(i, tuple(rand_ids(gen, vocab, n)), NEWS[i], ARRIVALS[i])
                                for i, n in enumerate(LENS)))


def hf_outputs(loaded, workload) -> dict[int, list[int]]:
    """The oracle's tokens of every request of ``workload``, by id."""
    return {r.id: hf_greedy(loaded, r.prompt_ids, r.max_new_tokens) for r in workload}


def assert_exact(run, expected, what: str = "") -> None:
    """``run`` gave the oracle's tokens, every one (``what``: how it ran, for the message)."""
    from splitlab.measure.analysis import token_match

    match = token_match(run.output_ids(), expected)
    assert match["exact"], f"{run.mode}{what} differs from HF generate: {match}"


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
