"""The ``splitlab`` command.

- ``splitlab run``: one workload through one mode; prints a summary table, and the summary
  as JSON on the last line.
- ``splitlab demo``: the default comparison on this machine's default model; prints one
  request's text, the comparison table, where the runs (and the HTML report) went, and the
  table as JSON on the last line.
- ``splitlab env``: what this machine has; JSON on the last line. With ``--model M``: how much
  KV fits for M on this GPU (or a card of ``--gpu-memory-gib G``); ``--json``: the JSON alone.
- ``splitlab report RESULTS_DIR -o report.html``: an HTML report of saved runs.
- ``splitlab serve``: an OpenAI-compatible server over the online engine (``splitlab.serve``).
- ``splitlab bench --endpoint URL``: a workload replayed against any OpenAI-compatible
  server; the vLLM-style summary as JSON on the last line.

Errors a user can cause print ``splitlab: error: <what to do>`` on stderr and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from splitlab.errors import ConfigError, SplitlabError

# columns of the printed tables (the JSON line has every summary field)
TABLE_COLUMNS = [
    "mode", "num_requests", "output_tokens", "wall_s", "throughput_tok_s", "ttft_p50_s", "ttft_p99_s",
    "tpot_p50_s", "tpot_p99_s", "itl_p99_s", "e2e_p50_s", "slo_attainment", "goodput_req_s",
]

DEMO_PROMPTS = (
    "What is the capital of France?",
    "Name the three primary colors.",
    "Write one sentence about the sea.",
    "What is 7 plus 5?",
    "Give me a synonym for happy.",
    "What do bees make?",
)


# ---- helpers ---------------------------------------------------------------------------------

def _json_line(value: Any) -> str:
    from splitlab.measure.metrics import to_jsonable

    return json.dumps(to_jsonable(value), sort_keys=False)


def _length(text: str, flag: str):
    """``N`` -> fixed N; ``LO:HI`` -> uniform in [LO, HI]."""
    from splitlab.workload import LengthDist

    try:
        values = [int(x) for x in text.split(":", 1)]
    except ValueError:
        raise ConfigError(f"{flag} must be N or LO:HI (positive integers), got {text!r}") from None
    return LengthDist.uniform(*values) if len(values) == 2 else LengthDist.fixed(values[0])


def _quiet_transformers() -> None:
    """No per-load progress bars or advisory warnings from transformers on the terminal."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover - older/newer transformers without these helpers
        pass


def default_model(gpu: bool | None = None) -> str:
    """The default model for this machine: SmolLM2-135M on CPU, a real-shape dummy on GPU."""
    import torch

    if gpu is None:
        gpu = torch.cuda.is_available()
    if not gpu:
        return "smollm2-135m"
    total = torch.cuda.get_device_properties(0).total_memory
    return "dummy:llama-3.1-8b" if total >= 40 * 2**30 else "dummy:llama-3.2-1b"


def _table(summaries: list[dict[str, Any]]) -> str:
    import pandas as pd

    df = pd.DataFrame(summaries)
    cols = [c for c in TABLE_COLUMNS if c in df.columns]
    with pd.option_context("display.width", 200, "display.max_columns", 50,
                           "display.float_format", lambda v: f"{v:.4g}"):
        return df[cols].to_string(index=False)


def _build_workload(args, model):
    from splitlab import workload as W

    if args.workload == "fixed":
        return W.fixed_batch(args.num_requests, _length(args.prompt_len, "--prompt-len"),
                             _length(args.output_len, "--output-len"), model=model, seed=args.seed)
    if args.workload == "poisson":
        return W.poisson(args.num_requests, args.rate, _length(args.prompt_len, "--prompt-len"),
                         _length(args.output_len, "--output-len"), seed=args.seed, model=model)
    # trace
    if not args.trace_path:
        raise ConfigError(
            "--workload trace needs --trace-path PATH to an Azure LLM inference trace CSV "
            f"(public: {W.AZURE_TRACE_SOURCE})"
        )
    caps = {}
    for flag, key in (("prompt_len", "max_prompt_len"), ("output_len", "max_new_tokens")):
        value = getattr(args, flag)
        if value is not None:
            try:
                caps[key] = int(value)
            except ValueError:
                raise ConfigError(f"with --workload trace, --{flag.replace('_', '-')} is a cap: one integer") from None
    return W.from_azure_trace(args.trace_path, rate_scale=args.rate_scale, limit=args.num_requests,
                              seed=args.seed, model=model, **caps)


_DEFAULTS = {"prompt_len": "128", "output_len": "32"}


# ---- commands --------------------------------------------------------------------------------

def cmd_run(args) -> int:
    from splitlab.config import SLO
    from splitlab.api import run
    from splitlab.measure.metrics import check_writable
    from splitlab.models import load_model

    _quiet_transformers()
    if args.save:  # before the run: a bad destination must not cost the whole run
        check_writable(args.save)
    if args.goodput and (args.slo_ttft is not None or args.slo_tpot is not None):
        raise ConfigError("give the SLO either as --goodput ttft:MS tpot:MS itl:MS e2el:MS or as "
                          "--slo-ttft/--slo-tpot (seconds), not both")
    slo = (SLO.from_vllm(args.goodput) if args.goodput else
           SLO(ttft_s=1.0 if args.slo_ttft is None else args.slo_ttft,
               tpot_s=0.1 if args.slo_tpot is None else args.slo_tpot))
    spec = args.model or default_model()
    model = load_model(spec, device=args.device, dtype=args.dtype, seed=args.seed)
    wl = _build_workload(args, model)
    result = run(wl, model, mode=args.mode, batch_size=args.batch_size, slo=slo, progress=not args.no_progress,
                 **_split_options(args))
    summary = result.summary()
    print(f"model {spec} on {model.device} ({str(model.dtype).replace('torch.', '')}), "
          f"workload {wl.name}: {len(wl)} requests")
    import pandas as pd

    with pd.option_context("display.float_format", lambda v: f"{v:.6g}"):
        print(pd.Series(summary, dtype=object).to_frame("value").to_string())
    if args.save:
        path = result.save(args.save)
        print(f"saved run to {path}")
    print(_json_line(summary))
    return 0


def cmd_demo(args) -> int:
    import torch

    from splitlab.api import available_modes, run
    from splitlab.config import SLO
    from splitlab.measure.metrics import check_writable
    from splitlab.models import load_model
    from splitlab.present.report import write_report

    _quiet_transformers()
    out_dir = Path(args.out)
    check_writable(out_dir / "index.json")  # before the runs: --out must be a folder we can write
    t_start = time.perf_counter()
    gpu = torch.cuda.is_available()
    spec = args.model or default_model(gpu)
    modes = available_modes(gpu)
    print(f"splitlab demo: model {spec} on {'cuda' if gpu else 'cpu'}; modes: {', '.join(modes)}")
    model = load_model(spec)
    slo = SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot make the --out folder {out_dir}: {exc.strerror or exc}") from None
    wl, shown = _demo_workload(spec, model, args)
    runs, skipped = [], []
    for mode in modes:
        try:
            runs.append(run(wl, model, mode=mode, batch_size=args.batch_size, slo=slo, progress=not args.no_progress))
        except SplitlabError as exc:  # a mode that cannot run here is reported, not fatal
            skipped.append((mode, str(exc)))
    if not runs:
        raise SplitlabError("no mode could run: " + "; ".join(f"{m}: {e}" for m, e in skipped))
    _save_demo_runs(runs, out_dir)
    _print_demo(runs, skipped, wl, slo, model, spec, shown, args.output_len)
    print(f"runs saved under {out_dir}/")
    report_path = write_report(out_dir, out_dir / "report.html")
    print(f"HTML report: {report_path}")
    print(f"demo took {time.perf_counter() - t_start:.1f} s")
    busy = _busy_note()
    if busy:
        print(busy)
    from splitlab.measure.metrics import summaries_table

    table = summaries_table(runs)
    cols = [c for c in TABLE_COLUMNS if c in table.columns]
    print(_json_line({"model": spec, "out": str(out_dir), "report": str(report_path),
                      "runs": table[cols].to_dict(orient="records")}))
    return 0


def _demo_workload(spec: str, model, args):
    """The demo's workload and the question whose answer it prints (None for random weights)."""
    from splitlab.workload import from_prompts, poisson, poisson_arrivals

    if spec.startswith("dummy:") or spec == "tiny":  # random weights: synthetic prompts, text would be noise
        ctx = model.facts.max_positions
        wl = poisson(args.num_requests or 32, rate=args.rate or 8.0, prompt_len=min(512, ctx // 4),
                     output_len=min(64, ctx // 8), seed=0, model=model, name="demo-poisson")
        return wl, None
    prompts = list(DEMO_PROMPTS)[: args.num_requests or len(DEMO_PROMPTS)]
    ids = [model.encode(p, chat=True) for p in prompts]
    rate = args.rate or 4.0
    wl = from_prompts(ids, args.output_len, arrivals_s=poisson_arrivals(len(ids), rate, seed=0),
                      name=f"demo-chat-r{rate:g}")
    return wl, prompts[0]


def _print_demo(runs, skipped, wl, slo, model, spec: str, shown: str | None, output_len: int) -> None:
    print()
    if shown is not None:
        first = runs[0]
        print(f"Q: {shown}")
        print(f"A: {model.decode(first.output_ids()[0]).strip()}")
        print(f"   (request 0 via {first.mode}: greedy, EOS ignored, so every request gets exactly "
              f"{output_len} tokens in every mode and the text may run on past the answer)")
    else:
        print(f"({spec} has random weights: its tokens are not text; the timings are real)")
    print()
    print(f"workload {wl.name}: {len(wl)} requests, {wl.total_output_tokens} output tokens; "
          f"SLO ttft<={slo.ttft_s:g}s tpot<={slo.tpot_s:g}s")
    print(_table([r.summary() for r in runs]))
    agree = _agreement(runs)
    if agree:
        print(agree)
    for mode, why in skipped:
        print(f"skipped {mode}: {why}")


def _save_demo_runs(runs, out_dir: Path) -> None:
    """Save the runs as ``<mode>.json`` beside an ``index.json``.

    The runs of an earlier demo in the same folder (those its index lists) are removed first,
    so the folder always holds exactly this demo's runs.
    """
    index = out_dir / "index.json"
    if index.is_file():
        try:
            old = json.loads(index.read_text()).get("runs", [])
        except (ValueError, AttributeError):
            old = []
        for entry in old:
            name = entry.get("file") if isinstance(entry, dict) else None
            if name and "/" not in name and name.endswith(".json"):
                (out_dir / name).unlink(missing_ok=True)
        index.unlink()
    from splitlab.present.results import save_runs

    save_runs(runs, out_dir, names=[r.mode for r in runs])


def _busy_note() -> str | None:
    """A warning when other work loads the CPU: CPU timings are then not the machine's own."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = os.cpu_count() or 1
    if load <= 1.5 * cores:
        return None
    return (f"note: the load average is {load:.1f} on {cores} cores: other work shares this CPU, "
            "so these timings are slower and noisier than the machine's own")


def _agreement(runs) -> str | None:
    """One line: do the modes' greedy outputs equal the hf-generate baseline's?"""
    base = next((r for r in runs if r.mode == "hf-generate"), None)
    if base is None or len(runs) < 2:
        return None
    ref = base.output_ids()
    parts = []
    for r in runs:
        if r is base:
            continue
        ids = r.output_ids()
        same = sum(ids.get(k) == v for k, v in ref.items())
        parts.append(f"{r.mode} {same}/{len(ref)}")
    return "requests whose tokens equal hf-generate's: " + ", ".join(parts)


def cmd_env(args) -> int:
    from splitlab.system.env import capacity_rows, environment, model_capacity
    from splitlab.api import available_modes, MODES

    asked = [f for f in ("max_seq_len", "kv_block_size", "gpu_memory_gib") if getattr(args, f) is not None]
    if asked and args.model is None:
        raise ConfigError(f"--{asked[0].replace('_', '-')} sizes the KV of a model: give --model M too")
    cap = None if args.model is None else model_capacity(args.model, args.max_seq_len, args.kv_block_size,
                                                         args.gpu_memory_gib, args.dtype)
    env = environment()
    env["modes_built"] = [m for m in MODES if m in available_modes(gpu=True)]
    env["modes_here"] = list(available_modes())
    rows = [
        ("device", env["device"]),
        ("GPU", env["gpu_name"] or "none"),
        ("GPUs / SMs / memory", f"{env['gpu_count']} / {env['sm_count'] or '-'} / "
                                f"{_gib(env['gpu_memory_bytes'])}"),
        ("CUDA (torch built with)", env["cuda_version"] or "none (CPU build)"),
        ("MPS control binary", env["mps_control_binary"] or "not found"),
        ("NVML", "available" if env["nvml"] else "not available"),
        ("CPU / threads", f"{env['cpu']} / {env['cpu_threads']}"),
        ("Python", env["python"]),
        ("platform", env["platform"]),
        ("modes built", ", ".join(env["modes_built"])),
        ("modes runnable here", ", ".join(env["modes_here"])),
        ("default model here", default_model()),
    ]
    rows += [(f"  {name}", version or "not installed") for name, version in env["versions"].items()]
    if cap is not None:
        env["kv_capacity"] = cap
        rows += capacity_rows(cap)
    width = max(len(k) for k, _ in rows)
    for key, value in rows if not args.json else ():
        print(f"{key:<{width}}  {value}")
    print(_json_line(env))
    return 0


def _gib(value) -> str:
    return f"{value / 2**30:.1f} GiB" if value else "-"


def cmd_report(args) -> int:
    results = Path(args.results_dir)
    if not results.is_dir():
        raise ConfigError(f"no results folder at {str(results)!r}; give a folder of runs saved with Run.save")
    try:
        from splitlab.present.report import write_report
    except ModuleNotFoundError as exc:
        if exc.name != "splitlab.present.report":
            raise
        raise SplitlabError("the report command is not built yet in this version (splitlab.present.report is missing)") from None
    except ImportError as exc:
        raise SplitlabError(f"splitlab.present.report has no write_report yet ({exc})") from None
    path = write_report(results, args.output)
    print(f"HTML report: {path}")
    print(_json_line({"report": str(path)}))
    return 0


# ---- parser ----------------------------------------------------------------------------------

def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0) or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _request_count(text: str) -> int:
    """A positive integer up to the builders' bound, checked before any model loads."""
    from splitlab.workload import MAX_REQUESTS

    value = _positive_int(text)
    if value > MAX_REQUESTS:
        raise argparse.ArgumentTypeError(f"expected at most MAX_REQUESTS = {MAX_REQUESTS} requests, got {text!r}")
    return value


def _split_options(args) -> dict:
    """``--backend``, the shares and the SM policy as ``split``'s keywords (refused by other modes)."""
    names = ("backend", "prefill_share", "decode_share", "prefill_sms", "sm_policy", "sm_profile")
    options = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.gap_ms is not None:
        options["gap_s"] = args.gap_ms / 1000
    if options and args.mode != "split":
        raise ConfigError(f"--{next(iter(options)).replace('_', '-')} applies to --mode split only")
    return options


def _split_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("split mode", "how the prefill and decode workers share the GPU (SplitConfig)")
    g.add_argument("--backend", choices=("streams", "processes", "mps", "green"), default=None)
    g.add_argument("--prefill-share", type=_positive_float, default=None, help="mps: prefill SM percent")
    g.add_argument("--decode-share", type=_positive_float, default=None, help="mps: decode SM percent")
    g.add_argument("--prefill-sms", type=_positive_int, default=None, help="green: SMs of the prefill context")
    g.add_argument("--sm-policy", choices=("static", "table", "slo"), default=None,
                   help="green: how the SMs follow the load (table / slo need --sm-profile)")
    g.add_argument("--sm-profile", default=None, help="a measured SM profile (benchmarks/sm_profile.py)")
    g.add_argument("--gap-ms", type=_positive_float, default=None, help="slo policy: the token gap to keep under")


def _workload_flags(p: argparse.ArgumentParser) -> None:
    """The workload flags of ``run`` and ``bench`` (built by ``_build_workload``)."""
    p.add_argument("--workload", default="poisson", choices=("fixed", "poisson", "trace"))
    p.add_argument("--rate", type=_positive_float, default=2.0, help="requests/s (poisson)")
    p.add_argument("--num-requests", type=_request_count, default=None,
                   help="requests (default 16; for a trace: the first N rows, default all)")
    p.add_argument("--prompt-len", default=None,
                   help="N or LO:HI tokens (default 128); for a trace: a cap on prompt length")
    p.add_argument("--output-len", default=None,
                   help="N or LO:HI tokens (default 32); for a trace: a cap on output length")
    p.add_argument("--trace-path", default=None, help="Azure LLM inference trace CSV (with --workload trace)")
    p.add_argument("--rate-scale", type=_positive_float, default=1.0, help="trace speed-up (2 = twice as fast)")


def build_parser() -> argparse.ArgumentParser:
    from splitlab.api import MODES

    parser = argparse.ArgumentParser(
        prog="splitlab", description="Phase-split LLM inference on one GPU: run, compare, report.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run one workload in one mode; JSON summary on the last line")
    p.add_argument("--model", default=None,
                   help="tiny | smollm2-135m | dummy:<arch> | folder | HF id (default: smollm2-135m on CPU, "
                        "a dummy real-shape model on GPU)")
    p.add_argument("--mode", default="hf-generate", choices=MODES)
    _workload_flags(p)
    p.add_argument("--batch-size", type=_positive_int, default=8, help="static batch of hf-generate")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if visible)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 CPU, bf16 GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, metavar="PATH",
                   help="write the run as JSON here (.json.gz: compressed); checked before the run")
    p.add_argument("--slo-ttft", type=_positive_float, default=None, help="TTFT bound, seconds (goodput; default 1)")
    p.add_argument("--slo-tpot", type=_positive_float, default=None, help="TPOT bound, seconds (goodput; default 0.1)")
    p.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="the SLO in vLLM's syntax, milliseconds: ttft:1000 tpot:50 itl:30 e2el:5000 (itl: every "
                        "inter-token gap); only the named bounds apply; instead of --slo-ttft/--slo-tpot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _split_flags(p)
    p.set_defaults(func=cmd_run)

    d = sub.add_parser("demo", help="the default comparison on this machine's default model")
    d.add_argument("--model", default=None, help="override the default model")
    d.add_argument("--out", default=os.path.join("out", "demo"), help="folder for the runs and report")
    d.add_argument("--num-requests", type=_request_count, default=None)
    d.add_argument("--output-len", type=_positive_int, default=24)
    d.add_argument("--rate", type=_positive_float, default=None, help="arrival rate, requests/s")
    d.add_argument("--batch-size", type=_positive_int, default=8)
    d.add_argument("--slo-ttft", type=_positive_float, default=2.0)
    d.add_argument("--slo-tpot", type=_positive_float, default=0.2)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("env", help="what this machine has (with --model: how much KV fits); JSON on the last line")
    e.add_argument("--model", default=None, help="print how much KV fits for this model (any run --model spec)")
    e.add_argument("--max-seq-len", type=int, default=None, help="positions per sequence (default min(2048, context))")
    e.add_argument("--kv-block-size", type=int, default=None, help="page size of a paged pool (default: slots)")
    e.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="compute for a card of this many GiB (needed without a GPU) instead of measuring")
    e.add_argument("--dtype", default="bfloat16", help="float32 | bfloat16 | float16 (default: bf16, the GPU's)")
    e.add_argument("--json", action="store_true", help="print the JSON line only")
    e.set_defaults(func=cmd_env)

    r = sub.add_parser("report", help="write an HTML report of saved runs")
    r.add_argument("results_dir", metavar="RESULTS_DIR")
    r.add_argument("-o", "--output", default="report.html")
    r.set_defaults(func=cmd_report)

    from splitlab.serve import bench, server  # FastAPI, uvicorn and httpx are imported when they run

    server.add_arguments(sub.add_parser("serve", help="an OpenAI-compatible server over the online engine"))
    b = sub.add_parser("bench", help="replay a workload against an OpenAI-compatible server; JSON on the last line")
    _workload_flags(b)
    b.add_argument("--seed", type=int, default=0, help="seed of the workload's prompts and arrivals")
    bench.add_arguments(b)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("run", "bench"):
        if args.num_requests is None and args.workload != "trace":
            args.num_requests = 16
        for flag in ("prompt_len", "output_len"):
            if getattr(args, flag) is None and args.workload != "trace":
                setattr(args, flag, _DEFAULTS[flag])
    try:
        return args.func(args)
    except SplitlabError as exc:
        sys.stdout.flush()
        print(f"splitlab: error: {exc}", file=sys.stderr)
        return 2


def console() -> None:  # pragma: no cover - the console-script entry point
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    console()
