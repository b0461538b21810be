"""The ``streams`` and ``green`` backends of ``split``: one process, two threads.

Both workers address one KV pool and one copy of the weights, through two ``ModelRunner``
objects (so they never share a scratch buffer: the prefill runner only runs eager
prefills, the decode runner owns the CUDA graphs and their static inputs).

- ``streams``: on CUDA, each thread runs on its own ``torch.cuda.Stream`` (the decode stream
  at the highest priority when ``high_priority_decode``); on CPU, plain threads.
- ``green``: each thread runs on the stream of its own green context; the two contexts hold
  disjoint SM sets (``splitlab.system.green.split_sms``). The decode graphs are captured
  on the decode context's stream, so the captured kernels belong to its SMs.

Ordering without events: a prefill step ends with ``.tolist()`` of its tokens, a host sync
of the prefill stream that returns only after every kernel before it (the KV writes
included) finished; only then is the handoff queued, so the decode stream's first read of
that slot comes after the writes. A slot is freed after the decode step that finished its
sequence returned its tokens (a sync of the decode stream), so the prefill stream never
overwrites KV that a queued decode kernel still reads.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import torch

from splitlab.config import EngineConfig, SplitConfig
from splitlab.errors import ModeError, WorkerError
from splitlab.engine.kv import SlotAllocator
from splitlab.engine.loop import DecodeWorker, PrefillWorker, build_engine
from splitlab.engine.warmup import warm_up
from splitlab.modes.common import (FreedSlots, Stopped, decode_loop, decode_runner, fault_hook, peak_bytes, prefill_loop, reset_peak, runner_facts)

_END = object()
GREEN_HINT = ("split backend green needs an NVIDIA GPU with green contexts (CUDA 12.4+ driver, cuda-python); "
              "use backend='processes' or 'streams'")

# Green contexts are never destroyed (a stream made on one dies with it: FACTS.md section 3),
# so a partition is made once per (device, SM split, priorities) and reused by every session
# of this process: the one piece of module-level state here, on purpose.
_GREEN_PARTITIONS: dict[tuple, Any] = {}
_GREEN_LOCK = threading.Lock()


def green_partition(device: torch.device, prefill_sms: int | None, high_priority_decode: bool):
    """``(partition, prefill_sms, decode_sms)``: disjoint green contexts, prefill first."""
    from splitlab.system import green

    if device.type != "cuda" or not torch.cuda.is_available():
        raise ModeError(GREEN_HINT)
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    total = int(props.multi_processor_count)
    gran = green.sm_granularity((props.major, props.minor))
    if prefill_sms is None:
        prefill_sms = max(gran, (total // 2) // gran * gran)
    first, second = green.plan_split((prefill_sms, gran), total, gran)
    priority = -1 if high_priority_decode else 0
    key = (index, first, second, priority)
    with _GREEN_LOCK:
        if key not in _GREEN_PARTITIONS:
            _GREEN_PARTITIONS[key] = green.split_sms((prefill_sms, second), device=index, priorities=(0, priority))
        part = _GREEN_PARTITIONS[key]
    return part, int(part.sm_counts[0]), int(part.sm_counts[1])


def _stream_ctx(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


class ThreadSplit:
    """A built engine (one KV pool, a prefill runner and a decode runner with its CUDA graphs)
    that serves runs with two threads; see the module docstring."""

    def __init__(self, model, config: EngineConfig, split: SplitConfig):
        self.model = model
        self.config = config
        self.split = split
        self.device = torch.device(model.device)
        cuda = self.device.type == "cuda"
        self.green: dict[str, Any] | None = None
        prefill_stream = decode_stream = None
        if split.backend == "green":
            part, p_sms, d_sms = green_partition(self.device, split.prefill_sms, split.high_priority_decode)
            prefill_stream, decode_stream = part.streams
            self.green = {**part.to_dict(), "prefill_sms": p_sms, "decode_sms": d_sms}
        elif cuda:
            prefill_stream = torch.cuda.Stream(self.device)
            decode_stream = torch.cuda.Stream(self.device, priority=-1 if split.high_priority_decode else 0)
        self.streams = (prefill_stream, decode_stream)
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        parts = build_engine(model, config)
        self.kv = parts.kv
        self.prefill_runner = parts.runner
        arch, weights = parts.runner.export()
        self.decode_runner = decode_runner(arch, weights, parts.kv, config, parts.runner.max_batch)
        if self.green is not None:
            self.decode_runner.capture_stream = decode_stream
            for runner, sms in ((self.prefill_runner, self.green["prefill_sms"]),
                                (self.decode_runner, self.green["decode_sms"])):
                if hasattr(runner.kernels, "sm_count"):  # split-K decode attention sizes its grid by it
                    runner.kernels.sm_count = sms
        # One long-lived thread per worker, kept across runs: cuDNN keeps its attention plans
        # per thread, and cuBLAS its handles per (thread, stream), so what warm-up builds on
        # these threads is what the runs use.
        self.pools = {name: ThreadPoolExecutor(1, thread_name_prefix=f"splitlab-{name}")
                      for name in ("prefill", "decode")}
        self.graphs: list[int] = []
        if config.warmup:
            # one after the other: a graph capture must not overlap the other stream's work
            self.graphs = self.pools["decode"].submit(self._on_stream, decode_stream, warm_up,
                                                      self.decode_runner, prefill=False).result()
            self.pools["prefill"].submit(self._on_stream, prefill_stream, warm_up, self.prefill_runner,
                                         decode=False, token_budget=config.token_budget).result()
        self.runs = 0

    @staticmethod
    def _on_stream(stream, fn, *args, **kwargs):
        with _stream_ctx(stream):
            return fn(*args, **kwargs)

    def facts(self) -> dict[str, Any]:
        out = runner_facts(self.prefill_runner, self.kv)
        out["decode_graphs"] = self.graphs
        out["decode_stream_priority"] = (self.streams[1].priority if self.streams[1] is not None
                                         and hasattr(self.streams[1], "priority") else None)
        return out

    def run(self, workload, progress: bool = True) -> dict[str, Any]:
        from tqdm.auto import tqdm

        split, config = self.split, self.config
        prefill_stream, decode_stream = self.streams
        self.runs += 1
        t0_box = [0.0]

        def clock() -> float:
            return time.perf_counter() - t0_box[0]

        allocator = SlotAllocator(self.kv.num_slots)
        hand_q: queue.Queue = queue.Queue()
        freed_q: queue.Queue = queue.Queue()
        pre = PrefillWorker(self.prefill_runner, allocator, config, clock)
        freed = FreedSlots(freed_q.put)
        dec = DecodeWorker(self.decode_runner, freed, config, clock)
        stop = threading.Event()
        go = threading.Event()
        ready = {"prefill": threading.Event(), "decode": threading.Event()}
        errors: list[tuple[str, BaseException, str]] = []
        results: dict[str, Any] = {}
        tokens = {"prefill": 0, "decode": 0}

        def wait_freed(timeout: float) -> list[int]:
            out: list[int] = []
            try:
                out.extend(freed_q.get(timeout=timeout) if timeout > 0 else freed_q.get_nowait())
                while True:
                    out.extend(freed_q.get_nowait())
            except queue.Empty:
                pass
            return out

        def receive(timeout: float):
            pairs, ended = [], False
            try:
                item = hand_q.get(timeout=timeout) if timeout > 0 else hand_q.get_nowait()
                while True:
                    if item is _END:
                        ended = True
                    else:
                        pairs.extend((h, seq.trace) for h, seq in item)
                    item = hand_q.get_nowait()
            except queue.Empty:
                pass
            return pairs, ended

        def wait_go() -> None:
            while not go.wait(0.05):
                if stop.is_set():
                    raise Stopped

        def count(name):
            def on_step(step, outcome, *_):
                tokens[name] += outcome.num_new_tokens
            return on_step

        def prefill_main() -> None:
            with _stream_ctx(prefill_stream):
                # this thread's library handles and workspaces on this stream, before t0
                self.prefill_runner.prefill([(0, [1] * 4, 0)])
                _sync(self.device)
                ready["prefill"].set()
                wait_go()
                results["prefill"] = prefill_loop(
                    pre, allocator, workload.requests, clock, hand_off=hand_q.put, wait_freed=wait_freed,
                    on_step=count("prefill"), stop=stop.is_set, fault=fault_hook("prefill"), poll_s=split.poll_s)
                hand_q.put(_END)

        def decode_main() -> None:
            with _stream_ctx(decode_stream):
                last = self.kv.num_slots - 1
                self.decode_runner.decode_step([last], [1], [0])
                _sync(self.device)
                ready["decode"].set()
                wait_go()
                results["decode"] = decode_loop(
                    dec, freed, receive=receive, on_step=count("decode"), stop=stop.is_set,
                    fault=fault_hook("decode"), poll_s=split.poll_s)

        def guarded(name, fn):
            def body() -> None:
                try:
                    fn()
                except Stopped:
                    pass
                except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                    errors.append((name, exc, traceback.format_exc()))
                    stop.set()
            return body

        bar = None
        futures = []
        try:
            futures = [self.pools[n].submit(guarded(n, f)) for n, f in (("prefill", prefill_main),
                                                                        ("decode", decode_main))]
            deadline = time.monotonic() + split.ready_timeout_s
            while not all(e.is_set() for e in ready.values()):
                _raise_first(errors)
                if all(f.done() for f in futures) or time.monotonic() > deadline:
                    _raise_first(errors)
                    raise WorkerError("the split worker threads did not get ready")
                time.sleep(0.01)
            reset_peak(self.device)
            bar = tqdm(total=workload.total_output_tokens, unit="tok", desc=f"split {split.backend}",
                       disable=not progress, leave=False)
            t0_box[0] = time.perf_counter()
            go.set()
            shown = 0
            while not all(f.done() for f in futures):
                wait(futures, timeout=0.1)
                _raise_first(errors)
                now = tokens["prefill"] + tokens["decode"]
                bar.update(now - shown)
                shown = now
            _raise_first(errors)
        except BaseException:
            stop.set()
            wait(futures, timeout=30.0)
            raise
        finally:
            if bar is not None:
                bar.close()
        seqs = results["prefill"]
        for s in seqs.values():
            s.trace.worker = "split"
        steps = sorted(pre.steps + dec.steps, key=lambda s: (s.start_s, s.worker))
        peak = peak_bytes(self.device)
        return {
            "traces": [seqs[r.id].trace for r in workload],
            "steps": steps,
            "memory": {"peak_bytes": peak, "per_worker": {"process": peak}},
        }

    def close(self) -> None:
        for pool in getattr(self, "pools", {}).values():
            pool.shutdown(wait=True, cancel_futures=True)
        self.pools = {}
        self.prefill_runner = self.decode_runner = None  # graphs and buffers go with them
        self.kv = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _raise_first(errors) -> None:
    if errors:
        name, exc, tb = errors[0]
        raise WorkerError(f"worker {name} failed: {exc.__class__.__name__}: {exc}\n{tb}") from exc

