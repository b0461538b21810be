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
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_shares  # noqa: E402  (puts the repository on sys.path)

from splitlab.measure.sweep import Cell, Sweep  # noqa: E402

DEFAULT_OUT = REPO / "results" / "mps_corun_h200.json"
JOBS = ("compute", "memory")
UNITS = {"compute": "TFLOP/s", "memory": "TB/s"}
SKIP_EXIT = 3  # a worker's exit status for "this case cannot run here" (reason in its result)
GPU_CONFIG = {"device": "cuda", "matmul_n": 8192, "dtype": "bfloat16", "copy_bytes": 1 << 30, "duration": 5.0,
              "batch": {"compute": 4, "memory": 8}, "warmup": 3, "ready_timeout": 240.0, "threads": None}
DRY_CONFIG = {"device": "cpu", "matmul_n": 96, "dtype": "float32", "copy_bytes": 1 << 20, "duration": 0.3,
              "batch": {"compute": 4, "memory": 4}, "warmup": 2, "ready_timeout": 60.0, "threads": 1}


# =========================================================================== worker side
# (child processes: torch only, not splitlab, except for green contexts)

def _make_job(kind: str, cfg: dict[str, Any]) -> tuple[Callable[[], None], float]:
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


def _sync_fn(cfg: dict[str, Any], stream: Any) -> Callable[[], None]:
    import torch

    return (lambda: None) if cfg["device"] == "cpu" else (stream or torch.cuda.current_stream()).synchronize


def _timed_loop(step, sync, batch: int, duration: float, start_at: float) -> dict[str, float]:
    while time.monotonic() < start_at:  # common start (CLOCK_MONOTONIC, system-wide)
        time.sleep(min(0.001, max(0.0, start_at - time.monotonic())))
    t0, iters = time.perf_counter(), 0
    while True:
        for _ in range(batch):
            step()
        sync()
        iters += batch
        if (elapsed := time.perf_counter() - t0) >= duration:
            return {"iters": iters, "elapsed_s": elapsed, "start_skew_s": t0 - start_at}


def _wait_start(ctrl: Path, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while not (ctrl / "start").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("no start signal from the parent")
        time.sleep(0.005)
    return float((ctrl / "start").read_text())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.with_suffix(".tmp").write_text(json.dumps(data))
    os.replace(path.with_suffix(".tmp"), path)


def _run_jobs(jobs: list[tuple[str, Any]], cfg: dict[str, Any], ctrl: Path, name: str,
              sequential: bool = False) -> dict[str, Any]:
    """Warm up each (job, stream), report ready, wait for the start, run them (together, one
    thread each; or one after the other when ``sequential``), return {job: rate record}."""
    prepared = []
    for kind, stream in jobs:
        with _on(stream):
            step, work = _make_job(kind, cfg)
            sync = _sync_fn(cfg, stream)
            for _ in range(int(cfg["warmup"])):
                step()
            sync()
        prepared.append((kind, stream, step, work, sync))
    (ctrl / f"{name}.ready").write_text("ok")
    start_at = _wait_start(ctrl, float(cfg["ready_timeout"]))
    results: dict[str, Any] = {}
    errors: list[str] = []

    def body(kind, stream, step, work, sync, at) -> None:
        try:
            with _on(stream):
                rec = _timed_loop(step, sync, int(cfg["batch"][kind]), float(cfg["duration"]), at)
            results[kind] = {**rec, "rate": rec["iters"] * work / rec["elapsed_s"] / 1e12, "unit": UNITS[kind]}
        except BaseException as exc:  # reported by the parent
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


def worker_main(args: argparse.Namespace) -> int:
    import torch

    cfg, ctrl = json.loads(args.config), Path(args.ctrl)
    out = ctrl / f"{args.name}.json"
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    extra: dict[str, Any] = {}
    if args.worker in ("job", "solo"):
        jobs = [(args.job, None)] if args.worker == "job" else [("compute", None), ("memory", None)]
        results = _run_jobs(jobs, cfg, ctrl, args.name, sequential=args.worker == "solo")
    elif args.worker == "streams":
        streams = [torch.cuda.Stream() if cfg["device"] != "cpu" else None for _ in JOBS]
        results = _run_jobs(list(zip(JOBS, streams)), cfg, ctrl, args.name)
    else:  # green
        from splitlab.errors import SplitlabError
        from splitlab.system.green import split_sms

        try:
            part = split_sms(tuple(cfg["green_sms"]), device=0)
        except SplitlabError as exc:
            _write_json(out, {"skipped": f"{type(exc).__name__}: {exc}"})
            return SKIP_EXIT
        extra["green"] = part.to_dict()
        results = _run_jobs(list(zip(JOBS, part.streams)), cfg, ctrl, args.name)
    extra["mps_env"] = {k: os.environ[k] for k in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
                        if k in os.environ}
    _write_json(out, {"results": results, **extra})
    return 0


# =========================================================================== parent side

class CaseSkipped(Exception):
    """This case cannot run on this machine; the message says why."""


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The parent's environment without any MPS client variable, plus ``extra``: a case
    without MPS must not reach a daemon someone else left in the environment."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("CUDA_MPS_")}, **(extra or {})}


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _spawn(w: dict[str, Any], name: str, ctrl: Path, cfg: dict[str, Any]) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", w["worker"], "--ctrl", str(ctrl),
           "--name", name, "--config", json.dumps(cfg), *(["--job", w["job"]] if w.get("job") else [])]
    with open(ctrl / f"{name}.log", "wb") as log:
        return subprocess.Popen(cmd, env=_clean_env(w.get("env")), cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)


def run_group(workers: list[dict[str, Any]], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Start worker processes, wait until all are warm, give one start time, collect results.
    ``workers``: [{"worker": "job"|"solo"|"streams"|"green", "job": ..., "env": {...}}].
    Nothing outlives this call: processes are stopped and the control folder removed."""
    ctrl = Path(tempfile.mkdtemp(prefix="splitlab-corun-"))
    names, procs = [f"w{i}" for i in range(len(workers))], []
    try:
        procs = [_spawn(w, name, ctrl, cfg) for name, w in zip(names, workers)]
        deadline = time.monotonic() + float(cfg["ready_timeout"])
        while not all((ctrl / f"{n}.ready").exists() for n in names):
            for name, w, p in zip(names, workers, procs):
                if p.poll() is not None and not (ctrl / f"{name}.ready").exists():
                    if p.returncode == SKIP_EXIT and (ctrl / f"{name}.json").exists():
                        raise CaseSkipped(json.loads((ctrl / f"{name}.json").read_text())["skipped"])
                    raise RuntimeError(f"worker {name} ({w['worker']}) exited with status {p.returncode} before it "
                                       f"was ready:\n" + _tail(ctrl / f"{name}.log"))
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not ready within {cfg['ready_timeout']} s")
            time.sleep(0.02)
        # one start time for all, a little ahead so every worker sees it before it comes
        (ctrl / "start.tmp").write_text(repr(time.monotonic() + 0.25))
        os.replace(ctrl / "start.tmp", ctrl / "start")
        limit = 2 * float(cfg["duration"]) + 60.0  # solo runs its two jobs one after the other
        finish_by, out = time.monotonic() + limit, []
        for name, p in zip(names, procs):
            try:
                rc = p.wait(timeout=max(0.1, finish_by - time.monotonic()))
            except subprocess.TimeoutExpired as exc:
                raise TimeoutError(f"worker {name} did not finish within {limit:.0f} s") from exc
            if rc != 0:
                raise RuntimeError(f"worker {name} failed with status {rc}:\n" + _tail(ctrl / f"{name}.log"))
            out.append(json.loads((ctrl / f"{name}.json").read_text()))
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(ctrl, ignore_errors=True)


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
                raise CaseSkipped(why)
            outputs = run_group(workers, self.cfg)
        except CaseSkipped as exc:
            return {**record, "skipped": str(exc), "compute": None, "memory": None, "sum": None}
        except (RuntimeError, TimeoutError, OSError, ValueError, KeyError) as exc:
            # one broken case must not cost the others' GPU time: record it, go on, exit 1
            print(f"# {case.name} FAILED: {exc}", file=sys.stderr, flush=True)
            return {**record, "error": f"{type(exc).__name__}: {exc}", "compute": None, "memory": None, "sum": None}
        results = {job: rec for o in outputs for job, rec in o["results"].items()}
        record.update({"green": o["green"] for o in outputs if "green" in o})  # the SMs the driver gave
        # what each job's process really had in its environment (provenance of the shares)
        record["client_env"] = {job: o.get("mps_env", {}) for o in outputs for job in o["results"]}
        for job in JOBS:
            rate = results[job]["rate"]
            record[job] = {"rate": round(rate, 6), "unit": UNITS[job], "fraction": round(rate / self.solo[job]["rate"], 4),
                           "iters": results[job]["iters"], "elapsed_s": round(results[job]["elapsed_s"], 4)}
        record["sum"] = round(sum(record[job]["fraction"] for job in JOBS), 4)
        return record


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


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    signal.signal(signal.SIGTERM, _terminate)  # SIGTERM -> SystemExit: every `finally` runs, MPS stopped
    import torch

    from splitlab.system.mps import mps_status

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --dry-run to exercise the orchestration on CPU")
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
    out_path = args.out if args.out is not None else (None if args.dry_run else DEFAULT_OUT)
    status_before = mps_status()
    print(f"# co-run benchmark on {cfg['device']}: matmul {cfg['matmul_n']}^3 {cfg['dtype']}, copy "
          f"{cfg['copy_bytes'] >> 20} MiB, {cfg['duration']} s per measurement", flush=True)
    if status_before["running"]:
        print("# WARNING: an MPS daemon not started by this run is up; cases without MPS may still reach it", flush=True)
    corun = Corun(args, cfg)
    solo_out = run_group([{"worker": "solo"}], cfg)[0]["results"]
    corun.solo = {job: {"rate": round(solo_out[job]["rate"], 6), "unit": UNITS[job], "iters": solo_out[job]["iters"]}
                  for job in JOBS}
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
