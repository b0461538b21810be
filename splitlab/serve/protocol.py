"""The OpenAI-compatible wire format: request models, the error shape, response bodies.

Requests are parsed from the raw JSON with pydantic (``CompletionRequest``,
``ChatRequest``); unknown fields are ignored, as OpenAI and vLLM do, but a known field
that would change the result and is not implemented (``n`` > 1, ``logprobs``, ``echo``,
penalties, ``suffix``, tools) is refused, so no client gets a silently different answer.
vLLM's ``ignore_eos``, ``min_tokens``, ``top_k`` and ``return_token_ids`` are accepted.

Every error a client can cause is an ``ApiError``: an HTTP status and OpenAI's body
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

#: OpenAI's error ``type`` per HTTP status.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 422: "invalid_request_error", 500: "server_error",
               503: "service_unavailable_error"}
MAX_STOP_STRINGS = 16


class ApiError(Exception):
    """An error answered as OpenAI's JSON error body with ``status``."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.code, self.param)


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


# ---- requests ---------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class GenerationParams(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=-1)
    seed: StrictInt | None = Field(None, ge=0, lt=2**63)
    stop: Union[str, list[str], None] = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(0, ge=0)
    return_token_ids: StrictBool = False
    # known, not implemented: refused unless left at their defaults (see ``refuse_unsupported``)
    n: StrictInt = Field(1, ge=1)
    best_of: StrictInt | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    echo: StrictBool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings are accepted, got {len(stops)}",
                           "invalid_value", "stop")
        if any(s == "" for s in stops):
            raise ApiError(400, "a stop string must not be empty", "invalid_value", "stop")
        return stops

    def refuse_unsupported(self) -> None:
        checks = (("n", self.n != 1, "only n=1 is supported"),
                  ("best_of", self.best_of not in (None, 1), "best_of is not supported"),
                  ("logprobs", self.logprobs not in (None, False, 0), "logprobs are not supported"),
                  ("top_logprobs", self.top_logprobs not in (None, 0), "top_logprobs are not supported"),
                  ("echo", self.echo, "echo is not supported"),
                  ("presence_penalty", self.presence_penalty not in (None, 0), "presence_penalty is not supported"),
                  ("frequency_penalty", self.frequency_penalty not in (None, 0),
                   "frequency_penalty is not supported"),
                  ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"))
        for param, bad, message in checks:
            if bad:
                raise ApiError(400, message, "unsupported_parameter", param)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationParams):
    prompt: Union[str, list[StrictInt], list[str], list[list[StrictInt]]]
    suffix: str | None = None

    def prompt_input(self) -> str | list[int]:
        """The one prompt: text, or token ids. A batch of several prompts is refused."""
        if self.suffix:
            raise ApiError(400, "suffix is not supported", "unsupported_parameter", "suffix")
        p = self.prompt
        if isinstance(p, list) and p and not isinstance(p[0], int):
            if len(p) != 1:
                raise ApiError(400, f"one prompt per request is supported, got {len(p)}; send them as separate "
                                    "requests", "unsupported_parameter", "prompt")
            p = p[0]
        if len(p) == 0:
            raise ApiError(400, "the prompt is empty; give at least one token", "invalid_value", "prompt")
        return p


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    tools: Any = None

    def conversation(self) -> list[dict[str, str]]:
        if self.tools:
            raise ApiError(400, "tools are not supported", "unsupported_parameter", "tools")
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


def parse(kind: type[GenerationParams], body: Any) -> GenerationParams:
    """``body`` (decoded JSON) as ``kind``; a 400 ApiError naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", "invalid_value")
    try:
        request = kind.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or None
        raise ApiError(400, f"{where}: {first.get('msg')}" if where else str(first.get("msg")),
                       "invalid_value", where) from None
    request.refuse_unsupported()
    if request.min_tokens and request.max_tokens is not None and request.min_tokens > request.max_tokens:
        raise ApiError(400, f"min_tokens ({request.min_tokens}) must not exceed max_tokens ({request.max_tokens})",
                       "invalid_value", "min_tokens")
    return request


# ---- responses --------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish: str | None, use: dict, token_ids=None,
                    prompt_ids=None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = list(token_ids)
        choice["prompt_token_ids"] = list(prompt_ids)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": use}


def chat_body(rid: str, model: str, text: str, finish: str | None, use: dict, token_ids=None,
              prompt_ids=None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                              "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = list(token_ids)
        choice["prompt_token_ids"] = list(prompt_ids)
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": use}


def stream_chunk(chat: bool, rid: str, model: str, text: str | None, finish: str | None,
                 token_ids=None, first: bool = False) -> dict[str, Any]:
    """One SSE chunk; ``text`` None: a chunk without new text (the final one)."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        kind = "text_completion"
    if token_ids is not None:
        choice["token_ids"] = list(token_ids)
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(chat: bool, rid: str, model: str, use: dict) -> dict[str, Any]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [], "usage": use}
