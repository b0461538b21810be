"""What every online engine is checked with, in-process (tests/test_online.py) and over spawned
children (tests/test_online_processes.py): the engine config, the ragged requests, and the
scenarios whose answer does not depend on where the engine runs (greedy tokens equal
``generate()``'s while requests arrive, deltas, seeded sampling, stop ids, refused submits)."""

from __future__ import annotations

import random
import time

import pytest
from _oracle import hf_generate

from splitlab.config import EngineConfig
from splitlab.engine.online import SamplingParams
from splitlab.errors import ConfigError, WorkloadError

CONFIG = EngineConfig(max_seq_len=256, num_slots=4, max_batch=4, chunk_size=24, token_budget=64)
# a paged pool of 8 pages of 16 positions: four ragged requests outgrow it, so the scheduler
# preempts and recomputes while tokens stream out
PAGED = CONFIG.replace(num_slots=None, kv_block_size=16, num_pages=8)


def ragged(seed: int = 0, n: int = 10):
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, 260) for _ in range(rng.randrange(2, 50))] for _ in range(n)]
    return prompts, [rng.randrange(1, 13) for _ in range(n)]


def kv_empty(engine) -> bool:
    stats = engine.stats()
    return stats["kv_slots_in_use"] == 0 and stats["active"] == 0


def check_greedy_with_arrivals(engine, model, lead_s: float):
    """Five requests at one instant ``lead_s`` from now (more than the KV holds), five more
    while it runs: every output is ``generate()``'s, every trace in order. ``(handles, burst)``."""
    prompts, news = ragged()
    burst = engine.clock() + lead_s
    handles = [engine.submit(p, n, ignore_eos=True, arrival_s=burst) for p, n in zip(prompts[:5], news[:5])]
    time.sleep(lead_s + 0.05)
    for p, n in zip(prompts[5:], news[5:]):  # the rest while it runs
        handles.append(engine.submit(p, n, ignore_eos=True))
        time.sleep(0.01)
    for h, p, n in zip(handles, prompts, news):
        assert h.result(60) == hf_generate(model, p, n, min_new=n), f"request {h.id}"
        assert h.finish_reason == "length"
        t = h.trace
        assert len(t.token_times_s) == n and t.token_times_s == sorted(t.token_times_s)
        assert t.arrival_s <= t.prefill_start_s <= t.prefill_end_s == t.token_times_s[0]
    return handles, burst


def check_deltas_and_the_logits_path(engine, model, length: int | None = None) -> list:
    """Iterated deltas carry every token once; a seeded sampled request in the same batch makes
    the step take the logits path, where the greedy requests still get ``generate()``'s tokens.
    ``length``: every greedy request's (None: the ragged ones). The first request's deltas."""
    prompts, news = ragged(seed=1, n=3)
    news = news if length is None else [length] * len(prompts)
    sampled = engine.submit(prompts[0], 12, sampling=SamplingParams(temperature=1.0, seed=3), ignore_eos=True)
    handles = [engine.submit(p, n, ignore_eos=True) for p, n in zip(prompts, news)]
    deltas = list(handles[0])
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])
    assert [t for d in deltas for t in d.token_ids] == handles[0].output_ids
    assert [t for d in deltas for t in d.times_s] == handles[0].trace.token_times_s
    for h, p, n in zip(handles, prompts, news):
        assert h.result(60) == hf_generate(model, p, n, min_new=n)
    assert len(sampled.result(60)) == 12
    return deltas


def check_seeded_sampling_is_reproducible(engine) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=100, seed=1234)
    a = engine.submit([20, 21, 22], 16, sampling=params, ignore_eos=True).result(30)
    b = engine.submit([20, 21, 22], 16, sampling=params, ignore_eos=True).result(30)
    c = engine.submit([20, 21, 22], 16, sampling=SamplingParams(temperature=1.0, seed=4321),
                      ignore_eos=True).result(30)
    assert a == b
    assert a != c  # 16 draws from a near-uniform distribution over 260 ids


def check_stop_ids_and_min_tokens(engine, model) -> None:
    prompt = [30, 31, 32, 33]
    greedy = hf_generate(model, prompt, 10, min_new=10)
    stop = greedy[3]
    h = engine.submit(prompt, 10, ignore_eos=True, stop_ids=[stop])
    assert h.result(30) == greedy[:greedy.index(stop) + 1] and h.finish_reason == "stop"
    held = engine.submit(prompt, 10, ignore_eos=True, stop_ids=[stop], min_tokens=10)
    assert len(held.result(30)) == 10 and stop not in held.output_ids and held.finish_reason == "length"


def check_bad_submits_are_refused(engine) -> None:
    """Each bad request raises at ``submit``, before it reaches any worker."""
    with pytest.raises(WorkloadError, match="context"):
        engine.submit([5] * 200, 100)
    with pytest.raises(WorkloadError, match="vocabulary"):
        engine.submit([5, 999], 4)
    with pytest.raises(WorkloadError, match="empty prompt"):
        engine.submit([], 4)
    with pytest.raises(WorkloadError, match="max_new_tokens"):
        engine.submit([5], 0)
    with pytest.raises(ConfigError, match="min_tokens"):
        engine.submit([5], 4, min_tokens=5)
    with pytest.raises(ConfigError, match="stop_ids"):
        engine.submit([5], 4, stop_ids=[1000])
