"""How close the engine gets to the hardware: decode vs the bandwidth floor, prefill vs the matmul rate.

One command on a GPU (H200, ``dummy:llama-3.1-8b`` in bf16, ~5 minutes), and a CPU smoke run::

    python benchmarks/engine_floor.py --out results/engine_floor_h200.json
    python benchmarks/engine_floor.py --model tiny --device cpu --quick

First the device checks (``tests/gpu/test_engine.py`` on ``--fp32-model``), then the sections as
cells of ``splitlab.measure.sweep``: the ceilings (best of the repeats, medians beside; again
after the runner sections, the best of both used); decode at batch 1/8/32/64 with 1k context
against the floor ``(weights + valid KV) / copy bandwidth``, with the graph's and its GEMMs'
CUDA-event time; the Triton GEMV against cuBLAS; prefill of 1x512, 8x512, 1x4096, 4x2048 under
each SDPA backend (another than PyTorch's choice only when 3% faster on the >= 4k cases); HF's
eager forward (``measure.profile``); a Poisson workload near saturation through serial, chunked
at each ``--chunk-sizes`` and hf-generate. ``measure.analysis.floor_summary`` judges decode
against the BEST copy rate and prefill against the MEDIAN matmul burst (a 4k prefill runs at the
sustained clock), the best beside it.

What is timed: decode ``step_ms`` is the wall time of ``runner.decode_step`` (staging, one input
copy, graph replay, the host sync that returns the tokens), median of many; ``gpu_ms`` is
CUDA-event time of back-to-back graph replays; ``host_ms = step_ms - gpu_ms``. Prefill and HF
times are wall times around a synchronised call, median of several after a warm-up.
"""

import argparse
import contextlib
import copy
import dataclasses
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_memory, gpu_tests, log, print_rows, quiet_transformers, report  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import splitlab  # noqa: E402
from splitlab.config import SLO, EngineConfig  # noqa: E402
from splitlab.measure import analysis as an  # noqa: E402
from splitlab.measure import flops  # noqa: E402
from splitlab.measure.profile import measure_ceilings, profile_records  # noqa: E402
from splitlab.measure.sweep import Cell, SkipCell, Sweep  # noqa: E402
from splitlab.workload import LengthDist, Workload  # noqa: E402

SDPA = ("auto", "flash", "cudnn", "efficient")
WORKLOAD_KEYS = ("throughput_tok_s", "goodput_req_s", "slo_attainment", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s",
                 "tpot_p99_s", "itl_p99_s", "wall_s", "completed", "num_requests", "peak_memory_bytes")


def say(msg: str) -> None:
    log("engine_floor", msg)


def plan(args) -> dict[str, Any]:
    gpu = args.device == "cuda"
    sizes = [int(x) for x in args.chunk_sizes.split(",")] if args.chunk_sizes else None
    hf_n = args.hf_requests
    if gpu and not args.quick:
        return dict(copy_bytes=1 << 30, matmul_n=8192, ceiling_repeats=15, decode_batches=[1, 8, 32, 64],
                    decode_ctx=1024, decode_iters=50, prefill_cases=[(1, 512), (8, 512), (1, 4096), (4, 2048)],
                    prefill_iters=5, hf_iters=3, workload=dict(n=args.requests or 200, prompt=(768, 1280), out=(96, 160)),
                    engine=dict(max_seq_len=2048, max_batch=64, chunk_sizes=sizes or [512, 1024, 2048]),
                    hf_batch=args.hf_batch, hf_requests=64 if hf_n is None else hf_n, budget_s=args.budget_s or 540.0)
    if gpu:  # --quick on a GPU: every section, smaller
        return dict(copy_bytes=1 << 28, matmul_n=4096, ceiling_repeats=7, decode_batches=[1, 32], decode_ctx=1024,
                    decode_iters=20, prefill_cases=[(1, 512), (1, 4096)], prefill_iters=3, hf_iters=2,
                    workload=dict(n=args.requests or 40, prompt=(768, 1280), out=(24, 40)),
                    engine=dict(max_seq_len=2048, max_batch=32, chunk_sizes=sizes or [512, 2048]),
                    hf_batch=args.hf_batch, hf_requests=16 if hf_n is None else hf_n, budget_s=args.budget_s or 300.0)
    return dict(copy_bytes=1 << 24, matmul_n=512, ceiling_repeats=5, decode_batches=[1, 4] if args.quick else [1, 4, 8],
                decode_ctx=48, decode_iters=5, prefill_cases=[(1, 64), (4, 32)], prefill_iters=2, hf_iters=2,
                workload=dict(n=args.requests or (8 if args.quick else 24), prompt=(16, 48), out=(4, 12)),
                engine=dict(max_seq_len=96, max_batch=4, chunk_sizes=sizes or [16, 32]), hf_batch=4,
                hf_requests=hf_n, budget_s=args.budget_s or 600.0)


def median_time(fn, device, iters: int, warmup: int = 1) -> float:
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Section(Cell):
    kind: str  # ceilings | runner | decode | gemv | prefill | hf | workload
    arg: tuple = ()


@dataclasses.dataclass
class RunnerSpace:
    """The runner sections' one runner and KV pool; how many slots hold ``decode_ctx`` tokens."""

    runner: Any
    filled: int = 0


class Bench:
    def __init__(self, args, p: dict[str, Any]) -> None:
        self.args, self.p, self.device = args, p, torch.device(args.device)
        self.dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(
            args.dtype, torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.gen = random.Random(args.seed)
        self.sweep = Sweep("engine_floor", args.out, budget_s=p["budget_s"], resume=args.merge_from or (),
                           progress=not args.no_progress, state=self.result)
        self.checks: dict[str, Any] = dict((self.sweep.earlier or {}).get("checks", {}))
        self.loaded = None

    def rows(self, prefix: str) -> list[dict[str, Any]]:
        """Copies of the rows of the cells named ``prefix...`` (the analysis adds to them)."""
        return [copy.deepcopy({k: v for k, v in r.items() if k != "cell"}) for r in self.sweep.rows
                if r["cell"].startswith(prefix)]

    def one(self, name: str) -> dict[str, Any] | None:
        found = self.rows(name)
        return found[0] if found else None

    def cells(self) -> list[Section]:
        gpu, p, e = self.device.type == "cuda", self.p, self.p["engine"]
        out = [Section(name="ceilings-start", kind="ceilings"), Section(name="runner", group="runner", kind="runner"),
               *[Section(name=f"decode-b{b}", group="runner", kind="decode", arg=(b,)) for b in p["decode_batches"]],
               Section(name="gemv", group="runner", kind="gemv"),
               *[Section(name=f"prefill-{b}", group="runner", kind="prefill", arg=(b,)) for b in (SDPA if gpu else SDPA[:1])],
               Section(name="ceilings-end", kind="ceilings")]
        if not self.args.skip_hf:
            out.append(Section(name="hf", kind="hf"))
        if not self.args.skip_workload:
            modes = [("serial", None)] + [("chunked", cs) for cs in e["chunk_sizes"] if cs > e["max_batch"]]
            modes += [] if self.args.skip_hf else [("hf-generate", None)]
            out += [Section(name=f"workload-{m}{'' if cs is None else f'-{cs}'}", group="workload", kind="workload",
                            arg=(m, cs)) for m, cs in modes]
        return out

    @contextlib.contextmanager
    def context(self, group: str):
        if group == "runner":
            from splitlab.engine.kv import KVPool
            from splitlab.engine.runner import ModelRunner
            from splitlab.engine.weights import extract_arch, extract_weights

            p, facts = self.p, self.loaded.facts
            max_len = min(max(max(n for _, n in p["prefill_cases"]), p["decode_ctx"] + 8), facts.max_positions)
            slots = max(max(p["decode_batches"]), max(b for b, _ in p["prefill_cases"]))
            kv = KVPool.for_model(self.loaded, max_len, num_slots=slots)
            m = self.loaded.model
            cfg = EngineConfig(max_seq_len=max_len, num_slots=slots, max_batch=max(p["decode_batches"]))
            space = RunnerSpace(ModelRunner.for_config(extract_arch(m), extract_weights(m, share_storage=True), kv, cfg))
            del kv
            yield space
            space.runner = None  # the runner and its KV pool go before the next section measures
        else:
            yield self.workload()
        free_memory()

    def measure(self, cell: Section, space) -> dict[str, Any]:
        return getattr(self, f"do_{cell.kind}")(cell, space)

    # -- the sections
    def do_ceilings(self, cell: Section, _) -> dict[str, Any]:
        mdt = self.dtype if self.device.type == "cuda" else torch.float32
        c = measure_ceilings(self.device, mdt, matmul_n=self.p["matmul_n"], copy_bytes=self.p["copy_bytes"],
                             repeats=self.p["ceiling_repeats"], refresh=True)
        say(f"{cell.name}: copy {c.copy_bytes_s / 1e9:.0f} GB/s, matmul {c.matmul_flops_s / 1e12:.1f} TFLOP/s (best)")
        return {"copy_GBps": c.copy_bytes_s / 1e9, "copy_GBps_median": c.copy_bytes_s_median / 1e9,
                "matmul_TFLOPs": c.matmul_flops_s / 1e12, "matmul_TFLOPs_median": c.matmul_flops_s_median / 1e12,
                "copy_bytes": c.copy_buffer_bytes, "matmul_n": c.matmul_n, "matmul_dtype": c.dtype, "repeats": c.repeats,
                "statistic": "best (max rate) of the repeats; medians beside; floors and fractions use the best",
                "ceilings": c.to_dict()}

    def do_runner(self, _cell, space: RunnerSpace) -> dict[str, Any]:
        r, t = space.runner, time.perf_counter()
        r.capture_graphs()
        say(f"runner: kernels {r.kernels.name}, graphs {r.cuda_graphs}, decode variant {r.decode_variant}")
        return {"kernels": r.kernels.name, "cuda_graphs": r.cuda_graphs, "buckets": r.buckets, "kv_pool": r.kv.describe(),
                "build_and_capture_s": time.perf_counter() - t, "decode_combine": getattr(r.kernels, "combine", None),
                **r.decode_variant_info(),
                "sdpa_effective": r.sdpa_effective_backend() if self.device.type == "cuda" else "n/a"}

    def floor_bytes(self, batch: int) -> float:
        facts = self.loaded.facts
        return flops.weights_read_bytes(facts) + flops.decode_cost(facts, batch, self.p["decode_ctx"]).kv_read_bytes

    def do_decode(self, cell: Section, space: RunnerSpace) -> dict[str, Any]:
        (batch,), r, ctx, vocab = cell.arg, space.runner, self.p["decode_ctx"], self.loaded.facts.vocab_size
        for lo in range(space.filled, batch, 8):  # fill slots with ctx tokens once (untimed)
            r.prefill([(s, [self.gen.randrange(4, vocab) for _ in range(ctx)], 0) for s in range(lo, min(batch, lo + 8))])
        space.filled = max(space.filled, batch)
        slots, tokens, positions = list(range(batch)), [self.gen.randrange(4, vocab) for _ in range(batch)], [ctx] * batch
        step_s = median_time(lambda: r.decode_step(slots, tokens, positions), self.device, self.p["decode_iters"], 3)
        row = {"batch": batch, "context": ctx, "step_ms": step_s * 1e3, "floor_bytes": self.floor_bytes(batch)}
        if r.cuda_graphs:
            from splitlab.engine.graphs import bucket_for
            from splitlab.engine.tuning import cuda_time

            gpu_s = cuda_time(r.graph(batch, ctx + 1).replay, self.p["decode_iters"])
            row.update(bucket=bucket_for(batch, r.buckets), gpu_ms=gpu_s * 1e3, host_ms=(step_s - gpu_s) * 1e3,
                       gemm_only_ms=gemm_only_time(r, bucket_for(batch, r.buckets)) * 1e3)
        say(f"decode B={batch}: {row['step_ms']:.3f} ms/step (gpu {row.get('gpu_ms', float('nan')):.3f})")
        return row

    def do_gemv(self, _cell, space: RunnerSpace) -> dict[str, Any]:
        from splitlab.engine.runner import ModelRunner
        from splitlab.engine.tuning import cuda_time

        r = space.runner
        if self.device.type != "cuda" or r.kernels.name != "triton":
            raise SkipCell("needs CUDA and the Triton kernels")
        arch, weights = r.export()
        g = ModelRunner.for_config(arch, weights, r.kv, EngineConfig(gemv=True, decode_variant=r.decode_variant,
                                                                     decode_combine=r.kernels.combine), max_batch=4)
        t = time.perf_counter()
        g.capture_graphs()  # tunes the GEMV configs first
        out: dict[str, Any] = {"tune_and_capture_s": time.perf_counter() - t, "per_shape": g.gemv_report, "decode": []}
        ctx = self.p["decode_ctx"]
        for batch in (b for b in (1, 4) if b <= space.filled):
            sl, tk = list(range(batch)), [5] * batch
            step_s = median_time(lambda: g.decode_step(sl, tk, [ctx] * batch), self.device, self.p["decode_iters"], 3)
            out["decode"].append({"batch": batch, "step_ms": step_s * 1e3, "floor_bytes": self.floor_bytes(batch),
                                  "gpu_ms": cuda_time(g.graph(batch, ctx + 1).replay, self.p["decode_iters"]) * 1e3})
        return out

    def do_prefill(self, cell: Section, space: RunnerSpace) -> dict[str, Any]:
        (backend,), r, facts = cell.arg, space.runner, self.loaded.facts
        r.set_sdpa_backend(backend)
        try:
            cases = []
            for batch, length in self.p["prefill_cases"]:
                chunks = [(s, [self.gen.randrange(4, facts.vocab_size) for _ in range(length)], 0) for s in range(batch)]
                t = median_time(lambda: r.prefill(chunks), self.device, self.p["prefill_iters"], 1)
                cost = flops.prefill_cost(facts, batch, length, lm_head="last")
                cases.append({"batch": batch, "length": length, "tokens": batch * length, "ms": t * 1e3,
                              "flops": cost.flops, "TFLOPs": cost.flops / t / 1e12, "sdpa_backend": backend,
                              "sdpa_effective": r.sdpa_effective_backend(batch, length)
                              if self.device.type == "cuda" else backend})
                say(f"prefill {batch}x{length} (sdpa {backend}): {t * 1e3:.2f} ms, {cases[-1]['TFLOPs']:.1f} TFLOP/s")
        except RuntimeError as exc:  # a backend that does not take these inputs on this GPU
            raise SkipCell(f"SDPA backend {backend}: {str(exc)[:200]}") from exc
        finally:
            r.set_sdpa_backend("auto")
        return {"backend": backend, "cases": cases}

    def do_hf(self, _cell, _space) -> dict[str, Any]:
        """HF's eager forward (DynamicCache), the same shapes, through ``profile_records``."""
        from splitlab.measure.profile import Ceilings

        p, c = self.p, Ceilings.from_dict(self.one("ceilings-start")["ceilings"])
        kw = dict(ceilings=c, backend="hf", repeats=p["hf_iters"], warmup=1, progress=False)
        dec = profile_records(self.loaded, batch_sizes=[], prompt_lens=[], context_lens=[p["decode_ctx"]],
                              decode_batch_sizes=p["decode_batches"], **kw)
        pre = [rec for b, n in p["prefill_cases"]
               for rec in profile_records(self.loaded, batch_sizes=[b], prompt_lens=[n], context_lens=[], **kw)]
        return {"decode": [{"batch": d["batch"], "context": d["tokens"], "step_ms": d["time_s"] * 1e3,
                            "floor_bytes": self.floor_bytes(d["batch"])} for d in dec],
                "prefill": [{"batch": d["batch"], "length": d["tokens"], "ms": d["time_s"] * 1e3,
                             "TFLOPs": d["achieved_flops_s"] / 1e12} for d in pre]}

    def workload(self) -> dict[str, Any]:
        """The Poisson workload near saturation (90% of the capacity the microbenchmarks predict)."""
        p, w = self.p, self.p["workload"]
        decode, prefill = self.rows("decode-"), (self.one("prefill-auto") or {}).get("cases")
        if self.args.rate is None and not (decode and prefill):
            raise SkipCell("no decode and prefill timings to estimate the saturation rate from; pass --rate")
        rate = self.args.rate or an.saturation_rate(decode, prefill, sum(w["prompt"]) / 2, sum(w["out"]) / 2)
        wl = splitlab.poisson(w["n"], rate=rate, prompt_len=LengthDist.uniform(*w["prompt"]),
                              output_len=LengthDist.uniform(*w["out"]), seed=self.args.seed, model=self.loaded)
        best = an.best_prefill_rows(self.result())
        big = max(best.values(), key=lambda r: r["tokens"]) if best else None
        runner = self.one("runner") or {}
        return {"workload": wl, "rate": rate, "micro": {"decode": decode, "prefill": big},
                "sdpa_backend": (big or {}).get("sdpa_backend", "auto"), "decode_variant": runner.get("decode_variant", "auto")}

    def do_workload(self, cell: Section, space: dict[str, Any]) -> dict[str, Any]:
        (mode, cs), wl, e = cell.arg, space["workload"], self.p["engine"]
        if mode == "hf-generate":
            n = self.p["hf_requests"] or len(wl)
            sub = wl if n >= len(wl) else Workload(f"{wl.name}-first{n}", tuple(wl.requests[:n]))
            run = splitlab.run(sub, self.loaded, mode="hf-generate", batch_size=self.p["hf_batch"], progress=False)
            return {**{k: run.summary(SLO()).get(k) for k in WORKLOAD_KEYS}, "mode": mode, "batch_size": self.p["hf_batch"],
                    "requests_used": len(sub), "note": f"first {len(sub)} of the {len(wl)} requests (same arrivals)"}
        cfg = EngineConfig(max_seq_len=e["max_seq_len"], max_batch=e["max_batch"], decode_variant=space["decode_variant"],
                           chunk_size=cs if cs is not None else max(e["chunk_sizes"] + [e["max_batch"] + 1]),
                           sdpa_backend=space["sdpa_backend"])
        t0 = time.perf_counter()
        run = splitlab.run(wl, self.loaded, mode=mode, config=cfg, progress=False)
        s = run.summary(SLO())
        say(f"{cell.name}: {s['throughput_tok_s']:.0f} tok/s, goodput {s['goodput_req_s']:.2f} req/s")
        return {**{k: s.get(k) for k in WORKLOAD_KEYS}, "mode": mode, "chunk_size": cs, "rate_rps": space["rate"],
                "workload": wl.name, "requests": len(wl), "output_tokens": wl.total_output_tokens,
                "setup_and_run_s": time.perf_counter() - t0, "steps": an.step_breakdown(run, space["micro"])}

    # -- the result file
    def result(self) -> dict[str, Any]:
        """The sections in the layout of the recorded results, from the rows so far."""
        out: dict[str, Any] = {"model": self.args.model, "dtype": str(self.dtype).replace("torch.", ""), "plan": self.p,
                               "targets": an.FLOOR_TARGETS, "timing_notes": __doc__.split("What is timed:")[1].strip(),
                               "checks": self.checks, "model_facts": self.loaded.facts.to_dict() if self.loaded else None}
        for key, name in (("ceilings_start", "ceilings-start"), ("ceilings_end", "ceilings-end"), ("runner", "runner"),
                          ("gemv", "gemv"), ("hf", "hf")):
            if self.one(name):
                out[key] = {k: v for k, v in self.one(name).items() if k != "ceilings"}
        out["decode"] = self.rows("decode-")
        by_backend = {r["backend"]: r["cases"] for r in self.rows("prefill-")}
        out["prefill"] = by_backend.get("auto", [])
        big = {b: sum(c["ms"] for c in cases if c["tokens"] >= 4096) for b, cases in by_backend.items()}
        fastest = min(big, key=big.get) if big else "auto"
        if fastest != "auto" and "auto" in big and big[fastest] < 0.97 * big["auto"]:
            out["prefill_alt"] = by_backend[fastest]
        out["prefill_by_sdpa_backend"] = {"total_ms_ge4k": big, "best": out.get("prefill_alt", [{}])[0].get(
            "sdpa_backend", "auto"), "rule": "another backend only when 3% faster than auto on the >= 4k cases"}
        runs = {r["cell"].removeprefix("workload-"): {k: v for k, v in r.items() if k != "cell"}
                for r in copy.deepcopy(self.sweep.rows) if r["cell"].startswith("workload-")}
        if runs:
            first = next(iter(runs.values()))
            chunked = {k: v for k, v in runs.items() if v["mode"] == "chunked"}
            out["workload"] = {"name": first.get("workload"), "rate_rps": first.get("rate_rps"),
                               "requests": first.get("requests"), "slo": SLO().to_dict(),
                               "runs": {k: v for k, v in runs.items() if v["mode"] != "hf-generate"},
                               "best_chunked": max(chunked, key=lambda k: (chunked[k]["goodput_req_s"] or 0,
                                                                           chunked[k]["throughput_tok_s"] or 0))
                               if chunked else None, **({"hf-generate": runs["hf-generate"]} if "hf-generate" in runs else {})}
        if "ceilings_start" in out:
            out["ceilings"] = an.recompute_floors(out)
            out["summary"] = {**an.floor_summary(out), "checks_passed": (self.checks.get("gpu_tests") or {}).get("passed")}
        return out


def gemm_only_time(runner, batch: int) -> float:
    """CUDA-event time of the step's matmuls alone (all layers + lm_head), replayed as one graph."""
    from splitlab.engine.tuning import cuda_time

    dev, dt, arch = runner.device, runner.dtype, runner.arch
    x = torch.randn(batch, arch["hidden_size"], device=dev, dtype=dt)
    a = torch.randn(batch, runner.num_heads * runner.head_dim, device=dev, dtype=dt)
    m = torch.randn(batch, arch["intermediate_size"], device=dev, dtype=dt)

    def body():
        for layer in runner.layers:
            F.linear(x, layer.qkv), F.linear(a, layer.o), F.linear(x, layer.gate_up), F.linear(m, layer.down)
        F.linear(x, runner.lm_head)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    return cuda_time(g.replay, 20)


COLUMNS = [("batch", "decode B", 8, 0), ("step_ms", "step ms", 9, 3), ("gpu_ms", "gpu ms", 8, 3),
           ("host_ms", "host ms", 8, 3), ("floor_ms", "floor ms", 9, 3), ("vs_floor", "x floor", 8, 2),
           ("gemm_only_ms", "GEMMs ms", 9, 3)]
PREFILL = [("case", "prefill", 10, None), ("ms", "ms", 9, 2), ("TFLOPs", "TFLOP/s", 9, 1),
           ("frac_of_matmul_median", "of median", 9, 2), ("frac_of_matmul", "of best", 8, 2)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dummy:llama-3.1-8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, every section")
    ap.add_argument("--out", default=None, help="write the JSON here (e.g. results/engine_floor_h200.json)")
    ap.add_argument("--fp32-model", default="dummy:llama-3.2-1b", help="model of the device checks on GPU ('' skips)")
    ap.add_argument("--rate", type=float, default=None, help="Poisson rate (req/s); default: 90%% of estimated capacity")
    ap.add_argument("--requests", type=int, default=None, help="workload size (default 200; 40 with --quick)")
    ap.add_argument("--chunk-sizes", default=None, help="chunked mode's token budgets, comma-separated (GPU 512,1024,2048)")
    ap.add_argument("--hf-batch", type=int, default=32, help="hf-generate static batch size")
    ap.add_argument("--hf-requests", type=int, default=None, help="hf-generate serves the first N requests (GPU 64; 0 = all)")
    ap.add_argument("--skip-hf", action="store_true", help="skip every HF comparison (eager forward, hf-generate)")
    ap.add_argument("--skip-workload", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=None, help="start no section after this (GPU 540 s)")
    ap.add_argument("--merge-from", action="append", help="an earlier output: its sections are kept, not rerun")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    quiet_transformers()
    bench = Bench(args, plan(args))
    if bench.device.type == "cuda" and args.fp32_model and "gpu_tests" not in bench.checks:
        say(f"device checks: tests/gpu/test_engine.py on {args.fp32_model}")
        bench.checks["gpu_tests"] = gpu_tests(["tests/gpu/test_engine.py"], model=args.fp32_model)
        say(f"device checks: {bench.checks['gpu_tests']['summary']}")
    torch.manual_seed(args.seed)
    bench.loaded = splitlab.load_model(args.model, device=bench.device, dtype=bench.dtype, seed=args.seed)
    data = bench.sweep.run(bench.cells(), bench.measure, group_context=bench.context)
    print_rows(data.get("decode", []), COLUMNS)
    print_rows([{**r, "case": f"{r['batch']}x{r['length']}"} for r in data.get("prefill", [])], PREFILL)
    report(data, {"out": args.out, **data.get("summary", {})})
    return 0 if (bench.checks.get("gpu_tests") or {}).get("passed") is not False and not data["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
