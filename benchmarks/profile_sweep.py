#!/usr/bin/env python
"""Prefill vs decode on the roofline: measured ceilings + profile_phases, written as JSON.

GPU (the recorded H200 run; about 1-3 minutes), and a CPU smoke test::

    python benchmarks/profile_sweep.py
        -> results/profile_h200.json (command, date, GPU, versions, ceilings, datasheet, table)
    python benchmarks/profile_sweep.py --model tiny --quick --out /tmp/profile_cpu.json

Grid (GPU default): prefill B in 1,4,16 x L in 128,512,2048; decode B in 1,8,32,64,128 at
C in 512,2048; models dummy:llama-3.2-1b and dummy:llama-3.1-8b in bf16 (random weights in
the real shapes). Backends: hf (Huggingface forward + DynamicCache) and, where
splitlab.engine.runner imports, engine (splitlab's ModelRunner). Each (model, backend) is a cell
of ``splitlab.measure.sweep`` (``--budget-s``: cases not started in time are recorded as
skipped; ``--merge-from``: keep an earlier call's cells); the file is a profile
(``splitlab.present.results.load_profile`` reads it). The last printed line is a JSON summary.
Needs torch + transformers only (no plotly, pandas or pynvml).
"""

import argparse
import contextlib
import dataclasses
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, free_memory  # noqa: E402

import torch  # noqa: E402

from splitlab.measure.profile import datasheet_for, measure_ceilings, profile_records, resolve_backend  # noqa: E402
from splitlab.measure.sweep import Cell, SkipCell, Sweep  # noqa: E402
from splitlab.models import load_model  # noqa: E402
from splitlab.present.results import PROFILE_FORMAT  # noqa: E402  (what load_profile reads)

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
    p.add_argument("--merge-from", action="append", help="an earlier output of this script: its cells are kept")
    return p.parse_args(argv)


def gpu_slug(name: str) -> str:
    m = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", name or "")
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", (name or "cpu").lower()).strip("-")).lower()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Profiled(Cell):
    """One model through one backend over the whole grid; a model's backends share it loaded."""

    model: str
    backend: str


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    models = args.models or (["tiny"] if args.quick or not on_gpu else list(DEFAULT_MODELS))
    grid = dict(QUICK_GRID if args.quick else GPU_GRID)
    if not on_gpu and not args.quick:
        print("profile_sweep: no GPU here; the full grid is for a GPU. Use --quick on CPU.", file=sys.stderr)
    ceil = measure_ceilings(device, args.dtype, **(dict(copy_bytes=64 << 20, repeats=3) if args.quick else {}))
    sheet = datasheet_for(ceil.device_name)
    print(f"ceilings: {ceil}")
    out = Path(args.out) if args.out else REPO / "results" / f"profile_{gpu_slug(ceil.device_name) if on_gpu else 'cpu'}.json"
    facts: dict[str, dict] = {}

    def state() -> dict:
        records = [rec for r in sweep.rows for rec in r["records"]]
        return {"gpu": ceil.device_name, "versions": sweep.info["environment"].get("versions"),
                "env": sweep.info["environment"], "ceilings": ceil.to_dict(),
                "datasheet": sheet.to_dict() if sheet else None, "table": records,
                "models": {**(sweep.earlier or {}).get("models", {}), **facts},
                "grid": {k: list(v) if isinstance(v, tuple) else v for k, v in grid.items()},
                "notes": [s["why"] for s in sweep.skipped] + [f["error"] for f in sweep.failed],
                "summary": summarise(records, ceil)}

    sweep = Sweep("profile_sweep", out, budget_s=args.budget_s, resume=args.merge_from or (), state=state,
                  command="python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None else
                  "python benchmarks/profile_sweep.py " + " ".join(argv), file_format=PROFILE_FORMAT)

    @contextlib.contextmanager
    def loaded(spec: str):
        t0 = time.perf_counter()
        model = load_model(spec, device=device, dtype=args.dtype)
        facts[spec] = model.facts.to_dict()
        print(f"{spec}: loaded in {time.perf_counter() - t0:.1f} s ({model.facts.num_params / 1e9:.3g} B params)")
        yield model
        del model
        free_memory()

    def measure(cell: Profiled, model) -> dict:
        try:
            name = resolve_backend(model, cell.backend)
        except Exception as exc:  # engine not built, or an arch it does not run
            raise SkipCell(f"{cell.model}: backend {cell.backend} skipped ({str(exc)[:160]})") from exc
        t0 = time.perf_counter()
        recs = profile_records(model, ceilings=ceil, backend=name, deadline=t0 + sweep.time_left(), **grid)
        print(f"{cell.model} ({name}): {len(recs)} cases in {time.perf_counter() - t0:.1f} s")
        print_table(recs)
        return {"model": cell.model, "backend": name, "records": recs}

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    data = sweep.run([Profiled(name=f"{m}--{b}", group=m, model=m, backend=b) for m in models for b in backends],
                     measure, group_context=loaded)
    print(json.dumps({"out": str(out), "gpu": ceil.device_name, "wall_s": data["wall_s"],
                      "ceilings": {"matmul_tflop_s": round(ceil.matmul_flops_s / 1e12, 3),
                                   "copy_tb_s": round(ceil.copy_bytes_s / 1e12, 4),
                                   "ridge_flop_per_byte": round(ceil.ridge, 2)},
                      "cases": len(data["table"]), "skipped": sum(1 for r in data["table"] if r.get("error")),
                      "summary": data["summary"], "notes": data["notes"]}))
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
                and isinstance(r["time_s"], float) and math.isfinite(r["time_s"])]
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
