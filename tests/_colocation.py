"""Helpers of the co-location tests (split, replicas, robustness): the greedy oracle's tokens, a ragged
workload, run invariants, snapshots of what a run could leave behind (processes,
/dev/shm entries, multiprocessing temp folders), and ``wait_until``."""

from __future__ import annotations

import os
import random
import time


from _oracle import hf_greedy
from _traces import assert_slots_never_overcommitted, assert_traces_complete

from splitlab.system.procs import alive, descendants, shm_mapped_elsewhere
from splitlab.workload import Workload, from_prompts

PREFIX = "splitlab-"


def wait_until(check, timeout_s: float = 10.0, poll_s: float = 0.02) -> bool:
    """Poll ``check()`` every ``poll_s`` until it is true or ``timeout_s`` passed; its last answer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(poll_s)
    return check()


def ragged_workload(seed: int = 0, n: int = 12, spread_s: float = 0.4, name: str | None = None) -> Workload:
    """Ragged prompts (2..59 tokens) and outputs (1..16 tokens; one request asks for a single
    token, so the prefill side frees its slot itself); half arrive at once (more than the
    slots, so some wait), the rest spread over ``spread_s`` seconds."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, 260) for _ in range(rng.randrange(2, 60))] for _ in range(n)]
    news = [rng.randrange(2, 17) for _ in range(n)]
    news[:3] = [16, 12, 9]  # the first burst holds its slots a while
    news[4] = 1
    arrivals = [0.0] * (n // 2) + sorted(rng.uniform(0.05, spread_s) for _ in range(n - n // 2))
    return from_prompts(prompts, news, arrivals, name=name or f"ragged-{seed}")


def expected_tokens(loaded, workload) -> dict[int, list[int]]:
    return {r.id: hf_greedy(loaded, r.prompt_ids, r.max_new_tokens) for r in workload}


def check_split_run(run, workload, num_slots: int) -> None:
    """What every split run must satisfy, whatever the backend."""
    assert_traces_complete(run, workload)
    by_id = {t.id: t for t in run.traces}
    assert {s.worker for s in run.steps} <= {"prefill", "decode"}
    assert {s.kind for s in run.steps if s.worker == "prefill"} == {"prefill"}
    assert {s.kind for s in run.steps if s.worker == "decode"} <= {"decode"}
    for worker in ("prefill", "decode"):  # each worker's own steps are sequential
        own = sorted((s for s in run.steps if s.worker == worker), key=lambda s: s.start_s)
        assert all(b.start_s >= a.end_s for a, b in zip(own, own[1:]))
    for s in run.steps:  # decode only runs sequences whose prefill is done
        if s.worker == "decode":
            assert all(by_id[rid].prefill_end_s <= s.start_s for rid in s.request_ids)
    # every prompt position and every output token but the last computed exactly once
    rows = sum(s.num_tokens for s in run.steps)
    assert rows == sum(r.prompt_len + r.max_new_tokens - 1 for r in workload)
    assert_slots_never_overcommitted(run, num_slots)
    assert any(t.prefill_start_s > t.arrival_s for t in run.traces)  # some waited for a slot


# ---- what a run may leave behind ------------------------------------------------------------------
# Other sessions may run tests on the same machine at the same time, so nothing here looks
# at the whole process table or the whole /dev/shm: only at this process's descendants, at
# the children a session reports (pids, temp folders), and at /dev/shm entries that no
# process outside this test maps.

def snapshot() -> dict[str, set]:
    # tqdm makes one multiprocessing lock per process, the first time a bar is made: make it
    # now, so it is not mistaken for something a run left behind
    from tqdm.auto import tqdm

    tqdm(disable=True).close()
    return {"descendants": descendants(), "shm": set(os.listdir("/dev/shm"))}


def assert_clean(before: dict[str, set], children: dict | None = None, timeout_s: float = 5.0) -> None:
    """Since ``before``: no new live descendant of this process; every child in ``children``
    (``{name: {"pid", "tmpdir", ...}}``, as sessions report them) gone with its temp folder;
    no new /dev/shm entry that only this test could have made (given ``timeout_s`` for the
    kernel to reap what was just killed)."""
    import multiprocessing

    children = children or {}
    deadline = time.monotonic() + timeout_s
    while True:
        procs = descendants() - before["descendants"]
        known = {n: c["pid"] for n, c in children.items() if c.get("pid") and alive(c["pid"])}
        dirs = [c["tmpdir"] for c in children.values() if c.get("tmpdir") and os.path.exists(c["tmpdir"])]
        shm = set(os.listdir("/dev/shm")) - before["shm"]
        if shm:
            shm -= shm_mapped_elsewhere()
        if not (procs or known or dirs or shm) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith(PREFIX)]
    assert not procs, f"processes left behind: {sorted(procs)}"
    assert not known, f"workers still alive: {known}"
    assert not dirs, f"multiprocessing temp folders left behind: {dirs}"
    assert not shm, f"/dev/shm entries left behind: {sorted(shm)}"


def drive_split_workers(loaded, config, workload, on_handoff=None):
    """The split-mode building blocks driven alternately in one process on a virtual clock
    (one tick per step): a prefill worker and a decode worker over one engine, every request
    added at once. ``on_handoff(handoff, seq)`` sees each handoff before the decode worker
    accepts it. Returns ``(seqs by id, prefill worker, decode worker, engine parts, clock)``."""
    from splitlab.engine.loop import DecodeWorker, PrefillWorker, build_engine
    from splitlab.engine.scheduler import SeqState
    from splitlab.engine.warmup import warm_up

    parts = build_engine(loaded, config)
    warm_up(parts.runner)
    t = [0.0]

    def clock() -> float:
        return t[0]

    pre = PrefillWorker(parts.runner, parts.allocator, config, clock)
    dec = DecodeWorker(parts.runner, parts.allocator, config, clock)
    seqs = {r.id: SeqState.new(r) for r in workload}
    for r in workload:
        pre.add(seqs[r.id])
    done = 0
    while done < len(workload):
        t[0] += 1.0
        hand, outcome = pre.step_handoffs()
        done += len(outcome.finished) if outcome is not None else 0
        for h in hand:
            if on_handoff is not None:
                on_handoff(h, seqs[h.request_id])
            dec.accept(h, seqs[h.request_id].trace)
        t[0] += 1.0
        out = dec.step()
        done += len(out.finished) if out is not None else 0
    return seqs, pre, dec, parts, clock
