"""The online engine (``splitlab.engine.online``): requests submitted while it runs.

Greedy tokens must equal HF ``generate()``'s (fp32 on CPU): with EOS masked (``ignore_eos``)
they are ``generate(min_new_tokens=n)``'s, through the runner's own path; with EOS allowed
(SmolLM2, a chat prompt it answers in a few tokens) ``generate(do_sample=False)``'s up to and
including the EOS, through the logits path. The same over a paged KV pool small enough that
the scheduler preempts, and in the split engine (a prefill and a decode thread). Cancelling
frees the KV; a seeded sampled request is reproducible; ``min_tokens`` holds EOS back;
closing ends every request.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from _online_checks import (CONFIG, PAGED, check_bad_submits_are_refused, check_deltas_and_the_logits_path,
                            check_greedy_with_arrivals, check_seeded_sampling_is_reproducible,
                            check_stop_ids_and_min_tokens, ragged)
from _oracle import hf_generate

from splitlab import online_engine
from splitlab.config import EngineConfig, SplitConfig
from splitlab.engine.online import GREEDY, OnlineEngine, SamplingParams, sample
from splitlab.errors import ConfigError, ModeError, WorkerError

@pytest.fixture(scope="module", params=["serial", "chunked", "chunked-paged", "split", "split-paged"])
def engine(request, tiny):
    mode, _, paged = request.param.partition("-")
    eng = online_engine(tiny, mode, PAGED if paged else CONFIG)
    yield eng
    eng.close()
    assert not eng._thread.is_alive()


def test_greedy_equals_generate_with_requests_arriving_while_it_runs(engine, tiny):
    check_greedy_with_arrivals(engine, tiny, lead_s=0.2)
    assert engine.stats()["kv_slots_in_use"] == 0
    if engine.scheduler.block_size is not None and engine.scheduler.reserve == "grow":
        assert engine.scheduler.preemptions > 0  # the tokens stayed exact through recomputation


def test_tokens_stream_as_deltas_and_the_logits_path_is_exact_too(engine, tiny):
    check_deltas_and_the_logits_path(engine, tiny)


def test_cancel_frees_the_slot_at_once(engine, tiny):
    long = engine.submit([5, 6, 7, 8], 100, ignore_eos=True)
    first = next(iter(long))
    assert len(first.token_ids) == 1 and engine.stats()["kv_slots_in_use"] >= 1  # a slot, or its pages
    assert engine.cancel(long) is True
    assert long.done and long.finish_reason == "abort"
    assert engine.stats()["kv_slots_in_use"] == 0
    assert 1 <= len(long.output_ids) < 100
    assert engine.cancel(long) is False  # already over
    # the engine goes on serving, exactly
    again = engine.submit([5, 6, 7, 8], 5, ignore_eos=True)
    assert again.result(30) == hf_generate(tiny, [5, 6, 7, 8], 5, min_new=5)


def test_wait_blocks_until_the_last_delta(engine):
    handle = engine.submit([5, 6, 7, 8], 100, ignore_eos=True)
    assert handle.wait(0.0) is False and not handle.done  # 100 tokens take longer than no time
    assert handle.wait(60) is True and handle.done and len(handle.output_ids) == 100
    assert handle.wait(0.0) is True  # an ended request answers at once


def test_cancel_of_a_waiting_request(tiny):
    with online_engine(tiny, "serial", CONFIG.replace(num_slots=1, max_batch=1)) as eng:
        running = eng.submit([9, 10, 11], 60, ignore_eos=True)
        waiting = eng.submit([12, 13], 5, ignore_eos=True)
        next(iter(running))
        assert eng.stats()["waiting"] == 1
        eng.cancel(waiting)
        assert waiting.finish_reason == "abort" and waiting.output_ids == []
        assert eng.stats()["waiting"] == 0
        assert len(running.result(60)) == 60 and running.finish_reason == "length"
        assert eng.stats()["kv_slots_in_use"] == 0


def test_seeded_sampling_is_reproducible(engine):
    check_seeded_sampling_is_reproducible(engine)


def test_sample_is_a_pure_function_of_logits_params_and_generator():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5, -1.0])
    assert sample(logits, GREEDY) == 1
    assert sample(logits, SamplingParams(temperature=0.7, top_k=1, seed=0),
                  torch.Generator().manual_seed(0)) == 1
    assert sample(logits, SamplingParams(temperature=1.0, top_p=0.01), torch.Generator().manual_seed(0)) == 1
    drawn = {sample(logits, SamplingParams(temperature=5.0, top_k=2), torch.Generator().manual_seed(s))
             for s in range(200)}
    assert drawn == {1, 3}  # only the two most likely, and both of them
    # top_p keeps the smallest set reaching p: here {1, 3} (0.55 + 0.34 of the mass)
    drawn = {sample(logits, SamplingParams(temperature=1.0, top_p=0.8), torch.Generator().manual_seed(s))
             for s in range(200)}
    assert drawn == {1, 3}
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    params = SamplingParams(temperature=2.0)
    assert [sample(logits, params, g1) for _ in range(20)] == [sample(logits, params, g2) for _ in range(20)]


def test_stop_ids_end_a_request_and_min_tokens_holds_them_back(engine, tiny):
    check_stop_ids_and_min_tokens(engine, tiny)


def test_async_iteration(engine, tiny):
    async def main():
        loop = asyncio.get_running_loop()
        handles = [engine.submit([40 + i, 41, 42], 6, ignore_eos=True, loop=loop) for i in range(3)]

        async def collect(h):
            return [t async for d in h for t in d.token_ids]

        return await asyncio.wait_for(asyncio.gather(*(collect(h) for h in handles)), 60)

    got = asyncio.run(main())
    assert got == [hf_generate(tiny, [40 + i, 41, 42], 6, min_new=6) for i in range(3)]


@pytest.mark.parametrize("mode", ["chunked", "split"])
def test_eos_ends_a_greedy_request_and_min_tokens_suppresses_it(smollm2, mode):
    prompt = smollm2.encode("What is the capital of France?", chat=True)
    with online_engine(smollm2, mode, EngineConfig(max_seq_len=512, num_slots=2, max_batch=2, chunk_size=64)) as eng:
        free = eng.submit(prompt, 24)
        forced = eng.submit(prompt, 14, min_tokens=14)
        held = eng.submit(prompt, 24, min_tokens=10)
        expected = hf_generate(smollm2, prompt, 24)
        assert smollm2.decode(expected).strip() == "The capital of France is Paris."
        assert len(expected) < 24  # it really stops at EOS
        assert free.result(120) == expected and free.finish_reason == "stop"
        assert free.output_ids[-1] in eng.eos_ids
        assert forced.result(120) == hf_generate(smollm2, prompt, 14, min_new=14)
        assert forced.finish_reason == "length"
        assert held.result(120) == hf_generate(smollm2, prompt, 24, min_new=10)
        assert len(held.output_ids) >= 10


def test_close_drains_or_aborts(tiny):
    eng = online_engine(tiny, "serial", CONFIG)
    h = eng.submit([50, 51], 8, ignore_eos=True)
    eng.close(abort=False)  # finish what is in flight first
    assert h.finish_reason == "length" and len(h.output_ids) == 8
    with pytest.raises(WorkerError, match="closed"):
        eng.submit([50, 51], 8)
    eng = online_engine(tiny, "serial", CONFIG)
    h = eng.submit([50, 51], 250 - 2, ignore_eos=True)
    next(iter(h))
    eng.close()
    assert h.finish_reason == "abort" and not eng._thread.is_alive()


def test_bad_requests_are_refused_at_submit(engine):
    check_bad_submits_are_refused(engine)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0)
    h = engine.submit([5, 6], 3, ignore_eos=True)
    with pytest.raises(ConfigError, match="async for"):
        asyncio.run(_drain_async(h))
    assert len(h.result(30)) == 3  # still fine


async def _drain_async(handle):
    return [d async for d in handle]


def test_split_engine_runs_two_threads(tiny):
    from splitlab.modes.split.online_threads import OnlineSplitEngine

    with online_engine(tiny, "split", CONFIG) as eng:
        assert isinstance(eng, OnlineSplitEngine) and eng._decode_thread.is_alive()
        h = eng.submit([60, 61, 62], 6, ignore_eos=True)
        assert h.result(30) == hf_generate(tiny, [60, 61, 62], 6, min_new=6)
        kinds = {(s.worker, s.kind) for s in eng.steps}
        assert kinds == {("prefill", "prefill"), ("decode", "decode")}
    assert not eng._thread.is_alive() and not eng._decode_thread.is_alive()


def test_online_split_follows_an_adaptive_sm_policy(tiny):
    """The offline split's build and SM controller under ``streams`` (simulated lanes): every
    step asks the policy, the oracle holds, and the server's gauges see the split."""
    from pathlib import Path

    profile = str(Path(__file__).resolve().parents[1] / "results" / "sm_profile_h200.json")
    split = SplitConfig(backend="streams", sm_policy="table", sm_profile=profile, prefill_layer_group=1)
    prompts, news = ragged(seed=3, n=6)
    with online_engine(tiny, "split", CONFIG, split=split) as eng:
        handles = [eng.submit(p, n, ignore_eos=True) for p, n in zip(prompts, news)]
        for h, p, n in zip(handles, prompts, news):
            assert h.result(60) == hf_generate(tiny, p, n, min_new=n), f"request {h.id}"
        facts = eng.facts()
        stats = eng.stats()
    assert facts["sm_policy"] == "table" and facts["green"]["simulated"] is True
    assert facts["green"]["decisions"] >= sum(s.kind == "decode" for s in eng.steps)
    assert {s.sms for s in eng.steps if s.kind == "decode"} <= set(facts["green"]["decode_sms_choices"]) | {132}
    assert stats["decode_sms"] is not None and stats["prefill_sms"] is not None
    with pytest.raises(ConfigError, match="SplitConfig"):
        online_engine(tiny, "split", CONFIG, split={"backend": "streams"})


def test_bad_engine_arguments(tiny):
    with pytest.raises(ModeError, match="serial, chunked, split, replicas"):
        online_engine(tiny, "generate")
    with pytest.raises(ConfigError, match="EngineConfig"):
        online_engine(tiny, "serial", {"max_seq_len": 64})
    with pytest.raises(ConfigError, match="split=... is for mode 'split'"):
        online_engine(tiny, "serial", CONFIG, split=SplitConfig())
    with pytest.raises(ModeError, match="OnlineEngine runs mode 'serial' or 'chunked', not 'split'"):
        OnlineEngine(tiny, "split", CONFIG)  # the class is the serial / chunked engine; the factory builds the rest


def test_replicas_mode_runs_spawned_engines(tiny):
    """``mode="replicas"`` is the real thing: N spawned engines, each request sent to one
    (the process engines' own tests: tests/test_online_processes.py)."""
    from splitlab.modes.online_replicas import OnlineReplicas

    with online_engine(tiny, "replicas", CONFIG) as eng:
        assert isinstance(eng, OnlineReplicas) and len(eng.pids) == 2
        handles = [eng.submit([60 + i, 61, 62], 6, ignore_eos=True) for i in range(2)]
        for i, h in enumerate(handles):
            assert h.result(60) == hf_generate(tiny, [60 + i, 61, 62], 6, min_new=6)
        assert {s.worker for s in eng.steps} == {"replica-0", "replica-1"}
    assert not eng.alive


def test_the_readme_example_runs(capsys):
    """The README's online-engine example, as a user pastes it: one request's tokens stream out
    in deltas, the last says ``length``, and each of its 8 tokens has a time."""
    from ast import literal_eval
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    after = readme.split("The engine under the server is a Python object too", 1)[1]
    code = after.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    *deltas, times = lines
    assert deltas[-1].endswith("length") and all(d.endswith("None") for d in deltas[:-1])
    assert sum(len(literal_eval(d.rsplit(" ", 1)[0])) for d in deltas) == 8  # the tuples it printed
    assert len(literal_eval(times)) == 8
