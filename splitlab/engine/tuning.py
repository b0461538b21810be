"""Choices made by timing on the GPU: the decode-attention variant and the GEMV configs.

``TuningMixin`` (a part of ``ModelRunner``, not used alone) holds the decode variant of each
batch class (batches with ``batch * kv_heads`` below the SM count are "small", the others
"large") and, with ``decode_variant="auto"`` on CUDA with Triton kernels and graphs, times
each candidate's decode graph once and keeps the fastest per class. ``tune_gemv`` times the
Triton GEMV's configs per weight shape.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from splitlab.config import DECODE_VARIANT_NAMES
from splitlab.engine.kernels import DECODE_VARIANTS, DecodeVariant
from splitlab.engine.kernels.triton_ops import next_pow2


def cuda_time(fn: Callable[[], Any], iters: int) -> float:
    """Mean seconds per call of ``fn`` run back to back on the current CUDA stream."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def tune_gemv(kernels, weights: list[torch.Tensor], rows: Sequence[int] = (1, 2, 4), iters: int = 20) -> dict:
    """Time every ``kernels.GEMV_CONFIGS`` entry on each distinct weight shape (CUDA events),
    keep the fastest per (N, K, rows bucket) in ``kernels.gemv_choice``; F.linear is timed too,
    for comparison. Call before graph capture. Returns ``{(N, K, rows): {"config", "gemv_us",
    "cublas_us"}}``."""
    report = {}
    for w in weights:
        n, k = w.shape
        for m in rows:
            key = (n, k, next_pow2(m))
            if key in report:
                continue
            x = torch.randn(m, k, dtype=w.dtype, device=w.device)
            best, best_t = None, float("inf")
            for cfg in kernels.GEMV_CONFIGS:
                t = cuda_time(lambda: kernels.gemv(x, w, config=cfg), iters)
                if t < best_t:
                    best, best_t = cfg, t
            kernels.gemv_choice[key] = best
            report[key] = {"config": best, "gemv_us": best_t * 1e6,
                           "cublas_us": cuda_time(lambda: F.linear(x, w), iters) * 1e6}
    return report


class TuningMixin:
    """The decode-variant choice and GEMV tuning of ``ModelRunner``."""

    def _init_tuning(self, decode_variant: str) -> None:
        """``decode_variant``: a valid ``EngineConfig.decode_variant`` ("auto", a name, or
        "small:large")."""
        timed = self.device.type == "cuda" and self.cuda_graphs and self.kernels.name == "triton"
        self._decode_auto = decode_variant == "auto" and timed
        self.decode_variant_report: dict[str, Any] | None = None
        if decode_variant == "auto":
            names = ["fused", "fused"]
        else:
            names = decode_variant.split(":") if ":" in decode_variant else [decode_variant] * 2
        self._variant_choice = {"small": names[0], "large": names[1]}
        self._variant_how = "timed" if self._decode_auto else ("default" if decode_variant == "auto" else "fixed")
        self.gemv_report: dict | None = None

    @property
    def decode_variant(self) -> str:
        """The decode variant in use: one name, or ``"small:large"`` when the classes differ."""
        a, b = self._variant_choice["small"], self._variant_choice["large"]
        return a if a == b else f"{a}:{b}"

    def decode_variant_info(self) -> dict[str, Any]:
        """What ``Run.config.effective`` and the benchmark JSON record about the choice."""
        return {"decode_variant": self.decode_variant, "decode_variant_how": self._variant_how,
                "decode_variant_timings": self.decode_variant_report}

    def _small_batch(self, batch: int) -> bool:
        # the torch reference has no split-K grid to fill: every batch is in the large class
        return self.kernels.name == "triton" and batch * self.num_kv_heads < self.kernels.sm_count

    def _variant_for(self, batch: int) -> DecodeVariant:
        return DECODE_VARIANTS[self._variant_choice["small" if self._small_batch(batch) else "large"]]

    def select_decode_variant(self, candidates: Sequence[str] | None = None, context: int = 1024,
                              iters: int = 20) -> dict[str, Any] | None:
        """Time each candidate's decode graph and keep the fastest per batch class (CUDA, Triton
        kernels, graphs, ``decode_variant="auto"``; once). The representative buckets: 1 (small)
        and the first large bucket from 32 on (else the largest). Their static inputs point at
        slots 0.. with ``context`` tokens each; replays write one K/V position of those slots
        (garbage that any later request overwrites before reading it, as the warm-up's writes):
        run it before serving. Timing: CUDA events around each replay, median of ``iters``
        after 3 warm-up replays. Graphs captured before are dropped (recaptured on use).
        """
        if not self._decode_auto or self.decode_variant_report is not None:
            return self.decode_variant_report
        names = self._distinct_candidates(candidates or DECODE_VARIANT_NAMES)
        reps: dict[str, int] = {}
        small = [b for b in self.buckets if self._small_batch(b)]
        large = [b for b in self.buckets if not self._small_batch(b)]
        if small:
            reps["small"] = small[0]
        if large:
            reps["large"] = next((b for b in large if b >= 32), large[-1])
        ctx = max(2, min(int(context), self.kv.max_seq_len - 1))
        report: dict[str, Any] = {"context": ctx, "iters": iters, "statistic": "median CUDA-event ms per replay"}
        for cls, bucket in reps.items():
            times: dict[str, float] = {}
            for name in names:
                self._variant_choice[cls] = name
                times[name] = self._time_decode_graph(bucket, ctx, iters)
            best = min(times, key=times.get)
            self._variant_choice[cls] = best
            report[cls] = {"bucket": bucket, "ms": times, "chosen": best}
        if "small" not in reps:
            self._variant_choice["small"] = self._variant_choice["large"]
        if "large" not in reps:
            self._variant_choice["large"] = self._variant_choice["small"]
        self.drop_graphs()
        self.decode_variant_report = report
        return report

    def _distinct_candidates(self, candidates: Sequence[str]) -> list[str]:
        """The candidates that launch differently (with the combine forced to "kernel", some
        coincide)."""
        forced_kernel = self.kernels.combine == "kernel"
        names, seen = [], set()
        for n in candidates:
            v = DECODE_VARIANTS[n]
            key = (v.rope_fused, "kernel" if forced_kernel else v.combine, v.block_n, v.split_target, v.early_v)
            if key not in seen:
                seen.add(key)
                names.append(n)
        return names

    def _time_decode_graph(self, bucket: int, ctx: int, iters: int) -> float:
        """Median ms of one replay of a freshly captured decode graph of ``bucket`` (the current
        variant choice), every row at ``ctx`` tokens in slots 0.. (or pages 0.. of a paged pool)."""
        graph, out = self._capture_graph(bucket, None, private_pool=True)
        self._timing_inputs(bucket, ctx)
        for _ in range(3):
            graph.replay()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for a, b in ev:
            a.record()
            graph.replay()
            b.record()
        torch.cuda.synchronize(self.device)
        ms = float(np.median([a.elapsed_time(b) for a, b in ev]))
        del graph, out
        return ms

    def tune_gemv(self) -> dict | None:
        """Pick the Triton GEMV config per weight shape by timing (CUDA, ``gemv=True`` only);
        run before capturing graphs. Returns the per-shape timings (GEMV vs cuBLAS, µs)."""
        if self._gemv is None or self.device.type != "cuda" or self.gemv_report is not None:
            return self.gemv_report
        first = self.layers[0]
        report = tune_gemv(self._gemv, [first.qkv, first.o, first.gate_up, first.down, self.lm_head])
        self.gemv_report = {f"{n}x{k}@{m}": v for (n, k, m), v in report.items()}
        return self.gemv_report
