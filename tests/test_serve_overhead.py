"""``splitlab.measure.serve_overhead``: the HTTP-overhead verdict on hand-made summaries, and
the workload digest that keeps runs of different requests apart."""

from __future__ import annotations

import pytest

from splitlab.measure.metrics import RequestTrace
from splitlab.measure.serve_overhead import judge, judge_rows, overhead, ttft_mean_s, workload_shape


def summary(ttft, itl, goodput=10.0):
    return {"ttft_p50_s": ttft, "ttft_p99_s": 3 * ttft, "itl_p50_s": itl, "itl_p99_s": 2 * itl,
            "goodput_req_s": goodput, "completed": 80}


def test_overhead_is_judged_on_the_medians():
    row = overhead(summary(0.0314, 0.0105), summary(0.030, 0.010))
    assert row["ttft_p50_added"] == pytest.approx(0.04667, rel=1e-3)
    assert row["itl_p50_added_s"] == pytest.approx(0.0005)
    assert row["ttft_target_met"] and row["itl_target_met"]
    slow = overhead(summary(0.033, 0.0125), summary(0.030, 0.010))
    assert not slow["ttft_target_met"] and not slow["itl_target_met"]


def test_verdict_needs_every_pair_and_reports_the_worst():
    verdict = judge({"serial@8": (summary(0.031, 0.010), summary(0.030, 0.010)),
                     "serial@16": (summary(0.036, 0.0101), summary(0.030, 0.010))})
    assert verdict["met"] is False
    assert verdict["worst_ttft_p50_added"] == pytest.approx(0.2)
    assert verdict["worst_itl_p50_added_s"] == pytest.approx(0.0001)
    assert judge({})["met"] is False  # nothing measured is not a pass


def test_result_rows_pair_http_with_in_process_on_the_same_requests():
    def row(step, side, rate, ttft, shape="a"):
        return {"step": step, "side": side, "rate": rate, "summary": summary(ttft, 0.01), "workload_shape": shape}

    rows = [row("serial", "in_process", 8.0, 0.030), row("serial", "http", 8.0, 0.036),
            row("chunked", "in_process", 8.0, 0.030), row("chunked", "http", 8.0, 0.031, shape="b"),
            row("split", "http", 8.0, 0.040),  # no in-process twin: not judged
            {"step": "serial", "side": "http", "rate": 16.0, "error": "failed"}]  # no summary: not judged
    verdict = judge_rows(rows)
    assert list(verdict["pairs"]) == ["serial@8"] and verdict["different_requests"] == ["chunked@8"]
    assert verdict["worst_ttft_p50_added"] == pytest.approx(0.2) and verdict["met"] is False


class _Run:
    def __init__(self, traces):
        self.traces = traces


def test_workload_shape_tells_different_requests_apart():
    a = [RequestTrace(id=i, arrival_s=0.1 * i, prompt_len=10 + i, max_new_tokens=4) for i in range(3)]
    b = [RequestTrace(id=i, arrival_s=0.1 * i, prompt_len=10 + i, max_new_tokens=4) for i in reversed(range(3))]
    c = [RequestTrace(id=i, arrival_s=0.1 * i, prompt_len=10 + i, max_new_tokens=5) for i in range(3)]
    assert workload_shape(_Run(a)) == workload_shape(_Run(b)) != workload_shape(_Run(c))


def test_rows_with_the_servers_view_say_where_the_mean_ttft_went():
    view = {"histograms": {"ttft": {"mean_s": 0.034}, "parse": {"mean_s": 0.0012},
                           "first_delivery": {"mean_s": 0.0008}}}
    http = {"step": "serial", "side": "http", "rate": 8.0, "summary": summary(0.040, 0.01), "workload_shape": "a",
            "ttft_mean_s": 0.041, "server_view": view}
    inproc = {"step": "serial", "side": "in_process", "rate": 8.0, "summary": summary(0.032, 0.01),
              "workload_shape": "a", "ttft_mean_s": 0.033, "server_view": None}
    where = judge_rows([http, inproc])["pairs"]["serial@8"]["ttft_mean_where"]
    assert where["client_ttft_mean_s"] == 0.041 and where["in_process_ttft_mean_s"] == 0.033
    assert where["engine_added_s"] == pytest.approx(0.001)  # the engine's own TTFT, slower under the server
    assert where["outside_server_mean_s"] == pytest.approx(0.041 - 0.036)
    # rows recorded before the server's view was kept: judged as before, with no breakdown
    old = judge_rows([{k: v for k, v in r.items() if k not in ("ttft_mean_s", "server_view")} for r in (http, inproc)])
    assert "ttft_mean_where" not in old["pairs"]["serial@8"]
    assert old["pairs"]["serial@8"]["ttft_p50_added"] == pytest.approx(0.25)


def test_ttft_mean_counts_requests_with_a_token():
    traces = [RequestTrace(id=0, arrival_s=1.0, prompt_len=4, max_new_tokens=2, token_times_s=[1.5, 1.6]),
              RequestTrace(id=1, arrival_s=2.0, prompt_len=4, max_new_tokens=2, token_times_s=[2.1, 2.2]),
              RequestTrace(id=2, arrival_s=3.0, prompt_len=4, max_new_tokens=2)]
    assert ttft_mean_s(_Run(traces)) == pytest.approx(0.3)
    assert ttft_mean_s(_Run(traces[2:])) is None
