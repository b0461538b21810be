#!/usr/bin/env python
"""Co-run a compute-bound and a memory-bound GPU job: how much of each one's solo rate
survives when they share the GPU, by sharing mechanism (FACTS.md section 3, re-measured).

Jobs: ``compute`` = a bf16 matmul loop (8192^3), rate in TFLOP/s; ``memory`` = a 1 GiB
device-to-device copy loop (``Tensor.copy_``, as FACTS.md; ``--memory-op kernel`` for an
elementwise kernel instead), rate in TB/s counting read + write bytes. Cases:

  solo        each job alone (no MPS): the denominators of every fraction
  processes   two processes, no MPS (time-sliced)
  streams     one process, two threads, two CUDA streams
  green       one process, two threads, two green contexts with DISJOINT SMs (if available)
  mps         two processes under MPS, no SM shares
  mps-C/M     under MPS, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE C for compute, M for memory

Every job runs in a fresh process (or thread) that warms up, reports ready, and waits for a
start time the parent hands out once all are ready, so co-running jobs start together; each
then runs for ``--duration`` seconds, synchronising the device every few steps, and reports
work done / time. The MPS daemon is private to this run (splitlab.system.mps) and stopped even on
error; client variables are in each child's environment before CUDA initialises there.

    python benchmarks/mps_corun.py              # GPU: writes results/mps_corun_h200.json
    python benchmarks/mps_corun.py --dry-run    # CPU, tiny sizes, no MPS: the orchestration

The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import datetime as _dt
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
DEFAULT_OUT = REPO / "results" / "mps_corun_h200.json"
JOBS = ("compute", "memory")
UNITS = {"compute": "TFLOP/s", "memory": "TB/s"}
SKIP_EXIT = 3  # a worker's exit status for "this case cannot run here" (reason in its result)

GPU_CONFIG = {
    "device": "cuda", "matmul_n": 8192, "dtype": "bfloat16", "copy_bytes": 1 << 30,
    "duration": 5.0, "batch": {"compute": 4, "memory": 8}, "warmup": 3,
    "ready_timeout": 240.0, "threads": None,
}
DRY_CONFIG = {
    "device": "cpu", "matmul_n": 96, "dtype": "float32", "copy_bytes": 1 << 20,
    "duration": 0.3, "batch": {"compute": 4, "memory": 4}, "warmup": 2,
    "ready_timeout": 60.0, "threads": 1,
}


# =========================================================================== worker side
# (runs in child processes; imports torch only, not splitlab, except for green contexts)


def _make_job(kind: str, cfg: dict[str, Any]) -> tuple[Callable[[], None], float]:
    """(one step, work per step): flop for compute, bytes read + written for memory."""
    import torch

    device = cfg["device"]
    if kind == "compute":
        n = int(cfg["matmul_n"])
        dtype = getattr(torch, cfg["dtype"])
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)

        def step() -> None:
            torch.matmul(a, b, out=c)

        return step, 2.0 * n**3
    if kind == "memory":
        nbytes = int(cfg["copy_bytes"])
        src = torch.ones(nbytes, device=device, dtype=torch.uint8)
        dst = torch.empty(nbytes, device=device, dtype=torch.uint8)
        if cfg.get("memory_op", "copy") == "kernel":
            # an elementwise kernel: certainly runs on the SMs of its stream's context
            def step() -> None:
                torch.mul(src, 1, out=dst)
        else:
            # as FACTS.md measured: Tensor.copy_ (cudaMemcpyAsync device-to-device)
            def step() -> None:
                dst.copy_(src)

        return step, 2.0 * nbytes
    raise ValueError(f"unknown job {kind!r}")


def _sync_fn(cfg: dict[str, Any], stream: Any) -> Callable[[], None]:
    if cfg["device"] == "cpu":
        return lambda: None
    import torch

    if stream is None:
        stream = torch.cuda.current_stream()
    return stream.synchronize


def _stream_ctx(stream: Any) -> Any:
    import contextlib

    if stream is None:
        return contextlib.nullcontext()
    import torch

    return torch.cuda.stream(stream)


def _timed_loop(step: Callable[[], None], sync: Callable[[], None], batch: int,
                duration: float, start_at: float) -> dict[str, float]:
    while time.monotonic() < start_at:  # common start (CLOCK_MONOTONIC, system-wide)
        time.sleep(min(0.001, max(0.0, start_at - time.monotonic())))
    t0 = time.perf_counter()
    iters = 0
    while True:
        for _ in range(batch):
            step()
        sync()
        iters += batch
        elapsed = time.perf_counter() - t0
        if elapsed >= duration:
            return {"iters": iters, "elapsed_s": elapsed, "start_skew_s": t0 - start_at}


def _wait_start(ctrl: Path, timeout: float) -> float:
    start = ctrl / "start"
    deadline = time.monotonic() + timeout
    while not start.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("no start signal from the parent")
        time.sleep(0.005)
    return float(start.read_text())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _run_jobs(jobs: list[tuple[str, Any]], cfg: dict[str, Any], ctrl: Path, name: str,
              sequential: bool = False) -> dict[str, Any]:
    """Warm up each (job, stream), report ready, wait for the start, run them (together, one
    thread each; or one after the other when ``sequential``), return {job: rate record}."""
    prepared = []
    for kind, stream in jobs:
        with _stream_ctx(stream):
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

    def body(kind: str, stream: Any, step: Callable[[], None], work: float,
             sync: Callable[[], None], at: float) -> None:
        try:
            with _stream_ctx(stream):
                rec = _timed_loop(step, sync, int(cfg["batch"][kind]), float(cfg["duration"]), at)
            rec["rate"] = rec["iters"] * work / rec["elapsed_s"] / 1e12
            rec["unit"] = UNITS[kind]
            results[kind] = rec
        except BaseException as exc:  # reported by the parent
            errors.append(f"{kind}: {exc!r}")

    if sequential:
        for item in prepared:
            body(*item, at=start_at)
            start_at = time.monotonic()
    else:
        threads = [threading.Thread(target=body, args=(*item, start_at), daemon=True)
                   for item in prepared]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return results


def worker_main(args: argparse.Namespace) -> int:
    cfg = json.loads(args.config)
    ctrl = Path(args.ctrl)
    out = ctrl / f"{args.name}.json"
    import torch

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    extra: dict[str, Any] = {}
    if args.worker == "job":
        results = _run_jobs([(args.job, None)], cfg, ctrl, args.name)
    elif args.worker == "solo":
        results = _run_jobs([("compute", None), ("memory", None)], cfg, ctrl, args.name,
                            sequential=True)
    elif args.worker == "streams":
        streams = [torch.cuda.Stream() if cfg["device"] != "cpu" else None for _ in JOBS]
        results = _run_jobs(list(zip(JOBS, streams)), cfg, ctrl, args.name)
    elif args.worker == "green":
        from splitlab.system.green import split_sms
        from splitlab.errors import SplitlabError

        try:
            part = split_sms(tuple(cfg["green_sms"]), device=0)
        except SplitlabError as exc:
            _write_json(out, {"skipped": f"{type(exc).__name__}: {exc}"})
            return SKIP_EXIT
        extra["green"] = part.to_dict()
        results = _run_jobs(list(zip(JOBS, part.streams)), cfg, ctrl, args.name)
    else:
        raise SystemExit(f"unknown worker {args.worker!r}")
    env_keys = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    extra["mps_env"] = {k: os.environ[k] for k in env_keys if k in os.environ}
    _write_json(out, {"results": results, **extra})
    return 0


# =========================================================================== parent side


class CaseSkipped(Exception):
    """This case cannot run on this machine; the message says why."""


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The parent's environment without any MPS client variable, plus ``extra``: a case
    without MPS must not reach a daemon someone else left in the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUDA_MPS_")}
    env.update(extra or {})
    return env


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_group(workers: list[dict[str, Any]], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Start worker processes, wait until all are warm, give one start time, collect results.

    ``workers``: [{"worker": "job"|"solo"|"streams"|"green", "job": ..., "env": {...}}].
    Nothing outlives this call: processes are stopped and the control folder removed.
    """
    ctrl = Path(tempfile.mkdtemp(prefix="splitlab-corun-"))
    procs: list[subprocess.Popen[bytes]] = []
    names = [f"w{i}" for i in range(len(workers))]
    try:
        for name, w in zip(names, workers):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", w["worker"],
                   "--ctrl", str(ctrl), "--name", name, "--config", json.dumps(cfg)]
            if w.get("job"):
                cmd += ["--job", w["job"]]
            with open(ctrl / f"{name}.log", "wb") as log:
                procs.append(subprocess.Popen(cmd, env=_clean_env(w.get("env")), cwd=REPO,
                                              stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT))
        deadline = time.monotonic() + float(cfg["ready_timeout"])
        while not all((ctrl / f"{n}.ready").exists() for n in names):
            for name, p in zip(names, procs):
                if p.poll() is not None and not (ctrl / f"{name}.ready").exists():
                    if p.returncode == SKIP_EXIT and (ctrl / f"{name}.json").exists():
                        reason = json.loads((ctrl / f"{name}.json").read_text())["skipped"]
                        raise CaseSkipped(reason)
                    raise RuntimeError(f"worker {name} ({workers[names.index(name)]['worker']}) "
                                       f"exited with status {p.returncode} before it was ready:\n"
                                       + _tail(ctrl / f"{name}.log"))
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not ready within {cfg['ready_timeout']} s")
            time.sleep(0.02)
        # one start time for all, a little ahead so every worker sees it before it comes
        (ctrl / "start.tmp").write_text(repr(time.monotonic() + 0.25))
        os.replace(ctrl / "start.tmp", ctrl / "start")
        limit = 2 * float(cfg["duration"]) + 60.0  # solo runs its two jobs one after the other
        finish_by = time.monotonic() + limit
        out = []
        for name, p in zip(names, procs):
            try:
                rc = p.wait(timeout=max(0.1, finish_by - time.monotonic()))
            except subprocess.TimeoutExpired as exc:
                raise TimeoutError(f"worker {name} did not finish within {limit:.0f} s") from exc
            if rc != 0:
                raise RuntimeError(f"worker {name} failed with status {rc}:\n"
                                   + _tail(ctrl / f"{name}.log"))
            out.append(json.loads((ctrl / f"{name}.json").read_text()))
        return out
    finally:
        _stop(procs)
        shutil.rmtree(ctrl, ignore_errors=True)


def _case_record(name: str, description: str, results: dict[str, Any],
                 solo: dict[str, Any], **extra: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {"name": name, "description": description, "skipped": None,
                           "error": None, **extra}
    total = 0.0
    for job in JOBS:
        rate = results[job]["rate"]
        fraction = rate / solo[job]["rate"]
        total += fraction
        rec[job] = {"rate": round(rate, 6), "unit": UNITS[job], "fraction": round(fraction, 4),
                    "iters": results[job]["iters"],
                    "elapsed_s": round(results[job]["elapsed_s"], 4)}
    rec["sum"] = round(total, 4)
    return rec


def _skipped(name: str, description: str, reason: str | None, **extra: Any) -> dict[str, Any]:
    return {"name": name, "description": description, "skipped": reason, "error": None,
            **extra, "compute": None, "memory": None, "sum": None}


def _merge(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for o in outputs:
        merged.update(o["results"])
    return merged


def parse_shares(text: str) -> list[tuple[int, int]]:
    """'30/70,50/50' -> [(30, 70), (50, 50)]; each percentage in 1..100."""
    shares = []
    for item in text.split(","):
        parts = item.split("/")
        if len(parts) != 2:
            raise ValueError(f"a share is compute/memory, e.g. 30/70; got {item!r}")
        c, m = int(parts[0]), int(parts[1])
        if not (1 <= c <= 100 and 1 <= m <= 100):
            raise ValueError(f"percentages must be in 1..100; got {item!r}")
        shares.append((c, m))
    return shares


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny sizes, no MPS or green contexts: test the orchestration")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results JSON (default {DEFAULT_OUT.relative_to(REPO)} on a GPU; "
                        "none in a dry run)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--shares", default="30/70,50/50,70/30",
                        help="MPS active thread percentages compute/memory, comma-separated")
    parser.add_argument("--green-sms", default="40,92",
                        help="SMs for compute,memory in the green case (the second gets the rest)")
    parser.add_argument("--cases", default="all",
                        help="comma-separated subset of: processes,streams,green,mps,shares")
    parser.add_argument("--mps-on-cpu", action="store_true",
                        help="with --dry-run: run the MPS cases under the MPS daemon anyway "
                        "(CPU workers; to test the daemon handling, e.g. with a fake binary)")
    parser.add_argument("--memory-op", choices=("copy", "kernel"), default="copy",
                        help="memory job: Tensor.copy_ (as FACTS.md) or an elementwise kernel")
    parser.add_argument("--matmul-n", type=int, default=None)
    parser.add_argument("--copy-mib", type=int, default=None)
    # worker mode (internal)
    parser.add_argument("--worker", choices=("job", "solo", "streams", "green"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--job", choices=JOBS, help=argparse.SUPPRESS)
    parser.add_argument("--ctrl", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args)

    # SIGTERM -> SystemExit, so every `finally` runs: workers stopped, MPS daemon stopped
    def _terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)

    import torch

    from splitlab.system.env import environment
    from splitlab.errors import MPSError
    from splitlab.system.mps import MPSDaemon, mps_status

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --dry-run to exercise the orchestration on CPU")
    cfg = dict(DRY_CONFIG if args.dry_run else GPU_CONFIG)
    if args.duration is not None:
        cfg["duration"] = args.duration
    if args.matmul_n is not None:
        cfg["matmul_n"] = args.matmul_n
    if args.copy_mib is not None:
        cfg["copy_bytes"] = args.copy_mib << 20
    cfg["memory_op"] = args.memory_op
    try:
        cfg["green_sms"] = [int(x) for x in args.green_sms.split(",")]
        shares = parse_shares(args.shares)
    except ValueError as exc:
        parser.error(f"--green-sms / --shares: {exc}")
    if len(cfg["green_sms"]) != 2:
        parser.error("--green-sms takes two counts, e.g. 40,92")
    all_cases = {"processes", "streams", "green", "mps", "shares"}
    wanted = set(args.cases.split(",")) if args.cases != "all" else all_cases
    if wanted - all_cases:
        parser.error(f"unknown case(s) {sorted(wanted - all_cases)}; "
                     f"choose from {sorted(all_cases)}")
    out_path = args.out if args.out is not None else (None if args.dry_run else DEFAULT_OUT)
    status_before = mps_status()
    t_start = time.monotonic()

    print(f"# co-run benchmark on {cfg['device']}: matmul {cfg['matmul_n']}^3 {cfg['dtype']}, "
          f"copy {cfg['copy_bytes'] >> 20} MiB, {cfg['duration']} s per measurement", flush=True)
    if status_before["running"]:
        print("# WARNING: an MPS daemon not started by this run is up; cases without MPS may "
              "still reach it", flush=True)

    solo_out = run_group([{"worker": "solo"}], cfg)[0]["results"]
    solo = {job: {"rate": round(solo_out[job]["rate"], 6), "unit": UNITS[job],
                  "iters": solo_out[job]["iters"]} for job in JOBS}
    cases: list[dict[str, Any]] = []

    def run_case(name: str, description: str, workers: list[dict[str, Any]],
                 **extra: Any) -> None:
        print(f"# {name}: {description}", flush=True)
        try:
            outputs = run_group(workers, cfg)
        except CaseSkipped as exc:
            cases.append(_skipped(name, description, str(exc), **extra))
            return
        except (RuntimeError, TimeoutError, OSError, ValueError, KeyError) as exc:
            # one broken case must not cost the others' GPU time: record it, go on, exit 1
            print(f"# {name} FAILED: {exc}", file=sys.stderr, flush=True)
            cases.append({**_skipped(name, description, None, **extra),
                          "error": f"{type(exc).__name__}: {exc}"})
            return
        for o in outputs:
            if "green" in o:
                extra["green"] = o["green"]  # the SM counts the driver really gave
        # what each job's process really had in its environment (provenance of the shares)
        extra["client_env"] = {
            job: o.get("mps_env", {}) for o in outputs for job in o["results"]
        }
        cases.append(_case_record(name, description, _merge(outputs), solo, **extra))

    pair = [{"worker": "job", "job": "compute"}, {"worker": "job", "job": "memory"}]
    if "processes" in wanted:
        run_case("processes", "two processes, no MPS (time-sliced)", pair)
    if "streams" in wanted:
        run_case("streams", "one process, two threads, two CUDA streams", [{"worker": "streams"}])
    if "green" in wanted:
        desc = f"one process, two threads, green contexts compute/memory {args.green_sms} SMs"
        if args.dry_run:
            cases.append(_skipped("green", desc, "dry run on CPU: no green contexts"))
        else:
            run_case("green", desc, [{"worker": "green"}], requested_sms=cfg["green_sms"])

    mps_cases = []
    mps_error: str | None = None
    if "mps" in wanted:
        mps_cases.append(("mps", "two processes under MPS, no SM shares", None))
    if "shares" in wanted:
        for c, m in shares:
            mps_cases.append((f"mps-{c}/{m}", f"two processes under MPS, compute {c}% / "
                              f"memory {m}% active threads", (c, m)))
    if mps_cases and args.dry_run and not args.mps_on_cpu:
        for name, desc, share in mps_cases:
            cases.append(_skipped(name, desc, "dry run on CPU: no MPS", shares=share))
    elif mps_cases:
        try:
            with MPSDaemon(timeout=30) as mps:
                for name, desc, share in mps_cases:
                    pc, pm = share if share else (None, None)
                    run_case(name, desc, [
                        {"worker": "job", "job": "compute", "env": mps.client_env(pc)},
                        {"worker": "job", "job": "memory", "env": mps.client_env(pm)},
                    ], shares=share)
        except MPSError as exc:  # could not start (cases skipped) or could not stop
            mps_error = f"{exc}"
            print(f"# MPS: {exc}", file=sys.stderr, flush=True)
            done = {c["name"] for c in cases}
            for name, desc, share in mps_cases:
                if name not in done:
                    cases.append(_skipped(name, desc, f"MPS unavailable: {exc}", shares=share))

    env = environment()
    data = {
        "benchmark": "mps_corun",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu_name": env.get("gpu_name"),
        "environment": env,
        "mps_status_before": status_before,
        "mps_error": mps_error,
        "config": cfg,
        "wall_s": round(time.monotonic() - t_start, 1),
        "solo": solo,
        "cases": cases,
        "notes": "fraction = rate while co-running / solo rate (both jobs alone, no MPS); "
                 "memory rate counts bytes read + written; each job runs for config.duration s "
                 "from a common start.",
    }
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(data, indent=2) + "\n")

    print(f"{'case':<12} {'compute':>10} {'frac':>6} {'memory':>10} {'frac':>6} {'sum':>6}")
    print(f"{'solo':<12} {solo['compute']['rate']:>10.4g} {1:>6.2f} "
          f"{solo['memory']['rate']:>10.4g} {1:>6.2f} {'':>6}  "
          f"({UNITS['compute']}, {UNITS['memory']})")
    for c in cases:
        if c["skipped"] or c.get("error"):
            why = f"skipped: {c['skipped']}" if c["skipped"] else f"FAILED: {c['error']}"
            print(f"{c['name']:<12} {why.splitlines()[0][:110]}")
            continue
        print(f"{c['name']:<12} {c['compute']['rate']:>10.4g} {c['compute']['fraction']:>6.2f} "
              f"{c['memory']['rate']:>10.4g} {c['memory']['fraction']:>6.2f} {c['sum']:>6.2f}")
    summary = {
        "out": str(out_path) if out_path is not None else None,
        "device": cfg["device"],
        "gpu_name": env.get("gpu_name"),
        "cases": {c["name"]: c["sum"] for c in cases},
        "skipped": {c["name"]: c["skipped"] for c in cases if c["skipped"]},
        "errors": {c["name"]: c["error"] for c in cases if c.get("error")},
        "wall_s": data["wall_s"],
    }
    print(json.dumps(summary))
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
