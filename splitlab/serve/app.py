"""The OpenAI-compatible HTTP app over an ``OnlineEngine`` (FastAPI).

Routes: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (the tokenizer's chat
template), streamed as server-sent events (``data: {...}`` chunks, then ``data: [DONE]``;
a usage chunk first when ``stream_options.include_usage``) or not; ``GET /v1/models``,
``GET /health`` (503 once the engine stopped) and ``GET /metrics`` (Prometheus).

Every error a client can cause is answered with OpenAI's JSON error body: a body over
``max_body_bytes`` 413, malformed JSON or a bad field 400, a prompt that leaves no room in
the context or a ``max_tokens`` over the limit 400 (code ``context_length_exceeded`` /
``invalid_value``), an unknown model 404, a missing or wrong API key 401, a full or
stopped engine 503. Nothing a request sends can stop the server. A client that
disconnects, mid-stream or while waiting for a whole answer, cancels its request at once
(its KV slot frees at the next engine step).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from splitlab.engine.online import EngineBusyError, OnlineEngine, SamplingParams
from splitlab.errors import ConfigError, WorkerError, WorkloadError
from splitlab.serve.metrics import ServerMetrics
from splitlab.serve.protocol import (ApiError, ChatRequest, CompletionRequest, GenerationParams, chat_body,
                                     completion_body, error_body, new_id, parse, stream_chunk, usage,
                                     usage_chunk)
from splitlab.serve.text import TextStream

#: Largest request body accepted by default (1 MiB: a 2k-token prompt as ids is ~15 kB).
MAX_BODY_BYTES = 1 << 20
DISCONNECT_POLL_S = 0.25


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """``served_model_name``: the ``model`` clients name (``aliases`` are accepted too).
    ``api_key``: when set, every ``/v1`` route needs ``Authorization: Bearer <key>``.
    ``max_body_bytes``: larger bodies get 413. ``max_tokens_limit``: most tokens one request
    may ask for (None: whatever the context leaves)."""

    served_model_name: str
    aliases: tuple[str, ...] = ()
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    max_tokens_limit: int | None = None


@dataclasses.dataclass
class _State:
    engine: OnlineEngine
    tokenizer: Any
    settings: ServerSettings
    metrics: ServerMetrics


def create_app(engine: OnlineEngine, tokenizer, settings: ServerSettings) -> FastAPI:
    """The app serving ``engine`` (a running ``OnlineEngine``) with ``tokenizer``."""
    app = FastAPI(title="splitlab", docs_url=None, redoc_url=None, openapi_url=None)
    state = _State(engine, tokenizer, settings, ServerMetrics(engine))
    app.state.splitlab = state
    _add_error_handlers(app, state)

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.alive:
            return JSONResponse({"status": "ok", **engine.stats()})
        return JSONResponse(error_body(503, "the engine has stopped", "engine_unavailable"), status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _authorize(request, settings)
        return JSONResponse({"object": "list", "data": [
            {"id": settings.served_model_name, "object": "model", "created": 0, "owned_by": "splitlab",
             "max_model_len": engine.max_seq_len}]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        received = engine.clock()
        params = await _parse_request(request, state, CompletionRequest)
        prompt = params.prompt_input()
        ids = _encode_text(tokenizer, prompt) if isinstance(prompt, str) else _check_ids(prompt, engine)
        return await _generate(request, state, params, ids, chat=False, received_s=received)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        received = engine.clock()
        params = await _parse_request(request, state, ChatRequest)
        ids = _chat_ids(tokenizer, params.conversation())
        return await _generate(request, state, params, ids, chat=True, received_s=received)

    return app


# ---- errors -----------------------------------------------------------------------------------

def _add_error_handlers(app: FastAPI, state: _State) -> None:
    def answer(status: int, body: dict) -> JSONResponse:
        state.metrics.rejected.labels(status=str(status)).inc()
        return JSONResponse(body, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return answer(exc.status, exc.body())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return answer(exc.status_code, error_body(exc.status_code, str(exc.detail), code))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return answer(500, error_body(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error"))


def _authorize(request: Request, settings: ServerSettings) -> None:
    if settings.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
        raise ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer <key>'",
                       "invalid_api_key")


# ---- reading a request ------------------------------------------------------------------------

async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {int(declared)} bytes; at most {limit} are accepted",
                       "request_too_large")
    body, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", "request_too_large")
        body.append(chunk)
    try:
        return json.loads(b"".join(body))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", "invalid_json") from None


async def _parse_request(request: Request, state: _State, kind: type[GenerationParams]) -> GenerationParams:
    settings = state.settings
    _authorize(request, settings)
    params = parse(kind, await _read_json(request, settings.max_body_bytes))
    if params.model is not None and params.model not in (settings.served_model_name, *settings.aliases):
        raise ApiError(404, f"the model {params.model!r} does not exist; this server serves "
                            f"{settings.served_model_name!r}", "model_not_found", "model")
    return params


def _encode_text(tokenizer, text: str) -> list[int]:
    ids = [int(i) for i in tokenizer(text)["input_ids"]]
    if not ids:
        raise ApiError(400, "the prompt encodes to no tokens; give some text", "invalid_value", "prompt")
    return ids


def _check_ids(ids: list[int], engine: OnlineEngine) -> list[int]:
    bad = next((i for i in ids if not 0 <= i < engine.vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary [0, {engine.vocab_size})", "invalid_value",
                       "prompt")
    return list(ids)


def _chat_ids(tokenizer, conversation: list[dict[str, str]]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template; use /v1/completions", "unsupported_model")
    try:
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # noqa: BLE001 - a template that refuses these messages
        raise ApiError(400, f"the chat template refused these messages: {exc}", "invalid_value", "messages") from None
    if hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def _max_tokens(params: GenerationParams, prompt_len: int, state: _State) -> int:
    """The request's ``max_tokens``, checked against the context and the server's limit."""
    room = state.engine.max_seq_len - prompt_len
    limit = state.settings.max_tokens_limit
    if room < 1:
        raise ApiError(400, f"the prompt has {prompt_len} tokens; this model's context is "
                            f"{state.engine.max_seq_len} tokens, so a prompt may have at most "
                            f"{state.engine.max_seq_len - 1}", "context_length_exceeded", "prompt")
    asked = getattr(params, "max_completion_tokens", None) or params.max_tokens
    if asked is None:
        return min(room, limit) if limit is not None else room
    if limit is not None and asked > limit:
        raise ApiError(400, f"max_tokens is {asked}; this server allows at most {limit}", "invalid_value",
                       "max_tokens")
    if asked > room:
        raise ApiError(400, f"the prompt ({prompt_len} tokens) plus max_tokens ({asked}) exceeds this model's "
                            f"context of {state.engine.max_seq_len} tokens", "context_length_exceeded", "max_tokens")
    if params.min_tokens > asked:
        raise ApiError(400, f"min_tokens ({params.min_tokens}) must not exceed max_tokens ({asked})",
                       "invalid_value", "min_tokens")
    return asked


def _sampling(params: GenerationParams) -> SamplingParams:
    try:
        return SamplingParams(temperature=1.0 if params.temperature is None else float(params.temperature),
                              top_p=1.0 if params.top_p is None else float(params.top_p),
                              top_k=params.top_k or 0, seed=params.seed)
    except ConfigError as exc:
        raise ApiError(400, str(exc), "invalid_value") from None


# ---- generating -------------------------------------------------------------------------------

class _Generation:
    """One request from its submission to its last delta: text, token ids, metrics, finish."""

    def __init__(self, state: _State, handle, stop: list[str]):
        self.state, self.handle = state, handle
        self.text = TextStream(state.tokenizer, stop)
        self.last_s: float | None = None
        self.finish: str | None = None
        self.error: str | None = None
        self.count = 0

    async def pieces(self) -> AsyncIterator[tuple[str, tuple[int, ...], str | None]]:
        """``(new text, new token ids, finish reason or None)`` per engine step."""
        metrics, arrival = self.state.metrics, self.handle.trace.arrival_s
        async for delta in self.handle:
            self.last_s = metrics.observe(arrival, self.last_s, delta.times_s)
            first = self.count == 0 and bool(delta.times_s)
            self.count += len(delta.token_ids)
            reason = delta.finish_reason
            piece = self.text.add(delta.token_ids, final=reason is not None)
            if first:
                metrics.first_delivery.observe(max(0.0, self.state.engine.clock() - delta.times_s[0]))
            if self.text.stopped and reason is None:
                reason = "stop"
                self.state.engine.cancel(self.handle, wait=False)
            if reason is not None:
                self.finish, self.error = reason, delta.error
                metrics.end(arrival, self.last_s, reason)
            yield piece, delta.token_ids, reason
            if reason is not None:
                return

    def close(self) -> None:
        """The client is gone or the answer is sent: an unfinished request is cancelled."""
        if self.finish is None:
            self.finish = "abort"
            self.state.engine.cancel(self.handle, wait=False)
            self.state.metrics.end(self.handle.trace.arrival_s, self.last_s, "abort")


async def _generate(request: Request, state: _State, params: GenerationParams, ids: list[int], chat: bool,
                    received_s: float) -> Response:
    """Submit and answer; ``received_s``: when the handler began (the engine's clock)."""
    max_tokens = _max_tokens(params, len(ids), state)
    stop = params.stop_strings()
    sampling = _sampling(params)
    try:
        handle = state.engine.submit(ids, max_tokens, sampling=sampling, ignore_eos=params.ignore_eos,
                                     min_tokens=params.min_tokens, loop=asyncio.get_running_loop())
    except EngineBusyError as exc:
        raise ApiError(503, str(exc), "engine_busy") from None
    except WorkerError as exc:
        raise ApiError(503, f"the engine is not running: {str(exc).splitlines()[0]}", "engine_unavailable") from None
    except (WorkloadError, ConfigError) as exc:
        raise ApiError(400, str(exc), "invalid_value") from None
    state.metrics.prompt_tokens.inc(len(ids))
    state.metrics.parse.observe(max(0.0, handle.trace.arrival_s - received_s))
    gen = _Generation(state, handle, stop)
    rid = new_id("chatcmpl" if chat else "cmpl")
    if params.stream:
        return StreamingResponse(_sse(gen, params, rid, ids, chat), media_type="text/event-stream")
    return await _whole(request, gen, params, rid, ids, chat)


def _sse_line(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def _sse(gen: _Generation, params: GenerationParams, rid: str, prompt_ids: list[int], chat: bool
               ) -> AsyncIterator[str]:
    name = gen.state.settings.served_model_name
    ids = params.return_token_ids
    try:
        if chat:
            yield _sse_line(stream_chunk(True, rid, name, "", None, [] if ids else None, first=True))
        async for piece, token_ids, reason in gen.pieces():
            if reason == "error":
                yield _sse_line(error_body(500, gen.error or "the engine failed", "engine_error"))
                break
            yield _sse_line(stream_chunk(chat, rid, name, piece, reason, token_ids if ids else None))
        if params.include_usage:
            yield _sse_line(usage_chunk(chat, rid, name, usage(len(prompt_ids), gen.count)))
        yield "data: [DONE]\n\n"
    finally:  # also when the client went away: the task is cancelled and this runs
        gen.close()


async def _whole(request: Request, gen: _Generation, params: GenerationParams, rid: str, prompt_ids: list[int],
                 chat: bool) -> Response:
    text: list[str] = []
    out: list[int] = []

    async def collect() -> None:
        async for piece, token_ids, _ in gen.pieces():
            text.append(piece)
            out.extend(token_ids)

    task = asyncio.ensure_future(collect())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                return Response(status_code=499)  # nobody reads it; the request is cancelled below
        task.result()
    finally:
        if not task.done():
            task.cancel()
        gen.close()
    if gen.finish == "error":
        raise ApiError(500, gen.error or "the engine failed", "engine_error")
    name = gen.state.settings.served_model_name
    build = chat_body if chat else completion_body
    token_ids = out if params.return_token_ids else None
    return JSONResponse(build(rid, name, "".join(text), gen.finish, usage(len(prompt_ids), gen.count), token_ids,
                              prompt_ids))
