"""Timing the engine's own steps at given shapes (``benchmarks/engine_floor.py``'s sections).

- ``timing_runner``: a ``ModelRunner`` over a fresh slot or paged KV pool holding random
  values (a step's time depends on the lengths, not the values, so no prefill fills it), its
  decode graphs captured; a paged pool gets block tables over shuffled pages
  (``shuffled_tables``).
- ``time_decode``: one decode step's wall time (``decode_step``: staging, the input copy, the
  graph replay, the sync that returns the tokens; median) and, with CUDA graphs, the CUDA-event
  time of back-to-back replays; the floor's bytes beside them (``floor.decode_floor_bytes``).
- ``time_prefill``: prefill steps of ``(batch, length)`` prompts under one SDPA backend.
- ``hf_rows``: HF's eager forward at the same shapes (``profile.profile_records``).
- ``time_gemv``: the Triton GEMV path beside cuBLAS; ``runner_info``: what a runner runs.
- ``saturation_workload`` and ``workload_row``: a Poisson workload near the capacity the steps
  predict, served in a mode and summarised.
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable, Sequence

import torch

from splitlab.config import EngineConfig
from splitlab.errors import ConfigError
from splitlab.measure import analysis, flops
from splitlab.measure.floor import decode_floor_bytes

WORKLOAD_KEYS = ("throughput_tok_s", "goodput_req_s", "slo_attainment", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s",
                 "tpot_p99_s", "itl_p99_s", "wall_s", "completed", "num_requests", "peak_memory_bytes")


def median_wall_s(step: Callable[[], Any], device, iters: int, warmup: int = 1) -> float:
    """Median wall seconds of ``step()`` over ``iters`` calls after ``warmup``, the device
    synchronised around each (``measure.profile``'s timing)."""
    from splitlab.measure.profile import _median_time, _sync_fn

    return _median_time(step, _sync_fn(torch.device(device)), warmup, iters)


def shuffled_tables(sequences: int, pages_each: int, seed: int = 0) -> list[list[int]]:
    """Block tables of ``sequences`` sequences of ``pages_each`` pages over a pool of exactly
    that many pages, in a seeded shuffled order: a serving pool's pages after some churn, not
    one contiguous run per sequence."""
    for name, v in (("sequences", sequences), ("pages_each", pages_each)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    pages = list(range(sequences * pages_each))
    random.Random(seed).shuffle(pages)
    return [pages[i * pages_each:(i + 1) * pages_each] for i in range(sequences)]


def timing_runner(loaded, max_seq_len: int, sequences: int, block_size: int | None = None,
                  decode_variant: str = "auto", capture: Sequence[int] = (), seed: int = 0) -> dict[str, Any]:
    """``{"runner", "tables", "captured", "build_s"}``: a runner of ``loaded`` over a fresh pool
    of ``sequences`` sequences of ``max_seq_len`` positions (slots, or pages of ``block_size``),
    filled with random values, with the decode graphs of the ``capture`` batches captured (and
    the decode variant timed first when ``"auto"``)."""
    from splitlab.engine.kv import build_kv
    from splitlab.engine.runner import ModelRunner
    from splitlab.engine.weights import extract_arch, extract_weights

    t, m = time.perf_counter(), loaded.model
    size = {"num_slots": sequences} if block_size is None else {
        "kv_block_size": block_size, "num_pages": sequences * -(-max_seq_len // block_size)}
    cfg = EngineConfig(max_seq_len=max_seq_len, max_batch=sequences, chunk_size=max(512, sequences + 1),
                       decode_variant=decode_variant, **size)
    kv, _ = build_kv(loaded, cfg, max_seq_len)
    for tensor in (kv.k, kv.v):
        tensor.normal_()
    runner = ModelRunner.for_config(extract_arch(m), extract_weights(m, share_storage=True), kv, cfg)
    captured = runner.capture_graphs(list(capture)) if capture else []
    tables = shuffled_tables(sequences, kv.pages_for(max_seq_len), seed) if block_size else None
    return {"runner": runner, "tables": tables, "captured": captured, "build_s": time.perf_counter() - t}


def decode_stepper(runner, batch: int, context: int, tables: Sequence[Sequence[int]] | None = None,
                   gen: random.Random | None = None) -> Callable[[], list[int]]:
    """A call of one decode step of ``batch`` sequences (slots ``0..``, or the first ``batch``
    block tables) at ``context`` cached tokens each, random tokens."""
    if tables is not None and len(tables) < batch:
        raise ConfigError(f"a decode step of {batch} sequences needs {batch} block tables, got {len(tables)}")
    gen = gen or random.Random(0)
    tokens = [gen.randrange(4, runner.embed.shape[0]) for _ in range(batch)]
    slots = [None] * batch if tables is not None else list(range(batch))
    blocks = list(tables[:batch]) if tables is not None else None
    return lambda: runner.decode_step(slots, tokens, [context] * batch, blocks)


def time_decode(runner, facts, batch: int, context: int, iters: int, tables=None,
                gen: random.Random | None = None) -> dict[str, Any]:
    """One decode step's row: ``step_ms`` (wall, median of ``iters`` after 3), ``floor_bytes``
    and, with CUDA graphs, ``gpu_ms`` (back-to-back replays) and ``host_ms``."""
    from splitlab.engine.graphs import bucket_for
    from splitlab.engine.tuning import cuda_time

    step_s = median_wall_s(decode_stepper(runner, batch, context, tables, gen), runner.device, iters, 3)
    row = {"batch": batch, "context": context, "step_ms": step_s * 1e3,
           "floor_bytes": decode_floor_bytes(facts, batch, context), "decode_variant": runner.decode_variant}
    if runner.cuda_graphs:
        gpu_s = cuda_time(runner.graph(batch, context + 1).replay, iters)
        row.update(bucket=bucket_for(batch, runner.buckets), gpu_ms=gpu_s * 1e3, host_ms=(step_s - gpu_s) * 1e3)
    return row


def time_prefill(runner, facts, cases: Sequence[tuple[int, int]], backend: str, iters: int,
                 gen: random.Random | None = None) -> list[dict[str, Any]]:
    """Prefill of ``batch`` prompts of ``length`` random tokens (slots ``0..``) per case under the
    SDPA ``backend`` (reset to auto after): wall ms (median of ``iters`` after 1) and TFLOP/s.
    A backend that does not take the inputs raises PyTorch's RuntimeError."""
    gen, cuda = gen or random.Random(0), runner.device.type == "cuda"
    runner.set_sdpa_backend(backend)
    try:
        out = []
        for batch, length in cases:
            chunks = [(s, [gen.randrange(4, facts.vocab_size) for _ in range(length)], 0) for s in range(batch)]
            t = median_wall_s(lambda: runner.prefill(chunks), runner.device, iters, 1)
            cost = flops.prefill_cost(facts, batch, length, lm_head="last")
            out.append({"batch": batch, "length": length, "tokens": batch * length, "ms": t * 1e3,
                        "flops": cost.flops, "TFLOPs": cost.flops / t / 1e12, "sdpa_backend": backend,
                        "sdpa_effective": runner.sdpa_effective_backend(batch, length) if cuda else backend})
        return out
    finally:
        runner.set_sdpa_backend("auto")


def hf_rows(loaded, ceilings, context: int, decode_batches: Sequence[int], prefill_cases: Sequence[tuple[int, int]],
            iters: int) -> dict[str, Any]:
    """HF's eager forward (DynamicCache) at the same shapes: decode rows (with their floor's
    bytes) and prefill rows, through ``profile.profile_records``."""
    from splitlab.measure.profile import profile_records

    kw = dict(ceilings=ceilings, backend="hf", repeats=iters, warmup=1, progress=False)
    dec = profile_records(loaded, batch_sizes=[], prompt_lens=[], context_lens=[context],
                          decode_batch_sizes=list(decode_batches), **kw)
    pre = [rec for b, n in prefill_cases
           for rec in profile_records(loaded, batch_sizes=[b], prompt_lens=[n], context_lens=[], **kw)]
    return {"decode": [{"batch": d["batch"], "context": d["tokens"], "step_ms": d["time_s"] * 1e3,
                        "floor_bytes": decode_floor_bytes(loaded.facts, d["batch"], context)} for d in dec],
            "prefill": [{"batch": d["batch"], "length": d["tokens"], "ms": d["time_s"] * 1e3,
                         "TFLOPs": d["achieved_flops_s"] / 1e12} for d in pre]}


def ceilings_row(c) -> dict[str, Any]:
    """A ``profile.Ceilings`` as the result file records it (GB/s, TFLOP/s, the whole record beside)."""
    return {"copy_GBps": c.copy_bytes_s / 1e9, "copy_GBps_median": c.copy_bytes_s_median / 1e9,
            "matmul_TFLOPs": c.matmul_flops_s / 1e12, "matmul_TFLOPs_median": c.matmul_flops_s_median / 1e12,
            "copy_bytes": c.copy_buffer_bytes, "matmul_n": c.matmul_n, "matmul_dtype": c.dtype, "repeats": c.repeats,
            "statistic": "best (max rate) of the repeats; medians beside; floors and fractions use the best",
            "ceilings": c.to_dict()}


def runner_info(runner, build_s: float, captured: Sequence[int]) -> dict[str, Any]:
    """What the result file records of a runner: kernels, graphs, KV pool, decode variant."""
    cuda = runner.device.type == "cuda"
    return {"kernels": runner.kernels.name, "cuda_graphs": runner.cuda_graphs, "buckets": runner.buckets,
            "kv_pool": runner.kv.describe(), "build_and_capture_s": build_s, "captured": list(captured),
            "decode_combine": getattr(runner.kernels, "combine", None), **runner.decode_variant_info(),
            "sdpa_effective": runner.sdpa_effective_backend() if cuda else "n/a"}


def time_gemv(runner, facts, context: int, iters: int, gen: random.Random | None = None) -> dict[str, Any]:
    """The Triton GEMV path beside cuBLAS: a GEMV runner over ``runner``'s weights and pool
    (its configs tuned per weight shape at capture), decode at batch 1 and 4."""
    from splitlab.engine.runner import ModelRunner

    arch, weights = runner.export()
    cfg = EngineConfig(gemv=True, decode_variant=runner.decode_variant, decode_combine=runner.kernels.combine)
    g = ModelRunner.for_config(arch, weights, runner.kv, cfg, max_batch=4)
    t = time.perf_counter()
    g.capture_graphs()  # tunes the GEMV configs first
    return {"tune_and_capture_s": time.perf_counter() - t, "per_shape": g.gemv_report,
            "decode": [time_decode(g, facts, b, context, iters, gen=gen) for b in (1, 4)]}


def saturation_workload(loaded, decode_rows, prefill_rows, n: int, prompt: tuple[int, int], out: tuple[int, int],
                        seed: int = 0, rate: float | None = None):
    """``(workload, rate)``: ``n`` Poisson requests (uniform prompt and output lengths) at
    ``rate``, by default 90% of what the measured steps sustain (``analysis.saturation_rate``)."""
    from splitlab.workload import LengthDist, poisson

    rate = rate or analysis.saturation_rate(decode_rows, prefill_rows, sum(prompt) / 2, sum(out) / 2)
    return poisson(n, rate=rate, prompt_len=LengthDist.uniform(*prompt), output_len=LengthDist.uniform(*out),
                   seed=seed, model=loaded), rate


def workload_row(loaded, wl, mode: str, config: EngineConfig | None = None, batch_size: int = 32,
                 requests: int | None = None, micro: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run of ``wl`` in ``mode``: ``WORKLOAD_KEYS`` of its summary under the default SLO.
    hf-generate serves the first ``requests`` (None or 0: all) in static batches of
    ``batch_size``; an engine mode runs under ``config``, its steps set beside ``micro`` (the
    microbenchmarks' decode rows and largest prefill: ``analysis.step_breakdown``)."""
    import splitlab
    from splitlab.config import SLO
    from splitlab.workload import Workload

    t0 = time.perf_counter()
    if mode == "hf-generate":
        n = requests or len(wl)
        sub = wl if n >= len(wl) else Workload(f"{wl.name}-first{n}", tuple(wl.requests[:n]))
        run = splitlab.run(sub, loaded, mode=mode, batch_size=batch_size, progress=False)
        return {**{k: run.summary(SLO()).get(k) for k in WORKLOAD_KEYS}, "mode": mode, "batch_size": batch_size,
                "requests_used": len(sub), "note": f"first {len(sub)} of the {len(wl)} requests (same arrivals)"}
    run = splitlab.run(wl, loaded, mode=mode, config=config, progress=False)
    return {**{k: run.summary(SLO()).get(k) for k in WORKLOAD_KEYS}, "mode": mode, "workload": wl.name,
            "requests": len(wl), "output_tokens": wl.total_output_tokens, "setup_and_run_s": time.perf_counter() - t0,
            "steps": analysis.step_breakdown(run, micro)}
