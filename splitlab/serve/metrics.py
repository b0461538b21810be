"""The server's own view of its requests, for ``/metrics`` (Prometheus text format).

Latencies use the definitions of every ``Run`` (``splitlab.measure.metrics``), measured on
the engine's clock: TTFT from the moment the request reached the engine (after parsing and
tokenising) to its first token; ITL every gap between consecutive tokens; E2E to the last
token. Two more split the server's side of the first token: the parse (the request received
by the app to its submission) and the first token's delivery (engine to the HTTP server). A
client sees more (the network, the HTTP server); ``splitlab bench`` reports the client's side
of the same requests, and the server's view from these (``splitlab.serve.server_view``). The gauges (queue depth, prompts being prefilled,
the running batch, KV slots in use and in all, and a split's SM split) are read from the engine at
each scrape.

Each app has its own ``CollectorRegistry``: two servers in one process never share a metric.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5, 5.0)
#: The server's own steps around the engine: sub-millisecond when all is well.
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0)


class _EngineGauges:
    """A collector that reads ``engine.stats()`` when scraped."""

    GAUGES = (("splitlab_num_requests_waiting", "requests arrived without a KV slot yet (queue depth)", "waiting"),
              ("splitlab_num_requests_prefilling", "requests whose prompt is being prefilled", "prefilling"),
              ("splitlab_num_requests_running", "requests in the running decode batch", "running"),
              ("splitlab_kv_slots_in_use", "KV slots held by requests", "kv_slots_in_use"),
              ("splitlab_kv_slots_total", "KV slots of the pool", "kv_slots"),
              ("splitlab_engine_alive", "1 while the engine thread runs", "alive"),
              # a split engine's SM split now (the adaptive policy's last decision); absent
              # when the two sides share every SM
              ("splitlab_decode_sms", "SMs the decode side runs on", "decode_sms"),
              ("splitlab_prefill_sms", "SMs the prefill side runs on", "prefill_sms"))

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        for name, doc, key in self.GAUGES:
            if stats.get(key) is None:
                continue
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], float(stats[key]))
            yield gauge


class ServerMetrics:
    """The histograms and counters of one server, and its engine's gauges."""

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("splitlab_time_to_first_token_seconds", "arrival at the engine to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("splitlab_inter_token_latency_seconds", "each gap between consecutive tokens",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("splitlab_e2e_request_latency_seconds", "arrival at the engine to last token",
                             buckets=E2E_BUCKETS, registry=r)
        self.parse = Histogram("splitlab_request_parse_seconds", "request received by the app to its submission "
                               "to the engine (JSON, validation, tokenising)", buckets=STEP_BUCKETS, registry=r)
        self.first_delivery = Histogram("splitlab_first_token_delivery_seconds", "the engine's first token to its "
                                        "first chunk handed to the HTTP server", buckets=STEP_BUCKETS, registry=r)
        self.prompt_tokens = Counter("splitlab_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("splitlab_generation_tokens", "tokens generated", registry=r)
        self.finished = Counter("splitlab_request_finished", "requests that ended, by finish reason",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("splitlab_request_rejected", "requests refused, by HTTP status", ["status"],
                                registry=r)
        r.register(_EngineGauges(engine))

    def observe(self, arrival_s: float, last_s: float | None, times_s) -> float | None:
        """Record a delta's token times; returns the time of its last token (for the next gap)."""
        for t in times_s:
            if last_s is None:
                self.ttft.observe(max(0.0, t - arrival_s))
            else:
                self.itl.observe(max(0.0, t - last_s))
            last_s = t
        self.generation_tokens.inc(len(times_s))
        return last_s

    def end(self, arrival_s: float, last_s: float | None, reason: str) -> None:
        if last_s is not None:
            self.e2e.observe(max(0.0, last_s - arrival_s))
        self.finished.labels(finish_reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
