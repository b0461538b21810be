"""The server's own view of a bench run: its Prometheus latency histograms, scraped before and
after the replay, as the difference of the two.

vLLM (``vllm:``), SGLang (``sglang:``) and ``splitlab serve`` (``splitlab_``) name their
histograms with the same endings (``time_to_first_token_seconds``,
``e2e_request_latency_seconds``, and in their recent versions ``inter_token_latency_seconds``;
an older server's ``time_per_output_token_seconds`` is not read: its meaning changed between
versions), so one reader serves all.
``splitlab serve`` adds two that split its side of the TTFT: ``request_parse_seconds`` (the
request received by the app to its submission: JSON, validation, tokenising) and
``first_token_delivery_seconds`` (the engine's first token to its first chunk handed to the
HTTP server). What the client's mean TTFT holds beyond the server's parse + TTFT + delivery is
the HTTP server, the network and the client (``splitlab.measure.serve_overhead.breakdown``).

Means are exact (the histograms' sums and counts); quantiles are interpolated inside a bucket,
as Prometheus' ``histogram_quantile`` does, so they are only as fine as the buckets.
"""

from __future__ import annotations

import math
from typing import Any

ENDINGS = {"ttft": "time_to_first_token_seconds", "itl": "inter_token_latency_seconds",
           "e2e": "e2e_request_latency_seconds", "parse": "request_parse_seconds",
           "first_delivery": "first_token_delivery_seconds"}


def metrics_url(endpoint: str) -> str:
    """``/metrics`` beside an OpenAI base URL (``http://host:port/v1`` -> ``http://host:port/metrics``)."""
    base = endpoint.rstrip("/")
    return (base[:-3] if base.endswith("/v1") else base) + "/metrics"


def histograms(text: str) -> dict[str, dict[str, Any]]:
    """``{key: {"name", "count", "sum", "buckets": [(upper bound, cumulative count)]}}`` for each
    histogram of ``ENDINGS`` in a Prometheus text page (unlabelled series, or summed over labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        key = next((k for k, end in ENDINGS.items() if family.name.endswith(end)), None)
        if key is None or key in out:
            continue
        count = total = 0.0
        buckets: dict[float, float] = {}
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
            elif sample.name.endswith("_sum"):
                total += sample.value
        out[key] = {"name": family.name, "count": count, "sum": total, "buckets": sorted(buckets.items())}
    return out


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative ``(upper bound, count)`` pairs."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, cum in buckets:
        if cum >= rank:
            if math.isinf(upper):
                return lower  # past the last finite bound: its bound is all that is known
            return lower + (upper - lower) * ((rank - below) / (cum - below) if cum > below else 1.0)
        lower, below = upper, cum
    return lower


def difference(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What the requests between the two scrapes added: per histogram its count, mean and
    p50 / p99 (seconds); a histogram absent before counts from zero."""
    out = {}
    for key, now in after.items():
        then = before.get(key, {"count": 0.0, "sum": 0.0, "buckets": []})
        old = dict(then["buckets"])
        buckets = [(le, cum - old.get(le, 0.0)) for le, cum in now["buckets"]]
        count = now["count"] - then["count"]
        out[key] = {"metric": now["name"], "count": int(round(count)),
                    "mean_s": (now["sum"] - then["sum"]) / count if count > 0 else None,
                    "p50_s": quantile(0.5, buckets), "p99_s": quantile(0.99, buckets)}
    return out


async def scrape(client, url: str) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
    """``(histograms, None)``, or ``(None, why not)`` when the server has no readable ``/metrics``."""
    import httpx

    try:
        resp = await client.get(url)
    except httpx.HTTPError as exc:
        return None, f"{url}: {type(exc).__name__}: {exc}"
    if resp.status_code != 200:
        return None, f"{url}: HTTP {resp.status_code}"
    try:
        found = histograms(resp.text)
    except (ValueError, KeyError) as exc:
        return None, f"{url}: not Prometheus text ({exc})"
    return (found, None) if found else (None, f"{url}: no latency histogram")
