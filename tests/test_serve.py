"""``splitlab serve`` as a real subprocess on a free loopback port.

SmolLM2 (serial mode): greedy tokens through HTTP, streamed and not, completions and chat,
equal HF ``generate()``'s. The tiny model (chunked mode): 32 concurrent streams, a client
that drops mid-stream (its KV slot frees), every kind of bad request (the right status, an
OpenAI JSON error, and the server keeps serving), and SIGTERM with requests in flight (exit
0, no process or port left). The API key and the non-loopback warning are checked in-process.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time

import httpx
import pytest
from _oracle import hf_generate
from _serve_checks import (assert_error, check_bad_request, check_concurrent_streams, check_dropped_client_frees_kv,
                           check_sigterm_with_streams_in_flight, metric, open_stream, post, stream, wait_until)

from splitlab.serve.process import ServerProcess

pytestmark = pytest.mark.timeout(600)

TINY_ARGS = ["--model", "tiny", "--mode", "chunked", "--max-seq-len", "256", "--num-slots", "8", "--max-batch", "8",
             "--chunk-size", "64", "--max-body-bytes", "65536", "--device", "cpu"]
SMOL_ARGS = ["--model", "smollm2-135m", "--mode", "serial", "--max-seq-len", "512", "--num-slots", "4",
             "--max-batch", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_server():
    server = ServerProcess.splitlab(TINY_ARGS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def smol_server():
    server = ServerProcess.splitlab(SMOL_ARGS)
    yield server
    assert server.stop() == 0, server.output()


# ---- SmolLM2: the greedy oracle over HTTP ---------------------------------------------------------

def test_completion_tokens_equal_generate_streamed_and_not(smol_server, smollm2):
    prompt = smollm2.encode("Name a primary color.", chat=True)
    n = 6
    expected = hf_generate(smollm2, prompt, n, min_new=n)
    body = {"model": "smollm2-135m", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    whole = post(smol_server, "/completions", body).json()
    choice = whole["choices"][0]
    assert choice["token_ids"] == expected and choice["finish_reason"] == "length"
    assert choice["text"] == smollm2.tokenizer.decode(expected, skip_special_tokens=True)
    assert whole["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}
    events = stream(smol_server, "/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == n
    chunks = [e["choices"][0] for e in events[:-2]]
    assert len(chunks) == n  # one chunk per token
    assert [t for c in chunks for t in c["token_ids"]] == expected
    assert "".join(c["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["finish_reason"] == "length" and all(c["finish_reason"] is None for c in chunks[:-1])


def test_chat_answers_stops_at_eos_and_at_a_stop_string(smol_server, smollm2):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smollm2.encode("What is the capital of France?", chat=True)
    expected = hf_generate(smollm2, prompt, 24)
    body = {"messages": messages, "max_tokens": 24, "temperature": 0, "return_token_ids": True}
    answer = post(smol_server, "/chat/completions", body).json()
    choice = answer["choices"][0]
    assert answer["object"] == "chat.completion"
    assert choice["message"] == {"role": "assistant", "content": "The capital of France is Paris."}
    assert choice["finish_reason"] == "stop" and choice["token_ids"] == expected
    assert choice["prompt_token_ids"] == prompt
    # streamed, cut by a stop string: the text ends before it, nothing of it is ever sent
    events = stream(smol_server, "/chat/completions", {**body, "stop": [" Paris"], "stream": True})
    deltas = [e["choices"][0] for e in events[:-1]]
    assert events[-1] == "[DONE]" and deltas[0]["delta"]["role"] == "assistant"
    assert "".join(d["delta"].get("content", "") for d in deltas) == "The capital of France is"
    assert deltas[-1]["finish_reason"] == "stop"
    assert [t for d in deltas for t in d["token_ids"]] == expected[:len(expected) - 2]  # "." and EOS never made


def test_a_client_dropped_mid_stream_frees_its_kv(smol_server):
    """SmolLM2 makes a token in tens of milliseconds: the request is surely still running."""
    check_dropped_client_frees_kv(smol_server, 400)


# ---- the tiny model: load, drops, bad input, signals ----------------------------------------------

def test_32_concurrent_streams_all_finish_with_their_lengths(tiny_server, tiny):
    check_concurrent_streams(tiny_server, tiny)


@pytest.mark.parametrize("body, status, code", [
    (b'{"prompt": [5, 6], "max_tokens": ', 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_value"),
    ({"prompt": [5] * 300, "max_tokens": 4}, 400, "context_length_exceeded"),
    ({"prompt": [5] * 200, "max_tokens": 100}, 400, "context_length_exceeded"),
    ({"prompt": [5, 6], "max_tokens": 0}, 400, "invalid_value"),
    ({"prompt": [5, 6], "max_tokens": 4, "model": "gpt-4"}, 404, "model_not_found"),
    ({"prompt": [5, 6000], "max_tokens": 4}, 400, "invalid_value"),
    ({"prompt": ["a", "b"], "max_tokens": 4}, 400, "unsupported_parameter"),
    ({"prompt": [], "max_tokens": 4}, 400, "invalid_value"),
    ({"prompt": [5], "max_tokens": 4, "n": 2}, 400, "unsupported_parameter"),
    ({"prompt": [5], "max_tokens": 4, "temperature": "hot"}, 400, "invalid_value"),
    ({"prompt": [5], "max_tokens": 4, "min_tokens": 9}, 400, "invalid_value"),
    ({"max_tokens": 4}, 400, "invalid_value"),
    ({"prompt": "x" * 70000}, 413, "request_too_large"),
])
def test_bad_requests_get_a_json_error_and_the_server_keeps_serving(tiny_server, body, status, code):
    check_bad_request(tiny_server, body, status, code)


def test_other_routes_and_errors(tiny_server):
    base = tiny_server.url.removesuffix("/v1")
    health = httpx.get(base + "/health", timeout=30.0, trust_env=False)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = httpx.get(tiny_server.url + "/models", timeout=30.0, trust_env=False).json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 256
    assert_error(post(tiny_server, "/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}), 400,
                 "unsupported_model")  # the byte tokenizer has no chat template
    assert_error(post(tiny_server, "/chat/completions", {"messages": []}), 400, "invalid_value")
    assert_error(httpx.get(tiny_server.url + "/completions", timeout=30.0, trust_env=False), 405)
    assert_error(httpx.get(base + "/nowhere", timeout=30.0, trust_env=False), 404)
    text = httpx.get(base + "/metrics", timeout=30.0, trust_env=False).text
    for name in ("splitlab_time_to_first_token_seconds_bucket", "splitlab_inter_token_latency_seconds_count",
                 "splitlab_e2e_request_latency_seconds_sum", "splitlab_num_requests_waiting",
                 "splitlab_kv_slots_total 8.0"):
        assert name in text


def test_the_openai_client_reads_it(tiny_server):
    """The official client: its models, completions (whole and streamed) and error classes."""
    import openai

    client = openai.OpenAI(base_url=tiny_server.url, api_key="unused", max_retries=0, timeout=60.0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    whole = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 4
    chunks = list(client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 4
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=3)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt="hi", max_tokens=0)
    assert bad.value.code == "invalid_value"


def test_sigterm_with_requests_in_flight_leaves_nothing_behind(smol_server):
    """SmolLM2 (tens of milliseconds a token): the 400-token requests are surely in flight."""
    check_sigterm_with_streams_in_flight(
        smol_server, 400, lambda: metric(smol_server, "splitlab_num_requests_running") == 3)


def test_drain_finishes_requests_in_flight_then_exits():
    server = ServerProcess.splitlab(TINY_ARGS + ["--drain", "--drain-timeout", "60"])
    try:
        results: list = []
        thread = threading.Thread(target=open_stream, args=(server, 250, results))
        thread.start()
        assert wait_until(lambda: metric(server, "splitlab_num_requests_running") == 1, 30.0)
        assert server.stop(signal.SIGINT, timeout_s=60.0) == 0, server.output()  # sent while it runs
        thread.join(30.0)
        events = results[0]
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        assert len(events) == 251  # every token came
    finally:
        server.stop()


# ---- in-process: the API key, the non-loopback warning ----------------------------------------------

def test_api_key_is_required_when_set(tiny):
    from splitlab.config import EngineConfig
    from splitlab.engine.online import OnlineEngine
    from splitlab.serve.app import ServerSettings, create_app

    with OnlineEngine(tiny, "serial", EngineConfig(max_seq_len=128, num_slots=2, max_batch=2)) as engine:
        app = create_app(engine, tiny.tokenizer, ServerSettings("tiny", api_key="s3cret"))

        async def main():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                body = {"prompt": [5, 6], "max_tokens": 2, "ignore_eos": True}
                missing = await client.post("/v1/completions", json=body)
                wrong = await client.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
                right = await client.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
                health = await client.get("/health")
                return missing, wrong, right, health

        missing, wrong, right, health = asyncio.run(main())
    assert_error(missing, 401, "invalid_api_key")
    assert_error(wrong, 401, "invalid_api_key")
    assert right.status_code == 200 and right.json()["usage"]["completion_tokens"] == 2
    assert health.status_code == 200  # health and metrics need no key


def test_a_taken_port_fails_at_once_and_other_hosts_are_warned_about(capsys):
    from splitlab.cli import main
    from splitlab.serve.server import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        started = time.monotonic()
        assert main(["serve", "--model", "tiny", "--host", "0.0.0.0", "--port", str(port)]) == 2
        assert time.monotonic() - started < 10.0  # before any model loads
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0" in err and "without an API key" in err
    assert f"cannot listen on 0.0.0.0:{port}" in err
