"""The process-backed online engines: ``split`` on ``processes`` (two spawned children, KV
handed over as slots or page ids) and ``replicas`` (N spawned engines, each request routed
to one).

Greedy tokens must equal HF ``generate()``'s (fp32 on CPU) as in the in-process engine:
``min_new_tokens=n`` with EOS masked, and up to and including EOS where it may stop
(SmolLM2). Deltas stream; cancelling frees the KV (stats back to empty); seeded sampling is
reproducible (the generator's state crosses the handoff); a future ``arrival_s`` waits;
closing with requests in flight aborts them and leaves no process, /dev/shm entry or temp
folder; a killed child fails every open handle with ``error``.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from _colocation import assert_clean, snapshot, wait_until
from _online_checks import (CONFIG, PAGED, check_bad_submits_are_refused, check_deltas_and_the_logits_path,
                            check_greedy_with_arrivals, check_seeded_sampling_is_reproducible,
                            check_stop_ids_and_min_tokens, kv_empty, ragged)
from _oracle import hf_generate

from splitlab.config import EngineConfig, SplitConfig
from splitlab import online_engine
from splitlab.engine.online import SamplingParams
from splitlab.errors import ConfigError, ModeError, WorkerError, WorkloadError
from splitlab.modes.online_replicas import OnlineReplicas
from splitlab.modes.replicas import ReplicaConfig
from splitlab.modes.split.online_processes import OnlineProcessSplit

pytestmark = pytest.mark.timeout(300)

PROCESSES = SplitConfig(backend="processes")
REPLICAS = ReplicaConfig(num_replicas=2, engine="chunked")


def start(model, kind: str, config: EngineConfig = CONFIG):
    if kind == "replicas":
        return online_engine(model, "replicas", config, replicas=REPLICAS)
    return online_engine(model, "split", config, split=PROCESSES)


# ---- start, close, failure (first: no module-scoped engine is alive while they look for leftovers) ----

@pytest.mark.parametrize("kind", ["split", "replicas"])
def test_close_with_requests_in_flight_aborts_them_and_leaves_nothing(tiny, kind):
    before = snapshot()
    eng = start(tiny, kind)
    running = [eng.submit([40 + i, 41], 250 - 2, ignore_eos=True) for i in range(3)]
    future = eng.submit([50, 51], 4, ignore_eos=True, arrival_s=eng.clock() + 60)
    for h in running:
        next(iter(h))
    children = eng.children
    started = time.monotonic()
    eng.close()
    assert time.monotonic() - started < 20.0
    assert all(h.finish_reason == "abort" for h in [*running, future])
    assert not eng.alive and eng.stats()["alive"] is False
    with pytest.raises(WorkerError, match="closed"):
        eng.submit([5], 2)
    eng.close()  # idempotent
    assert_clean(before, children)


def test_close_without_abort_finishes_what_is_in_flight(tiny):
    eng = start(tiny, "split")
    h = eng.submit([50, 51], 8, ignore_eos=True)
    eng.close(abort=False)
    assert h.finish_reason == "length" and h.output_ids == hf_generate(tiny, [50, 51], 8, min_new=8)


@pytest.mark.parametrize("victim", ["decode", "replica-1"])
def test_a_killed_child_fails_every_open_handle(tiny, victim):
    before = snapshot()
    eng = start(tiny, "replicas" if victim.startswith("replica") else "split")
    try:
        handles = [eng.submit([60 + i, 61], 250 - 2, ignore_eos=True) for i in range(2)]
        for h in handles:
            next(iter(h))
        os.kill(eng.pids[victim], signal.SIGKILL)
        for h in handles:
            h.result(10)  # no hang: every open handle ends
        # the split's decode child held both; replica-1 the second (replica-0's may have finished)
        for h in handles if victim == "decode" else handles[1:]:
            assert h.finish_reason == "error"
            assert f"worker {victim} died" in h.error and "killed by signal 9" in h.error
        assert wait_until(lambda: not eng.alive)
        with pytest.raises(WorkerError, match="failed"):
            eng.submit([5], 2)
    finally:
        children = eng.children
        eng.close()
    assert_clean(before, children)


def test_a_hung_child_fails_the_open_handles_after_the_stall_timeout(tiny):
    before = snapshot()
    eng = online_engine(tiny, "split", CONFIG, split=SplitConfig(backend="processes", stall_timeout_s=2.0))
    try:
        h = eng.submit([70, 71], 250 - 2, ignore_eos=True)
        next(iter(h))
        os.kill(eng.pids["decode"], signal.SIGSTOP)  # alive, silent
        h.result(20)
        assert h.finish_reason == "error" and "hung worker" in h.error
    finally:
        children = eng.children
        eng.close()
    assert_clean(before, children)


def test_mps_is_refused_on_cpu_before_starting_anything(tiny):
    before = snapshot()
    with pytest.raises(ModeError, match="mps needs an NVIDIA GPU with nvidia-cuda-mps-control"):
        online_engine(tiny, "split", CONFIG, split=SplitConfig(backend="mps", prefill_share=70, decode_share=30))
    with pytest.raises(ModeError, match="replicas with mps=True needs an NVIDIA GPU"):
        online_engine(tiny, "replicas", CONFIG, replicas=ReplicaConfig(mps=True))
    assert_clean(before)


def test_bad_engine_arguments(tiny):
    with pytest.raises(ConfigError, match="offline only"):
        online_engine(tiny, "replicas", CONFIG, replicas=ReplicaConfig(engine="generate"))
    with pytest.raises(ConfigError, match="ReplicaConfig"):
        online_engine(tiny, "replicas", CONFIG, replicas={"num_replicas": 2})
    with pytest.raises(ConfigError, match="EngineConfig"):
        online_engine(tiny, "split", {"max_seq_len": 64}, split=PROCESSES)



# ---- one engine per kind for the module --------------------------------------------------------

@pytest.fixture(scope="module", params=["split", "split-paged", "replicas"])
def engine(request, tiny):
    kind, _, paged = request.param.partition("-")
    before = snapshot()
    eng = start(tiny, kind, PAGED if paged else CONFIG)
    yield eng
    children = eng.children
    eng.close()
    assert_clean(before, children)


def test_the_dispatch_gives_the_process_engines(engine):
    kind = OnlineReplicas if engine.mode == "replicas" else OnlineProcessSplit
    assert isinstance(engine, kind) and engine.alive
    assert engine.max_seq_len == 256 and engine.vocab_size == 260
    pids = engine.pids
    assert len(pids) == 2 and os.getpid() not in pids.values()
    facts = engine.facts()
    assert set(facts["workers"]) == set(pids) and facts["mps"] is None
    if engine.mode == "split":  # the decode child maps the prefill child's weights and KV pool
        assert facts["backend"] == "processes" and facts["workers"]["decode"]["weights_shared"] is True


def test_greedy_equals_generate_with_requests_arriving_while_it_runs(engine, tiny):
    handles, burst = check_greedy_with_arrivals(engine, tiny, lead_s=0.3)
    for h in handles[:5]:  # none was admitted before its arrival
        assert h.trace.prefill_start_s >= burst
    assert wait_until(lambda: kv_empty(engine))
    workers = {s.worker for s in engine.steps}
    assert workers == ({"replica-0", "replica-1"} if engine.mode == "replicas" else {"prefill", "decode"})


def test_tokens_stream_as_deltas_and_the_logits_path_is_exact_too(engine, tiny):
    deltas = check_deltas_and_the_logits_path(engine, tiny, length=12)
    assert len(deltas) >= 2  # the first token, then the decode steps' tokens


def test_concurrent_submits_from_many_threads(engine, tiny):
    prompts, news = ragged(seed=2, n=12)
    got: dict[int, list[int]] = {}

    def one(i: int) -> None:
        got[i] = engine.submit(prompts[i], news[i], ignore_eos=True).result(60)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert {i: got.get(i) for i in range(len(prompts))} == {
        i: hf_generate(tiny, p, n, min_new=n) for i, (p, n) in enumerate(zip(prompts, news))}


def test_cancel_frees_the_kv_at_once(engine, tiny):
    long = engine.submit([5, 6, 7, 8], 100, ignore_eos=True)  # 7 pages of 16 on the paged pool
    it = iter(long)
    next(it), next(it)  # a decode step ran: the request is held by the decode child (split)
    assert wait_until(lambda: engine.stats()["kv_slots_in_use"] >= 1)
    assert engine.cancel(long) is True
    assert long.done and long.finish_reason == "abort"
    assert engine.stats()["kv_slots_in_use"] == 0 and engine.stats()["active"] == 0
    assert 2 <= len(long.output_ids) < 100
    assert engine.cancel(long) is False  # already over
    waiting = engine.submit([9, 10], 5, ignore_eos=True, arrival_s=engine.clock() + 60)  # not arrived yet
    assert wait_until(lambda: engine.stats()["waiting"] == 1)
    assert engine.cancel(waiting) and waiting.finish_reason == "abort" and waiting.output_ids == []
    assert engine.stats()["waiting"] == 0
    again = engine.submit([5, 6, 7, 8], 5, ignore_eos=True)  # it goes on serving, exactly
    assert again.result(30) == hf_generate(tiny, [5, 6, 7, 8], 5, min_new=5)


def test_seeded_sampling_is_reproducible(engine):
    check_seeded_sampling_is_reproducible(engine)


def test_seeded_sampling_draws_what_the_in_process_engine_draws(engine, tiny):
    """The generator's state crosses the handoff: the same stream as one process."""
    params = SamplingParams(temperature=0.8, top_k=50, seed=77)
    here = online_engine(tiny, "serial", CONFIG)
    try:
        expected = here.submit([30, 31, 32], 10, sampling=params, ignore_eos=True).result(30)
    finally:
        here.close()
    assert engine.submit([30, 31, 32], 10, sampling=params, ignore_eos=True).result(30) == expected


def test_stop_ids_end_a_request_and_min_tokens_holds_them_back(engine, tiny):
    check_stop_ids_and_min_tokens(engine, tiny)


def test_bad_requests_are_refused_at_submit(engine):
    check_bad_submits_are_refused(engine)
    h = engine.submit([5, 6], 3, ignore_eos=True, request_id=900)
    with pytest.raises(WorkloadError, match="already in flight"):
        engine.submit([5, 6], 3, request_id=900)
    assert len(h.result(30)) == 3
    if engine.config.kv_block_size is not None:  # more pages than one pool has
        with pytest.raises(WorkloadError, match="KV pages"):
            engine.submit([5] * 100, 100)


# ---- SmolLM2: EOS allowed ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["split", "replicas"])
def test_eos_ends_a_greedy_request_and_min_tokens_suppresses_it(smollm2, kind):
    prompt = smollm2.encode("What is the capital of France?", chat=True)
    with start(smollm2, kind, EngineConfig(max_seq_len=512, num_slots=4, max_batch=2, chunk_size=64)) as eng:
        free = eng.submit(prompt, 24)
        forced = eng.submit(prompt, 14, min_tokens=14)
        held = eng.submit(prompt, 24, min_tokens=10)
        expected = hf_generate(smollm2, prompt, 24)
        assert smollm2.decode(expected).strip() == "The capital of France is Paris."
        assert free.result(120) == expected and free.finish_reason == "stop"
        assert free.output_ids[-1] in eng.eos_ids
        assert forced.result(120) == hf_generate(smollm2, prompt, 14, min_new=14)
        assert forced.finish_reason == "length"
        assert held.result(120) == hf_generate(smollm2, prompt, 24, min_new=10)
