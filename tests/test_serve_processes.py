"""``splitlab serve --mode split --backend processes`` as a real subprocess: the OpenAI server
over the two spawned children (prefill and decode processes sharing one KV pool).

One server (the tiny model) for the module: greedy tokens through HTTP, streamed and not,
equal HF ``generate()``'s; 32 concurrent streams all finish with their lengths; a client
dropped mid-stream frees its KV (``/metrics`` back to empty); bad requests get their status
and an OpenAI JSON error while the server keeps serving; and last, SIGTERM with requests in
flight: exit 0, every stream ended, no process, /dev/shm entry or port left behind. Then a
``--mode replicas`` server of its own: two engines' greedy tokens, a clean stop.
"""

from __future__ import annotations

import os
import signal
import threading

import httpx
import pytest
from _oracle import hf_generate
from _serve_checks import (check_bad_request, check_concurrent_streams, check_dropped_client_frees_kv,
                           check_sigterm_with_streams_in_flight, metric, post, stream, wait_until)

from splitlab.serve.process import ServerProcess, descendants
from splitlab.system.procs import alive, read_proc_file

pytestmark = pytest.mark.timeout(300)

ARGS = ["--model", "tiny", "--mode", "split", "--backend", "processes", "--max-seq-len", "512", "--num-slots", "8",
        "--max-batch", "8", "--max-body-bytes", "65536", "--device", "cpu"]


def shm_mapped_by(pids) -> set[str]:
    """The /dev/shm entries (queue semaphores, CUDA IPC files) these processes map now."""
    out: set[str] = set()
    for pid in pids:
        for line in (read_proc_file(pid, "maps") or b"").decode("utf-8", "replace").splitlines():
            i = line.find("/dev/shm/")
            if i >= 0:
                out.add(line[i + len("/dev/shm/"):].split()[0])
    return out


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess.splitlab(ARGS)
    yield proc
    proc.stop()


def test_it_runs_two_child_processes(server):
    kids = descendants(server.pid)
    names = set()
    for pid in kids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                names.add(f.read().strip())
        except OSError:
            pass
    assert {"splitlab-prefil", "splitlab-decode"} <= names, names  # comm: 15 characters


def test_greedy_tokens_equal_generate_streamed_and_not(server, tiny):
    prompt, n = [17, 18, 19, 20, 21], 12
    expected = hf_generate(tiny, prompt, n, min_new=n)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    whole = post(server, "/completions", body).json()
    choice = whole["choices"][0]
    assert choice["token_ids"] == expected and choice["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == n
    events = stream(server, "/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == n
    chunks = [e["choices"][0] for e in events[:-2]]
    assert [t for c in chunks for t in c["token_ids"]] == expected
    assert "".join(c["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["finish_reason"] == "length" and all(c["finish_reason"] is None for c in chunks[:-1])


def test_32_concurrent_streams_all_finish_with_their_lengths(server, tiny):
    check_concurrent_streams(server, tiny)


def test_a_client_dropped_mid_stream_frees_its_kv(server):
    check_dropped_client_frees_kv(server, 500)


@pytest.mark.parametrize("body, status, code", [
    (b'{"prompt": [5, 6], "max_tokens": ', 400, "invalid_json"),
    ({"prompt": [5] * 600, "max_tokens": 4}, 400, "context_length_exceeded"),
    ({"prompt": [5] * 400, "max_tokens": 200}, 400, "context_length_exceeded"),
    ({"prompt": [5, 6], "max_tokens": 0}, 400, "invalid_value"),
    ({"prompt": [5, 6], "max_tokens": 4, "model": "gpt-4"}, 404, "model_not_found"),
    ({"prompt": [5, 6000], "max_tokens": 4}, 400, "invalid_value"),
    ({"prompt": "x" * 70000}, 413, "request_too_large"),
])
def test_bad_requests_get_a_json_error_and_the_server_keeps_serving(server, body, status, code):
    check_bad_request(server, body, status, code)


def test_health_and_metrics_read_the_children(server):
    base = server.url.removesuffix("/v1")
    health = httpx.get(base + "/health", timeout=30.0, trust_env=False).json()
    assert health["status"] == "ok" and health["alive"] is True and health["kv_slots"] == 8
    assert metric(server, "splitlab_kv_slots_total") == 8.0 and metric(server, "splitlab_engine_alive") == 1.0


def test_sigterm_with_requests_in_flight_leaves_nothing_behind(server):
    """It stops the module's server: every test of it comes before."""
    def mapped(children):
        assert len(children) >= 2
        shm = shm_mapped_by([server.pid, *children])  # the server's own, not what other programs make meanwhile
        assert shm, "the server's queues map their semaphores from /dev/shm"
        return shm

    shm = check_sigterm_with_streams_in_flight(server, 500, lambda: metric(server, "splitlab_kv_slots_in_use") == 3,
                                               before_stop=mapped)
    left = shm & set(os.listdir("/dev/shm"))
    assert not left, f"/dev/shm entries left behind: {sorted(left)}"


def test_a_replicas_server_serves_generate_tokens_and_stops_clean(tiny):
    """``--mode replicas``: each request goes to one of two spawned engines."""
    args = ["--model", "tiny", "--mode", "replicas", "--replicas", "2", "--replica-engine", "chunked",
            "--max-seq-len", "256", "--num-slots", "4", "--max-batch", "4", "--chunk-size", "64", "--device", "cpu"]
    with ServerProcess.splitlab(args) as replicas:
        children = descendants(replicas.pid)
        prompts = [[30 + i, 31, 32] for i in range(4)]
        results: list = [None] * 4

        def one(i: int) -> None:
            body = {"prompt": prompts[i], "max_tokens": 9, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True, "stream": True}
            events = stream(replicas, "/completions", body)
            results[i] = [t for e in events[:-1] for t in e["choices"][0]["token_ids"]]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [hf_generate(tiny, p, 9, min_new=9) for p in prompts]
        assert metric(replicas, "splitlab_kv_slots_total") == 4.0
        assert replicas.stop(signal.SIGTERM, timeout_s=60.0) == 0, replicas.output()
    assert wait_until(lambda: not [pid for pid in children if alive(pid)], 10.0)
