"""Workload builders: determinism, exact lengths, Poisson arrivals, and the Azure trace replay."""

from __future__ import annotations

import csv
from datetime import datetime

import numpy as np
import pytest

from splitlab import WorkloadError
from splitlab.workload import (LengthDist, fixed_batch, from_azure_trace, from_prompts, poisson, poisson_arrivals, read_azure_trace, token_space)


def _as_tuples(wl):
    return [(r.id, r.prompt_ids, r.max_new_tokens, r.arrival_s) for r in wl]


# ---- fixed batch ---------------------------------------------------------------------------

def test_fixed_batch_is_seeded_and_exact(tiny):
    a = fixed_batch(6, 20, 5, model=tiny, seed=3)
    b = fixed_batch(6, 20, 5, model=tiny, seed=3)
    c = fixed_batch(6, 20, 5, model=tiny, seed=4)
    assert _as_tuples(a) == _as_tuples(b)
    assert _as_tuples(a) != _as_tuples(c)
    assert len(a) == 6
    assert all(r.prompt_len == 20 and r.max_new_tokens == 5 and r.arrival_s == 0.0 for r in a)
    assert a.total_output_tokens == 30


def test_prompts_avoid_special_tokens(tiny):
    space = token_space(model=tiny)
    specials = set(tiny.tokenizer.all_special_ids)
    assert specials == {0, 1, 2, 3}
    assert not specials & set(space.tolist())
    assert space.max() < tiny.facts.vocab_size
    wl = fixed_batch(20, 50, 2, model=tiny, seed=0)
    used = {t for r in wl for t in r.prompt_ids}
    assert not used & specials
    assert len(used) > 100  # drawn across the vocabulary, not a handful of ids


def test_bare_vocab_size_skips_low_ids():
    wl = fixed_batch(4, 64, 3, vocab_size=10, seed=1)
    assert {t for r in wl for t in r.prompt_ids} <= set(range(4, 10))


def test_length_distributions_per_request(tiny):
    wl = fixed_batch(40, LengthDist.uniform(5, 9), LengthDist.uniform(1, 3), model=tiny, seed=2)
    plens = [r.prompt_len for r in wl]
    assert set(plens) == set(range(5, 10))  # every value of [5, 9] appears with 40 draws
    assert {r.max_new_tokens for r in wl} == {1, 2, 3}


def test_lognormal_lengths_are_clipped_and_have_the_asked_mean():
    dist = LengthDist.lognormal(200, 0.5, lo=10, hi=2000)
    values = dist.sample(np.random.default_rng(0), 20000)
    assert values.min() >= 10 and values.max() <= 2000
    assert values.mean() == pytest.approx(200, rel=0.03)
    clipped = LengthDist.lognormal(200, 1.0, lo=50, hi=100).sample(np.random.default_rng(0), 1000)
    assert clipped.min() == 50 and clipped.max() == 100


@pytest.mark.parametrize("make", [
    lambda: LengthDist.fixed(0),
    lambda: LengthDist.uniform(5, 2),
    lambda: LengthDist.lognormal(-1, 0.5),
    lambda: LengthDist.lognormal(100, 0),
    lambda: LengthDist("gamma", 1, 2),
    lambda: LengthDist.coerce("12"),
])
def test_bad_length_distributions(make):
    with pytest.raises(WorkloadError):
        make()


def test_builders_need_a_vocabulary():
    with pytest.raises(WorkloadError, match="vocab_size"):
        fixed_batch(2, 4, 4)


def test_builders_refuse_what_does_not_fit_the_model(tiny):
    with pytest.raises(WorkloadError, match="context is 512"):
        fixed_batch(1, 510, 8, model=tiny)


# ---- Poisson -------------------------------------------------------------------------------

def test_poisson_is_seeded_with_the_asked_rate():
    a = poisson(4000, rate=5.0, prompt_len=8, output_len=2, seed=7, vocab_size=100)
    b = poisson(4000, rate=5.0, prompt_len=8, output_len=2, seed=7, vocab_size=100)
    assert _as_tuples(a) == _as_tuples(b)
    arr = np.array([r.arrival_s for r in a])
    assert arr[0] == 0.0
    assert np.all(np.diff(arr) >= 0)
    assert np.diff(arr).mean() == pytest.approx(1 / 5.0, rel=0.05)
    assert [r.arrival_s for r in a] == poisson_arrivals(4000, 5.0, seed=7)


def test_poisson_lengths(tiny):
    wl = poisson(30, rate=2.0, prompt_len=LengthDist.uniform(4, 12), output_len=LengthDist.fixed(3),
                 seed=0, model=tiny)
    assert all(4 <= r.prompt_len <= 12 and r.max_new_tokens == 3 for r in wl)
    assert wl.name.startswith("poisson-r2")


@pytest.mark.parametrize("rate", [0, -1.0, float("inf"), float("nan"), "2"])
def test_poisson_bad_rate(rate):
    with pytest.raises(WorkloadError, match="rate"):
        poisson(3, rate=rate, vocab_size=100)


@pytest.mark.parametrize("n", [0, -2, 2.5])
def test_bad_request_counts(n):
    with pytest.raises(WorkloadError):
        poisson(n, rate=1.0, vocab_size=100)
    with pytest.raises(WorkloadError):
        fixed_batch(n, 4, 4, vocab_size=100)


def test_from_prompts_keeps_arrivals_and_sorts():
    wl = from_prompts([[5, 6], [7]], [3, 1], arrivals_s=[0.5, 0.1])
    assert [r.id for r in wl] == [1, 0]
    assert [r.arrival_s for r in wl] == [0.1, 0.5]


# ---- Azure trace ---------------------------------------------------------------------------

def _reference_rows(path, n):
    """The first n rows parsed independently of splitlab (csv + datetime)."""
    rows = []
    with open(path, newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            if i == n:
                break
            stamp = row["TIMESTAMP"]
            head, frac = stamp.split(".")
            t = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp() + float("0." + frac)
            rows.append((t, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    return rows


def test_trace_replay_exact_counts_and_arrivals(azure_csv):
    ref = _reference_rows(azure_csv, 40)
    wl = from_azure_trace(azure_csv, limit=40, vocab_size=32000, seed=0)
    assert len(wl) == 40
    t0 = min(t for t, _, _ in ref)
    by_id = {r.id: r for r in wl}
    for i, (t, ctx, gen) in enumerate(ref):
        r = by_id[i]
        assert r.prompt_len == ctx  # synthesised to the exact token count
        assert r.max_new_tokens == max(1, gen)
        assert r.arrival_s == pytest.approx(t - t0, abs=1e-6)
    assert by_id[0].arrival_s == 0.0


def test_trace_rate_scale_and_seed(azure_csv):
    base = from_azure_trace(azure_csv, limit=25, vocab_size=1000, seed=1)
    fast = from_azure_trace(azure_csv, limit=25, vocab_size=1000, seed=1, rate_scale=4.0)
    again = from_azure_trace(azure_csv, limit=25, vocab_size=1000, seed=1)
    other = from_azure_trace(azure_csv, limit=25, vocab_size=1000, seed=2)
    assert _as_tuples(base) == _as_tuples(again)
    assert [r.prompt_ids for r in base] != [r.prompt_ids for r in other]
    slow_arr = {r.id: r.arrival_s for r in base}
    for r in fast:
        assert r.arrival_s == pytest.approx(slow_arr[r.id] / 4.0)
        assert r.prompt_ids == base.requests[[q.id for q in base].index(r.id)].prompt_ids


def test_trace_caps_lengths_to_fit_the_model(azure_csv, tiny):
    ref = _reference_rows(azure_csv, 60)
    wl = from_azure_trace(azure_csv, limit=60, model=tiny, max_new_tokens=16)
    by_id = {r.id: r for r in wl}
    assert any(ctx > 512 for _, ctx, _ in ref)  # the trace has prompts longer than tiny's context
    for i, (_, ctx, gen) in enumerate(ref):
        r = by_id[i]
        assert r.max_new_tokens == min(max(gen, 1), 16)
        assert r.prompt_len == min(ctx, 512 - r.max_new_tokens)
        assert r.prompt_len + r.max_new_tokens <= tiny.facts.max_positions
    wl.check_fits(tiny.facts.max_positions)
    capped = from_azure_trace(azure_csv, limit=60, vocab_size=500, max_prompt_len=100, max_total_len=104)
    assert all(r.prompt_len <= 100 and r.prompt_len + r.max_new_tokens <= 104 for r in capped)


def test_full_trace_parses(azure_csv):
    table = read_azure_trace(azure_csv)
    assert len(table) == 8819  # the data README says "8,818"; the file has 8,819 data rows
    assert table["arrival_s"].min() == 0.0
    assert 3000 < table["arrival_s"].max() < 4000  # about one hour
    assert (table["context_tokens"] >= 0).all()


def _write(tmp_path, text, name="trace.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


@pytest.mark.parametrize("body, message", [
    ("2023-11-16 18:17:03.97,10,5\nnot-a-date,10,5\n", r"row 2 \(line 3\).*TIMESTAMP"),
    ("2023-11-16 18:17:03.97,10,5\n2023-11-16 18:17:04.10,ten,5\n", r"row 2 \(line 3\).*ContextTokens"),
    ("2023-11-16 18:17:03.97,10,5\n2023-11-16 18:17:04.10,10,5\n2023-11-16 18:17:05,10,-3\n",
     r"row 3 \(line 4\).*GeneratedTokens"),
    ("2023-11-16 18:17:03.97,10.5,5\n", r"row 1 \(line 2\).*ContextTokens"),
    ("2023-11-16 18:17:03.97,10,\n", r"row 1 \(line 2\).*GeneratedTokens"),
    ("", "no rows"),
])
def test_bad_trace_rows(tmp_path, body, message):
    path = _write(tmp_path, GOOD_HEADER + body)
    with pytest.raises(WorkloadError, match=message):
        from_azure_trace(path, vocab_size=100)


@pytest.mark.parametrize("text, message", [
    ("TIMESTAMP,ContextTokens\n2023-11-16 18:17:03,10\n", r"missing \['GeneratedTokens'\]"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens,Extra\n2023-11-16 18:17:03,10,5,x\n", r"unexpected \['Extra'\]"),
    ("time,prompt,output\n2023-11-16 18:17:03,10,5\n", "expected exactly"),
    ("", "cannot parse"),
    (GOOD_HEADER + "2023-11-16 18:17:03,10,5\n2023-11-16 18:17:04,10,5,7,8\n", "cannot parse.*line 3"),
    (GOOD_HEADER + "2023-11-16 18:17:03,10,5\n2023-11-16 18:17:04,10\n", r"row 2 \(line 3\).*GeneratedTokens"),
])
def test_bad_trace_columns(tmp_path, text, message):
    with pytest.raises(WorkloadError, match=message):
        from_azure_trace(_write(tmp_path, text), vocab_size=100)


def test_missing_trace_file_says_where_to_get_it(tmp_path):
    with pytest.raises(WorkloadError, match="AzurePublicDataset"):
        from_azure_trace(tmp_path / "nope.csv", vocab_size=100)


def test_zero_generated_tokens_asks_for_one(tmp_path):
    path = _write(tmp_path, GOOD_HEADER + "2023-11-16 18:17:03.5,10,0\n2023-11-16 18:17:04,3,2\n")
    wl = from_azure_trace(path, vocab_size=100)
    assert [(r.prompt_len, r.max_new_tokens) for r in wl] == [(10, 1), (3, 2)]
    assert [r.arrival_s for r in wl] == pytest.approx([0.0, 0.5])


@pytest.mark.parametrize("kwargs", [{"rate_scale": 0}, {"rate_scale": -2.0}, {"limit": 0},
                                    {"max_new_tokens": 0}, {"max_total_len": 1}])
def test_bad_trace_arguments(azure_csv, kwargs):
    with pytest.raises(WorkloadError):
        from_azure_trace(azure_csv, vocab_size=100, **kwargs)
