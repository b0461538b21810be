"""What the caller of an online engine holds (``RequestHandle``, its ``Delta`` s) and the
engine's state of one request (``OnlineSeq``: a ``SeqState`` that may stop early and samples
by its own parameters). Every online engine (in-process threads or spawned children) uses
these, so a server or a replay sees one kind of handle."""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
from typing import Iterator, NamedTuple

import torch

from splitlab.errors import ConfigError
from splitlab.engine.sampling import GREEDY, SamplingParams, sample
from splitlab.engine.scheduler import RequestFacts, SeqState
from splitlab.measure.metrics import RequestTrace
from splitlab.workload import Request

FINISH_REASONS = ("length", "stop", "abort", "error")


class Delta(NamedTuple):
    """New tokens of one request from one step (``times_s``: engine clock), or its end:
    ``finish_reason`` is set on the last delta (``length``, ``stop`` (EOS or a stop id),
    ``abort`` (cancelled or the engine closed), ``error`` (``error`` says what)). A named
    tuple, not a dataclass: one is made per request per step, on the engine's loop."""

    token_ids: tuple[int, ...]
    times_s: tuple[float, ...]
    finish_reason: str | None = None
    error: str | None = None


class RequestHandle(RequestFacts):
    """One submitted request: iterate it for its ``Delta`` s (``for`` when submitted without
    ``loop``, ``async for`` with one), or wait with ``result()``. ``trace`` is its
    ``RequestTrace``; ``output_ids`` and ``finish_reason`` fill in as it runs."""

    def __init__(self, request: Request, trace: RequestTrace, loop: asyncio.AbstractEventLoop | None = None):
        self.request = request
        self.trace = trace
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._done = threading.Event()
        self._loop = loop
        self._queue: queue.SimpleQueue | None = queue.SimpleQueue() if loop is None else None
        self._aqueue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._iterated = False

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _deliver(self, delta: Delta) -> None:
        """Called on the engine thread: record, then hand over."""
        self.output_ids.extend(delta.token_ids)
        if delta.finish_reason is not None:
            self.finish_reason, self.error = delta.finish_reason, delta.error
        if self._aqueue is not None:
            try:
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, delta)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening
                pass
        else:
            self._queue.put(delta)
        if delta.finish_reason is not None:
            self._done.set()

    def _claim(self, is_async: bool) -> None:
        if (self._aqueue is not None) != is_async:
            how = "async for (it was submitted with loop=...)" if self._aqueue is not None else \
                "a plain for loop (submit with loop=asyncio.get_running_loop() to use async for)"
            raise ConfigError(f"request {self.id}: iterate this handle with {how}")
        if self._iterated:
            raise ConfigError(f"request {self.id}: a handle's deltas can be iterated once")
        self._iterated = True

    def __iter__(self) -> Iterator[Delta]:
        self._claim(False)
        while True:
            delta = self._queue.get()
            yield delta
            if delta.finish_reason is not None:
                return

    async def __aiter__(self):
        self._claim(True)
        while True:
            delta = await self._aqueue.get()
            yield delta
            if delta.finish_reason is not None:
                return

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request ends (its last delta is out) or ``timeout`` s pass; ``done``."""
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> list[int]:
        """Wait for the end; the output ids. TimeoutError after ``timeout`` seconds."""
        if not self.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return list(self.output_ids)


@dataclasses.dataclass(eq=False)
class OnlineSeq(SeqState):
    """A ``SeqState`` that may end before ``max_new_tokens`` (EOS, a stop id) and picks its
    tokens by its own sampling parameters."""

    handle: RequestHandle | None = None
    params: SamplingParams = GREEDY
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_ids: frozenset = frozenset()
    eos_ids: frozenset = frozenset()
    generator: torch.Generator | None = None
    sent: int = 0  # tokens already delivered to the handle
    cancelled: bool = False
    owner: str = "prefill"  # the loop that holds it (a split engine has two)

    @property
    def finished(self) -> bool:
        out = self.trace.output_ids
        return len(out) >= self.request.max_new_tokens or self.stopped

    @property
    def stopped(self) -> bool:
        """The last token ends the request (a stop id, or EOS unless ``ignore_eos``)."""
        out = self.trace.output_ids
        return bool(out) and (out[-1] in self.stop_ids or (not self.ignore_eos and out[-1] in self.eos_ids))

    @property
    def exact_path(self) -> bool:
        """Greedy with EOS masked throughout and no stop ids: the runner's own greedy path."""
        return (self.params.greedy and not self.stop_ids
                and (self.ignore_eos or self.min_tokens >= self.request.max_new_tokens))

    def suppressed(self) -> list[int]:
        """Token ids the next token may not be (EOS and stop ids before ``min_tokens``)."""
        n = len(self.trace.output_ids)
        ids = set(self.eos_ids) if (self.ignore_eos or n < self.min_tokens) else set()
        if n < self.min_tokens:
            ids |= self.stop_ids
        return sorted(ids)

    def pick(self, logits: torch.Tensor) -> int:
        masked = self.suppressed()
        if masked:
            logits = logits.index_fill(0, torch.tensor(masked, device=logits.device), float("-inf"))
        return sample(logits, self.params, self.generator)


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What a request must fit: the vocabulary, the context, and on a paged pool its pages
    (``page_headroom`` more than it writes) among ``pool_pages``."""

    vocab_size: int
    max_seq_len: int
    block_size: int | None = None
    pool_pages: int | None = None
    page_headroom: int = 0


def checked_request(prompt_ids, max_tokens, request_id: int, limits: RequestLimits, *,
                    sampling: SamplingParams | None, ignore_eos: bool, min_tokens: int, stop_ids
                    ) -> tuple[Request, SamplingParams, frozenset]:
    """``(request, sampling, stop ids)`` of one ``submit``, every argument checked once here
    for every online engine (in-process or over children): ``ConfigError`` for a bad
    setting, ``WorkloadError`` for a request the engine can never hold."""
    from splitlab.engine.kv import pages_written
    from splitlab.errors import WorkloadError

    sampling = GREEDY if sampling is None else sampling
    if not isinstance(sampling, SamplingParams):
        raise ConfigError(f"sampling must be a SamplingParams, got {sampling!r}")
    if not isinstance(ignore_eos, bool):
        raise ConfigError(f"ignore_eos must be True or False, got {ignore_eos!r}")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise ConfigError(f"min_tokens must be an integer >= 0, got {min_tokens!r}")
    stops = frozenset(_token_ids(stop_ids, "stop_ids", limits.vocab_size))
    request = Request(request_id, prompt_ids, max_tokens)  # checks the ids and lengths
    if min_tokens > request.max_new_tokens:
        raise ConfigError(f"min_tokens ({min_tokens}) must not exceed max_tokens ({request.max_new_tokens})")
    top, low = max(request.prompt_ids), min(request.prompt_ids)
    if top >= limits.vocab_size or low < 0:
        raise WorkloadError(f"token id {top if top >= limits.vocab_size else low} is outside the model's "
                            f"vocabulary [0, {limits.vocab_size})")
    need = request.prompt_len + request.max_new_tokens
    if need > limits.max_seq_len:
        raise WorkloadError(f"the request needs {need} positions (prompt {request.prompt_len} + "
                            f"{request.max_new_tokens} new) but the engine's context is {limits.max_seq_len}; "
                            "shorten the prompt or ask for fewer tokens")
    if limits.block_size is not None:
        pages = pages_written(request, limits.block_size) + limits.page_headroom
        if pages > limits.pool_pages:
            raise WorkloadError(f"request {request.id} needs {pages} KV pages of {limits.block_size} positions but "
                                f"the pool has {limits.pool_pages}; raise EngineConfig.num_pages (or the KV "
                                "memory), or shorten the prompt or ask for fewer tokens")
    return request, sampling, stops


def _token_ids(ids, what: str, vocab_size: int) -> list[int]:
    try:
        given = list(ids)
    except TypeError:
        raise ConfigError(f"{what} must be a list of token ids, got {ids!r}") from None
    for i in given:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise ConfigError(f"{what} must be token ids in [0, {vocab_size}), got {given!r}")
    return given
