"""The HF oracle of the CPU tests: ``generate(do_sample=False)`` on one prompt, fp32 on CPU."""

from __future__ import annotations

import torch


def hf_greedy(loaded, prompt, n: int) -> list[int]:
    """Exactly ``n`` greedy tokens (EOS held back: ``min_new_tokens=n``)."""
    return _generate(loaded, prompt, n, min_new_tokens=n)


def hf_generate(loaded, prompt, n: int, min_new: int | None = None) -> list[int]:
    """HF greedy: ``min_new`` None stops at EOS (its EOS kept, the padding after it dropped)."""
    tokens = _generate(loaded, prompt, n, **({} if min_new is None else {"min_new_tokens": min_new}))
    eos = loaded.model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    return tokens[:next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))]


def _generate(loaded, prompt, n: int, **extra) -> list[int]:
    ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                    pad_token_id=0, **extra)
    return out[0, len(prompt):].tolist()
