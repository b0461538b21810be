"""What every ``splitlab serve`` test module checks against its own server (a real subprocess),
whatever mode runs behind it: the HTTP helpers, and the scenarios the serve issue asks of
every mode (32 concurrent streams, a client dropped mid-stream, bad requests, SIGTERM with
requests in flight)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
from typing import Any, Callable

import httpx
from _colocation import wait_until as _wait_until
from _oracle import hf_generate

from splitlab.serve.process import descendants, port_is_free
from splitlab.system.procs import alive


def post(server, route: str, body, **kw) -> httpx.Response:
    return httpx.post(server.url + route, json=body, timeout=120.0, trust_env=False, **kw)


def sse_events(response: httpx.Response) -> list:
    """The ``data:`` payloads of a streamed response, ``[DONE]`` as the string."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def stream(server, route: str, body) -> list:
    with httpx.stream("POST", server.url + route, json=body, timeout=120.0, trust_env=False) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r)


def metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(server.url.removesuffix("/v1") + "/metrics", timeout=30.0, trust_env=False).text
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def wait_until(check, timeout_s: float) -> bool:
    """``_colocation.wait_until`` at a slower poll: each check here scrapes the server over HTTP."""
    return _wait_until(check, timeout_s, poll_s=0.1)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert err["message"] and err["type"]
    if code is not None:
        assert err["code"] == code, err
    return err


def open_stream(server, n: int, out: list) -> None:
    """One streamed request of ``n`` tokens; its events (or the error that ended it) to ``out``."""
    body = {"prompt": [7, 8, 9], "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", server.url + "/completions", json=body, timeout=60.0, trust_env=False) as r:
            out.append(sse_events(r))
    except httpx.HTTPError as exc:  # a connection the server closed is an end too
        out.append(exc)


# ---- the scenarios --------------------------------------------------------------------------------

def check_concurrent_streams(server, model=None, n: int = 32) -> None:
    """``n`` streamed requests at once all end with their lengths (and ``model``'s greedy
    tokens, when given); the KV pool is empty after."""
    lengths = [1 + (i * 7) % 8 for i in range(n)]
    prompts = [[10 + i, 11, 12, 13 + i % 5] for i in range(n)]

    async def one(client, prompt, max_tokens):
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "completions", json=body) as r:
            assert r.status_code == 200
            events = [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
                      async for line in r.aiter_lines() if line.startswith("data: ")]
        chunks = [e["choices"][0] for e in events[:-2]]
        return [t for c in chunks for t in c["token_ids"]], chunks[-1]["finish_reason"], events[-2]["usage"]

    async def main():
        async with httpx.AsyncClient(base_url=server.url + "/", timeout=120.0, trust_env=False) as client:
            return await asyncio.gather(*(one(client, p, k) for p, k in zip(prompts, lengths)))

    for (ids, finish, use), prompt, k in zip(asyncio.run(main()), prompts, lengths):
        assert len(ids) == k and finish == "length" and use["completion_tokens"] == k
        if model is not None:
            assert ids == hf_generate(model, prompt, k, min_new=k)
    assert wait_until(lambda: metric(server, "splitlab_kv_slots_in_use") == 0, 30.0)


def check_dropped_client_frees_kv(server, max_tokens: int) -> None:
    """A client that closes its stream 2 tokens into ``max_tokens``: its request is aborted and
    its KV freed (the server must make tokens slowly enough that it is still running)."""
    aborted = metric(server, "splitlab_request_finished_total", '{finish_reason="abort"}')
    body = {"prompt": [5, 6, 7], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/completions", json=body, timeout=60.0, trust_env=False) as r:
        lines = r.iter_lines()  # kept: closing this iterator would close the connection already
        data = [line for line in (next(lines) for _ in range(4)) if line.startswith("data: ")]
        assert len(data) == 2  # two tokens (each line is followed by an empty one)
        assert metric(server, "splitlab_kv_slots_in_use") == 1
    # the connection is closed here
    assert wait_until(lambda: metric(server, "splitlab_kv_slots_in_use") == 0, 30.0)
    assert metric(server, "splitlab_request_finished_total", '{finish_reason="abort"}') == aborted + 1
    assert wait_until(lambda: metric(server, "splitlab_num_requests_running") == 0, 10.0)


def check_bad_request(server, body, status: int, code: str) -> None:
    """``body`` (bytes as sent, or a JSON value) gets ``status`` with an OpenAI error of ``code``,
    and the next good request is served."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/completions", content=content, timeout=60.0, trust_env=False,
                   headers={"content-type": "application/json"})
    assert_error(r, status, code)
    good = post(server, "/completions", {"prompt": [5, 6], "max_tokens": 2, "ignore_eos": True})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 2


def check_sigterm_with_streams_in_flight(server, max_tokens: int, in_flight: Callable[[], bool],
                                         before_stop: Callable[[list[int]], Any] | None = None) -> Any:
    """Three streams of ``max_tokens`` open (``in_flight()`` says when), then SIGTERM: exit 0 in
    under 30 s, each stream ended (aborted, then ``[DONE]``), the port free, every child process
    gone. ``before_stop(children)`` runs just before the signal; its value is returned."""
    results: list = []
    threads = [threading.Thread(target=open_stream, args=(server, max_tokens, results)) for _ in range(3)]
    for t in threads:
        t.start()
    assert wait_until(in_flight, 60.0)
    children = descendants(server.pid)
    seen = before_stop(children) if before_stop is not None else None
    port = server.port
    started = time.monotonic()
    assert server.stop(signal.SIGTERM, timeout_s=60.0) == 0, server.output()
    assert time.monotonic() - started < 30.0
    for t in threads:
        t.join(30.0)
        assert not t.is_alive()
    assert len(results) == 3
    for events in results:  # each stream ended: aborted, then [DONE]
        assert isinstance(events, list) and events[-1] == "[DONE]", events
        assert events[-2]["choices"][0]["finish_reason"] == "abort"
    assert "splitlab serve: stopped" in server.output()
    assert port_is_free(port)
    assert wait_until(lambda: not [pid for pid in children if alive(pid)], 10.0)
    return seen
