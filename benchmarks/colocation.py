#!/usr/bin/env python
"""Co-location on one GPU: split (prefill and decode workers side by side) against the baselines.

On the H200 (``dummy:llama-3.1-8b``, bf16) in calls bounded by ``--budget-s``, each resuming the
last (``--merge-from``), about 25 minutes in all; on a CPU, a smoke run (``tiny``, fp32)::

    python benchmarks/colocation.py --out results/colocation_h200.json
    python benchmarks/colocation.py --merge-from results/colocation_h200.json --out results/colocation_h200.json
    python benchmarks/colocation.py --quick --device cpu --out /tmp/colocation_cpu.json

First the device checks (``tests/gpu/test_exact.py`` on ``--check-model``), then calibration
(Poisson rates 0.6x/1.0x/1.3x of serial's burst capacity, the Azure code trace at 0.6x/1.0x),
then the grid (``step_specs``, priority order) through ``splitlab.measure.sweep``; every session
first runs a check workload compared with serial's tokens. ``splitlab.measure.analysis`` draws
the conclusions. The recorded file's first call found its 1.0x rate below saturation, so its
runs were relabelled ``poisson-low`` (``analysis.relabel``) and the later calls pass ``--rates``.
The last printed line is a JSON summary.
"""

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, free_memory, gpu_tests, leftover_diff, leftovers, log, parse_shares, print_rows,  # noqa: E402
                     quiet_transformers, report)

import torch  # noqa: E402

import splitlab  # noqa: E402
from splitlab.config import SLO, EngineConfig, SplitConfig  # noqa: E402
from splitlab.measure import analysis as an  # noqa: E402
from splitlab.measure.sweep import Cell, SkipCell, Sweep, command_line, load_result, merge_results, write_json_atomic  # noqa: E402,E501
from splitlab.workload import LengthDist, Request, Workload, from_azure_trace, from_prompts, poisson  # noqa: E402

AZURE_CSV = REPO.parent / "shared" / "data" / "azure-llm-2023" / "AzureLLMInferenceTrace_code.csv"
DEFAULT_OUT = REPO / "results" / "colocation_h200.json"
DEFAULT_SHARES = [(50, 50), (100, 100), (70, 30), (30, 70), (60, 40)]  # prefill/decode; 100/100: no partition
RATE_MULTIPLES = [0.6, 1.0, 1.3]  # of serial's burst capacity: low, near saturation, overload
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


def rebase(requests, name: str, at_zero: bool = False) -> Workload:
    """Requests with ids 0.. and the first arrival at 0 (all at 0 with ``at_zero``)."""
    t0 = min(r.arrival_s for r in requests)
    ordered = sorted(requests, key=lambda r: (r.arrival_s, r.id))
    return Workload(name, tuple(Request(i, r.prompt_ids, r.max_new_tokens, 0.0 if at_zero else r.arrival_s - t0)
                                for i, r in enumerate(ordered)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Step(Cell):
    """One (step, workload) cell; the cells of one step share its session (``group``)."""

    step: str
    workload: str
    kind: str  # engine | split | replicas | hf
    options: tuple = ()  # the mode's keywords as (name, value) pairs
    sweep: bool = False
    gpu_only: bool = False


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
                           key_of=lambda r: f"{r['step']}--{r['workload_key']}", progress=False, state=self.state)
        earlier = self.sweep.earlier or {}
        if earlier and earlier.get("plan", {}).get("model") != plan["model"]:
            raise SystemExit(f"--merge-from: not a colocation result for {plan['model']}")
        self.checks = {k: v for k, v in earlier.get("checks", {}).items() if k not in ("leftovers", "gpu_paths")}
        self.calibration = dict(earlier.get("calibration", {}))
        self.reference = {int(k): v for k, v in self.checks.get("check_reference", {}).items()}
        self.specs: dict[str, tuple] = {}
        from tqdm.auto import tqdm

        tqdm(disable=True).close()  # tqdm's one multiprocessing lock per process: made now, not a leftover
        self.before = leftovers()
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
        say(f"device checks: tests/gpu/test_exact.py on {spec}")
        self.checks["gpu_tests"] = gpu_tests(["tests/gpu/test_exact.py"], model=spec)
        say(f"device checks: {self.checks['gpu_tests']['summary']}")
        self.sweep.write()

    def engine_config(self) -> EngineConfig:
        p = self.plan
        return EngineConfig(max_seq_len=p["max_seq_len"], num_slots=p["num_slots"], max_batch=p["max_batch"],
                            token_budget=p["token_budget"], chunk_size=max(p["chunk_size"], p["max_batch"] + 1))

    def capacity(self, wl: Workload) -> float:
        """Requests/s of ``serial`` on ``wl`` with every request arriving at t=0."""
        run = splitlab.run(rebase(wl.requests, wl.name, at_zero=True), self.model, mode="serial",
                           config=self.engine_config(), progress=False)
        say(f"calibration {wl.name}: serial serves a burst of {len(wl)} at {len(wl) / run.wall_s:.2f} req/s")
        free_memory()
        return len(wl) / run.wall_s

    def build_workloads(self) -> None:
        p, n, model, earlier = self.plan, self.plan["requests"], self.model, self.sweep.earlier or {}
        old = earlier.get("workloads", {})
        rng, spec = random.Random(7), p["check"]
        prompts = [[rng.randrange(4, model.facts.vocab_size) for _ in range(k)] for k in spec["lens"][: spec["n"]]]
        arrivals = [0.0 if i < 3 else 0.2 * i / spec["n"] for i in range(len(prompts))]
        self.workloads["check"] = (from_prompts(prompts, spec["new"], arrivals, name="check"), {"kind": "check"})
        plen, olen = LengthDist.uniform(*p["prompt"]), LengthDist.uniform(*p["output"])
        rates = [float(x) for x in self.args.rates.split(",")] if self.args.rates else \
            [m["rate"] for m in old.values() if m.get("kind") == "poisson"] or None
        if rates is None:
            burst = poisson(p["calib_n"], rate=1e6, prompt_len=plen, output_len=olen, seed=99, model=model,
                            name="calibration-poisson")
            self.calibration.update(poisson_capacity_req_s=self.capacity(burst), rate_multiples=RATE_MULTIPLES)
            rates = an.calibrated_rates(self.calibration["poisson_capacity_req_s"], RATE_MULTIPLES)
        for key, rate in an.rate_labels(rates).items():
            wl = poisson(n, rate=rate, prompt_len=plen, output_len=olen, seed=1, model=model,
                         name=f"poisson-r{rate:.3g}-n{n}")
            self.workloads[key] = (wl, {"kind": "poisson", "rate": rate})
        if "poisson-mid" in self.workloads:
            wl, meta = self.workloads["poisson-mid"]
            first = p["hf"]["n"]
            self.workloads["hf-prefix"] = (rebase(wl.requests[:first], f"{wl.name}-first{first}"),
                                           {"kind": "poisson-prefix", "rate": meta["rate"]})
        if AZURE_CSV.is_file():
            self.azure_workloads(n, old)
        else:
            self.sweep.skip("azure workloads", f"trace not found at {AZURE_CSV}")
        for key, (wl, _meta) in self.workloads.items():  # merged runs must have served the same requests
            if key in old and (old[key]["name"] != wl.name or old[key]["requests"] != len(wl)):
                raise SystemExit(f"--merge-from: workload {key} was {old[key]['name']} ({old[key]['requests']} "
                                 f"requests), now {wl.name} ({len(wl)}); pass the same --requests and --rates")

    def azure_workloads(self, n: int, old: dict[str, Any]) -> None:
        total, model = self.plan["max_seq_len"], self.model
        base = from_azure_trace(AZURE_CSV, rate_scale=1.0, limit=n, max_total_len=total, seed=3, model=model,
                                name="azure-code")
        trace_rate = len(base) / (max(r.arrival_s for r in base) or 1.0)
        targets = sorted(float(x) for x in self.args.azure_rates.split(",")) if self.args.azure_rates else \
            sorted(m["rate"] for m in old.values() if m.get("kind") == "azure")
        if not targets:
            cap = self.calibration["azure_capacity_req_s"] = self.capacity(rebase(base.requests, "calibration-azure"))
            targets = [0.8 * cap] if self.plan["quick"] else [0.6 * cap, 1.0 * cap]
        self.calibration["azure_trace_rate_req_s"] = trace_rate
        for label, target in zip(["a", "b"], targets):
            scale = target / trace_rate
            wl = from_azure_trace(AZURE_CSV, rate_scale=scale, limit=n, max_total_len=total, seed=3, model=model,
                                  name=f"azure-code-x{scale:.3g}-n{n}")
            self.workloads[f"azure-{label}"] = (wl, {"kind": "azure", "rate": target, "rate_scale": scale})

    def cells(self) -> list[Step]:
        """The grid: every wanted step on each of its workloads not done yet (a step's check
        run only while it has a comparison workload left)."""
        out, names = [], set()
        for name, kind, options, wls, gpu_only, sweep in step_specs(self.plan, self.shares()):
            if self.modes is not None and not any(name == m or name.startswith(m) for m in self.modes):
                continue
            keys = [k for k in wls if k in self.workloads and f"{name}--{k}" not in self.sweep.done | names]
            if not [k for k in keys if k != "check"]:
                continue
            self.specs[name] = (kind, options, gpu_only)
            heavy = kind == "replicas" or dict(options).get("backend") in ("mps", "processes")
            for key in keys:
                wl = self.workloads[key][0]
                cost = 2.0 if key == "check" else max(r.arrival_s for r in wl) + 5.0
                out.append(Step(name=f"{name}--{key}", group=name, cost_s=cost, setup_s=30.0 if heavy else 15.0,
                                step=name, workload=key, kind=kind, options=options, sweep=sweep, gpu_only=gpu_only))
                names.add(f"{name}--{key}")
        return out

    def shares(self) -> list[tuple[int, int]]:
        try:
            return parse_shares(self.args.shares) if self.args.shares else DEFAULT_SHARES
        except ValueError as exc:
            raise SystemExit(f"--shares: {exc}") from None

    @contextlib.contextmanager
    def session(self, step: str):
        """The step's session (None for the one-call modes), closed after its last cell; what it
        left behind is recorded."""
        kind, options, gpu_only = self.specs[step]
        if gpu_only and not self.gpu:
            raise SkipCell("needs a CUDA GPU")
        say(f"step {step}")
        before = leftovers()
        try:
            if kind in ("split", "replicas"):
                from splitlab.modes.replicas import ReplicaSession
                from splitlab.modes.split import SplitSession

                opened = SplitSession(self.model, self.engine_config(), **dict(options)) if kind == "split" else \
                    ReplicaSession(self.model, engine="serial", config=self.engine_config(), **dict(options))
                with opened as session:
                    yield session
            else:
                yield None
        finally:
            free_memory()
            left = leftover_diff(before, timeout_s=3.0)
            if any(left.values()):
                self.checks.setdefault("leftovers_by_step", {})[step] = left

    def measure(self, cell: Step, session) -> dict[str, Any]:
        wl, meta = self.workloads[cell.workload]
        progress = not self.args.no_progress
        if session is not None:
            run = session.run(wl, progress=progress)
        elif cell.kind == "hf":
            run = splitlab.run(wl, self.model, mode="hf-generate", batch_size=self.plan["hf"]["batch"],
                               progress=progress)
        else:
            run = splitlab.run(wl, self.model, config=self.engine_config(), progress=progress, **dict(cell.options))
        row = {"step": cell.step, "workload_key": cell.workload, "workload": wl.name, **meta,
               **an.run_row(run, self.slo), "sweep": cell.sweep}
        if cell.workload == "check":
            if not self.reference:
                self.reference = self.checks["check_reference"] = run.output_ids()
                row["check_vs_serial"] = {"reference": True}
            else:
                row["check_vs_serial"] = an.token_match(run.output_ids(), self.reference)
        from splitlab.present.results import save_runs

        save_runs([run], self.runs_dir, [cell.name], compress=True)
        slow = (row.get("decode_interference") or {}).get("slowdown_batch_matched")
        say(f"{cell.name}: {row['completed']}/{row['num_requests']} done, {row['throughput_tok_s']:.0f} tok/s, "
            f"TTFT p99 {row['ttft_p99_s']:.3f} s, TPOT p99 {row['tpot_p99_s'] * 1e3:.1f} ms, goodput "
            f"{row['goodput_req_s']:.2f} req/s" + (f", decode slowdown {slow:.2f}x" if slow else ""))
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
    analysis = data.get("analysis") or {}
    report(data, {"out": str(out), "runs_dir": str(runs_dir), "checks_ok": data.get("checks_ok"),
                  "gpu_tests_passed": (data.get("checks", {}).get("gpu_tests") or {}).get("passed"),
                  "chosen_shares": (analysis.get("sm_share_sweep") or {}).get("chosen"),
                  "targets": {k: v for k, v in analysis.get("targets", {}).items() if k != "thresholds"}})


def analyse(rows: list[dict[str, Any]], runs_dir: Path) -> dict[str, Any]:
    names = [f"{r['step']}--{r['workload_key']}" for r in rows]
    return an.colocation_analysis(rows, an.stalls_of_saved_runs(runs_dir, names))


def analyse_only(args) -> int:
    """``--analyse-only``: the merged file as it was, with its analysis redone here."""
    if not args.merge_from:
        raise SystemExit("--analyse-only needs --merge-from (the output of the runs to analyse)")
    loaded = [load_result(p, "colocation") for p in args.merge_from]
    data = loaded[0] if len(loaded) == 1 else merge_results(loaded, lambda r: f"{r['step']}--{r['workload_key']}")
    out = Path(args.out) if args.out else DEFAULT_OUT
    runs_dir = Path(args.runs_dir) if args.runs_dir else out.with_suffix("")
    data["analysis"] = analyse(data["runs"], runs_dir)
    data["analysed_on"] = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "command": command_line()}
    write_json_atomic(out, data)
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
    tests = bench.checks.get("gpu_tests") or {}
    checks_ok = (tests.get("passed") is not False and not any(bench.checks["leftovers"].values())
                 and all(v is not False for v in bench.checks["gpu_paths"].values()))
    bench.sweep.write(analysis=analyse(bench.sweep.rows, bench.runs_dir), checks_ok=checks_ok)
    finish(json.loads(bench.out.read_text()), bench.out, bench.runs_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
