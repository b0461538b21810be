"""What every co-location backend shares: the prefill and decode loops, warm-up, the fault hook.

The loops are written once, against small callables for their transport, so threads
(``queue.Queue``) and processes (``torch.multiprocessing`` queues) run the same code:

- ``prefill_loop``: feeds arrived requests (never before their ``arrival_s``) to a
  ``PrefillWorker``, runs batched prefill steps straight into KV slots, and hands every
  prefilled sequence over as a ``Handoff`` (slot, prompt length, first token). Slots come
  from its own ``SlotAllocator``; slots the decode side freed come back through
  ``wait_freed``. When it has nothing to run it blocks on that freed-slot channel until a
  slot frees or the next request arrives, whichever is first.
- ``decode_loop``: accepts handoffs, runs decode steps over everything handed over
  (continuous batching), and returns the slots of finished sequences through a
  ``FreedSlots`` proxy (the decode side never allocates). It ends after the prefill side's
  end marker, once its batch is empty.

No KV byte moves in a handoff: both workers address the same pool, and a handoff is sent
only after the host sync that returned the prefill step's tokens, which orders the KV
writes (on the prefill worker's stream or process) before the decode worker's first read.
Likewise a slot is freed only after the decode step that finished it returned its tokens.

Test hook (documented, off unless set): ``SPLITLAB_FAULT="<worker>:<action>:<n>"`` makes
the worker named ``<worker>`` (``prefill``, ``decode``, ``replica-0``, ...) fail right after
its ``n``-th step: ``raise`` raises ``RuntimeError``, ``exit`` calls ``os._exit(3)`` (no
message), ``kill`` sends itself SIGKILL. Several entries are separated by commas.
Children inherit the variable when they are spawned.
"""

from __future__ import annotations

import collections
import os
import signal
import time
from typing import Any, Callable, Iterable, Sequence

import torch

from splitlab.errors import ConfigError
from splitlab.engine.kv import KVPool
from splitlab.engine.runner import ModelRunner
from splitlab.engine.scheduler import SeqState
from splitlab.engine.loop import DecodeWorker, Handoff, PrefillWorker

FAULT_ENV = "SPLITLAB_FAULT"
FAULT_ACTIONS = ("raise", "exit", "kill")


class Stopped(Exception):
    """A worker loop was asked to stop (the other worker failed, or Ctrl-C)."""


# ---- the fault hook (tests) -----------------------------------------------------------------------

def fault_hook(worker: str, spec: str | None = None) -> Callable[[int], None] | None:
    """The test hook of ``worker`` from ``SPLITLAB_FAULT`` (or ``spec``); None when unset."""
    spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
    if not spec.strip():
        return None
    for entry in spec.split(","):
        parts = entry.strip().split(":")
        if len(parts) != 3 or parts[1] not in FAULT_ACTIONS or not parts[2].isdigit():
            raise ConfigError(
                f"{FAULT_ENV}={spec!r}: each entry must be '<worker>:<action>:<steps>' with action one of "
                f"{', '.join(FAULT_ACTIONS)}, e.g. 'decode:raise:3'"
            )
        name, action, n = parts[0], parts[1], int(parts[2])
        if name != worker:
            continue

        def fire(step: int, _action=action, _n=n, _name=name) -> None:
            if step < _n:
                return
            if _action == "raise":
                raise RuntimeError(f"{FAULT_ENV}: injected failure in worker {_name} after step {step}")
            if _action == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGKILL)

        return fire
    return None


# ---- slots freed by the decode side ---------------------------------------------------------------

class FreedSlots:
    """The decode side's allocator: ``free(slot)`` collects, ``flush()`` sends the slots back
    to the prefill side's allocator through ``send(list_of_slots)``. It never allocates."""

    def __init__(self, send: Callable[[list[int]], None]):
        self._send = send
        self._pending: list[int] = []

    def alloc(self) -> int | None:
        raise RuntimeError("the decode worker never allocates slots; the prefill worker owns the allocator")

    def free(self, slot: int) -> None:
        self._pending.append(int(slot))

    def flush(self) -> None:
        if self._pending:
            slots, self._pending = self._pending, []
            self._send(slots)

    @property
    def num_free(self) -> int:
        return 0


# ---- the loops ------------------------------------------------------------------------------------

def prefill_loop(worker: PrefillWorker, allocator, requests: Iterable, clock: Callable[[], float], *,
                 hand_off: Callable[[list[tuple[Handoff, SeqState]]], None],
                 wait_freed: Callable[[float], list[int]],
                 on_step: Callable[[Any, Any], None] | None = None,
                 stop: Callable[[], bool] | None = None,
                 fault: Callable[[int], None] | None = None,
                 poll_s: float = 0.02) -> dict[int, SeqState]:
    """Prefill every request of ``requests`` as it arrives; return their states by id.

    ``hand_off(pairs)``: the step's handoffs with their sequence states (a thread backend
    passes the states' traces on; a process backend sends the handoffs alone).
    ``wait_freed(timeout)``: slots the decode side freed, waiting up to ``timeout`` seconds
    for at least one (0: just look). ``on_step(step_trace, outcome)``: after each step.
    """
    pending = collections.deque(sorted(requests, key=lambda r: (r.arrival_s, r.id)))
    seqs = {r.id: SeqState.new(r, worker.name) for r in pending}
    left = len(seqs)
    steps = 0
    while left:
        if stop is not None and stop():
            raise Stopped
        for slot in wait_freed(0.0):
            allocator.free(slot)
        now = clock()
        while pending and pending[0].arrival_s <= now:
            worker.add(seqs[pending.popleft().id])
        handoffs, outcome = worker.step_handoffs()
        if outcome is None:
            # Nothing runnable: requests wait for a slot, or none has arrived. Sleep on the
            # freed-slot channel until a slot frees, the next arrival, or poll_s.
            timeout = poll_s
            if pending:
                timeout = min(timeout, max(0.0, pending[0].arrival_s - clock()))
            for slot in wait_freed(timeout):
                allocator.free(slot)
            continue
        left -= len(outcome.prefilled)
        if handoffs:
            hand_off([(h, seqs[h.request_id]) for h in handoffs])
        if on_step is not None:
            on_step(worker.steps[-1], outcome)
        steps += 1
        if fault is not None:
            fault(steps)
    return seqs


def decode_loop(worker: DecodeWorker, freed: FreedSlots, *,
                receive: Callable[[float], tuple[list[tuple[Handoff, Any]], bool]],
                on_step: Callable[[Any, Any, dict[int, SeqState]], None] | None = None,
                stop: Callable[[], bool] | None = None,
                fault: Callable[[int], None] | None = None,
                poll_s: float = 0.02) -> dict[int, SeqState]:
    """Decode everything handed over until the end marker came and the batch is empty.

    ``receive(timeout)``: ``(pairs, ended)``, the handoffs that came (each with the
    request's trace, or None to make one from the handoff) and whether the prefill side's
    end marker came; it waits up to ``timeout`` for the first (0: just look).
    ``on_step(step_trace, outcome, seqs_by_id)``: after each step.
    """
    seqs: dict[int, SeqState] = {}
    ended = False
    steps = 0
    while True:
        if stop is not None and stop():
            raise Stopped
        busy = worker.scheduler.has_work()
        pairs, end = receive(0.0 if busy else poll_s)
        for handoff, trace in pairs:
            seqs[handoff.request_id] = worker.accept(handoff, trace)
        ended = ended or end
        if worker.scheduler.has_work():
            outcome = worker.step()
            freed.flush()  # slots back to the prefill side before anything else
            if on_step is not None:
                on_step(worker.steps[-1], outcome, seqs)
            steps += 1
            if fault is not None:
                fault(steps)
        elif ended:
            return seqs


# ---- the runner of a worker -----------------------------------------------------------------------

def decode_runner(arch: dict[str, Any], weights: dict[str, torch.Tensor], kv: KVPool, config, max_batch: int
                  ) -> ModelRunner:
    """A runner over shared weights and a shared KV pool, with the engine options of ``config``."""
    return ModelRunner.for_config(arch, weights, kv, config, max_batch=max_batch)


# ---- facts a run records ----------------------------------------------------------------------------

def check_same_model(model, info: dict[str, Any], who: str, how: str) -> None:
    """Refuse to run when the process ``who`` loaded other shapes or weights than ``model``.

    Worker processes load the model themselves by (spec, device, dtype, seed) and report its
    facts and a weight fingerprint in ``info``; ``how`` says what to do instead.
    """
    if info.get("facts") != model.facts.to_dict():
        raise ConfigError(f"{who} loaded {model.spec!r} with other shapes than the model passed in; {how}")
    mine = weight_fingerprint(model.model)
    if mine is not None and info.get("fingerprint") != mine:
        raise ConfigError(
            f"the weights {who} loaded for {model.spec!r} (seed {model.seed}) differ from those of the model "
            f"passed in (were they changed after load_model?); {how}"
        )


def weight_fingerprint(hf_model) -> list[float] | None:
    """A few sums over slices of the first, middle and last parameters (float64 on CPU):
    equal for the same weights on the same device and dtype, so a child that loaded the
    model by spec can be checked against the model the caller passed. None on ``meta``."""
    params = [p for _, p in hf_model.named_parameters()]
    if not params or any(p.is_meta for p in params[:1]):
        return None
    picks = [params[0], params[len(params) // 2], params[-1]]
    out: list[float] = []
    with torch.no_grad():
        for p in picks:
            flat = p.detach().reshape(-1)[:4096].to("cpu", torch.float64)
            out.extend([float(flat.sum()), float(flat.abs().sum())])
    return out


def mapped_not_owned(tensors, device: torch.device) -> bool:
    """True when ``tensors`` (just received from another process) are mapped, not copied:
    on CPU every one lives in shared memory; on CUDA this process's allocator holds less
    than half their bytes (CUDA IPC mappings are not this process's allocations). Call it
    right after receiving them, before allocating anything else."""
    tensors = list(tensors)
    if torch.device(device).type == "cpu":
        return all(t.is_shared() for t in tensors)
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return int(torch.cuda.memory_allocated(device)) < total / 2


def peak_bytes(device: torch.device) -> int | None:
    if torch.device(device).type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))


def reset_peak(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def cpu_threads_per_worker(workers: int) -> None:
    """On CPU, give each of ``workers`` co-running processes its share of the cores."""
    n = max(1, (os.cpu_count() or 1) // max(1, workers))
    torch.set_num_threads(n)


def runner_facts(runner: ModelRunner, kv: KVPool) -> dict[str, Any]:
    return {
        "num_slots": kv.num_slots,
        "max_seq_len": kv.max_seq_len,
        "max_batch": runner.max_batch,
        "kernels": runner.kernels.name,
        "sdpa_backend": getattr(runner, "sdpa_backend", None),
        "decode_combine": getattr(runner.kernels, "combine", None),
        "cuda_graphs": runner.cuda_graphs,
        "device": str(runner.device),
        "dtype": str(runner.dtype).replace("torch.", ""),
        "kv_pool_bytes": kv.nbytes,
        "weight_bytes": runner.weight_bytes,
    }


def step_tuple(step) -> tuple:
    """A StepTrace as a plain tuple (cheap to pickle)."""
    return (step.worker, step.kind, step.start_s, step.end_s, list(step.request_ids), step.num_tokens)


class Outbox:
    """Batches a child's events to the parent: at most one message per ``flush_s``."""

    def __init__(self, send: Callable[[str, Any], None], kind: str, flush_s: float):
        self._send = send
        self.kind = kind
        self.flush_s = flush_s
        self.items: list[Any] = []
        self._last = time.perf_counter()

    def add(self, item: Any) -> None:
        self.items.append(item)
        if time.perf_counter() - self._last >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        if self.items:
            items, self.items = self.items, []
            self._send(self.kind, items)
        self._last = time.perf_counter()


def worker_model_args(model) -> dict[str, Any]:
    """What a worker process needs to load ``model`` itself: (spec, device, dtype, seed)."""
    return {"spec": model.spec, "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
            "seed": int(getattr(model, "seed", 0))}


def no_mps_env() -> dict[str, None]:
    """A worker environment that removes every ``CUDA_MPS_*`` variable of the caller, so no
    process joins an MPS daemon it was not asked to (a daemon's client_env adds them back)."""
    return {k: None for k in os.environ if k.startswith("CUDA_MPS_")}


def mps_clients(daemon, pids: dict[str, int], **extra: Any) -> dict[str, Any]:
    """What an MPS daemon reports while the workers run: its servers, their clients, and
    whether every worker is among them (recorded in the run; a mismatch warns)."""
    import warnings

    info: dict[str, Any] = {"pipe_dir": str(daemon.pipe_dir), **extra}
    try:
        servers = daemon.servers()
        clients = {s: daemon.clients(s) for s in servers}
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        info["query_error"] = str(exc)
        return info
    seen = {pid for listed in clients.values() for pid in listed}
    info["servers"] = servers
    info["clients"] = {str(k): v for k, v in clients.items()}
    info["workers_are_clients"] = {name: pid in seen for name, pid in pids.items()}
    if not all(info["workers_are_clients"].values()):
        warnings.warn(f"the MPS daemon does not list every worker as its client: {info}", stacklevel=3)
    return info


def round_robin(requests: Sequence, n: int) -> list[list]:
    """Requests (sorted by arrival) dealt to ``n`` workers in turn: worker i gets i, i+n, ..."""
    ordered = sorted(requests, key=lambda r: (r.arrival_s, r.id))
    return [ordered[i::n] for i in range(n)]
