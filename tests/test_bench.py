"""``splitlab bench`` against two real servers on free loopback ports.

- ``splitlab serve`` (the tiny model, the split engine): the bench sends the workload's own
  token ids and forces the lengths, so its saved ``Run`` holds exactly the tokens HF
  ``generate()`` gives; the
  client's TTFT and ITL agree with the server's own ``/metrics`` within a stated margin: the
  client's mean TTFT is never below the server's by more than 5 ms (the client's clock starts
  at the request's arrival, before the server's) and at most 250 ms above it (HTTP, JSON and
  tokenising on a 2-core machine shared with other work); the mean ITL (the same gaps, seen at
  both ends) within 10 ms or 30%, whichever is larger.
- ``transformers serve`` on the converted SmolLM2 folder, offline: it takes text prompts only
  and refuses vLLM's fields, so the bench falls back to text, says the lengths were not
  forced, and records the prompt lengths the server reported.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import httpx
import pytest

from _oracle import hf_greedy

from splitlab.cli import main
from splitlab.measure.metrics import load_run
from splitlab.serve.process import ServerProcess, free_port
from splitlab.measure.serve_overhead import breakdown
from splitlab.workload import LengthDist, poisson

pytestmark = pytest.mark.timeout(600)

TINY_ARGS = ["--model", "tiny", "--mode", "split", "--max-seq-len", "256", "--num-slots", "8", "--max-batch", "8",
             "--device", "cpu"]
TTFT_BELOW_S, TTFT_ABOVE_S = 0.005, 0.25
ITL_ABS_S, ITL_REL = 0.010, 0.30


def histogram(base: str, name: str) -> tuple[float, float]:
    """``(sum, count)`` of a histogram on the server's /metrics."""
    text = httpx.get(base + "/metrics", timeout=30.0, trust_env=False).text
    values = [float(re.search(rf"^{name}_{part} (\S+)$", text, re.M).group(1)) for part in ("sum", "count")]
    return values[0], values[1]


def bench(capsys, *args: str) -> tuple[int, dict | None, str]:
    """``splitlab bench ARGS`` in this process: (status, the JSON of the last stdout line, stderr)."""
    code = main(["bench", "--no-progress", *args])
    out = capsys.readouterr()
    last = out.out.strip().splitlines()[-1] if out.out.strip() else ""
    return code, (json.loads(last) if last.startswith("{") else None), out.err


@pytest.fixture(scope="module")
def tiny_server():
    server = ServerProcess.splitlab(TINY_ARGS)
    yield server
    assert server.stop() == 0, server.output()


def test_bench_against_splitlab_serve(tiny_server, tiny, tmp_path, capsys):
    base = tiny_server.url.removesuffix("/v1")
    ttft0, itl0 = histogram(base, "splitlab_time_to_first_token_seconds"), \
        histogram(base, "splitlab_inter_token_latency_seconds")
    code, summary, err = bench(
        capsys, "--endpoint", tiny_server.url, "--dialect", "ids", "--workload", "poisson", "--rate", "20",
        "--num-requests", "12", "--prompt-len", "8:32", "--output-len", "2:10", "--goodput", "ttft:2000", "itl:500",
        "--save", str(tmp_path / "run.json"), "--result-json", str(tmp_path / "vllm.json"))
    assert code == 0, err
    ttft1, itl1 = histogram(base, "splitlab_time_to_first_token_seconds"), \
        histogram(base, "splitlab_inter_token_latency_seconds")
    expected = poisson(12, 20.0, LengthDist.uniform(8, 32), LengthDist.uniform(2, 10), seed=0, model=tiny)
    assert summary["completed"] == 12 and summary["failed"] == 0
    assert summary["total_output_tokens"] == expected.total_output_tokens
    assert summary["total_input_tokens"] == sum(r.prompt_len for r in expected)
    assert summary["prompt_kind"] == "ids" and summary["lengths_forced"] is True
    assert summary["prompt_len_reported"] == 12 and summary["prompt_len_mismatched"] == 0
    assert 0 < summary["request_goodput"] <= summary["request_throughput"]
    for key in ("mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "std_e2el_ms", "output_throughput"):
        assert summary[key] > 0, key

    run = load_run(tmp_path / "run.json")  # what splitlab report and the notebooks read
    assert run.mode == "bench" and run.workload == expected.name and run.summary()["completed"] == 12
    for trace, request in zip(sorted(run.traces, key=lambda t: t.id), expected):
        assert trace.output_ids == hf_greedy(tiny, request.prompt_ids, request.max_new_tokens), trace.id
        assert trace.arrival_s == pytest.approx(request.arrival_s)
        assert trace.arrival_s < trace.token_times_s[0] <= trace.token_times_s[-1] <= run.wall_s
    vllm = json.loads((tmp_path / "vllm.json").read_text())
    assert len(vllm["ttfts"]) == len(vllm["output_lens"]) == 12 and vllm["errors"] == [""] * 12

    # the client's view against the server's own, request for request the same population
    n_gaps = expected.total_output_tokens - 12
    assert ttft1[1] - ttft0[1] == 12 and itl1[1] - itl0[1] == n_gaps
    server_ttft, server_itl = (ttft1[0] - ttft0[0]) / 12, (itl1[0] - itl0[0]) / n_gaps
    client_ttft, client_itl = summary["mean_ttft_ms"] / 1000, summary["mean_itl_ms"] / 1000
    assert -TTFT_BELOW_S <= client_ttft - server_ttft <= TTFT_ABOVE_S, (client_ttft, server_ttft)
    assert abs(client_itl - server_itl) <= max(ITL_ABS_S, ITL_REL * server_itl), (client_itl, server_itl)

    # the bench's own scrape of the same histograms (no probe request between: --dialect ids)
    view = summary["server_view"]
    assert view["url"] == base + "/metrics" and run.config.extra["server_view"]["url"] == view["url"]
    hist = view["histograms"]
    assert (hist["ttft"]["count"], hist["itl"]["count"], hist["e2e"]["count"]) == (12, n_gaps, 12)
    assert hist["ttft"]["mean_s"] == pytest.approx(server_ttft) and hist["itl"]["mean_s"] == pytest.approx(server_itl)
    assert hist["parse"]["count"] == hist["first_delivery"]["count"] == 12
    parts = breakdown(client_ttft, hist)
    assert parts["server_parse_mean_s"] > 0 and parts["server_first_delivery_mean_s"] >= 0
    assert parts["outside_server_mean_s"] >= -TTFT_BELOW_S, parts  # the client's clock starts first


def test_bench_probes_the_dialect(tiny_server, capsys):
    code, summary, err = bench(capsys, "--endpoint", tiny_server.url + "/", "--workload", "fixed",
                               "--num-requests", "3", "--prompt-len", "6", "--output-len", "3")
    assert code == 0, err
    assert summary["prompt_kind"] == "ids" and summary["lengths_forced"] is True  # the first dialect tried
    assert summary["completed"] == 3 and summary["total_output_tokens"] == 9


def test_bad_bench_arguments_fail_before_anything_is_sent(capsys):
    port = free_port()  # nothing listens there
    cases = [
        (["--endpoint", "127.0.0.1:8000/v1"], "must be an http(s) URL"),
        (["--endpoint", f"http://127.0.0.1:{port}/v1", "--num-requests", "20000"], "at most 10000 requests"),
        (["--endpoint", f"http://127.0.0.1:{port}/v1", "--extra-body", "{nope"], "--extra-body must be a JSON"),
        (["--endpoint", f"http://127.0.0.1:{port}/v1", "--server-metrics", "metrics"], "--server-metrics must be"),
        (["--endpoint", f"http://127.0.0.1:{port}/v1", "--model", "tiny"], "cannot reach"),
    ]
    for args, message in cases:
        code, _, err = bench(capsys, *args)
        assert code == 2 and message in err, (args, err)


def test_bench_against_transformers_serve(smollm2, tmp_path, capsys):
    from splitlab.models import smollm2_dir

    folder = smollm2_dir()
    assert (folder / "model.safetensors").is_file()  # the smollm2 fixture converted it
    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    argv = [str(exe), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    base = f"http://127.0.0.1:{port}"
    with ServerProcess.start(argv, base + "/v1", base + "/health", env={"HF_HUB_OFFLINE": "1"}) as server:
        code, summary, err = bench(capsys, "--endpoint", server.url, "--workload", "fixed", "--num-requests", "2",
                                   "--prompt-len", "8", "--output-len", "4", "--save", str(tmp_path / "hf.json"))
        assert code == 0, err + server.output()
    assert server.proc.returncode is not None
    assert summary["model"] == str(folder)
    assert summary["prompt_kind"] == "text" and summary["lengths_forced"] is False
    assert summary["completed"] == 2 and summary["failed"] == 0
    assert summary["prompt_len_reported"] == 2 and isinstance(summary["prompt_len_diff_max_abs"], int)
    assert 2 <= summary["total_output_tokens"] <= 8
    run = load_run(tmp_path / "hf.json")
    for trace in run.traces:
        assert 1 <= len(trace.token_times_s) <= 4
        assert trace.arrival_s < trace.token_times_s[0] <= trace.token_times_s[-1]
    assert run.config.extra["lengths_forced"] is False
    assert "unavailable" in summary["server_view"], summary["server_view"]  # it serves no latency histograms
