"""``splitlab.online_engine(model, "split", config, split=SplitConfig(backend="processes" | "mps"))``:
the two spawned children of the process split as an online engine. It is the one loop of
these backends: an offline run (``splitlab.run(..., mode="split")``, a ``SplitSession``) is a
replay through it (``splitlab.modes.split.processes.ProcessSplit``).

Start-up (``prefill_setup`` / ``decode_setup`` of ``splitlab.modes.split.processes``): the
PREFILL child loads the model by (spec, device, dtype, seed), builds the engine, shares its
weights and KV pool with the DECODE child (CUDA IPC on GPU, shared memory on CPU:
``Setup``), both warm up and send ``Ready``; with ``mps`` both are clients of the session's
private MPS daemon, each with its SM share. The parent then sends ``Go`` (one clock for all)
and only holds handles (``splitlab.modes.online_parent``); it may ask both children to
``Measure`` (peak memory, scheduler counters, KV held), which they answer between steps.

Data flow, one request: parent --Submit--> prefill child's inbox (the queue the decode child
also returns freed slots or pages on, so ONE blocking read wakes it for either); it is
admitted once the clock reaches its arrival, prefilled into the shared pool, and its first
token goes to the parent (``Tokens``) BEFORE the handoff; a request that needs more goes to
the decode child as ``Handed`` (the ``Handoff``: slot or page ids, never KV bytes; plus its
sampling parameters and the state of its random generator, so a seeded request draws the
same stream as in one process). The decode child batches what was handed over, sends each
step's tokens to the parent, and returns the KV of what finished (``Freed``, with the
requests' ids) to the prefill child, the pool's only allocator, which reports those ids as
released. ``Cancel`` goes to the prefill child; a request it no longer holds was handed
over, so it forwards the Cancel on the handoff queue, behind that handoff (FIFO).

A paged pool with ``kv_prefix_cache``: the prefill child's allocator gives a request the
cached pages of its longest cached prefix (held by every sharer, read-only: full blocks);
the decode child returns a sequence's page ids one at a time, so a shared page is free again
only once its last holder gave it back.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import torch

from splitlab.config import EngineConfig, SplitConfig
from splitlab.engine.loop import Handoff, _HandedRequest
from splitlab.engine.handles import OnlineSeq
from splitlab.engine.online import MAX_QUEUED
from splitlab.engine.sampling import SamplingParams
from splitlab.engine.scheduler import Scheduler
from splitlab.errors import ConfigError
from splitlab.measure.metrics import RequestTrace
from splitlab.modes.common import Fault, FreedSlots, worker_model_args
from splitlab.modes.online_child import (IDLE_S, Cancel, ChildLoop, StartClock, Submit, closing, online_worker,
                                         rng_from, rng_state, take, wait_go)
from splitlab.modes.online_parent import ChildEngine
from splitlab.modes.session import Close, ProcessSession
from splitlab.modes.split.processes import Bye, Freed, decode_setup, prefill_setup, say_bye
from splitlab.modes.split.run import check_backend_here

@dataclasses.dataclass(frozen=True)
class Handed:
    """A prefilled online request, as the decode child continues it."""

    handoff: Handoff
    params: SamplingParams
    ignore_eos: bool
    min_tokens: int
    stop_ids: tuple[int, ...]
    rng: bytes | None  # the state of its sampling generator (None: greedy)


@dataclasses.dataclass(frozen=True)
class HandedOver:
    items: tuple[Handed, ...]


# ---- the prefill child --------------------------------------------------------------------------

def online_prefill_main(channel, model_args, config: EngineConfig, split: SplitConfig, handoff_q, inbox_q,
                        fault: Fault | None = None) -> None:
    parts, ready = prefill_setup(channel, model_args, config, handoff_q)
    runner, clock = parts.runner, StartClock()
    scheduler = Scheduler("prefill", parts.allocator, runner.max_batch, config.token_budget)
    loop = ChildLoop(online_worker("prefill", runner, scheduler, clock), ready.facts["eos_token_ids"], runner.device,
                     fault=fault)
    channel.send(ready)
    bye = _serve_prefill(channel, loop, parts.allocator, handoff_q, inbox_q) if wait_go(channel, clock) else False
    # the decode child maps our weights and KV: keep them until it let go
    deadline = time.monotonic() + 60.0
    while not bye and time.monotonic() < deadline:
        bye = any(isinstance(msg, Bye) for msg in take(inbox_q, 0.2))
        channel.check_parent()


def _serve_prefill(channel, loop: ChildLoop, allocator, handoff_q, inbox_q) -> bool:
    """Until ``Close``: requests in, prefill steps, first tokens out, handoffs; whether the
    decode child's ``Bye`` came already."""
    busy, wait, bye = False, None, False
    while True:
        timeout = 0.0 if busy else min(IDLE_S, IDLE_S if wait is None else wait)
        for msg in take(inbox_q, timeout):  # wakes at once for a request, a cancel or freed KV
            if isinstance(msg, Submit):
                loop.submit(msg)
            elif isinstance(msg, Cancel):
                if not loop.cancel(msg.request_id):
                    handoff_q.put(msg)  # handed over (or over): behind its handoff, to the decode child
            elif isinstance(msg, Freed):
                for kv_id in msg.slots:
                    allocator.free(kv_id)
                loop.released.extend(msg.request_ids)
            elif isinstance(msg, Bye):
                bye = True
            elif isinstance(msg, Close):
                return bye
            else:
                raise RuntimeError(f"prefill worker: unexpected message {msg!r}")
        if closing(channel, loop):
            return bye
        wait = loop.admit_arrived()
        outcome = loop.step() if loop.scheduler.has_work() else None
        busy = outcome is not None  # None with work left: every slot or page is held; wait for one
        handed = []
        for seq in outcome.prefilled if outcome is not None else ():
            if not seq.finished and not seq.cancelled:
                loop.held.pop(seq.id, None)
                handed.append(Handed(Handoff.of(seq), seq.params, seq.ignore_eos, seq.min_tokens,
                                     tuple(sorted(seq.stop_ids)), rng_state(seq.generator)))
        loop.flush(channel.send)  # first tokens before the handoff
        if handed:
            handoff_q.put(HandedOver(tuple(handed)))


# ---- the decode child ---------------------------------------------------------------------------

class _FreedWithIds(FreedSlots):
    """The decode side's allocator: slots or page ids back to the prefill child, with the
    requests they were of (which the prefill child then reports released)."""

    def __init__(self, inbox_q):
        super().__init__(lambda slots: None)
        self._q = inbox_q
        self.request_ids: list[int] = []

    def flush(self) -> None:
        if self._pending or self.request_ids:
            self._q.put(Freed(tuple(self._pending), tuple(self.request_ids)))
            self._pending = []
            self.request_ids.clear()  # in place: the loop's release hook appends to this list


def online_decode_main(channel, config: EngineConfig, split: SplitConfig, handoff_q, inbox_q,
                       fault: Fault | None = None) -> None:
    runner, ready = decode_setup(channel, config, split, handoff_q)
    device, clock = runner.device, StartClock()
    freed = _FreedWithIds(inbox_q)
    worker = online_worker("decode", runner, Scheduler("decode", freed, runner.max_batch), clock)
    loop = ChildLoop(worker, runner.arch.get("eos_token_ids") or (), device, release=freed.request_ids.append,
                     fault=fault)
    channel.send(ready)
    try:
        if wait_go(channel, clock):
            _serve_decode(channel, loop, freed, handoff_q, split.poll_s)
    finally:
        runner = loop = worker = None  # noqa: F841 - nothing maps the prefill child's memory any more
        say_bye(device, inbox_q)


def _serve_decode(channel, loop: ChildLoop, freed: _FreedWithIds, handoff_q, poll_s: float) -> None:
    sch, room = loop.scheduler, loop.worker.runner.max_batch
    backlog: collections.deque[OnlineSeq] = collections.deque()  # handed over while the batch is full
    while True:
        for msg in take(handoff_q, 0.0 if sch.has_work() else poll_s):
            if isinstance(msg, HandedOver):
                for item in msg.items:
                    seq = _accept(item, loop)
                    loop.held[seq.id] = seq
                    backlog.append(seq)
            elif isinstance(msg, Cancel):
                seq = loop.held.get(msg.request_id)
                if seq is not None:  # else it finished already
                    if seq in backlog:
                        backlog.remove(seq)
                    loop.drop(seq, "abort")
            else:
                raise RuntimeError(f"decode worker: unexpected message {msg!r}")
        if closing(channel, loop):
            return
        while backlog and len(sch.running) < room:
            sch.add_running(backlog.popleft())
        if sch.has_work():
            loop.step()
        freed.flush()  # KV back to the prefill child before anything else
        loop.flush(channel.send, running_extra=len(backlog))


def _accept(item: Handed, loop: ChildLoop) -> OnlineSeq:
    h = item.handoff
    trace = RequestTrace(id=h.request_id, arrival_s=h.arrival_s, prompt_len=h.prompt_len,
                         max_new_tokens=h.max_new_tokens, prefill_start_s=h.prefill_start_s,
                         prefill_end_s=h.prefill_end_s, token_times_s=[h.prefill_end_s], output_ids=[h.first_token],
                         worker="decode")
    request = _HandedRequest(h.request_id, h.prompt_len, h.max_new_tokens, h.arrival_s)
    return OnlineSeq(request, trace, slot=h.slot, num_computed=h.prompt_len, blocks=list(h.blocks),  # type: ignore[arg-type]
                     params=item.params, ignore_eos=item.ignore_eos, min_tokens=item.min_tokens,
                     stop_ids=frozenset(item.stop_ids), eos_ids=loop.eos_ids, generator=rng_from(item.rng, loop.device),
                     sent=1, owner="decode")  # its first token went out from the prefill child


# ---- the parent ---------------------------------------------------------------------------------

class OnlineProcessSplit(ChildEngine):
    """The online split on two spawned children (``processes``), under MPS with ``mps``;
    see the module docstring. Arguments as ``OnlineEngine``'s; ``faults``: ``{"prefill" |
    "decode": Fault}``, each handed to its child (tests)."""

    mode = "split"

    def __init__(self, model, config: EngineConfig | None = None, *, split: SplitConfig, keep_steps: int | None = 10_000,
                 max_queued: int = MAX_QUEUED, ready_timeout_s: float = 600.0,
                 faults: dict[str, Fault | None] | None = None):
        config = self._setup(model, config, keep_steps, max_queued)
        if not isinstance(split, SplitConfig) or split.backend not in ("processes", "mps"):
            raise ConfigError(f"OnlineProcessSplit runs SplitConfig backends 'processes' and 'mps'; got {split!r}")
        model.require_engine_support("split")
        faults = dict(faults or {})
        check_backend_here(split, torch.device(model.device))  # mps: a GPU and the MPS control binary
        self.split = split
        queues = {}

        def build(group):
            queues["handoff"], queues["inbox"] = group.queue(), group.queue()  # the group releases them
            return [("prefill", online_prefill_main, (worker_model_args(model), config, split, queues["handoff"],
                                                      queues["inbox"], faults.get("prefill"))),
                    ("decode", online_decode_main, (config, split, queues["handoff"], queues["inbox"],
                                                    faults.get("decode")))]

        shares = {"prefill": split.prefill_share, "decode": split.decode_share} if split.backend == "mps" else None
        self.session = ProcessSession(
            model, build, label=f"online split {split.backend}", owner="prefill",
            how=("the processes / mps backends load the model by (spec, device, dtype, seed) in their own "
                 "process: pass an unmodified model, or use backend='streams'"),
            close_order=["decode", "prefill"],  # the decode child lets go of the shared memory first
            ready_timeout_s=ready_timeout_s, stall_timeout_s=split.stall_timeout_s, mps_shares=shares)
        self._inbox = queues.pop("inbox")
        queues.clear()
        self._start_or_close("prefill", ["prefill", "decode"])

    def facts(self):
        return {**super().facts(), "backend": self.split.backend}

    def _target(self, rid: int) -> str:
        return "prefill"

    def _send(self, target: str, msg) -> None:
        self._inbox.put(msg)  # the prefill child's one inbox; it forwards what it handed over

    def _wake_to_close(self) -> None:
        self._inbox.put(Close())

    def _closed(self) -> None:
        self._inbox = None  # the group closed it: nothing may keep its semaphores alive
