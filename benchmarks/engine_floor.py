"""How close the engine gets to the hardware: decode vs the bandwidth floor, prefill vs the matmul rate.

One command on a GPU (H200, ``dummy:llama-3.1-8b`` in bf16, about 4 minutes), and a CPU smoke run::

    python benchmarks/engine_floor.py --out results/engine_floor_h200.json
    python benchmarks/engine_floor.py --model tiny --device cpu --quick

The device checks first (``tests/gpu/test_engine.py`` on ``--fp32-model``), then ``--sections``
(all by default, in this order) as ``measure.sweep`` cells: the ceilings; ``decode`` (batch 1 to
256 at 1k context on a slot pool, against the floor ``(weights + valid KV) / copy rate``,
``measure.floor``); ``gemv`` (the Triton GEMV against cuBLAS); ``long`` (batch 32 at 8k context);
``prefill`` (four shapes under each SDPA backend); ``paged`` (the decode and long steps on pools
of 16/32/64-position pages, each against the slot step: at most 5% slower is the target); the
ceilings again (the best of both used); ``hf`` (HF's eager forward); ``workload`` (Poisson near
saturation: serial, chunked, hf-generate); ``kernels`` (one CUDA-graph step at batch 1 and 32
under torch.profiler, its kernels by kind, ``measure.kernel_breakdown``; last, as CUPTI stays
attached after it). ``measure.floor.result_sections`` lays out the file and its summary.

What is timed: decode ``step_ms`` is the wall time of ``runner.decode_step`` (staging, one input
copy, graph replay, the host sync that returns the tokens), median of many; ``gpu_ms`` is
CUDA-event time of back-to-back graph replays; ``host_ms = step_ms - gpu_ms``. The KV pools hold
random values, not prefilled prompts: a step's time depends on the lengths, not on the values.
A kernel breakdown's ``host_us`` is its step's wall time minus its kernels' time (profiled
apart). Prefill and HF times are wall times around a synchronised call, median of several after
a warm-up.
"""

import argparse
import contextlib
import copy
import dataclasses
import functools
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_memory, gpu_tests, log, quiet_transformers, report  # noqa: E402

import torch  # noqa: E402

import splitlab  # noqa: E402
from splitlab.config import EngineConfig  # noqa: E402
from splitlab.errors import ConfigError  # noqa: E402
from splitlab.measure import analysis as an, engine_timing as et, floor, kernel_breakdown as kb  # noqa: E402
from splitlab.measure.profile import measure_ceilings  # noqa: E402
from splitlab.measure.sweep import Cell, SkipCell, Sweep  # noqa: E402

say = functools.partial(log, "engine_floor")
SDPA = ("auto", "flash", "cudnn", "efficient")
SECTIONS = ("decode", "gemv", "long", "prefill", "paged", "hf", "workload", "kernels")  # in the order they run
GPU = dict(copy_bytes=1 << 30, matmul_n=8192, ceiling_repeats=15, decode_batches=[1, 8, 32, 64, 128, 256],
           decode_ctx=1024, long_cases=[(32, 8192)], block_sizes=[16, 32, 64], kernel_batches=[1, 32],
           kernel_steps=20, decode_iters=30, hf_decode_batches=[1, 8, 32, 64],
           prefill_cases=[(1, 512), (8, 512), (1, 4096), (4, 2048)], prefill_iters=5, hf_iters=3,
           workload=dict(n=100, prompt=(768, 1280), out=(96, 160)),
           engine=dict(max_seq_len=2048, max_batch=64, chunk_sizes=[512, 1024, 2048]), hf_batch=32, hf_requests=32,
           budget_s=540.0)
CPU = dict(copy_bytes=1 << 24, matmul_n=512, ceiling_repeats=5, decode_batches=[1, 4, 8], decode_ctx=48,
           long_cases=[(2, 160)], block_sizes=[16, 32, 64], kernel_batches=[1, 4], kernel_steps=3, decode_iters=5,
           hf_decode_batches=[1, 4], prefill_cases=[(1, 64), (4, 32)], prefill_iters=2, hf_iters=2,
           workload=dict(n=24, prompt=(16, 48), out=(4, 12)),
           engine=dict(max_seq_len=96, max_batch=4, chunk_sizes=[16, 32]), hf_batch=4, hf_requests=None, budget_s=600.0)
QUICK = {"cuda": dict(copy_bytes=1 << 28, matmul_n=4096, ceiling_repeats=7, decode_batches=[1, 32, 256],
                      block_sizes=[16], kernel_batches=[1], kernel_steps=10, decode_iters=15, hf_decode_batches=[1, 32],
                      prefill_cases=[(1, 512), (1, 4096)], prefill_iters=3, hf_iters=2,
                      workload=dict(n=40, prompt=(768, 1280), out=(24, 40)),
                      engine=dict(max_seq_len=2048, max_batch=32, chunk_sizes=[512, 2048]), hf_requests=16,
                      budget_s=300.0),
         "cpu": dict(decode_batches=[1, 4], block_sizes=[16, 32], workload=dict(n=8, prompt=(16, 48), out=(4, 12)))}


def plan(args) -> dict[str, Any]:
    """The sizes (``GPU`` / ``CPU``, with ``QUICK``'s under --quick) and the flags' overrides."""
    dev = "cuda" if args.device == "cuda" else "cpu"
    p = copy.deepcopy({**(GPU if dev == "cuda" else CPU), **(QUICK[dev] if args.quick else {})})
    parsers = {"batches": ("decode_batches", floor.parse_sizes), "long": ("long_cases", floor.parse_cases),
               "block_sizes": ("block_sizes", floor.parse_sizes)}
    for flag, (key, parse) in parsers.items():
        if getattr(args, flag):
            p[key] = parse(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.chunk_sizes:
        p["engine"]["chunk_sizes"] = floor.parse_sizes(args.chunk_sizes, "--chunk-sizes")
    p["workload"]["n"] = args.requests or p["workload"]["n"]
    p.update({k: getattr(args, k) for k in ("hf_batch", "hf_requests", "budget_s") if getattr(args, k) is not None})
    on = set(SECTIONS) if args.sections == "all" else {s.strip() for s in args.sections.split(",")}
    if on - set(SECTIONS):
        raise ConfigError(f"--sections: unknown {sorted(on - set(SECTIONS))}; choose from {', '.join(SECTIONS)} or all")
    p["sections"] = [s for s in SECTIONS if s in on and not (args.skip_hf and s == "hf")
                     and not (args.skip_workload and s == "workload")]
    return p


@dataclasses.dataclass(frozen=True, kw_only=True)
class Section(Cell):
    kind: str  # ceilings | runner | decode | kernels | gemv | prefill | hf | workload
    arg: tuple = ()  # decode: (batch, context, page size); kernels: batches; prefill: (backend,); workload


class Bench:
    def __init__(self, args, p: dict[str, Any]) -> None:
        self.args, self.p, self.device = args, p, torch.device(args.device)
        self.dtype = getattr(torch, args.dtype or ("bfloat16" if self.device.type == "cuda" else "float32"))
        self.gen = random.Random(args.seed)
        self.sweep = Sweep("engine_floor", args.out, budget_s=p["budget_s"], resume=args.merge_from or (),
                           progress=not args.no_progress, state=self.result)
        self.checks: dict[str, Any] = dict((self.sweep.earlier or {}).get("checks", {}))
        self.loaded, self.pools = None, {}

    def one(self, name: str) -> dict[str, Any] | None:
        return next((r for r in self.sweep.rows if r["cell"] == name), None)

    def pool(self, group: str, block, cells: list[Section], lengths=(), batches=()) -> list[Section]:
        """The cells of one runner group; its pool holds their largest batch at their longest sequence."""
        steps = [c.arg[:2] for c in cells if c.kind == "decode"]
        graphs = {b for b, _ in steps} | {b for c in cells if c.kind == "kernels" for b in c.arg}
        max_len = min(max([c + 8 for _, c in steps] + list(lengths)), self.loaded.facts.max_positions)
        self.pools[group] = (block, max_len, max([*graphs, *batches]), sorted(graphs))
        return [dataclasses.replace(c, group=group) for c in cells]

    def cells(self) -> list[Section]:
        p, on, ctx, e = self.p, self.p["sections"], self.p["decode_ctx"], self.p["engine"]
        dec = lambda name, b, c, bs=None: Section(name=name, kind="decode", arg=(b, c, bs))  # noqa: E731
        out = [Section(name="ceilings-start", kind="ceilings")]
        if {"decode", "gemv"} & set(on):
            cells = [Section(name="runner", kind="runner")]
            cells += [dec(f"decode-b{b}", b, ctx) for b in p["decode_batches"] if "decode" in on]
            out += self.pool("slot-1k", None, cells + ([Section(name="gemv", kind="gemv")] if "gemv" in on else []),
                             [ctx + 8], [4])
        if {"long", "prefill"} & set(on):
            cells = [dec(f"long-b{b}-c{c}", b, c) for b, c in p["long_cases"] if "long" in on]
            cells += [Section(name=f"prefill-{b}", kind="prefill", arg=(b,)) for b in
                      (SDPA if self.device.type == "cuda" else SDPA[:1]) if "prefill" in on]
            out += self.pool("slot-long", None, cells, [n for _, n in p["prefill_cases"]],
                             [b for b, _ in p["prefill_cases"]])
        for bs in p["block_sizes"] if "paged" in on else []:
            for label, cases in (("1k", [(b, ctx) for b in p["decode_batches"]]), ("long", p["long_cases"])):
                out += self.pool(f"paged{bs}-{label}", bs, [dec(f"paged{bs}-b{b}-c{c}", b, c, bs) for b, c in cases])
        out.append(Section(name="ceilings-end", kind="ceilings"))
        out += [Section(name="hf", kind="hf")] if "hf" in on else []
        if "workload" in on:
            modes = [("serial", None)] + [("chunked", cs) for cs in e["chunk_sizes"] if cs > e["max_batch"]]
            modes += [("hf-generate", None)] if "hf" in on else []
            out += [Section(name=f"workload-{m}{'' if cs is None else f'-{cs}'}", group="workload", kind="workload",
                            arg=(m, cs)) for m, cs in modes]
        if "kernels" in on:  # last: CUPTI stays attached after torch.profiler and slows what runs after it
            kernels = Section(name="kernels", kind="kernels", arg=tuple(p["kernel_batches"]))
            out += self.pool("profile-1k", None, [kernels], [ctx + 8])
        return out

    @contextlib.contextmanager
    def context(self, group: str):
        if group == "workload":
            yield self.workload()
        else:
            block, max_len, seqs, steps = self.pools[group]
            # every pool decodes with the slot pool's variant, so the pools differ in their layout alone
            variant = "auto" if group == "slot-1k" else (self.one("runner") or {}).get("decode_variant", "auto")
            space = et.timing_runner(self.loaded, max_len, seqs, block, variant, steps, self.args.seed)
            yield space
            space.clear()  # the runner and its KV pool go before the next section measures
        free_memory()

    # -- the sections
    def do_ceilings(self, cell: Section, _) -> dict[str, Any]:
        mdt = self.dtype if self.device.type == "cuda" else torch.float32
        c = measure_ceilings(self.device, mdt, matmul_n=self.p["matmul_n"], copy_bytes=self.p["copy_bytes"],
                             repeats=self.p["ceiling_repeats"], refresh=True)
        say(f"{cell.name}: copy {c.copy_bytes_s / 1e9:.0f} GB/s, matmul {c.matmul_flops_s / 1e12:.1f} TFLOP/s (best)")
        return et.ceilings_row(c)

    def do_runner(self, _cell, space: dict[str, Any]) -> dict[str, Any]:
        r = space["runner"]
        say(f"runner: kernels {r.kernels.name}, graphs {r.cuda_graphs}, decode variant {r.decode_variant}")
        return et.runner_info(r, space["build_s"], space["captured"])

    def do_decode(self, cell: Section, space: dict[str, Any]) -> dict[str, Any]:
        (batch, ctx, block), r = cell.arg, space["runner"]
        row = {"pool": f"paged{block}" if block else "slot", "block_size": block, **et.time_decode(
            r, self.loaded.facts, batch, ctx, self.p["decode_iters"], space["tables"], self.gen)}
        if r.cuda_graphs and cell.name.startswith("decode-b"):
            row["gemm_only_ms"] = kb.gemm_only_time(r, row["bucket"]) * 1e3
        say(f"{cell.name}: {row['step_ms']:.3f} ms/step (gpu {row.get('gpu_ms', float('nan')):.3f})")
        return row

    def do_kernels(self, cell: Section, space: dict[str, Any]) -> dict[str, Any]:
        p, r = self.p, space["runner"]
        out = kb.decode_step_breakdown(r, cell.arg, p["decode_ctx"], p["kernel_steps"], p["decode_iters"], self.gen)
        for k in out:
            say(f"kernels B={k['batch']}: {k['kernel_us']:.0f} us in kernels of a {k['wall_us']:.0f} us step")
        return {"breakdowns": out}

    def do_gemv(self, _cell, space: dict[str, Any]) -> dict[str, Any]:
        if self.device.type != "cuda" or space["runner"].kernels.name != "triton":
            raise SkipCell("needs CUDA and the Triton kernels")
        return et.time_gemv(space["runner"], self.loaded.facts, self.p["decode_ctx"], self.p["decode_iters"], self.gen)

    def do_prefill(self, cell: Section, space: dict[str, Any]) -> dict[str, Any]:
        (backend,) = cell.arg
        try:
            cases = et.time_prefill(space["runner"], self.loaded.facts, self.p["prefill_cases"], backend,
                                    self.p["prefill_iters"], self.gen)
        except RuntimeError as exc:  # a backend that does not take these inputs on this GPU
            raise SkipCell(f"SDPA backend {backend}: {str(exc)[:200]}") from exc
        for c in cases:
            say(f"prefill {c['batch']}x{c['length']} (sdpa {backend}): {c['ms']:.2f} ms, {c['TFLOPs']:.1f} TFLOP/s")
        return {"backend": backend, "cases": cases}

    def do_hf(self, _cell, _space) -> dict[str, Any]:
        from splitlab.measure.profile import Ceilings

        p = self.p
        return et.hf_rows(self.loaded, Ceilings.from_dict(self.one("ceilings-start")["ceilings"]), p["decode_ctx"],
                          p["hf_decode_batches"], p["prefill_cases"], p["hf_iters"])

    def workload(self) -> dict[str, Any]:
        """The Poisson workload near saturation (90% of the capacity the microbenchmarks predict
        at the engine's ``max_batch``)."""
        w, e = self.p["workload"], self.p["engine"]
        decode = [r for r in self.sweep.rows if r["cell"].startswith("decode-b") and r["batch"] <= e["max_batch"]]
        prefill = (self.one("prefill-auto") or {}).get("cases")
        if self.args.rate is None and not (decode and prefill):
            raise SkipCell("no decode and prefill timings to estimate the saturation rate from; pass --rate")
        wl, rate = et.saturation_workload(self.loaded, decode, prefill, w["n"], w["prompt"], w["out"], self.args.seed,
                                          self.args.rate)
        best = an.best_prefill_rows(self.result())
        big = max(best.values(), key=lambda r: r["tokens"]) if best else None
        return {"workload": wl, "rate": rate, "micro": {"decode": decode, "prefill": big},
                "sdpa_backend": (big or {}).get("sdpa_backend", "auto"),
                "decode_variant": (self.one("runner") or {}).get("decode_variant", "auto")}

    def do_workload(self, cell: Section, space: dict[str, Any]) -> dict[str, Any]:
        (mode, cs), wl, e = cell.arg, space["workload"], self.p["engine"]
        if mode == "hf-generate":
            return et.workload_row(self.loaded, wl, mode, batch_size=self.p["hf_batch"],
                                   requests=self.p["hf_requests"])
        cfg = EngineConfig(max_seq_len=e["max_seq_len"], max_batch=e["max_batch"], sdpa_backend=space["sdpa_backend"],
                           chunk_size=cs if cs is not None else max(e["chunk_sizes"] + [e["max_batch"] + 1]),
                           decode_variant=space["decode_variant"])
        row = et.workload_row(self.loaded, wl, mode, cfg, micro=space["micro"])
        say(f"{cell.name}: {row['throughput_tok_s']:.0f} tok/s, goodput {row['goodput_req_s']:.2f} req/s")
        return {**row, "chunk_size": cs, "rate_rps": space["rate"]}

    def result(self) -> dict[str, Any]:
        """The result file's sections from the rows so far (``measure.floor.result_sections``)."""
        base = {"model": self.args.model, "dtype": str(self.dtype).replace("torch.", ""), "gpu": self.sweep.info["gpu"],
                "plan": self.p, "targets": {**an.FLOOR_TARGETS, "paged_vs_slot_ratio": floor.PAGED_TARGET},
                "timing_notes": __doc__.split("What is timed:")[1].strip(), "checks": self.checks,
                "model_facts": self.loaded.facts.to_dict() if self.loaded else None}
        return floor.result_sections(self.sweep.rows, base, (self.checks.get("gpu_tests") or {}).get("passed"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dummy:llama-3.1-8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="bfloat16 on cuda, else float32")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, every section")
    ap.add_argument("--out", default=None, help="write the JSON here (e.g. results/engine_floor_h200.json)")
    ap.add_argument("--sections", default="all", help=f"comma-separated, of {','.join(SECTIONS)} (default: all)")
    ap.add_argument("--batches", default=None, help="decode batches at the decode context (GPU 1,8,32,64,128,256)")
    ap.add_argument("--long", default=None, help="long-context decode cases, BATCHxCONTEXT (GPU 32x8192)")
    ap.add_argument("--block-sizes", default=None, help="the paged pools' page sizes (GPU 16,32,64)")
    ap.add_argument("--fp32-model", default="dummy:llama-3.2-1b", help="device checks' model ('' skips)")
    ap.add_argument("--rate", type=float, default=None, help="Poisson rate, req/s (default: 90%% of capacity)")
    ap.add_argument("--requests", type=int, default=None, help="workload size (GPU 100; 40 with --quick)")
    ap.add_argument("--chunk-sizes", default=None, help="chunked mode's budgets (GPU 512,1024,2048)")
    ap.add_argument("--hf-batch", type=int, default=None, help="hf-generate static batch size (GPU 32)")
    ap.add_argument("--hf-requests", type=int, default=None, help="hf-generate serves the first N (GPU 32; 0: all)")
    ap.add_argument("--skip-hf", action="store_true", help="skip every HF comparison (eager forward, hf-generate)")
    ap.add_argument("--skip-workload", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=None, help="start no section after this (GPU 540 s)")
    ap.add_argument("--merge-from", action="append", help="an earlier output: its sections are kept, not rerun")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        p = plan(args)
    except ConfigError as exc:
        ap.error(str(exc))
    quiet_transformers()
    bench = Bench(args, p)
    if bench.device.type == "cuda" and args.fp32_model and "gpu_tests" not in bench.checks:
        say(f"device checks: tests/gpu/test_engine.py on {args.fp32_model}")
        bench.checks["gpu_tests"] = gpu_tests(["tests/gpu/test_engine.py"], model=args.fp32_model)
        say(f"device checks: {bench.checks['gpu_tests']['summary']}")
    torch.manual_seed(args.seed)
    bench.loaded = splitlab.load_model(args.model, device=bench.device, dtype=bench.dtype, seed=args.seed)
    data = bench.sweep.run(bench.cells(), lambda c, space: getattr(bench, f"do_{c.kind}")(c, space), bench.context)
    for table in floor.tables(data):
        print(table.to_string(index=False, float_format="%.3f"))
    report(data, {"out": args.out, **data.get("summary", {})})
    return 0 if (bench.checks.get("gpu_tests") or {}).get("passed") is not False and not data["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
