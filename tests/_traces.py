"""Invariants every engine run's request traces satisfy, whatever the mode or backend."""

from __future__ import annotations


def assert_traces_complete(run, workload) -> None:
    """Every request finished with exactly its tokens, never prefilled before it arrived,
    first token at the end of its prefill, token times non-decreasing."""
    by_id = {t.id: t for t in run.traces}
    assert sorted(by_id) == sorted(r.id for r in workload)
    for r in workload:
        t = by_id[r.id]
        assert t.finished and len(t.output_ids) == r.max_new_tokens == len(t.token_times_s)
        assert t.prefill_start_s >= r.arrival_s  # never run before it arrives
        assert t.prefill_end_s >= t.prefill_start_s
        assert t.token_times_s[0] == t.prefill_end_s
        assert all(b >= a for a, b in zip(t.token_times_s, t.token_times_s[1:]))
