#!/usr/bin/env python
"""What HTTP adds, and a peer server on the same GPU: ``splitlab serve`` (serial, chunked, the
adaptive green split) under ``splitlab bench`` against the same Poisson workloads run in-process
(``splitlab.run``), then the same bench against ``transformers serve --continuous-batching``
on the same dummy model saved to local disk. GPU only.

    python benchmarks/serve_bench.py --out results/serve_h200.json --runs-dir /tmp/serve-runs
    python benchmarks/serve_bench.py --merge-from results/serve_h200.json --out results/serve_h200.json ...

Target (``splitlab.measure.serve_overhead``): HTTP adds at most 5% to TTFT p50 and 1 ms to ITL
p50 at every rate. The client and the in-process run are two runs of the same requests, so
part of any difference is run-to-run noise; both sides' p99s are kept beside the medians. Each
HTTP row also keeps the server's own histograms over its replay (``server_view``), so the
analysis says where the mean TTFT went: the server's parse, its engine, the first token's
delivery, or outside the server (``ttft_mean_where``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, free_memory, leftover_diff, leftovers, log, quiet_transformers  # noqa: E402

import splitlab  # noqa: E402
from splitlab.config import SLO, EngineConfig, SplitConfig  # noqa: E402
from splitlab.measure.serve_overhead import judge_rows, ttft_mean_s  # noqa: E402
from splitlab.measure.sweep import Cell, Sweep  # noqa: E402
from splitlab.workload import LengthDist, poisson  # noqa: E402

RATES = (8.0, 16.0, 21.2)  # 21.2: the co-location benchmark's rate near saturation
PROMPT, OUTPUT = (768, 1280), (192, 320)
SEED = 1
SLO_RELAXED = SLO(ttft_s=1.0, tpot_s=0.05)
ENGINE = dict(max_seq_len=2048, num_slots=64, max_batch=64, token_budget=8192)
# (step, serve flags, in-process mode and options); the transformers peer has no in-process twin
STEPS = [
    ("serial", ["--mode", "serial"], ("serial", {}, None)),
    # the same serial engine in a process of its own (one replica): the server's event loop and
    # the engine's kernel launches no longer share one interpreter's GIL (vLLM's engine core)
    ("serial-own-process", ["--mode", "replicas", "--replicas", "1", "--replica-engine", "serial"],
     ("serial", {}, None)),
    ("chunked-2048", ["--mode", "chunked", "--chunk-size", "2048"], ("chunked", {"chunk_size": 2048}, None)),
    ("split-green-table", ["--mode", "split", "--backend", "green", "--sm-policy", "table"],
     ("split", {}, {"backend": "green", "sm_policy": "table"})),
    ("transformers-serve", None, None),
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run(Cell):
    step: str
    side: str  # "http" or "in_process"
    rate: float


def say(msg: str) -> None:
    log("serve", msg)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dummy:llama-3.1-8b")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only checks the script")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--requests", type=int, default=80)
    p.add_argument("--prompt-len", default="%d:%d" % PROMPT, help="LO:HI tokens")
    p.add_argument("--output-len", default="%d:%d" % OUTPUT, help="LO:HI tokens")
    p.add_argument("--rates", default=",".join(f"{r:g}" for r in RATES))
    p.add_argument("--steps", help="step names, comma-separated (default: all)")
    p.add_argument("--sm-profile", default=str(REPO / "results" / "sm_profile_h200.json"))
    p.add_argument("--budget-s", type=float, default=470.0)
    p.add_argument("--out", default=str(REPO / "results" / "serve_h200.json"))
    p.add_argument("--runs-dir", required=True)
    p.add_argument("--merge-from", action="append")
    return p.parse_args(argv)


def bench_argv(url: str, args, rate: float, save: Path) -> list[str]:
    return [sys.executable, "-m", "splitlab", "bench", "--endpoint", url, "--workload", "poisson",
            "--num-requests", str(args.requests), "--rate", f"{rate:g}", "--prompt-len", args.prompt_len,
            "--output-len", args.output_len, "--seed", str(SEED), "--model", args.model, "--save", str(save),
            "--no-progress", "--timeout", "300"]


@contextlib.contextmanager
def splitlab_server(args, flags: list[str]):
    from splitlab.serve.process import ServerProcess

    extra = ["--sm-profile", args.sm_profile] if "--sm-policy" in flags else []
    server = ServerProcess.splitlab(["--model", args.model, "--device", args.device, "--dtype", args.dtype,
                                     "--max-seq-len", str(ENGINE["max_seq_len"]), "--num-slots",
                                     str(ENGINE["num_slots"]), "--max-batch", str(ENGINE["max_batch"]),
                                     "--token-budget", str(ENGINE["token_budget"]), *flags, *extra],
                                    timeout_s=600.0)
    try:
        yield server
    finally:
        say(f"server stopped: status {server.stop()}")


@contextlib.contextmanager
def transformers_server(args, model_holder):
    """The same dummy weights saved to local disk, served by ``transformers serve``."""
    from splitlab.serve.process import ServerProcess, free_port

    with tempfile.TemporaryDirectory(prefix="splitlab-dummy-") as folder:
        model = model_holder()
        model.model.save_pretrained(folder)
        model.tokenizer.save_pretrained(folder)
        free_memory()
        port = free_port()
        exe = Path(sys.executable).with_name("transformers")
        argv = [str(exe) if exe.exists() else "transformers", "serve", folder, "--host", "127.0.0.1", "--port",
                str(port), "--device", args.device, "--dtype", args.dtype, "--continuous-batching"]
        base = f"http://127.0.0.1:{port}"
        with ServerProcess.start(argv, base + "/v1", base + "/health", timeout_s=600.0,
                                 env={"HF_HUB_OFFLINE": "1"}) as server:
            yield server


def _lengths(text: str) -> LengthDist:
    lo, hi = (int(x) for x in text.split(":"))
    return LengthDist.uniform(lo, hi)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_transformers()
    rates = [float(r) for r in args.rates.split(",")]
    wanted = set(args.steps.split(",")) if args.steps else None
    steps = {name: (flags, inproc) for name, flags, inproc in STEPS if wanted is None or name in wanted}
    cells = []
    for step, (flags, inproc) in steps.items():
        sides = ["http"] + (["in_process"] if inproc else [])
        cells += [Run(name=f"{step}--{side}--r{r:g}", group=f"{step}--{side}", cost_s=args.requests / r + 10.0,
                      setup_s=90.0, step=step, side=side, rate=r) for side in sides for r in rates]
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    sweep = Sweep("serve_bench", args.out, budget_s=args.budget_s, resume=args.merge_from or (), progress=False)
    before = leftovers()
    loaded: dict[str, Any] = {}

    def model():  # in-process runs and the transformers peer's saved copy; loaded once, when needed
        if "m" not in loaded:
            loaded["m"] = splitlab.load_model(args.model, device=args.device, dtype=args.dtype)
        return loaded["m"]

    def context(group: str):
        step, side = group.split("--")
        if side == "in_process":
            return contextlib.nullcontext(None)
        if step == "transformers-serve":
            return transformers_server(args, model)
        return splitlab_server(args, steps[step][0])

    def measure(cell: Run, server) -> dict[str, Any]:
        from splitlab.measure.serve_overhead import workload_shape
        from splitlab.present.results import save_runs

        if cell.side == "http":
            with tempfile.TemporaryDirectory(prefix="splitlab-bench-") as tmp:
                save = Path(tmp) / "run.json"
                done = subprocess.run(bench_argv(server.url, args, cell.rate, save), capture_output=True,
                                      text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if done.returncode != 0:
                    raise RuntimeError(f"splitlab bench failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                                       f"{done.stderr[-3000:]}")
                vllm = json.loads(done.stdout.strip().splitlines()[-1])
                run = splitlab.load_run(save)
        else:
            mode, opts, split = steps[cell.step][1]
            wl = poisson(args.requests, cell.rate, _lengths(args.prompt_len), _lengths(args.output_len),
                         seed=SEED, model=model())
            extra = {"split": SplitConfig(**split, sm_profile=args.sm_profile)} if split else {}
            run = splitlab.run(wl, model(), mode=mode, config=EngineConfig(**ENGINE, **opts), progress=False,
                               **extra)
            vllm = None
        save_runs([run], runs_dir, [cell.name], compress=True)
        s = run.summary(SLO_RELAXED)
        say(f"{cell.name}: TTFT p50 {s['ttft_p50_s'] * 1e3:.1f} ms, ITL p50 {(s['itl_p50_s'] or 0) * 1e3:.2f} ms, "
            f"goodput {s['goodput_req_s']:.2f} req/s, {s['completed']}/{s['num_requests']} completed")
        return {"step": cell.step, "side": cell.side, "rate": cell.rate, "file": f"{cell.name}.json.gz",
                "summary": s, "vllm_fields": vllm, "workload_shape": workload_shape(run),
                "ttft_mean_s": ttft_mean_s(run), "server_view": (vllm or {}).get("server_view")}

    sweep.run(cells, measure, group_context=context)
    sweep.write(leftovers=leftover_diff(before), analysis=judge_rows(sweep.rows))
    say(f"done: {len(sweep.rows)} runs; left: {len(sweep.data().get('left') or [])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
