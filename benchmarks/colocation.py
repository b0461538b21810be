#!/usr/bin/env python
"""Co-location on one GPU: split (prefill and decode workers side by side) against the baselines.

On the H200 (``dummy:llama-3.1-8b``, bf16) in calls bounded by ``--budget-s``, each resuming the
last (``--merge-from``), about 25 minutes in all; on a CPU, a smoke run (``tiny``, fp32)::

    python benchmarks/colocation.py --out results/colocation_h200.json
    python benchmarks/colocation.py --merge-from results/colocation_h200.json --out results/colocation_h200.json
    python benchmarks/colocation.py --quick --device cpu --out /tmp/colocation_cpu.json

First the device checks (``tests/gpu/test_exact.py`` on ``--check-model``), then calibration
(``splitlab.measure.calibrate``: Poisson rates 0.6x/1.0x/1.3x of serial's burst capacity, the
Azure code trace at 0.6x/1.0x), then the grid (``step_specs``, priority order; its cells and
rows from ``splitlab.measure.colocation``) through ``splitlab.measure.sweep``; every session
first runs a check workload compared with serial's tokens. ``splitlab.measure.analysis`` draws
the conclusions. The recorded file's first call found its 1.0x rate below saturation, so its
runs were relabelled ``poisson-low`` (``analysis.relabel``) and the later calls pass ``--rates``.
The last printed line is a JSON summary.
"""

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, free_memory, leftover_diff, leftovers_baseline, leftovers_watched, log,  # noqa: E402
                     parse_shares, print_rows, quiet_transformers, reanalysed, report, run_device_checks, run_step,
                     step_session)

import torch  # noqa: E402

import splitlab  # noqa: E402
from splitlab.config import SLO, EngineConfig, SplitConfig  # noqa: E402
from splitlab.measure import analysis as an, calibrate as cal, colocation as co  # noqa: E402
from splitlab.measure.sweep import SkipCell, Sweep  # noqa: E402
from splitlab.workload import LengthDist, Workload  # noqa: E402

AZURE_CSV = REPO.parent / "shared" / "data" / "azure-llm-2023" / "AzureLLMInferenceTrace_code.csv"
DEFAULT_OUT = REPO / "results" / "colocation_h200.json"
DEFAULT_SHARES = [(50, 50), (100, 100), (70, 30), (30, 70), (60, 40)]  # prefill/decode; 100/100: no partition
SLO_WHY = ("TTFT 1 s: several ~100 ms 4x1k prefill steps of queueing, not a backlog; TPOT 50 ms: 20 tok/s per "
           "user, ~8x a normal decode step, broken only by decode stalls or overload")


def say(msg: str) -> None:
    log("colocation", msg)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, kw in [
        ("--model", dict(help="main model (GPU default dummy:llama-3.1-8b; CPU tiny)")),
        ("--check-model", dict(help="fp32 model of the device checks (GPU default dummy:llama-3.2-1b); 'none' skips")),
        ("--device", dict(help="cuda or cpu (default: cuda when present)")),
        ("--dtype", dict(help="main model dtype (default bf16 on GPU, fp32 on CPU)")),
        ("--quick", dict(action="store_true", help="small workloads and fewer steps (CPU smoke test)")),
        ("--requests", dict(type=int, help="requests per workload (GPU default 160)")),
        ("--rates", dict(help="1 to 3 Poisson rates in req/s, comma-separated; default: calibrated")),
        ("--azure-rates", dict(help="target mean rates of the Azure replay, comma-separated")),
        ("--modes", dict(help="step names or prefixes to run, comma-separated (e.g. serial,split-mps)")),
        ("--slo-ttft", dict(type=float, default=1.0)), ("--slo-tpot", dict(type=float, default=0.05)),
        ("--chunk-size", dict(type=int, help="chunked mode's token budget per step (GPU 1024)")),
        ("--slots", dict(type=int, help="KV slots and the largest decode batch (GPU 64)")),
        ("--budget-s", dict(type=float, help="start no cell after this (GPU 470 s)")),
        ("--out", dict(help=f"output JSON (default {DEFAULT_OUT.relative_to(REPO)})")),
        ("--runs-dir", dict(help="folder of the saved runs (default: <out without .json>/)")),
        ("--shares", dict(help="prefill/decode MPS shares of the sweep (default 50/50,100/100,70/30,30/70,60/40)")),
        ("--merge-from", dict(action="append", help="an earlier output (repeatable): its runs are kept, its cells "
                                                    "skipped (pass the same --requests and --rates)")),
        ("--no-progress", dict(action="store_true")),
        ("--analyse-only", dict(action="store_true", help="with --merge-from: redo the analysis, run nothing")),
    ]:
        p.add_argument(flag, **kw)
    return p.parse_args(argv)


def make_plan(args) -> dict[str, Any]:
    gpu = torch.cuda.is_available() if args.device is None else args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA GPU is visible")
    quick = args.quick or not gpu
    plan: dict[str, Any] = {"device": "cuda" if gpu else "cpu", "model": args.model or ("dummy:llama-3.1-8b" if gpu
                                                                                         else "tiny"),
                            "dtype": args.dtype or ("bfloat16" if gpu else "float32"),
                            "check_model": args.check_model or ("dummy:llama-3.2-1b" if gpu else "none"), "quick": quick}
    if gpu:
        n = args.requests or (32 if quick else 160)
        plan.update(requests=n, prompt=(768, 1280), output=(192, 320), max_seq_len=2048, num_slots=args.slots or 64,
                    max_batch=args.slots or 64, token_budget=8192, chunk_size=args.chunk_size or 1024,
                    check=dict(n=6, lens=(37, 120, 300, 64, 512, 9), new=32), hf=dict(n=32, batch=32),
                    budget_s=args.budget_s or (240.0 if quick else 470.0), calib_n=n)
    else:
        plan.update(requests=args.requests or 10, prompt=(16, 48), output=(6, 12), max_seq_len=96, num_slots=4,
                    max_batch=4, token_budget=128, chunk_size=args.chunk_size or 24,
                    check=dict(n=5, lens=(7, 30, 12, 41, 3), new=6), hf=dict(n=4, batch=4),
                    budget_s=args.budget_s or 300.0, calib_n=8)
    return plan


def step_specs(plan: dict[str, Any], shares: list[tuple[int, int]]) -> list[tuple]:
    """(name, kind, options, workloads, gpu_only, sweep) in priority order: the comparison and
    the SM-share sweep near saturation, replicas and hf-generate there, then the other rates."""
    mid, rest = ["check", "poisson-mid"], ["check", "poisson-high", "azure-a", "poisson-low", "azure-b"]
    few = ["check", "poisson-high", "azure-a"]
    default = (int(SplitConfig.DEFAULT_PREFILL_SHARE), int(SplitConfig.DEFAULT_DECODE_SHARE))

    def mps(p, d, wl, sweep=False):
        return (f"split-mps-p{p}-d{d}", "split", (("backend", "mps"), ("prefill_share", p), ("decode_share", d)),
                wl, True, sweep)

    def split(backend, wl):
        return (f"split-{backend}", "split", (("backend", backend),), wl, backend in ("green", "mps"), False)

    def replicas(n, on):
        return (f"replicas-{n}{'-mps' if on else ''}", "replicas", (("num_replicas", n), ("mps", on)), mid, on, False)

    quick = plan["quick"]
    return [("serial", "engine", (("mode", "serial"),), mid, False, False),
            ("chunked", "engine", (("mode", "chunked"),), mid, False, False),
            *[mps(p, d, mid, sweep=True) for p, d in (shares[:2] if quick else shares)],
            split("green", mid), split("processes", mid),
            *[replicas(n, on) for n, on in ([(2, True), (2, False)] if quick else
                                            [(2, True), (4, True), (2, False), (4, False)])],
            ("hf-generate", "hf", (), ["check", "hf-prefix"], False, False), split("streams", mid),
            ("serial", "engine", (("mode", "serial"),), rest, False, False),
            ("chunked", "engine", (("mode", "chunked"),), rest, False, False), mps(*default, rest),
            *([] if default == (100, 100) else [mps(100, 100, few)]), split("green", few),
            split("processes", ["check", "azure-a"])]


class Bench:
    def __init__(self, args, plan: dict[str, Any]) -> None:
        self.args, self.plan, self.gpu = args, plan, plan["device"] == "cuda"
        self.slo = SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot)
        self.out = Path(args.out) if args.out else DEFAULT_OUT
        self.runs_dir = Path(args.runs_dir) if args.runs_dir else self.out.with_suffix("")
        self.workloads: dict[str, tuple[Workload, dict[str, Any]]] = {}
        self.modes = [m.strip() for m in args.modes.split(",")] if args.modes else None
        self.sweep = Sweep("colocation", self.out, budget_s=plan["budget_s"], resume=args.merge_from or (),
                           key_of=co.cell_key, progress=False, state=self.state)
        earlier = self.sweep.earlier or {}
        if earlier and earlier.get("plan", {}).get("model") != plan["model"]:
            raise SystemExit(f"--merge-from: not a colocation result for {plan['model']}")
        self.checks = {k: v for k, v in earlier.get("checks", {}).items() if k not in ("leftovers", "gpu_paths")}
        self.calibration = dict(earlier.get("calibration", {}))
        self.token_check = co.TokenCheck(self.checks)
        self.steps: dict[str, co.Step] = {}
        self.before = leftovers_baseline()
        self.model = None

    def state(self) -> dict[str, Any]:
        return {"plan": self.plan, "slo": self.slo.to_dict(), "slo_why": SLO_WHY, "calibration": self.calibration,
                "workloads": {k: {"name": wl.name, "requests": len(wl), **meta}
                              for k, (wl, meta) in self.workloads.items()},
                "checks": self.checks, "analysis": None}

    def device_checks(self) -> None:
        spec = self.plan["check_model"]
        if spec in ("none", "") or (self.checks.get("gpu_tests") or {}).get("passed"):
            return self.sweep.skip("device checks", "--check-model none" if spec in ("none", "") else "merged")
        run_device_checks(self.checks, ["tests/gpu/test_exact.py"], spec, say)
        self.sweep.write()

    def engine_config(self) -> EngineConfig:
        p = self.plan
        return EngineConfig(max_seq_len=p["max_seq_len"], num_slots=p["num_slots"], max_batch=p["max_batch"],
                            token_budget=p["token_budget"], chunk_size=max(p["chunk_size"], p["max_batch"] + 1))

    def calibrated(self, wl: Workload, req_s: float) -> None:
        say(f"calibration {wl.name}: serial serves a burst of {len(wl)} at {req_s:.2f} req/s")
        free_memory()

    def build_workloads(self) -> None:
        """The check, Poisson at three rates (calibrated, or --rates, or the merged file's), the
        first requests of the middle one for hf-generate, and the Azure replays."""
        p, n, old = self.plan, self.plan["requests"], (self.sweep.earlier or {}).get("workloads", {})
        calibration = cal.Calibration(self.model, self.engine_config(), recorded=old, measured=self.calibration,
                                      on_capacity=self.calibrated)
        check = p["check"]
        self.workloads["check"] = (cal.check_workload(self.model.facts.vocab_size, check["lens"][: check["n"]],
                                                      check["new"]), {"kind": "check"})
        rates = [float(x) for x in self.args.rates.split(",")] if self.args.rates else None
        self.workloads.update(calibration.poisson(n, LengthDist.uniform(*p["prompt"]), LengthDist.uniform(*p["output"]),
                                                  rates, calib_n=p["calib_n"]))
        if "poisson-mid" in self.workloads:
            self.workloads["hf-prefix"] = cal.prefix_of(*self.workloads["poisson-mid"], p["hf"]["n"])
        if AZURE_CSV.is_file():
            targets = [float(x) for x in self.args.azure_rates.split(",")] if self.args.azure_rates else None
            self.workloads.update(calibration.trace(AZURE_CSV, n, p["max_seq_len"], targets,
                                                    multiples=(0.8,) if p["quick"] else (0.6, 1.0)))
        else:
            self.sweep.skip("azure workloads", f"trace not found at {AZURE_CSV}")
        for change in cal.workload_changes(self.workloads, old):  # merged runs must have served the same requests
            raise SystemExit(f"--merge-from: {change}; pass the same --requests and --rates")

    def cells(self) -> list[co.Step]:
        """The grid (``step_specs``) less what is done or not wanted."""
        cells = co.step_cells(step_specs(self.plan, self.shares()), {k: wl for k, (wl, _) in self.workloads.items()},
                              self.sweep.done, self.modes)
        self.steps = {c.step: c for c in cells}
        return cells

    def shares(self) -> list[tuple[int, int]]:
        try:
            return parse_shares(self.args.shares) if self.args.shares else DEFAULT_SHARES
        except ValueError as exc:
            raise SystemExit(f"--shares: {exc}") from None

    @contextlib.contextmanager
    def session(self, step: str):
        """The step's session (None for the one-call modes), closed after its last cell; what it
        left behind is recorded."""
        first = self.steps[step]  # a step's cells all carry its kind and options
        if first.gpu_only and not self.gpu:
            raise SkipCell("needs a CUDA GPU")
        say(f"step {step}")
        with leftovers_watched(lambda left: self.checks.setdefault("leftovers_by_step", {}).update({step: left})), \
                step_session(first.kind, self.model, self.engine_config(), dict(first.options)) as session:
            yield session

    def measure(self, cell: co.Step, session) -> dict[str, Any]:
        wl, meta = self.workloads[cell.workload]
        run = run_step(session, wl, self.model, cell.kind, dict(cell.options), self.engine_config(),
                       progress=not self.args.no_progress, hf_batch=self.plan["hf"]["batch"])
        row = co.run_record(run, self.slo, cell.step, cell.workload, wl.name, meta, sweep=cell.sweep)
        if cell.workload == "check":
            row["check_vs_serial"] = self.token_check(run)
        from splitlab.present.results import save_runs

        save_runs([run], self.runs_dir, [cell.name], compress=True)
        say(co.describe(cell.name, row))
        return row


COLUMNS = [("step", "step", 24, None), ("workload_key", "workload", 13, None), ("throughput_tok_s", "tok/s", 8, 0),
           ("ttft_p50_s", "TTFT50", 7, 3), ("ttft_p99_s", "TTFT99", 7, 3), ("tpot_p99_ms", "TPOT99ms", 8, 1),
           ("itl_p99_ms", "ITL99ms", 8, 1), ("goodput_req_s", "good/s", 7, 2), ("slo_attainment", "attain", 6, 2),
           ("slowdown", "slowdn", 6, 2)]


def print_table(rows: list[dict[str, Any]]) -> None:
    print_rows([{**r, "tpot_p99_ms": r["tpot_p99_s"] * 1e3, "itl_p99_ms": r["itl_p99_s"] * 1e3,
                 "slowdown": (r.get("decode_interference") or {}).get("slowdown_batch_matched")}
                for r in rows if r["workload_key"] != "check"], COLUMNS)


def finish(data: dict[str, Any], out: Path, runs_dir: Path) -> None:
    print_table(data["runs"])
    report(data, co.summary(data, str(out), str(runs_dir)))


def analyse_only(args) -> int:
    """``--analyse-only``: the merged file as it was, with its analysis redone here."""
    if not args.merge_from:
        raise SystemExit("--analyse-only needs --merge-from (the output of the runs to analyse)")
    out = Path(args.out) if args.out else DEFAULT_OUT
    runs_dir = Path(args.runs_dir) if args.runs_dir else out.with_suffix("")
    data = reanalysed(args.merge_from, "colocation", co.cell_key, lambda d: co.analyse_saved(d["runs"], runs_dir), out)
    finish(data, out, runs_dir)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_transformers()
    if args.analyse_only:
        return analyse_only(args)
    plan = make_plan(args)
    bench = Bench(args, plan)
    say(f"plan: {plan['model']} ({plan['dtype']}) on {plan['device']}, {plan['requests']} requests per workload, "
        f"budget {plan['budget_s']:.0f} s, SLO TTFT {bench.slo.ttft_s} s / TPOT {bench.slo.tpot_s * 1e3:.0f} ms")
    if bench.gpu:
        from splitlab.system.mps import mps_status

        bench.checks["mps_status_before"] = mps_status()
    bench.device_checks()
    bench.model = splitlab.load_model(plan["model"], device=plan["device"], dtype=plan["dtype"])
    bench.checks["main_model"] = {"spec": plan["model"], "dtype": plan["dtype"],
                                  "weight_bytes": bench.model.facts.weight_bytes}
    try:
        bench.build_workloads()
    except Exception as exc:  # noqa: BLE001 - recorded; the grid runs on what was built
        bench.sweep.fail("workloads / calibration", exc)
    bench.sweep.run(bench.cells(), bench.measure, group_context=bench.session)
    bench.model = None
    free_memory()
    bench.checks["leftovers"] = leftover_diff(bench.before)
    bench.checks["gpu_paths"] = an.gpu_paths(bench.sweep.rows)
    bench.sweep.write(analysis=co.analyse_saved(bench.sweep.rows, bench.runs_dir), checks_ok=co.checks_ok(bench.checks))
    finish(json.loads(bench.out.read_text()), bench.out, bench.runs_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
