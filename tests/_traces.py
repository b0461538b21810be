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


def assert_slots_never_overcommitted(run, num_slots: int) -> int:
    """A request holds a KV slot from its prefill start to its last token: at most
    ``num_slots`` requests may hold one at any moment. Returns the peak number held."""
    events = sorted([(t.prefill_start_s, 1) for t in run.traces] + [(t.token_times_s[-1], -1) for t in run.traces],
                    key=lambda e: (e[0], e[1]))
    live = peak = 0
    for _, d in events:
        live += d
        peak = max(peak, live)
    assert peak <= num_slots
    return peak
