"""Metrics on hand-built timestamps whose TTFT/TPOT/ITL/E2E/goodput are known by hand."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from splitlab import SLO, SplitlabError, load_run
from splitlab.measure.metrics import RequestTrace, Run, StepTrace, summaries_table


def hand_run(**kwargs) -> Run:
    # A: arrives 1.0, tokens at 1.5 1.7 2.0 2.1 -> TTFT 0.5, E2E 1.1, TPOT 0.6/3 = 0.2, gaps .2 .3 .1
    # B: arrives 0.0, one token at 0.4     -> TTFT 0.4, E2E 0.4, TPOT undefined
    # C: arrives 0.5, tokens at 3.0 3.5    -> TTFT 2.5, E2E 3.0, TPOT 0.5, gap .5
    traces = [
        RequestTrace(0, 1.0, 10, 4, 1.2, 1.5, [1.5, 1.7, 2.0, 2.1], [5, 6, 7, 8], "w"),
        RequestTrace(1, 0.0, 3, 1, 0.1, 0.4, [0.4], [9], "w"),
        RequestTrace(2, 0.5, 7, 2, 2.0, 3.0, [3.0, 3.5], [10, 11], "w"),
    ]
    steps = [StepTrace("w", "prefill", 0.1, 0.4, [1], 3), StepTrace("w", "decode", 1.5, 2.1, [0], 3)]
    return Run("hand", "none", "hand-made", {"note": "test"}, {"device": "cpu"}, traces, steps, **kwargs)


def test_per_request_table():
    t = hand_run().requests.set_index("id")
    assert t.loc[0, "ttft_s"] == pytest.approx(0.5)
    assert t.loc[0, "e2e_s"] == pytest.approx(1.1)
    assert t.loc[0, "tpot_s"] == pytest.approx(0.2)
    assert t.loc[0, "itl_p50_s"] == pytest.approx(0.2)
    assert t.loc[0, "itl_max_s"] == pytest.approx(0.3)
    assert t.loc[0, "queue_s"] == pytest.approx(0.2)
    assert t.loc[0, "prefill_s"] == pytest.approx(0.3)
    assert t.loc[0, "decode_s"] == pytest.approx(0.6)
    assert t.loc[1, "ttft_s"] == pytest.approx(0.4)
    assert math.isnan(t.loc[1, "tpot_s"])
    assert math.isnan(t.loc[1, "itl_p50_s"])
    assert t.loc[2, "ttft_s"] == pytest.approx(2.5)
    assert t.loc[2, "tpot_s"] == pytest.approx(0.5)
    assert t.loc[2, "e2e_s"] == pytest.approx(3.0)
    assert list(t["output_len"]) == [4, 1, 2]


def test_summary_throughput_itl_and_goodput():
    run = hand_run()
    assert run.wall_s == pytest.approx(3.5)  # the last token of the last request
    s = run.summary(SLO(ttft_s=1.0, tpot_s=0.25))
    assert s["output_tokens"] == 7
    assert s["completed"] == 3
    assert s["throughput_tok_s"] == pytest.approx(7 / 3.5)
    assert s["request_rate_s"] == pytest.approx(3 / 3.5)
    # pooled gaps: .2 .3 .1 .5 -> p50 .25
    np.testing.assert_allclose(np.sort(run.itl_gaps()), [0.1, 0.2, 0.3, 0.5])
    assert s["itl_p50_s"] == pytest.approx(0.25)
    assert s["ttft_p50_s"] == pytest.approx(0.5)
    assert s["tpot_p50_s"] == pytest.approx(0.35)  # TPOT of A and C; B has none
    # A meets both bounds, B meets TTFT and has no TPOT, C misses TTFT and TPOT
    assert s["slo_met"] == 2
    assert s["slo_attainment"] == pytest.approx(2 / 3)
    assert s["goodput_req_s"] == pytest.approx(2 / 3.5)
    tight = run.summary(SLO(ttft_s=0.45, tpot_s=0.25))  # A's TTFT 0.5 now misses
    assert tight["slo_met"] == 1
    assert tight["goodput_req_s"] == pytest.approx(1 / 3.5)
    loose = run.summary(SLO(ttft_s=10, tpot_s=10))
    assert loose["slo_met"] == 3


def test_summary_defaults_to_the_recorded_slo():
    run = hand_run()
    run.config = dataclasses.replace(run.config, slo=SLO(ttft_s=0.45, tpot_s=0.25))
    assert run.summary()["slo_met"] == 1
    assert run.summary()["slo_ttft_s"] == 0.45


def test_explicit_wall_time_is_kept():
    run = hand_run(wall_s=7.0)
    assert run.summary()["throughput_tok_s"] == pytest.approx(1.0)


def test_save_and_load_round_trip(tmp_path):
    run = hand_run()
    path = run.save(tmp_path / "sub" / "run.json")
    assert path.is_file()
    json.loads(path.read_text())  # strict JSON
    back = load_run(path)
    assert back.to_dict() == run.to_dict()
    assert back.output_ids() == {0: [5, 6, 7, 8], 1: [9], 2: [10, 11]}
    a, b = run.summary(SLO(1.0, 0.25)), back.summary(SLO(1.0, 0.25))
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float) and math.isnan(a[k]):
            assert math.isnan(b[k])
        else:
            assert a[k] == b[k], k


def test_load_run_errors(tmp_path):
    with pytest.raises(SplitlabError, match="no run file"):
        load_run(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(SplitlabError, match="not a splitlab run"):
        load_run(bad)


def test_summaries_table_one_row_per_run():
    table = summaries_table([hand_run(), hand_run(wall_s=7.0)], SLO(1.0, 0.25))
    assert len(table) == 2
    assert list(table["throughput_tok_s"]) == pytest.approx([2.0, 1.0])


def test_step_kv_usage_round_trips_and_older_run_files_load_without_it(tmp_path):
    run = hand_run()
    run.steps[1] = StepTrace("w", "decode", 1.5, 2.1, [0], 3, kv_used=5, kv_total=8)
    back = load_run(run.save(tmp_path / "kv.json.gz"))
    assert [(s.kv_used, s.kv_total) for s in back.steps] == [(None, None), (5, 8)]
    old = run.to_dict()
    for step in old["steps"]:  # a run file written before StepTrace had the KV fields
        del step["kv_used"], step["kv_total"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    assert [(s.kv_used, s.kv_total) for s in load_run(path).steps] == [(None, None), (None, None)]


def test_summary_shows_preemptions_when_the_run_counted_them():
    assert hand_run().summary()["preemptions"] is None  # no memory record: unknown, not 0
    assert hand_run(memory={"peak_bytes": 10, "preemptions": 3}).summary()["preemptions"] == 3
    assert hand_run(memory={"peak_bytes": 10, "preemptions": 0}).summary()["preemptions"] == 0
