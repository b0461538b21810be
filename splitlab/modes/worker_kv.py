"""What the modes do with a worker's KV pool, slots or pages alike: a fresh allocator per run,
throw-away steps at the pool's two ends before a run, the check that every request's pages
can ever fit (before a run starts, once the pool's size is known), and the scheduler
counters a run reports (preemptions, prefix-cache hits)."""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping

from splitlab.config import EngineConfig
from splitlab.errors import WorkloadError
from splitlab.engine.kv import pages_written
from splitlab.engine.plan import PrefillChunk


def new_allocator(kv, config: EngineConfig):
    """A fresh allocator of ``kv``'s slots, or of its pages (with ``config``'s prefix cache):
    one per run, so a run's prefix hits and counts are its own."""
    return kv.new_allocator(prefix_cache=config.kv_prefix_cache) if kv.paged else kv.new_allocator()


def warm_chunk(kv, n: int) -> PrefillChunk:
    """A throw-away prompt of ``n`` tokens at the pool's first rows: slot 0, or pages 0, 1, ...
    (wrapping on a pool with fewer). Only before a run, when every slot and page is free: a
    request writes each position before it reads it."""
    if not kv.paged:
        return PrefillChunk(0, [1] * n, 0)
    return PrefillChunk(None, [1] * n, 0, True, [j % kv.num_pages for j in range(kv.pages_for(n))])


def warm_decode_step(runner) -> None:
    """A throw-away decode step of one row at position 0 of the pool's last slot or page (the
    other end from ``warm_chunk``, which the prefill side may run at the same time)."""
    kv = runner.kv
    last = kv.max_sequences - 1
    if kv.paged:
        runner.decode_step([None], [1], [0], [[last]])
    else:
        runner.decode_step([last], [1], [0])


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
