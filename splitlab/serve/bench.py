"""``splitlab bench``: replay a workload against any OpenAI-compatible server, streaming.

The workload comes from the builders of ``splitlab.workload`` and the flags of
``splitlab run`` (``--workload fixed|poisson|trace`` ...), with prompts drawn from the
vocabulary of ``--model`` (default: the model the server lists). Each request is sent at its
arrival time (seconds after the start) to ``POST {endpoint}/completions`` with
``stream: true`` and ``stream_options.include_usage``, its ``max_tokens`` the workload's
output length, and vLLM's ``ignore_eos`` / ``min_tokens`` so the lengths are forced.

The wire dialect is found by one probe request before the clock starts (``--dialect auto``),
in this order: prompts as token ids with the forcing fields; text (the ids decoded by the
tokenizer) with them; ids without them; text without them; or given (``--dialect ids`` ...:
no probe request, so the server's own metrics hold only the workload's requests). A server
that refuses the forcing fields (HTTP 4xx) may stop at EOS before the asked length: the run
records that (``lengths_forced``), and the prompt length the server reports
(``usage.prompt_tokens``) against the intended one.

Client-side metrics use the definitions of every ``Run``: TTFT from the request's arrival
time (queueing in the client and the server included) to the first chunk that carries a
token; ITL each gap between tokens; E2E to the last token. A chunk that carries several
tokens (``token_ids``, or ``usage`` at the end says more tokens than chunks) gives all of
them its arrival time. The ``Run`` is saved with ``--save`` (``splitlab report``, the plots
and the notebooks read it); vLLM ``bench serve``'s JSON fields (``request_throughput``,
``output_throughput``, mean/median/std/p99 of ``ttft_ms``, ``tpot_ms``, ``itl_ms`` (gaps
between chunks, as vLLM), ``e2el_ms``, ``completed``, token totals, ``request_goodput`` with
``--goodput``) are printed as JSON on the last stdout line and written by ``--result-json``.

The server's own view: its Prometheus ``/metrics`` (``--server-metrics``, default the one beside
the endpoint) is scraped before and after the replay, and the difference of its latency
histograms (TTFT, ITL, E2E; ``splitlab serve``'s parse and first-token delivery too) is kept
as ``server_view`` in the run and the printed JSON (``splitlab.serve.server_view``).

Bounded: at most ``BENCH_MAX_REQUESTS`` requests, a total ``--timeout`` (requests still open
then are cancelled and count as failed) and a per-request read timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import time
from typing import Any

import numpy as np

from splitlab.errors import ConfigError, SplitlabError
from splitlab.serve.server_view import difference, metrics_url, scrape

#: Most requests one bench run sends.
BENCH_MAX_REQUESTS = 10_000
#: The fields a vLLM-compatible server uses to force output lengths (and report token ids).
FORCING_FIELDS = ("ignore_eos", "min_tokens", "return_token_ids")
DIALECTS = (("ids", True), ("text", True), ("ids", False), ("text", False))
DIALECT_NAMES = {"ids": ("ids", True), "text": ("text", True), "ids-plain": ("ids", False),
                 "text-plain": ("text", False)}


@dataclasses.dataclass
class RequestResult:
    """What the client saw of one request (times: seconds since the replay's start)."""

    id: int
    arrival_s: float
    intended_prompt_len: int
    intended_output_len: int
    sent_s: float | None = None
    chunk_times_s: list[float] = dataclasses.field(default_factory=list)  # chunks carrying tokens
    token_times_s: list[float] = dataclasses.field(default_factory=list)  # one per token
    token_ids: list[int] = dataclasses.field(default_factory=list)
    ids_known: bool = True
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    complete: bool = False  # the stream ended ([DONE] or its end) without an error

    @property
    def ok(self) -> bool:
        return self.complete and self.error is None and bool(self.token_times_s)

    def add_chunk(self, now: float, choice: dict[str, Any]) -> None:
        ids = choice.get("token_ids")
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or {}).get("content") or ""
        n = len(ids) if isinstance(ids, list) else (1 if text else 0)
        if isinstance(ids, list):
            self.token_ids.extend(int(i) for i in ids)
        else:
            self.ids_known = False
        self.text += text
        if n:
            self.chunk_times_s.append(now)
            self.token_times_s.extend([now] * n)
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]

    def settle(self) -> None:
        """After the stream: tokens the usage counts beyond those seen arrived with the last chunk."""
        extra = (self.completion_tokens or 0) - len(self.token_times_s)
        if extra > 0 and self.token_times_s:
            self.token_times_s.extend([self.token_times_s[-1]] * extra)
            self.ids_known = False


# ---- the wire -------------------------------------------------------------------------------------

def request_body(served: str | None, prompt, max_tokens: int, forced: bool, extra: dict[str, Any],
                 stream: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": int(max_tokens), "temperature": 0.0,
                            "stream": stream}
    if served is not None:
        body["model"] = served
    if stream:
        body["stream_options"] = {"include_usage": True}
    if forced:
        body.update(ignore_eos=True, min_tokens=int(max_tokens), return_token_ids=True)
    body.update(extra)
    return body


async def served_model(client) -> str | None:
    """The first model id the server lists at ``/models`` (None if it lists none)."""
    import httpx

    try:
        resp = await client.get("models")
    except httpx.HTTPError as exc:
        raise SplitlabError(f"cannot reach {client.base_url}models: {type(exc).__name__}: {exc}; is the server "
                            "running, and is --endpoint its /v1 URL?") from None
    try:
        data = resp.json().get("data") if resp.status_code == 200 else None
    except (ValueError, AttributeError):
        return None
    return str(data[0]["id"]) if data and isinstance(data[0], dict) and "id" in data[0] else None


async def probe(client, served: str | None, ids: list[int], text: str, extra: dict[str, Any]) -> tuple[str, bool]:
    """The first dialect (prompt kind, forcing fields) the server answers with 200."""
    import httpx

    answers = []
    for kind, forced in DIALECTS:
        body = request_body(served, ids if kind == "ids" else text, 1, forced, extra, stream=False)
        try:
            resp = await client.post("completions", json=body)
        except httpx.HTTPError as exc:
            raise SplitlabError(f"cannot reach {client.base_url}completions: {type(exc).__name__}: {exc}; "
                                "is the server running, and is --endpoint its /v1 URL?") from None
        if resp.status_code == 200:
            return kind, forced
        answers.append(f"{kind}{'+forced' if forced else ''}: HTTP {resp.status_code} {resp.text[:200]}")
        if resp.status_code in (401, 403, 404) or resp.status_code >= 500:
            break
    raise SplitlabError(f"the server at {client.base_url} answered no probe request: " + "; ".join(answers))


async def stream_one(client, body: dict[str, Any], res: RequestResult, t0: float) -> None:
    """Send one streaming request; record every chunk's arrival in ``res``."""
    import httpx

    res.sent_s = time.perf_counter() - t0
    try:
        async with client.stream("POST", "completions", json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return
            async for line in resp.aiter_lines():
                now = time.perf_counter() - t0
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = f"server error: {json.dumps(chunk['error'])[:300]}"
                    break
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"].get("prompt_tokens")
                    res.completion_tokens = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    res.add_chunk(now, choice)
            res.complete = res.error is None
    except (httpx.HTTPError, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.settle()


async def replay(client, served: str | None, workload, prompts: dict[int, Any], forced: bool,
                 extra: dict[str, Any], timeout_s: float, max_concurrency: int | None, progress: bool
                 ) -> tuple[list[RequestResult], float]:
    """Every request of ``workload`` at its arrival time; ``(results, t0)``."""
    from tqdm.auto import tqdm

    results = [RequestResult(r.id, r.arrival_s, r.prompt_len, r.max_new_tokens) for r in workload]
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(results), unit="req", desc="bench", disable=not progress)
    t0 = time.perf_counter() + 0.05  # a moment to schedule every task before the first arrival

    async def one(request, res: RequestResult) -> None:
        await asyncio.sleep(max(0.0, t0 + request.arrival_s - time.perf_counter()))
        body = request_body(served, prompts[request.id], request.max_new_tokens, forced, extra)
        try:
            if limit is None:
                await stream_one(client, body, res, t0)
            else:
                async with limit:
                    await stream_one(client, body, res, t0)
        finally:
            bar.update(1)

    tasks = [asyncio.create_task(one(r, res)) for r, res in zip(workload, results)]
    try:
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        bar.close()
    for res in results:
        if res.error is None and not res.complete:
            res.error = f"cancelled: the total timeout ({timeout_s:g} s) ran out"
        elif res.error is None and not res.token_times_s:
            res.error = "the server sent no token"
    return results, t0


# ---- what the run recorded ------------------------------------------------------------------------

def build_run(results: list[RequestResult], workload, served: str | None, endpoint: str, dialect: tuple[str, bool],
              slo, server_view: dict[str, Any] | None = None):
    """The ``Run`` of a bench: one trace per request, client-side times; no engine steps.
    ``server_view``: the server's histograms over the replay (``splitlab.serve.server_view``)."""
    from splitlab.config import RunConfig
    from splitlab.measure.metrics import RequestTrace, Run
    from splitlab.system.env import environment

    traces = []
    for res in results:
        n = len(res.token_times_s)
        ids = res.token_ids if res.ids_known and len(res.token_ids) == n else [-1] * n  # -1: id not reported
        traces.append(RequestTrace(id=res.id, arrival_s=res.arrival_s,
                                   prompt_len=res.prompt_tokens or res.intended_prompt_len,
                                   max_new_tokens=res.intended_output_len, token_times_s=list(res.token_times_s),
                                   output_ids=list(ids), worker="client"))
    extra = {"endpoint": endpoint, "served_model": served, "prompt_kind": dialect[0],
             "lengths_forced": dialect[1], **prompt_len_check(results),
             "failed": sum(not r.ok for r in results),
             "errors": [f"request {r.id}: {r.error}" for r in results if r.error][:20],
             "send_lag_max_s": max((r.sent_s - r.arrival_s for r in results if r.sent_s is not None), default=None),
             "server_view": server_view}
    config = RunConfig(mode="bench", slo=slo, num_requests=len(results), rate=workload.rate, extra=extra)
    return Run(mode="bench", model=served or "?", workload=workload.name, config=config, env=environment(),
               traces=traces)


def prompt_len_check(results: list[RequestResult]) -> dict[str, Any]:
    """How the server's prompt lengths (``usage.prompt_tokens``) differ from the intended ones."""
    diffs = [r.prompt_tokens - r.intended_prompt_len for r in results if r.prompt_tokens is not None]
    return {"prompt_len_reported": len(diffs), "prompt_len_mismatched": sum(d != 0 for d in diffs),
            "prompt_len_diff_mean": float(np.mean(diffs)) if diffs else None,
            "prompt_len_diff_max_abs": int(max(map(abs, diffs))) if diffs else None}


def _stats(name: str, values_s) -> dict[str, float]:
    ms = np.asarray(list(values_s), dtype=float) * 1000.0
    if ms.size == 0:
        return {f"{k}_{name}_ms": math.nan for k in ("mean", "median", "std", "p99")}
    return {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
            f"std_{name}_ms": float(ms.std()), f"p99_{name}_ms": float(np.percentile(ms, 99))}


def vllm_summary(results: list[RequestResult], run, slo) -> dict[str, Any]:
    """vLLM ``bench serve``'s result fields, from what the client saw (duration: the run's wall)."""
    ok = [r for r in results if r.ok]
    duration = float(run.wall_s or math.nan)
    out_tokens = sum(len(r.token_times_s) for r in ok)
    in_tokens = sum(r.prompt_tokens or r.intended_prompt_len for r in ok)
    ttft = [r.chunk_times_s[0] - r.arrival_s for r in ok]
    e2el = [r.token_times_s[-1] - r.arrival_s for r in ok]
    tpot = [(r.token_times_s[-1] - r.chunk_times_s[0]) / (len(r.token_times_s) - 1)
            for r in ok if len(r.token_times_s) > 1]
    itl = [g for r in ok for g in np.diff(r.chunk_times_s)]
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: math.nan)
    out: dict[str, Any] = {"duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
                           "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
                           "request_throughput": per_s(len(ok)), "output_throughput": per_s(out_tokens),
                           "total_token_throughput": per_s(in_tokens + out_tokens)}
    if slo is not None:
        out["request_goodput"] = run.summary(slo)["goodput_req_s"]
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        out.update(_stats(name, values))
    return out


# ---- the command ----------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``splitlab bench`` beside the workload flags it shares with ``splitlab run``."""
    from splitlab.cli import _positive_float, _positive_int

    p.add_argument("--endpoint", required=True, help="the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--served-model", default=None,
                   help="the 'model' field of each request (default: the first model the server lists)")
    p.add_argument("--model", default=None,
                   help="spec whose tokenizer and vocabulary make the prompts (default: --served-model)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--dialect", default="auto", choices=("auto", *DIALECT_NAMES),
                   help="how prompts and lengths are sent: auto (one probe request finds it), ids / text "
                        "(with ignore_eos + min_tokens), ids-plain / text-plain (without them)")
    p.add_argument("--extra-body", default=None, metavar="JSON", help="fields added to every request body")
    p.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="the SLO in vLLM's syntax, milliseconds: ttft:1000 tpot:50 itl:30 e2el:5000")
    p.add_argument("--max-concurrency", type=_positive_int, default=None, help="most requests open at once")
    p.add_argument("--timeout", type=_positive_float, default=600.0,
                   help="seconds the whole replay may take (open requests are then cancelled)")
    p.add_argument("--request-timeout", type=_positive_float, default=120.0,
                   help="seconds to wait for a connection or the next chunk of one request")
    p.add_argument("--server-metrics", default="auto", metavar="auto|off|URL",
                   help="scrape the server's Prometheus /metrics before and after the replay and record its "
                        "own latency histograms (auto: /metrics beside --endpoint; a server without one is noted)")
    p.add_argument("--save", default=None, metavar="PATH", help="write the Run here (splitlab report reads it)")
    p.add_argument("--result-json", default=None, metavar="PATH",
                   help="write vLLM bench serve's result JSON here (with per-request lists)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)


def _check_args(args) -> tuple[str, dict[str, Any], Any]:
    """``(endpoint, extra body, SLO or None)``; every flag checked before anything is sent."""
    from splitlab.config import SLO
    from splitlab.measure.metrics import check_writable

    endpoint = args.endpoint.rstrip("/")
    if not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"--endpoint must be an http(s) URL such as http://127.0.0.1:8000/v1, got {args.endpoint!r}")
    if args.server_metrics not in ("auto", "off") and not args.server_metrics.startswith(("http://", "https://")):
        raise ConfigError(f"--server-metrics must be auto, off or an http(s) URL of a Prometheus page, got "
                          f"{args.server_metrics!r}")
    if args.num_requests is not None and args.num_requests > BENCH_MAX_REQUESTS:
        raise ConfigError(f"splitlab bench sends at most {BENCH_MAX_REQUESTS} requests; --num-requests is "
                          f"{args.num_requests}")
    extra: dict[str, Any] = {}
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body)
        except ValueError as exc:
            raise ConfigError(f"--extra-body must be a JSON object: {exc}") from None
        if not isinstance(extra, dict):
            raise ConfigError(f"--extra-body must be a JSON object, got {args.extra_body!r}")
    for path in (args.save, args.result_json):
        if path:
            check_writable(path)
    return endpoint, extra, (SLO.from_vllm(args.goodput) if args.goodput else None)


def cmd_bench(args) -> int:
    from splitlab.cli import _json_line, _quiet_transformers

    endpoint, extra, slo = _check_args(args)
    _quiet_transformers()
    results, workload, served, dialect, view = asyncio.run(_bench(args, endpoint, extra))
    run = build_run(results, workload, served, endpoint, dialect, slo, view)
    summary = {"endpoint": endpoint, "model": served, "workload": workload.name, "prompt_kind": dialect[0],
               "lengths_forced": dialect[1], **vllm_summary(results, run, slo), **prompt_len_check(results),
               "server_view": view}
    print(f"bench {endpoint} ({served}): {summary['completed']}/{len(results)} requests completed in "
          f"{summary['duration']:.2f} s; prompts as {dialect[0]}, lengths "
          f"{'forced' if dialect[1] else 'NOT forced (the server refused ignore_eos/min_tokens)'}")
    for r in results:
        if r.error:
            print(f"  request {r.id} failed: {r.error}")
    if args.save:
        print(f"saved run to {run.save(args.save)}")
    if args.result_json:
        from pathlib import Path

        from splitlab.measure.metrics import to_jsonable, write_json_file

        per_request = {"input_lens": [r.prompt_tokens or r.intended_prompt_len for r in results],
                       "output_lens": [len(r.token_times_s) for r in results],
                       "ttfts": [r.chunk_times_s[0] - r.arrival_s if r.chunk_times_s else None for r in results],
                       "itls": [list(np.diff(r.chunk_times_s)) for r in results],
                       "generated_texts": [r.text for r in results], "errors": [r.error or "" for r in results]}
        write_json_file(Path(args.result_json), to_jsonable({**summary, **per_request}))
        print(f"wrote {args.result_json}")
    print(_json_line(summary))
    return 0 if summary["completed"] else 1


async def _bench(args, endpoint: str, extra: dict[str, Any]):
    import httpx

    from splitlab.cli import _build_workload
    from splitlab.models import load_model

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.request_timeout, connect=min(10.0, args.request_timeout))
    limits = httpx.Limits(max_connections=args.max_concurrency or 1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=endpoint + "/", headers=headers, timeout=timeout, limits=limits,
                                 trust_env=False) as client:
        served = args.served_model or await served_model(client)
        spec = args.model or served
        if spec is None:
            raise ConfigError("the server lists no model; give --served-model NAME and --model SPEC (whose "
                              "tokenizer makes the prompts)")
        model = load_model(spec, device="meta")  # the tokenizer and the facts; no weights held
        workload = _build_workload(args, model)
        if len(workload) > BENCH_MAX_REQUESTS:  # a trace without --num-requests
            raise ConfigError(f"splitlab bench sends at most {BENCH_MAX_REQUESTS} requests; the workload has "
                              f"{len(workload)} (give --num-requests)")
        texts = {r.id: model.tokenizer.decode(list(r.prompt_ids)) for r in workload}
        first = workload.requests[0]
        if args.dialect == "auto":
            dialect = await probe(client, served, list(first.prompt_ids), texts[first.id], extra)
        else:
            dialect = DIALECT_NAMES[args.dialect]
        prompts = {r.id: (list(r.prompt_ids) if dialect[0] == "ids" else texts[r.id]) for r in workload}
        url = None if args.server_metrics == "off" else \
            metrics_url(endpoint) if args.server_metrics == "auto" else args.server_metrics
        before, why = await scrape(client, url) if url else (None, "--server-metrics off")
        results, _ = await replay(client, served, workload, prompts, dialect[1], extra, args.timeout,
                                  args.max_concurrency, not args.no_progress)
        after, why_after = await scrape(client, url) if before is not None else (None, why)
    view = {"url": url, "histograms": difference(before, after)} if after is not None \
        else {"url": url, "unavailable": why_after}
    return results, workload, served, dialect, view
