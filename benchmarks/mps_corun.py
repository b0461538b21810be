#!/usr/bin/env python
"""Co-run a compute-bound and a memory-bound GPU job: how much of each one's solo rate survives
when they share the GPU, by sharing mechanism.

Jobs: ``compute`` = a bf16 matmul loop (8192^3), rate in TFLOP/s; ``memory`` = a 1 GiB
device-to-device copy loop (``Tensor.copy_``; ``--memory-op kernel`` for an elementwise kernel
instead), rate in TB/s counting read + write bytes. Cases (cells of ``splitlab.measure.sweep``):

  solo        each job alone (no MPS): the denominators of every fraction
  processes   two processes, no MPS (time-sliced)
  streams     one process, two threads, two CUDA streams
  green       one process, two threads, two green contexts with DISJOINT SMs (if available)
  mps         two processes under MPS, no SM shares
  mps-C/M     under MPS, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE C for compute, M for memory

Every job runs in a fresh process (or thread) that warms up, reports ready, and waits for a
start time the parent hands out once all are ready, so co-running jobs start together; each
then runs for ``--duration`` seconds, synchronising the device every few steps, and reports
work done / time. The MPS daemon is private to this run (splitlab.system.mps) and stopped even
on error; client variables are in each child's environment before CUDA initialises there.

    python benchmarks/mps_corun.py              # GPU: writes results/mps_corun_h200.json
    python benchmarks/mps_corun.py --dry-run    # CPU, tiny sizes, no MPS: the orchestration

The last line printed is JSON.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_shares  # noqa: E402  (puts the repository on sys.path)

from splitlab.measure.corun import JOBS, UNITS, case_record, run_jobs, solo_rates  # noqa: E402
from splitlab.measure.sweep import Cell, Sweep  # noqa: E402
from splitlab.system.corun import CoRunSkipped, Launch, ready_and_wait, run_together, skip, write_result  # noqa: E402

DEFAULT_OUT = REPO / "results" / "mps_corun_h200.json"
GPU_CONFIG = {"device": "cuda", "matmul_n": 8192, "dtype": "bfloat16", "copy_bytes": 1 << 30, "duration": 5.0,
              "batch": {"compute": 4, "memory": 8}, "warmup": 3, "ready_timeout": 240.0, "threads": None}
DRY_CONFIG = {"device": "cpu", "matmul_n": 96, "dtype": "float32", "copy_bytes": 1 << 20, "duration": 0.3,
              "batch": {"compute": 4, "memory": 4}, "warmup": 2, "ready_timeout": 60.0, "threads": 1}


# =========================================================================== worker side
# (child processes of run_group: the jobs of splitlab.measure.corun, under the protocol of
# splitlab.system.corun)

def worker_main(args: argparse.Namespace) -> int:
    import torch

    cfg, ctrl = json.loads(args.config), Path(args.ctrl)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    extra: dict[str, Any] = {}
    if args.worker in ("job", "solo"):
        jobs = [(args.job, None)] if args.worker == "job" else [("compute", None), ("memory", None)]
    elif args.worker == "streams":
        jobs = list(zip(JOBS, [torch.cuda.Stream() if cfg["device"] != "cpu" else None for _ in JOBS]))
    else:  # green
        from splitlab.errors import SplitlabError
        from splitlab.system.green import split_sms

        try:
            part = split_sms(tuple(cfg["green_sms"]), device=0)
        except SplitlabError as exc:
            return skip(ctrl, args.name, f"{type(exc).__name__}: {exc}")
        extra["green"] = part.to_dict()
        jobs = list(zip(JOBS, part.streams))
    results = run_jobs(jobs, cfg, lambda: ready_and_wait(ctrl, args.name, float(cfg["ready_timeout"])),
                       sequential=args.worker == "solo")
    extra["mps_env"] = {k: os.environ[k] for k in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
                        if k in os.environ}
    write_result(ctrl, args.name, {"results": results, **extra})
    return 0


# =========================================================================== parent side

def run_group(workers: list[dict[str, Any]], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Worker processes of this script started together (``splitlab.system.corun``): warm, one
    start time, their results in order; nothing outlives the call.
    ``workers``: [{"worker": "job"|"solo"|"streams"|"green", "job": ..., "env": {...}}]."""
    def argv(w: dict[str, Any]):
        return lambda ctrl, name: [sys.executable, str(Path(__file__).resolve()), "--worker", w["worker"],
                                   "--ctrl", str(ctrl), "--name", name, "--config", json.dumps(cfg),
                                   *(["--job", w["job"]] if w.get("job") else [])]

    launches = [Launch(argv(w), env=w.get("env"), label=w["worker"]) for w in workers]
    # solo runs its two jobs one after the other
    return run_together(launches, float(cfg["ready_timeout"]), 2 * float(cfg["duration"]) + 60.0, cwd=REPO)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Case(Cell):
    description: str
    workers: tuple = ()  # which worker processes: (worker, job, share or None)
    shares: tuple | None = None
    skip: str | None = None  # why it cannot run here, known before it starts


class Corun:
    def __init__(self, args, cfg: dict[str, Any]) -> None:
        self.args, self.cfg, self.mps_error, self.solo = args, cfg, None, None

    @contextlib.contextmanager
    def daemon(self, group: str):
        """The MPS cases' private daemon (or why there is none), stopped even on error."""
        from splitlab.errors import MPSError
        from splitlab.system.mps import MPSDaemon

        if self.args.dry_run and not self.args.mps_on_cpu:
            yield "dry run on CPU: no MPS"
            return
        try:
            mps = MPSDaemon(timeout=30).start()
        except MPSError as exc:  # could not start: the cases are skipped
            self.mps_error = f"{exc}"
            yield f"MPS unavailable: {exc}"
            return
        try:
            yield mps
        finally:
            try:
                mps.stop()
            except MPSError as exc:
                self.mps_error = f"{exc}"

    def measure(self, case: Case, mps) -> dict[str, Any]:
        record = {"name": case.name, "description": case.description, "skipped": None, "error": None,
                  **({"shares": list(case.shares) if case.shares else None} if case.group == "mps" else {}),
                  **({"requested_sms": self.cfg["green_sms"]} if case.name == "green" else {})}
        why = case.skip or (mps if isinstance(mps, str) else None)
        print(f"# {case.name}: {case.description}", flush=True)
        workers = [{"worker": w, "job": j, "env": mps.client_env(s) if case.group == "mps" else None}
                   for w, j, s in case.workers] if why is None else []
        try:
            if why is not None:
                raise CoRunSkipped(why)
            outputs = run_group(workers, self.cfg)
        except CoRunSkipped as exc:
            return {**record, "skipped": str(exc), "compute": None, "memory": None, "sum": None}
        except (RuntimeError, TimeoutError, OSError, ValueError, KeyError) as exc:
            # one broken case must not cost the others' GPU time: record it, go on, exit 1
            print(f"# {case.name} FAILED: {exc}", file=sys.stderr, flush=True)
            return {**record, "error": f"{type(exc).__name__}: {exc}", "compute": None, "memory": None, "sum": None}
        return {**record, **case_record(outputs, self.solo)}


def cases(args, cfg, shares: list[tuple[int, int]]) -> list[Case]:
    wanted = set(args.cases.split(",")) if args.cases != "all" else {"processes", "streams", "green", "mps", "shares"}
    pair = (("job", "compute", None), ("job", "memory", None))
    out = [Case(name="processes", description="two processes, no MPS (time-sliced)", workers=pair),
           Case(name="streams", description="one process, two threads, two CUDA streams", workers=(("streams", None, None),)),
           Case(name="green", description=f"one process, two threads, green contexts compute/memory {args.green_sms} SMs",
                workers=(("green", None, None),), skip="dry run on CPU: no green contexts" if args.dry_run else None),
           Case(name="mps", group="mps", description="two processes under MPS, no SM shares", workers=pair)]
    out += [Case(name=f"mps-{c}/{m}", group="mps", shares=(c, m), workers=(("job", "compute", c), ("job", "memory", m)),
                 description=f"two processes under MPS, compute {c}% / memory {m}% active threads") for c, m in shares]
    return [c for c in out if (c.group == "mps" and c.shares and "shares" in wanted) or
            (not c.shares and c.name in wanted)]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--dry-run", action="store_true", help="CPU, tiny sizes, no MPS or green contexts: test the orchestration")
    add("--out", type=Path, default=None, help=f"results JSON (default {DEFAULT_OUT.relative_to(REPO)}; none dry)")
    add("--duration", type=float, default=None, help="seconds per measurement")
    add("--shares", default="30/70,50/50,70/30", help="MPS active thread percentages compute/memory, comma-separated")
    add("--green-sms", default="40,92", help="SMs for compute,memory in the green case (the second gets the rest)")
    add("--cases", default="all", help="comma-separated subset of: processes,streams,green,mps,shares")
    add("--mps-on-cpu", action="store_true", help="with --dry-run: run the MPS cases under the daemon anyway")
    add("--memory-op", choices=("copy", "kernel"), default="copy", help="memory job: Tensor.copy_ or a kernel")
    add("--matmul-n", type=int, default=None)
    add("--copy-mib", type=int, default=None)
    for flag, kw in (("--worker", dict(choices=("job", "solo", "streams", "green"))), ("--job", dict(choices=JOBS)),
                     ("--ctrl", {}), ("--name", {}), ("--config", {})):  # worker mode (internal)
        add(flag, help=argparse.SUPPRESS, **kw)
    return parser, parser.parse_args(argv)


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def make_config(parser: argparse.ArgumentParser, args) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    """The workers' config (sizes, duration, green SMs) and the MPS shares, from the options;
    a bad option ends the program with its usage."""
    cfg = dict(DRY_CONFIG if args.dry_run else GPU_CONFIG, memory_op=args.memory_op)
    cfg.update({k: v for k, v in (("duration", args.duration), ("matmul_n", args.matmul_n)) if v is not None})
    if args.copy_mib is not None:
        cfg["copy_bytes"] = args.copy_mib << 20
    try:
        cfg["green_sms"], shares = [int(x) for x in args.green_sms.split(",")], parse_shares(args.shares)
    except ValueError as exc:
        parser.error(f"--green-sms / --shares: {exc}")
    if len(cfg["green_sms"]) != 2:
        parser.error("--green-sms takes two counts, e.g. 40,92")
    unknown = set(args.cases.split(",")) - {"all", "processes", "streams", "green", "mps", "shares"}
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; choose from green, mps, processes, shares, streams")
    return cfg, shares


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    signal.signal(signal.SIGTERM, _terminate)  # SIGTERM -> SystemExit: every `finally` runs, MPS stopped
    import torch

    from splitlab.system.mps import mps_status

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --dry-run to exercise the orchestration on CPU")
    cfg, shares = make_config(parser, args)
    out_path = args.out if args.out is not None else (None if args.dry_run else DEFAULT_OUT)
    status_before = mps_status()
    print(f"# co-run benchmark on {cfg['device']}: matmul {cfg['matmul_n']}^3 {cfg['dtype']}, copy "
          f"{cfg['copy_bytes'] >> 20} MiB, {cfg['duration']} s per measurement", flush=True)
    if status_before["running"]:
        print("# WARNING: an MPS daemon not started by this run is up; cases without MPS may still reach it", flush=True)
    corun = Corun(args, cfg)
    corun.solo = solo_rates(run_group([{"worker": "solo"}], cfg)[0]["results"])
    sweep = Sweep("mps_corun", out_path, progress=False, command=" ".join([Path(sys.executable).name, *sys.argv]),
                  state=lambda: {"gpu_name": sweep.info["gpu"], "mps_status_before": status_before, "config": cfg,
                                 "mps_error": corun.mps_error, "solo": corun.solo, "cases": [
                                     {k: v for k, v in r.items() if k != "cell"} for r in sweep.rows],
                                 "notes": "fraction = rate while co-running / solo rate (both jobs alone, no MPS); "
                                          "memory rate counts bytes read + written; each job runs for "
                                          "config.duration s from a common start."})
    data = sweep.run(cases(args, cfg, shares), corun.measure, group_context=corun.daemon)
    print_table(corun.solo, data["cases"])
    summary = {"out": str(out_path) if out_path is not None else None, "device": cfg["device"],
               "gpu_name": data["gpu_name"], "cases": {c["name"]: c["sum"] for c in data["cases"]},
               "skipped": {c["name"]: c["skipped"] for c in data["cases"] if c["skipped"]},
               "errors": {c["name"]: c["error"] for c in data["cases"] if c.get("error")}, "wall_s": data["wall_s"]}
    print(json.dumps(summary))
    return 1 if summary["errors"] or data["failed"] else 0


def print_table(solo: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    print(f"{'case':<12} {'compute':>10} {'frac':>6} {'memory':>10} {'frac':>6} {'sum':>6}")
    print(f"{'solo':<12} {solo['compute']['rate']:>10.4g} {1:>6.2f} {solo['memory']['rate']:>10.4g} {1:>6.2f} "
          f"{'':>6}  ({UNITS['compute']}, {UNITS['memory']})")
    for c in rows:
        if c["skipped"] or c.get("error"):
            why = f"skipped: {c['skipped']}" if c["skipped"] else f"FAILED: {c['error']}"
            print(f"{c['name']:<12} {why.splitlines()[0][:110]}")
        else:
            print(f"{c['name']:<12} {c['compute']['rate']:>10.4g} {c['compute']['fraction']:>6.2f} "
                  f"{c['memory']['rate']:>10.4g} {c['memory']['fraction']:>6.2f} {c['sum']:>6.2f}")


if __name__ == "__main__":
    sys.exit(main())
