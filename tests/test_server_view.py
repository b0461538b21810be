"""``splitlab.serve.server_view``: a server's latency histograms read from Prometheus text (the
names vLLM, SGLang and splitlab serve use), their difference over a replay, the quantile
interpolation of ``histogram_quantile``, and the TTFT breakdown built from them."""

from __future__ import annotations

import pytest

from splitlab.measure.serve_overhead import breakdown
from splitlab.serve.server_view import difference, histograms, metrics_url, quantile


def page(name: str, buckets: dict[str, float], total: float, labels: str = "") -> str:
    sep = "," if labels else ""
    lines = [f"# HELP {name} test", f"# TYPE {name} histogram"]
    lines += [f'{name}_bucket{{{labels}{sep}le="{le}"}} {n}' for le, n in buckets.items()]
    lines += [f"{name}_count{{{labels}}} {buckets['+Inf']}" if labels else f"{name}_count {buckets['+Inf']}",
              f"{name}_sum{{{labels}}} {total}" if labels else f"{name}_sum {total}"]
    return "\n".join(lines) + "\n"


def test_metrics_url_sits_beside_the_openai_base():
    assert metrics_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/metrics"
    assert metrics_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/metrics"
    assert metrics_url("http://h:9/api") == "http://h:9/api/metrics"


def test_histograms_are_found_by_their_ending_and_summed_over_labels():
    text = (page("vllm:time_to_first_token_seconds", {"0.01": 1, "0.04": 3, "+Inf": 4}, 0.2,
                 labels='model_name="a"')
            + page("vllm:time_to_first_token_seconds", {"0.01": 0, "0.04": 1, "+Inf": 2}, 0.3,
                   labels='model_name="b"')
            + page("sglang:e2e_request_latency_seconds", {"1.0": 2, "+Inf": 2}, 1.5)
            + "# TYPE other_seconds histogram\nother_seconds_bucket{le=\"+Inf\"} 1\nother_seconds_count 1\n"
              "other_seconds_sum 9\n")
    found = histograms(text)
    assert set(found) == {"ttft", "e2e"}  # a histogram of another name is not read
    ttft = found["ttft"]
    assert ttft["name"] == "vllm:time_to_first_token_seconds"
    assert (ttft["count"], ttft["sum"]) == (6, pytest.approx(0.5))
    assert ttft["buckets"] == [(0.01, 1), (0.04, 4), (float("inf"), 6)]


def test_quantile_interpolates_inside_a_bucket_as_prometheus_does():
    buckets = [(0.01, 2.0), (0.03, 6.0), (0.1, 8.0), (float("inf"), 10.0)]
    assert quantile(0.1, buckets) == pytest.approx(0.005)  # rank 1 of the first bucket's 2, from 0
    assert quantile(0.5, buckets) == pytest.approx(0.025)  # rank 5: 3 of the second bucket's 4
    assert quantile(0.99, buckets) == pytest.approx(0.1)  # in +Inf: the last finite bound
    assert quantile(0.5, [(0.01, 0.0), (float("inf"), 0.0)]) is None  # nothing observed
    assert quantile(0.5, []) is None


def test_difference_is_what_the_replay_added():
    name = "splitlab_time_to_first_token_seconds"
    before = histograms(page(name, {"0.01": 2, "0.04": 2, "+Inf": 2}, 0.01))
    after = histograms(page(name, {"0.01": 2, "0.04": 6, "+Inf": 7}, 0.01 + 0.1 + 0.5)
                       + page("splitlab_request_parse_seconds", {"0.001": 5, "+Inf": 5}, 0.002))
    d = difference(before, after)
    assert d["ttft"]["count"] == 5 and d["ttft"]["mean_s"] == pytest.approx(0.12)
    assert d["ttft"]["p50_s"] == pytest.approx(0.01 + 0.03 * 2.5 / 4)  # rank 2.5 of the new 4 in (0.01, 0.04]
    assert d["parse"] == {"metric": "splitlab_request_parse_seconds", "count": 5, "mean_s": pytest.approx(0.0004),
                          "p50_s": pytest.approx(0.0005), "p99_s": pytest.approx(0.00099)}  # absent before: from zero
    assert difference(after, after)["ttft"]["mean_s"] is None  # nothing new: no mean


def test_breakdown_splits_the_client_ttft():
    view = {"ttft": {"mean_s": 0.030}, "parse": {"mean_s": 0.001}, "first_delivery": {"mean_s": 0.0005}}
    parts = breakdown(0.038, view)
    assert parts["server_ttft_mean_s"] == 0.030 and parts["server_parse_mean_s"] == 0.001
    assert parts["outside_server_mean_s"] == pytest.approx(0.038 - 0.0315)
    vllm = breakdown(0.05, {"ttft": {"mean_s": 0.04}})  # a server without splitlab's two extra histograms
    assert vllm["server_parse_mean_s"] is None and vllm["outside_server_mean_s"] == pytest.approx(0.01)
    assert breakdown(0.05, None) is None and breakdown(None, view) is None
    assert breakdown(0.05, {"ttft": {"mean_s": None}}) is None
