#!/usr/bin/env python
"""The paged KV pool against the slot pool at EQUAL KV memory (issue "capacity"). Serial unless named:

- capacity: the Azure code trace's first requests (contexts up to 8192, so a slot reserves 8192),
  all arriving at 0: the peak decode batch, and the pool's capacity in sequences;
- burst capacity: the highest Poisson / Azure rate at 90% attainment of TTFT 1 s / TPOT 50 ms
  (``measure.slo.interpolate_max_rate``), the slot pool against pages of 16;
- the co-location benchmark's rates (Poisson 21.2, Azure 17.4 req/s; Azure uncapped here):
  serial, chunked and split-mps 60/40 on both pools (a split only where ``splitlab.run`` takes
  a paged pool, else skipped with the reason printed); page sizes 16/32/64 on the burst and Poisson.

One engine per pool is built and warmed once; each run of its group gets a new scheduler and
allocator, and is stopped (failed) past twice its expected time + 30 s. Runs land in ``--runs-dir``::

    python benchmarks/paged_capacity.py --out results/paged_h200.json      # H200: about 8 min (470 s budget)
    python benchmarks/paged_capacity.py --merge-from results/paged_h200.json --out results/paged_h200.json  # the rest
    python benchmarks/paged_capacity.py --smoke --out /tmp/paged_cpu.json   # CPU: tiny model, tiny sizes
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, free_memory, leftover_diff, leftovers, log, quiet_transformers, report  # noqa: E402

import torch  # noqa: E402

import splitlab  # noqa: E402
from splitlab.config import SLO, EngineConfig  # noqa: E402
from splitlab.engine.loop import build_engine  # noqa: E402
from splitlab.engine.warmup import warm_up  # noqa: E402
from splitlab.errors import ConfigError, ModeError, WorkloadError  # noqa: E402
from splitlab.measure.paged import analyse, row_of  # noqa: E402
from splitlab.measure.sweep import Cell, SkipCell, Sweep  # noqa: E402
from splitlab.modes.common import check_workload, reset_peak  # noqa: E402
from splitlab.modes.continuous import serve_on  # noqa: E402
from splitlab.workload import LengthDist, Request, Workload, from_azure_trace, poisson  # noqa: E402

TRACE = "shared/data/azure-llm-2023/AzureLLMInferenceTrace_code.csv"  # in the repository or beside it
SLO_RELAXED = SLO(ttft_s=1.0, tpot_s=0.05)
SPLIT_OPTIONS = {"mps": {"backend": "mps", "prefill_share": 60, "decode_share": 40}, "streams": {"backend": "streams"},
                 "green": {"backend": "green"}, "processes": {"backend": "processes"}}
# prefill_tok_s, drain_s, setup_s: what the budget expects a burst's prefill, a run's tail and an engine to take
# the co-location benchmark's Poisson (160 requests; serial met the SLO at 21.2 req/s there) and the
# adaptive sweep's Azure size (60 requests; serial's limit there, contexts capped at 2048: 6 req/s)
GPU_PLAN = dict(device="cuda", model="dummy:llama-3.1-8b", dtype="bfloat16", seq_len=8192, slots=64, paged_batch=256,
                page_sizes=[16, 32, 64], token_budget=8192, chunk_size=2048, burst_requests=288, requests=160,
                azure_requests=60, prompt=[768, 1280], output=[192, 320], poisson_rates=[21.2, 26.0, 32.0, 40.0],
                azure_rates=[4.0, 7.0, 10.4, 17.4], coloc_poisson=21.2, coloc_azure=17.4, split=["mps"],
                budget_s=470.0, prefill_tok_s=35000.0, drain_s=5.0, setup_s=10.0)
SMOKE_PLAN = dict(device="cpu", model="tiny", dtype="float32", seq_len=256, slots=4, paged_batch=16,
                  page_sizes=[16, 32], token_budget=256, chunk_size=48, burst_requests=16, requests=8, azure_requests=8,
                  prompt=[16, 48], output=[6, 12], poisson_rates=[4.0, 8.0], azure_rates=[4.0], coloc_poisson=8.0,
                  coloc_azure=4.0, split=["streams"], budget_s=600.0, prefill_tok_s=20000.0, drain_s=2.0, setup_s=2.0)
say = functools.partial(log, "paged")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU: the tiny model and tiny sizes (the test's path)")
    p.add_argument("--model")
    p.add_argument("--trace", help=f"the Azure code trace CSV (default: {TRACE} in or beside the repository)")
    p.add_argument("--split", help=f"split backends, comma-separated ({', '.join(SPLIT_OPTIONS)}; or none)")
    p.add_argument("--budget-s", type=float, help="start no cell after this (GPU 470 s)")
    p.add_argument("--out", default=str(REPO / "results" / "paged_h200.json"))
    p.add_argument("--runs-dir", help="folder of the saved runs (default: <out without .json>/)")
    p.add_argument("--merge-from", action="append", help="an earlier output (repeatable): its cells are skipped")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def make_plan(args) -> dict[str, Any]:
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: pass --smoke for the CPU run (tiny model, tiny sizes)")
    plan = dict(SMOKE_PLAN if args.smoke else GPU_PLAN)
    plan.update({k: v for k, v in (("model", args.model), ("budget_s", args.budget_s)) if v})
    if args.split:
        plan["split"] = [] if args.split == "none" else [b.strip() for b in args.split.split(",")]
        if set(plan["split"]) - set(SPLIT_OPTIONS):
            raise SystemExit(f"--split: give backends among {', '.join(SPLIT_OPTIONS)}, or none")
    return plan


def pools(plan) -> dict[str, EngineConfig]:
    """The slot pool and, per page size, a paged pool of the same bytes (each pool's tensors hold
    one scratch row: a slot there, a page here)."""
    base = EngineConfig(max_seq_len=plan["seq_len"], token_budget=plan["token_budget"], chunk_size=plan["chunk_size"],
                        max_batch=plan["slots"], num_slots=plan["slots"])
    positions = (plan["slots"] + 1) * plan["seq_len"]
    return {"slots": base, **{f"paged{bs}": base.replace(num_slots=None, max_batch=plan["paged_batch"],
                                                         kv_block_size=bs, num_pages=positions // bs - 1)
                              for bs in plan["page_sizes"]}}


def workloads(plan, model, csv: Path | None) -> dict[str, tuple[Workload, dict[str, Any]]]:
    out: dict[str, tuple[Workload, dict[str, Any]]] = {}
    plen, olen, n = LengthDist.uniform(*plan["prompt"]), LengthDist.uniform(*plan["output"]), plan["requests"]
    for rate in plan["poisson_rates"]:
        out[f"poisson-r{rate:g}"] = (poisson(n, rate=rate, prompt_len=plen, output_len=olen, seed=1, model=model,
                                             name=f"poisson-r{rate:g}-n{n}"), {"kind": "poisson", "rate": rate})
    if csv is None:
        return out
    cap, m, n = plan["seq_len"], plan["burst_requests"], plan["azure_requests"]
    burst = from_azure_trace(csv, limit=m, max_total_len=cap, seed=3, model=model)
    out["azure-burst"] = (Workload(f"azure-code-burst-n{m}", tuple(Request(r.id, r.prompt_ids, r.max_new_tokens, 0.0)
                                                                     for r in burst)), {"kind": "burst", "rate": None})
    base = from_azure_trace(csv, limit=n, max_total_len=cap, seed=3, model=model)
    trace_rate = len(base) / max(r.arrival_s for r in base)
    for rate in plan["azure_rates"]:
        out[f"azure-r{rate:g}"] = (from_azure_trace(csv, rate_scale=rate / trace_rate, limit=n, max_total_len=cap,
                                                    seed=3, model=model, name=f"azure-code-r{rate:g}-n{n}"),
                                   {"kind": "azure", "rate": rate, "rate_scale": rate / trace_rate})
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Point(Cell):
    step: str  # serial | chunked | split-<backend>
    pool: str  # slots | paged<page size>
    workload: str


def grid(plan, wls) -> list[Point]:
    """Priority order, grouped so that each pool's engine is built once: the slot pool and pages
    of 16 (capacity, rate sweeps, co-location rates), the other page sizes, then the splits."""
    main = ["slots", f"paged{plan['page_sizes'][0]}"]
    coloc = [f"poisson-r{plan['coloc_poisson']:g}", f"azure-r{plan['coloc_azure']:g}"]
    sweeps = ["azure-burst", *[k for k in wls if k.startswith(("poisson-", "azure-r"))]]
    todo = [(s, pool, w) for pool in main for s, ws in (("serial", sweeps), ("chunked", coloc)) for w in ws]
    todo += [("serial", f"paged{bs}", w) for bs in plan["page_sizes"][1:] for w in ("azure-burst", coloc[0])]
    todo += [(f"split-{b}", pool, w) for b in plan["split"] for pool in main for w in coloc]
    cells = []
    for step, pool, key in todo:
        if key in wls:
            wl, split = wls[key][0], step.startswith("split-")
            cost = (sum(r.prompt_len for r in wl) / plan["prefill_tok_s"] if key == "azure-burst" else
                    max(r.arrival_s for r in wl)) + plan["drain_s"]
            cells.append(Point(name=f"{step}--{pool}--{key}", group=f"split:{step}:{pool}" if split else
                               f"engine:{pool}", cost_s=round(cost, 1), setup_s=plan["setup_s"] * (3 if split else 1),
                               step=step, pool=pool, workload=key))
    return cells


def serve(parts, model, wl: Workload, mode: str, bound_s: float, progress: bool):
    """One run of ``mode`` on an engine already built and warmed (``modes.continuous.serve_on``),
    stopped past ``bound_s``."""
    check_workload(wl, model, parts.config)
    reset_peak(torch.device(model.device))
    return serve_on(parts, wl, model, mode, warmed_up=True, progress=progress, slo=SLO_RELAXED, deadline_s=bound_s)


def split_refusal(model, cfg: EngineConfig, options: dict[str, Any]) -> str | None:
    """Why ``splitlab.run`` refuses a split over ``cfg`` (None: it takes it), from its own input
    checks: a request one position too long passes the mode's checks and stops at the workload's."""
    too_long = Workload("probe", (Request(0, (1,) * cfg.max_seq_len, 1, 0.0),))
    try:
        splitlab.run(too_long, model, mode="split", config=cfg, progress=False, **options)
    except WorkloadError:
        return None
    except (ConfigError, ModeError) as exc:
        return str(exc)
    return "the probe ran instead of being refused"


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_transformers()
    plan, out = make_plan(args), Path(args.out)
    runs_dir, configs, progress = Path(args.runs_dir or out.with_suffix("")), pools(plan), not args.no_progress
    state: dict[str, Any] = {"plan": plan, "slo": SLO_RELAXED.to_dict(), "split_refused": {},
                             "pools": {k: c.to_dict() for k, c in configs.items()}}
    sweep = Sweep("paged_capacity", out, budget_s=plan["budget_s"], resume=args.merge_from or (), progress=progress,
                  state=lambda: state)
    before, model = leftovers(), splitlab.load_model(plan["model"], device=plan["device"], dtype=plan["dtype"])
    csv = next((p for p in ([Path(args.trace)] if args.trace else [REPO / TRACE, REPO.parent / TRACE]) if p.is_file()),
               None)
    if csv is None:
        sweep.skip("azure workloads", f"the trace is not at {args.trace or TRACE} (in or beside the repository)")
    wls = workloads(plan, model, csv)
    for key, old in ((sweep.earlier or {}).get("workloads") or {}).items():  # merged runs: the same requests
        if key in wls and (old["name"], old["requests"]) != (wls[key][0].name, len(wls[key][0])):
            raise SystemExit(f"--merge-from: workload {key} was {old['name']}, now {wls[key][0].name}")
    state["workloads"] = {k: {"name": wl.name, "requests": len(wl), **meta} for k, (wl, meta) in wls.items()}
    say(f"{plan['model']} ({plan['dtype']}), slots or pages: "
        + ", ".join(f"{k} {c.num_slots or c.num_pages}" for k, c in configs.items()))

    @contextlib.contextmanager
    def group(name: str):
        kind, *rest = name.split(":")
        cfg, held = configs[rest[-1]], []  # held: emptied before free_memory, so the pool is freed
        try:
            if kind == "engine":
                held.append(build_engine(model, cfg))
                warm_up(held[0].runner, token_budget=cfg.token_budget)
                yield held[0]
            else:
                options = SPLIT_OPTIONS[rest[0].removeprefix("split-")]
                why = state["split_refused"][name] = split_refusal(model, cfg, options)
                if why:
                    say(f"{name} skipped: splitlab.run refuses it: {why}")
                    raise SkipCell(f"splitlab.run refuses a split over this pool: {why}")
                from splitlab.modes.split import SplitSession

                with SplitSession(model, cfg, **options) as session:
                    yield session
        finally:
            held.clear()
            free_memory()

    def measure(cell: Point, ctx) -> dict[str, Any]:
        from splitlab.present.results import save_runs

        wl, meta = wls[cell.workload]
        if cell.step.startswith("split-"):  # bounded by its workload alone: a session has no deadline
            run = ctx.run(wl, progress=progress)
            run.config = dataclasses.replace(run.config, slo=SLO_RELAXED)
        else:
            run = serve(ctx, model, wl, cell.step, 2 * cell.cost_s + 30.0, progress)
        save_runs([run], runs_dir, [cell.name], compress=True)
        row = row_of(run, cell, meta, configs[cell.pool], SLO_RELAXED)
        say(f"{cell.name}: peak batch {row['peak_decode_batch']}, goodput {row['goodput_req_s']:.2f} req/s, "
            f"attainment {row['slo_attainment']:.2f}, TTFT p99 {row['ttft_p99_s']:.3f} s, "
            f"preemptions {row['preemptions']}")
        return row

    sweep.run(grid(plan, wls), measure, group_context=group)
    model = None
    free_memory()
    data = sweep.write(analysis=analyse(sweep.rows, plan), leftovers=leftover_diff(before))
    a = data["analysis"]
    report(data, {"out": str(out), "runs_dir": str(runs_dir), "capacity_ratio": a["capacity_ratio"],
                  "burst_ratio": {k: v.get("paged_over_slots") for k, v in a["burst_capacity"].items()},
                  "equal_memory": a["equal_memory"]["equal"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
