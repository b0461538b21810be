"""Two GPU jobs measured while they share the device: a compute-bound one and a memory-bound
one, each rate given as a fraction of the rate it reaches alone.

``compute`` is a matmul loop, its rate in TFLOP/s (2 n^3 flop a step); ``memory`` a
device-to-device copy (``Tensor.copy_``, or an elementwise kernel), its rate in TB/s counting
the bytes read and written. ``run_jobs`` runs on the worker side (one process or one thread
per job, each on its own stream or green context); ``case_record`` and ``solo_rates`` are the
parent's bookkeeping. torch is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, Mapping, Sequence

JOBS = ("compute", "memory")
UNITS = {"compute": "TFLOP/s", "memory": "TB/s"}


def make_job(kind: str, cfg: Mapping[str, Any]) -> tuple[Callable[[], Any], float]:
    """(one step, work per step): flop for compute, bytes read + written for memory."""
    import torch

    device = cfg["device"]
    if kind == "compute":
        n, dtype = int(cfg["matmul_n"]), getattr(torch, cfg["dtype"])
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        return (lambda: torch.matmul(a, b, out=c)), 2.0 * n**3
    nbytes = int(cfg["copy_bytes"])
    src = torch.ones(nbytes, device=device, dtype=torch.uint8)
    dst = torch.empty(nbytes, device=device, dtype=torch.uint8)
    if cfg.get("memory_op", "copy") == "kernel":  # an elementwise kernel: certainly on its context's SMs
        return (lambda: torch.mul(src, 1, out=dst)), 2.0 * nbytes
    return (lambda: dst.copy_(src)), 2.0 * nbytes  # Tensor.copy_: cudaMemcpyAsync device-to-device


def _on(stream: Any):
    import torch

    return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)


def _sync_fn(cfg: Mapping[str, Any], stream: Any) -> Callable[[], None]:
    import torch

    return (lambda: None) if cfg["device"] == "cpu" else (stream or torch.cuda.current_stream()).synchronize


def timed_loop(step, sync, batch: int, duration: float, start_at: float) -> dict[str, float]:
    """Wait for ``start_at`` (``time.monotonic()``), then run ``batch`` steps and a sync at a
    time until ``duration`` seconds have passed: iterations, elapsed time, lateness of the start."""
    while time.monotonic() < start_at:
        time.sleep(min(0.001, max(0.0, start_at - time.monotonic())))
    t0, iters = time.perf_counter(), 0
    while True:
        for _ in range(batch):
            step()
        sync()
        iters += batch
        if (elapsed := time.perf_counter() - t0) >= duration:
            return {"iters": iters, "elapsed_s": elapsed, "start_skew_s": t0 - start_at}


def _prepare(jobs: Sequence[tuple[str, Any]], cfg: Mapping[str, Any]) -> list[tuple]:
    """Each (job, stream) built and warmed up on its stream."""
    prepared = []
    for kind, stream in jobs:
        with _on(stream):
            step, work = make_job(kind, cfg)
            sync = _sync_fn(cfg, stream)
            for _ in range(int(cfg["warmup"])):
                step()
            sync()
        prepared.append((kind, stream, step, work, sync))
    return prepared


def run_jobs(jobs: Sequence[tuple[str, Any]], cfg: Mapping[str, Any], ready: Callable[[], float],
             sequential: bool = False) -> dict[str, Any]:
    """Warm up each (job, stream), call ``ready()`` for the start time, run the jobs (together,
    one thread each; or one after the other when ``sequential``): {job: rate record}."""
    prepared = _prepare(jobs, cfg)
    start_at = ready()
    results: dict[str, Any] = {}
    errors: list[str] = []

    def body(kind, stream, step, work, sync, at) -> None:
        try:
            with _on(stream):
                rec = timed_loop(step, sync, int(cfg["batch"][kind]), float(cfg["duration"]), at)
            results[kind] = {**rec, "rate": rec["iters"] * work / rec["elapsed_s"] / 1e12, "unit": UNITS[kind]}
        except BaseException as exc:  # a thread's error, raised below for the whole worker
            errors.append(f"{kind}: {exc!r}")

    if sequential:
        for item in prepared:
            body(*item, at=start_at)
            start_at = time.monotonic()
    else:
        threads = [threading.Thread(target=body, args=(*item, start_at), daemon=True) for item in prepared]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return results


def solo_rates(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The solo run's rates as the denominators of every fraction."""
    return {job: {"rate": round(results[job]["rate"], 6), "unit": UNITS[job], "iters": results[job]["iters"]}
            for job in JOBS}


def case_record(outputs: Sequence[Mapping[str, Any]], solo: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What a co-run case measured, from its workers' outputs: each job's rate and its fraction
    of the solo rate, their sum, the green partition the driver gave (if any) and the MPS
    variables each job's process had (the provenance of the shares)."""
    results = {job: rec for o in outputs for job, rec in o["results"].items()}
    record: dict[str, Any] = {"green": o["green"] for o in outputs if "green" in o}
    record["client_env"] = {job: o.get("mps_env", {}) for o in outputs for job in o["results"]}
    for job in JOBS:
        rate = results[job]["rate"]
        record[job] = {"rate": round(rate, 6), "unit": UNITS[job], "fraction": round(rate / solo[job]["rate"], 4),
                       "iters": results[job]["iters"], "elapsed_s": round(results[job]["elapsed_s"], 4)}
    record["sum"] = round(sum(record[job]["fraction"] for job in JOBS), 4)
    return record
