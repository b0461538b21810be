#!/usr/bin/env python
"""Prefill vs decode on the roofline: measured ceilings + profile_phases, written as JSON.

GPU (the recorded H200 run; about 1-3 minutes):

    python benchmarks/profile_sweep.py
        -> results/profile_h200.json (command, date, GPU, versions, ceilings, datasheet, table)

CPU smoke test:

    python benchmarks/profile_sweep.py --model tiny --quick --out /tmp/profile_cpu.json

Grid (GPU default): prefill B in 1,4,16 x L in 128,512,2048; decode B in 1,8,32,64,128 at
C in 512,2048; models dummy:llama-3.2-1b and dummy:llama-3.1-8b in bf16 (random weights in
the real shapes). Backends: hf (Huggingface forward + DynamicCache) and, where
splitlab.engine.runner imports, engine (splitlab's ModelRunner). The last printed line is a JSON
summary. Needs torch + transformers only (no plotly, pandas or pynvml).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from splitlab.models import load_model  # noqa: E402
from splitlab.measure.profile import datasheet_for, measure_ceilings, profile_records, resolve_backend  # noqa: E402
from splitlab.present.results import save_profile  # noqa: E402

GPU_GRID = dict(batch_sizes=(1, 4, 16), prompt_lens=(128, 512, 2048), decode_batch_sizes=(1, 8, 32, 64, 128),
                context_lens=(512, 2048), repeats=5, warmup=2)
QUICK_GRID = dict(batch_sizes=(1, 2), prompt_lens=(16, 32), decode_batch_sizes=(1, 4), context_lens=(32,),
                  repeats=2, warmup=1)
DEFAULT_MODELS = ("dummy:llama-3.2-1b", "dummy:llama-3.1-8b")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", dest="models",
                   help="model spec (repeatable); default: " + ", ".join(DEFAULT_MODELS))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="bf16 / fp32 / fp16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--backends", default="hf,engine",
                   help="comma list of hf, engine (engine is skipped where splitlab.engine.runner is absent)")
    p.add_argument("--quick", action="store_true", help="tiny grid, small ceilings: a CPU smoke test")
    p.add_argument("--budget-s", type=float, default=220.0,
                   help="stop starting new cases after this many seconds (they are recorded as skipped)")
    p.add_argument("--out", default=None, help="output JSON (default: results/profile_<gpu>.json)")
    return p.parse_args(argv)


def gpu_slug(name: str) -> str:
    m = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", name or "")
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", (name or "cpu").lower()).strip("-")).lower()


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    models = args.models or (["tiny"] if args.quick or not on_gpu else list(DEFAULT_MODELS))
    grid = dict(QUICK_GRID if args.quick else GPU_GRID)
    if not on_gpu and not args.quick:
        print("profile_sweep: no GPU here; the full grid is for a GPU. Use --quick on CPU.", file=sys.stderr)

    kw = dict(copy_bytes=64 << 20, repeats=3) if args.quick else {}
    ceil = measure_ceilings(device, args.dtype, **kw)
    sheet = datasheet_for(ceil.device_name)
    print(f"ceilings: {ceil}")
    if sheet:
        print(f"datasheet {sheet.name}: {sheet.bf16_tflops:g} TFLOP/s, {sheet.mem_tb_s:g} TB/s "
              f"(measured {ceil.matmul_flops_s / sheet.flops_s:.0%} and {ceil.copy_bytes_s / sheet.bytes_s:.0%})")

    records, facts, notes = [], {}, []
    for spec in models:
        t0 = time.perf_counter()
        loaded = load_model(spec, device=device, dtype=args.dtype)
        facts[spec] = loaded.facts.to_dict()
        print(f"{spec}: loaded in {time.perf_counter() - t0:.1f} s "
              f"({loaded.facts.num_params / 1e9:.3g} B params, {loaded.facts.weight_bytes / 1e9:.3g} GB)")
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            try:
                name = resolve_backend(loaded, backend)
            except Exception as exc:  # engine not built yet, or an arch it does not run
                notes.append(f"{spec}: backend {backend} skipped ({str(exc)[:160]})")
                print(notes[-1])
                continue
            t0 = time.perf_counter()
            try:
                recs = profile_records(loaded, ceilings=ceil, backend=name, deadline=deadline, **grid)
            except Exception as exc:  # one backend failing must not lose the other's numbers
                notes.append(f"{spec}: backend {name} failed: {exc.__class__.__name__}: {str(exc)[:300]}")
                print(notes[-1])
                continue
            records += recs
            print(f"{spec} ({name}): {len(recs)} cases in {time.perf_counter() - t0:.1f} s")
            print_table(recs)
        del loaded
        if on_gpu:
            torch.cuda.empty_cache()

    out = Path(args.out) if args.out else ROOT / "results" / f"profile_{gpu_slug(ceil.device_name) if on_gpu else 'cpu'}.json"
    summary = summarise(records, ceil)
    command = "python " + " ".join([str(Path(sys.argv[0]).as_posix())] + sys.argv[1:]) if argv is None else \
        "python benchmarks/profile_sweep.py " + " ".join(argv)
    save_profile(records, ceil, out, command=command, datasheet=sheet,
                 extra={"models": facts, "grid": {k: list(v) if isinstance(v, tuple) else v for k, v in grid.items()},
                        "notes": notes, "summary": summary, "wall_s": time.perf_counter() - t_start})
    result = {"out": str(out), "gpu": ceil.device_name, "wall_s": round(time.perf_counter() - t_start, 1),
              "ceilings": {"matmul_tflop_s": round(ceil.matmul_flops_s / 1e12, 3),
                           "copy_tb_s": round(ceil.copy_bytes_s / 1e12, 4), "ridge_flop_per_byte": round(ceil.ridge, 2)},
              "cases": len(records), "skipped": sum(1 for r in records if r.get("error")), "summary": summary,
              "notes": notes}
    print(json.dumps(result))
    return 0


def print_table(recs) -> None:
    print(f"  {'phase':8}{'B':>5}{'L/C':>6}{'ms':>11}{'tok/s':>11}{'TFLOP/s':>10}{'TB/s':>10}{'FLOP/B':>9}  {'bound':8}{'roof':>6}")
    for r in recs:
        if r.get("error"):
            print(f"  {r['phase']:8}{r['batch']:>5}{r['tokens']:>6}  {r['error']}")
            continue
        print(f"  {r['phase']:8}{r['batch']:>5}{r['tokens']:>6}{r['time_s'] * 1e3:>11.3f}{r['tokens_per_s']:>11.4g}"
              f"{r['achieved_flops_s'] / 1e12:>10.3g}{r['achieved_bytes_s'] / 1e12:>10.3g}{r['intensity']:>9.3g}"
              f"  {r['bound']:8}{r['frac_of_roof']:>6.0%}")


def summarise(records, ceil) -> dict:
    """Where prefill and decode land against the ceilings, per model and backend."""
    out: dict = {}
    for key in sorted({(r["model"], r["backend"]) for r in records}):
        rows = [r for r in records if (r["model"], r["backend"]) == key and not r.get("error")
                and math.isfinite(r["time_s"])]
        pre = [r for r in rows if r["phase"] == "prefill"]
        dec = [r for r in rows if r["phase"] == "decode"]
        entry: dict = {}
        if pre:
            best = max(pre, key=lambda r: r["achieved_flops_s"])
            entry["prefill_best"] = {"batch": best["batch"], "prompt_len": best["tokens"],
                                     "tflop_s": round(best["achieved_flops_s"] / 1e12, 2),
                                     "frac_of_matmul_peak": round(best["achieved_flops_s"] / ceil.matmul_flops_s, 3)}
            entry["prefill_median_frac_of_roof"] = round(statistics.median(r["frac_of_roof"] for r in pre), 3)
        if dec:
            best = max(dec, key=lambda r: r["achieved_bytes_s"])
            entry["decode_best"] = {"batch": best["batch"], "context": best["tokens"],
                                    "tb_s": round(best["achieved_bytes_s"] / 1e12, 3),
                                    "frac_of_copy_bw": round(best["achieved_bytes_s"] / ceil.copy_bytes_s, 3),
                                    "ms": round(best["time_s"] * 1e3, 3)}
            entry["decode_median_frac_of_roof"] = round(statistics.median(r["frac_of_roof"] for r in dec), 3)
            entry["decode_bound"] = sorted({r["bound"] for r in dec})
        out[f"{key[0]} ({key[1]})"] = entry
    return out


if __name__ == "__main__":
    sys.exit(main())
