"""Measure the step times an SM policy predicts from: decode and prefill on green partitions.

``measure_sm_profile(model)`` builds the engine once, then for each decode SM count makes a
disjoint green split (decode first, prefill the rest), captures the decode graphs on the
decode partition's stream, and times on the real engine path (``decode_step`` with its host
sync, eager ``prefill``):

- a decode step per (SMs, batch, context), alone and while a prefill loop runs on the other
  partition (what a token gap sees: SMs are split, memory bandwidth and L2 are not);
- a prefill step per (SMs, prompt tokens) on the prefill partition, and both on the whole GPU.

KV contents are whatever the pool holds: step times do not depend on the values.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any, Sequence

import torch

from splitlab.config import EngineConfig
from splitlab.engine.loop import build_engine
from splitlab.engine.runner import ModelRunner
from splitlab.errors import ConfigError, ModeError
from splitlab.modes.split.policy import SMProfile

PROMPT_LEN = 1024  # prefill steps are made of prompts of this many tokens


def _sync() -> None:
    torch.cuda.synchronize()


def _time_decode(runner: ModelRunner, batch: int, context: int, reps: int) -> float:
    slots, tokens, positions = list(range(batch)), [1] * batch, [context] * batch
    for _ in range(3):
        runner.decode_step(slots, tokens, positions)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        runner.decode_step(slots, tokens, positions)  # returns after its host sync
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _prefill_chunks(tokens: int) -> list[tuple[int, list[int], int]]:
    n = max(1, tokens // PROMPT_LEN)
    length = min(tokens, PROMPT_LEN)
    return [(i, [1] * length, 0) for i in range(n)]


def _time_prefill(runner: ModelRunner, tokens: int, reps: int) -> float:
    chunks = _prefill_chunks(tokens)
    runner.prefill(chunks)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        runner.prefill(chunks)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _PrefillLoad:
    """Prefill steps back to back on ``stream`` in a thread, while decode is timed."""

    def __init__(self, runner: ModelRunner, stream, tokens: int):
        self.runner, self.stream, self.chunks = runner, stream, _prefill_chunks(tokens)
        self.stop = threading.Event()
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else torch.cuda.stream(torch.cuda.Stream())
        with ctx:
            while not self.stop.is_set():
                self.runner.prefill(self.chunks)
                self.steps += 1

    def __enter__(self) -> "_PrefillLoad":
        self.thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def measure_sm_profile(model, decode_sms: Sequence[int] = (16, 32, 48, 64, 96), batches: Sequence[int] = (1, 8, 32, 64),
                       contexts: Sequence[int] = (512, 2048), prefill_tokens: Sequence[int] = (1024, 4096),
                       corun_tokens: int = 4096, reps: int = 10, progress: bool = True) -> SMProfile:
    """Time decode and prefill steps of ``model`` (a ``LoadedModel`` on CUDA) on each green split
    of ``decode_sms`` decode SMs and on the whole GPU; return the ``SMProfile``."""
    from tqdm.auto import tqdm

    from splitlab.system import green

    device = torch.device(model.device)
    if device.type != "cuda":
        raise ModeError("an SM profile is measured on a CUDA GPU with green contexts")
    if not decode_sms or not batches or not contexts:
        raise ConfigError("give at least one decode SM count, batch and context")
    total = int(torch.cuda.get_device_properties(device).multi_processor_count)
    max_batch = max(max(batches), max(prefill_tokens + (corun_tokens,)) // PROMPT_LEN)
    config = EngineConfig(max_seq_len=max(max(contexts), PROMPT_LEN) + 64, num_slots=max_batch, max_batch=max_batch,
                          chunk_size=max_batch + 64)
    started = time.perf_counter()
    parts = build_engine(model, config)
    prefill_runner = parts.runner
    arch, weights = prefill_runner.export()
    decode_s: dict[tuple[int, int, int], float] = {}
    corun_s: dict[tuple[int, int, int], float] = {}
    prefill_s: dict[tuple[int, int], float] = {}
    capture_s: dict[int, float] = {}
    splits = [(total, None)] + [(d, green.split_sms((d, total - d), device=device.index or 0)) for d in decode_sms]
    bar = tqdm(total=len(splits), desc="SM profile", disable=not progress)
    chosen_variant = None
    for sms, part in splits:
        dec_stream = part.streams[0] if part is not None else torch.cuda.Stream(device)
        pre_stream = part.streams[1] if part is not None else None
        cfg = config if chosen_variant is None else config.replace(decode_variant=chosen_variant)
        runner = ModelRunner.for_config(arch, weights, parts.kv, cfg)
        runner.capture_stream = dec_stream
        if part is not None and hasattr(runner.kernels, "sm_count"):
            runner.kernels.sm_count = int(part.sm_counts[0])
        real = int(part.sm_counts[0]) if part is not None else total
        t = time.perf_counter()
        with torch.cuda.stream(dec_stream):
            runner.capture_graphs()
            _sync()
        capture_s[real] = time.perf_counter() - t
        chosen_variant = chosen_variant or runner.decode_variant
        with torch.cuda.stream(dec_stream):
            for b in batches:
                for c in contexts:
                    decode_s[(real, b, c)] = _time_decode(runner, b, c, reps)
        pre_sms = int(part.sm_counts[1]) if part is not None else total
        ctx = torch.cuda.stream(pre_stream) if pre_stream is not None else torch.cuda.stream(torch.cuda.current_stream())
        with ctx:
            for n in prefill_tokens:
                prefill_s[(pre_sms, n)] = _time_prefill(prefill_runner, n, max(3, reps // 3))
            _sync()
        if part is not None:  # decode beside a running prefill on the other partition
            with _PrefillLoad(prefill_runner, pre_stream, corun_tokens), torch.cuda.stream(dec_stream):
                for b in batches:
                    for c in contexts:
                        corun_s[(real, b, c)] = _time_decode(runner, b, c, reps)
            _sync()
        del runner
        bar.update(1)
    bar.close()
    facts: dict[str, Any] = {"model": model.spec, "dtype": str(prefill_runner.dtype).replace("torch.", ""),
                             "decode_variant": chosen_variant, "prompt_len": PROMPT_LEN, "reps": reps,
                             "corun_tokens": corun_tokens, "graph_capture_s": capture_s,
                             "gpu": torch.cuda.get_device_name(device),
                             "measure_s": time.perf_counter() - started}
    return SMProfile(total, decode_s, prefill_s, corun_s, facts)
