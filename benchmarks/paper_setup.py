#!/usr/bin/env python
"""The Splitwiser paper's own setup: replicas of HF ``generate()`` against sequential
``generate()`` (its baseline), on the OPT-125m shape, batch 20, prompts of 1024 tokens,
12 new tokens, 2 and 4 processes, MPS on and off.

    python benchmarks/paper_setup.py --out results/paper_setup_h200.json

Each configuration is timed three ways, apart: the session's start-up (spawning the
processes, loading and sharing the model), a warm-up run (one batch per replica), and the
measured run. Latency is each request's end-to-end time; throughput is output tokens over
the measured run's wall time. A CPU smoke run: ``--model tiny --device cpu --requests 8``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, free_memory, leftover_diff, leftovers, log, quiet_transformers  # noqa: E402

import splitlab  # noqa: E402
from splitlab.measure.sweep import Cell, Sweep  # noqa: E402
from splitlab.workload import fixed_batch  # noqa: E402

import dataclasses  # noqa: E402


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setup(Cell):
    replicas: int  # 0: sequential generate() in this process (the paper's baseline)
    mps: bool = False


def row(run, startup_s: float, warmup_s: float) -> dict[str, Any]:
    table = run.requests
    return {"startup_s": startup_s, "warmup_s": warmup_s, "wall_s": run.wall_s,
            "throughput_tok_s": run.summary()["throughput_tok_s"], "e2e_mean_s": float(table["e2e_s"].mean()),
            "e2e_p50_s": float(table["e2e_s"].median()), "requests": len(table)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dummy:opt-125m")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--requests", type=int, default=80)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--out", default=str(REPO / "results" / "paper_setup_h200.json"))
    p.add_argument("--budget-s", type=float, default=300.0)
    args = p.parse_args(argv)
    quiet_transformers()
    model = splitlab.load_model(args.model, device=args.device, dtype=args.dtype)
    wl = fixed_batch(args.requests, args.prompt_len, args.new_tokens, model=model, name=f"paper-n{args.requests}")
    cells = [Setup(name="sequential", replicas=0)] + [
        Setup(name=f"replicas-{n}{'-mps' if mps else ''}", replicas=n, mps=mps)
        for n in (2, 4) for mps in (False, True) if args.device.startswith("cuda") or not mps]
    before = leftovers()

    def measure(cell: Setup, _context) -> dict[str, Any]:
        warm = fixed_batch(max(1, cell.replicas) * args.batch, args.prompt_len, args.new_tokens, model=model,
                           seed=1, name="warm-up")
        if cell.replicas == 0:
            start = time.perf_counter()
            splitlab.run(warm, model, mode="hf-generate", batch_size=args.batch, progress=False)
            warmup_s = time.perf_counter() - start
            run = splitlab.run(wl, model, mode="hf-generate", batch_size=args.batch, progress=False)
            return row(run, 0.0, warmup_s)
        from splitlab.modes.replicas import ReplicaSession

        start = time.perf_counter()
        with ReplicaSession(model, num_replicas=cell.replicas, engine="generate", mps=cell.mps,
                            batch_size=args.batch) as session:
            startup_s = time.perf_counter() - start
            start = time.perf_counter()
            session.run(warm, progress=False)
            warmup_s = time.perf_counter() - start
            run = session.run(wl, progress=False)
        free_memory()
        return row(run, startup_s, warmup_s)

    sweep = Sweep("paper_setup", args.out, budget_s=args.budget_s, progress=False)
    sweep.run(cells, measure)
    rows = {r["cell"]: r for r in sweep.rows}
    base = rows.get("sequential")
    if base:
        for r in rows.values():  # the paper's two figures: latency reduction and throughput ratio
            r["latency_reduction"] = 1 - r["e2e_mean_s"] / base["e2e_mean_s"]
            r["throughput_ratio"] = r["throughput_tok_s"] / base["throughput_tok_s"]
    sweep.write(leftovers=leftover_diff(before), paper={"latency_reduction": 0.176, "throughput_ratio_4": 1.1,
                                                        "throughput_ratio_max": 1.42})
    for name, r in rows.items():
        log("paper", f"{name}: {r['throughput_tok_s']:.0f} tok/s, mean E2E {r['e2e_mean_s']:.3f} s, start-up "
                     f"{r['startup_s']:.1f} s, warm-up {r['warmup_s']:.1f} s, vs sequential: latency reduction "
                     f"{r.get('latency_reduction', float('nan')):+.1%}, throughput {r.get('throughput_ratio', 0):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
