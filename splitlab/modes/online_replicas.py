"""``splitlab.online_engine(model, "replicas", config, replicas=ReplicaConfig(...))``: the ``replicas``
mode's N spawned engines as one online engine.

Start-up is the offline mode's (``splitlab.modes.replicas``): replica 0 loads the model by
(spec, device, dtype, seed) and shares its weights with the others (CUDA IPC on GPU, shared
memory on CPU); each replica builds its own KV pool of 1/N of the budget and warms up; with
``mps=True`` they are clients of a private MPS daemon. Each replica then runs the online
engine's step loop (an ``OnlineWorker`` over a ``serial`` or ``chunked`` scheduler) on the
requests it is given, so sampling and the stop rules are the in-process engine's.

Data flow: the parent sends each request (``Submit``, through the replica's command channel,
on which an idle replica blocks) to the replica with the fewest requests in flight (the
lowest index on a tie); that replica alone makes its tokens, one ``Tokens`` message per step
to the parent, and ``Cancel`` goes to it. ``stats()`` sums the replicas' queues and pools.
"""

from __future__ import annotations

import collections

import torch

from splitlab.config import EngineConfig
from splitlab.engine.kv import new_allocator
from splitlab.engine.online import MAX_QUEUED
from splitlab.engine.scheduler import Scheduler
from splitlab.errors import ConfigError
from splitlab.modes.common import worker_model_args
from splitlab.modes.online_child import (IDLE_S, Cancel, ChildLoop, StartClock, Submit, online_worker,
                                         wait_go)
from splitlab.modes.online_parent import ChildEngine
from splitlab.modes.replicas import (ReplicaConfig, _check_mps_here, engine_runner, replica_weights, say_bye,
                                     wait_byes)
from splitlab.modes.session import Close, ProcessSession, Ready


def online_replica_main(channel, index: int, n: int, model_args, options: ReplicaConfig, config: EngineConfig,
                        share_q, bye_q) -> None:
    device, loaded, shared, owner, facts = replica_weights(channel, index, n, model_args, options, config, share_q)
    runner, more = engine_runner(shared, device, config)
    del shared
    facts.update(more, eos_token_ids=list(runner.arch.get("eos_token_ids") or ()))
    clock = StartClock()
    scheduler = Scheduler(options.engine, new_allocator(runner.kv, config), runner.max_batch, config.token_budget,
                          config.chunk_size)  # before Ready: a config it refuses fails the start
    loop = ChildLoop(online_worker(channel.name, runner, scheduler, clock), facts["eos_token_ids"], device)
    channel.send(Ready(facts, **owner))
    try:
        if wait_go(channel, clock):
            _serve(channel, loop)
    finally:
        runner = scheduler = loop = None  # noqa: F841
        if index != 0:
            loaded = None  # noqa: F841 - its mapped weights go before the bye
            say_bye(index, device, bye_q)  # let go of replica 0's weights
    if index == 0:
        wait_byes(channel, bye_q, n - 1)


def _serve(channel, loop: ChildLoop) -> None:
    """Until ``Close``: requests in (blocking on the channel when idle), steps, tokens out."""
    busy, wait = False, None
    while True:
        msg = channel.recv(timeout=0.0 if busy else min(IDLE_S, IDLE_S if wait is None else wait))
        while msg is not None:
            if isinstance(msg, Submit):
                loop.submit(msg)
            elif isinstance(msg, Cancel):
                loop.cancel(msg.request_id)  # False: it ended already
            elif isinstance(msg, Close):
                return
            else:
                raise RuntimeError(f"worker {channel.name}: unexpected command {msg!r}")
            msg = channel.recv(timeout=0)
        outcome, wait = loop.turn()
        busy = outcome is not None
        loop.flush(channel.send)


class OnlineReplicas(ChildEngine):
    """N engine replicas as one online engine; see the module docstring. ``replicas``: a
    ``ReplicaConfig`` (None: the default, 2 serial replicas); other arguments as
    ``OnlineEngine``'s."""

    mode = "replicas"
    page_headroom = 1  # a serial / chunked engine keeps a page to grow into

    def __init__(self, model, config: EngineConfig | None = None, *, replicas: ReplicaConfig | None = None,
                 keep_steps: int | None = 10_000, max_queued: int = MAX_QUEUED, ready_timeout_s: float = 600.0):
        config = self._setup(model, config, keep_steps, max_queued)
        options = replicas if replicas is not None else ReplicaConfig()
        if not isinstance(options, ReplicaConfig):
            raise ConfigError(f"replicas must be a splitlab.modes.replicas.ReplicaConfig, got {type(options).__name__}")
        if options.engine == "generate":
            raise ConfigError("online replicas run engine='serial' or 'chunked'; 'generate' serves static batches "
                              "of a whole workload and is offline only (splitlab.run(..., mode='replicas'))")
        model.require_engine_support("replicas")
        if options.mps:
            _check_mps_here(torch.device(model.device))
        self.options = options
        self.names = [f"replica-{i}" for i in range(options.num_replicas)]
        self._load: collections.Counter = collections.Counter({name: 0 for name in self.names})

        def build(group):
            share_q, bye_q = group.queue(), group.queue()  # the group owns them and releases them
            args = worker_model_args(model)
            return [(name, online_replica_main, (i, options.num_replicas, args, options, config, share_q, bye_q))
                    for i, name in enumerate(self.names)]

        self.session = ProcessSession(
            model, build, label=f"online replicas x{options.num_replicas}", owner=self.names[0],
            how="replicas load the model by (spec, device, dtype, seed) in their own processes",
            close_order=list(reversed(self.names)),  # replica 0, the owner of the weights, last
            ready_timeout_s=ready_timeout_s, stall_timeout_s=options.stall_timeout_s,
            mps_shares={name: None for name in self.names} if options.mps else None)
        self._start_or_close(self.names[0], self.names)

    def _target(self, rid: int) -> str:
        name = min(self.names, key=lambda n: (self._load[n], self.names.index(n)))
        self._load[name] += 1
        return name

    def _end(self, rid: int):
        name = self._owner.get(rid)
        if name is not None:
            self._load[name] -= 1
        return super()._end(rid)
