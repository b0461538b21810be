"""What the modes do with a worker's KV pool, slots or pages alike: the check that every
request's pages can ever fit (before a run starts, once the pool's size is known), and the
scheduler counters a run reports (preemptions, prefix-cache hits). A fresh allocator per run
is ``splitlab.engine.kv.new_allocator``; the throw-away steps at the pool's two ends are
``splitlab.engine.warmup``'s."""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping

from splitlab.errors import WorkloadError
from splitlab.engine.kv import pages_written


def check_pages_fit(requests: Iterable, facts: Mapping[str, Any], headroom: int = 0) -> None:
    """Refuse, before a run starts, a request that can never get its pages from the paged pool
    a worker reports (``worker_facts``): every position it writes, plus ``headroom`` pages (one
    for a serial / chunked engine, which keeps one free to grow into). A slot pool: nothing
    (``check_workload`` checked the slot length)."""
    block, pages = facts.get("kv_block_size"), facts.get("num_pages")
    if block is None:
        return
    for r in requests:
        need = pages_written(r, block) + headroom
        if need > pages:
            extra = " (one of them headroom)" if headroom else ""
            raise WorkloadError(
                f"request {r.id} (prompt {r.prompt_len} + {r.max_new_tokens} new) needs {need} KV pages of {block} "
                f"positions{extra} but a worker's pool has {pages}; raise EngineConfig.num_pages (or the KV memory) "
                "or shorten it")


def merged_counters(counters: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Several schedulers' ``counters()`` summed (the prefix cache's hit rate recomputed)."""
    out: dict[str, Any] = {}
    for part in counters:
        for key, value in part.items():
            if key != "prefix_hit_rate":
                out[key] = out.get(key, 0) + value
    if "prefix_blocks_queried" in out:
        queried = out["prefix_blocks_queried"]
        out["prefix_hit_rate"] = out["prefix_blocks_hit"] / queried if queried else None
    return out


def warn_preemptions(mode: str, counters: Mapping[str, Any]) -> None:
    """Tell the user when a paged pool ran out and sequences were recomputed."""
    if counters.get("preemptions"):
        warnings.warn(f"{mode}: the KV pool ran out {counters['preemptions']} times; those sequences were "
                      f"preempted and recomputed ({counters['recomputed_tokens']} positions again): give the pool "
                      "more pages (EngineConfig.num_pages / kv_memory_fraction) or lower max_batch", stacklevel=3)
