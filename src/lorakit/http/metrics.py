"""Prometheus metrics of a server: per-request counters and latency histograms labelled by adapter and
version, plus the engine's gauges and counters read at scrape time (which adapter versions are resident,
the adapter cache's hit rate).

Each server has its own `CollectorRegistry` (not prometheus_client's global one), so several
apps in one process — tests, the benchmark — never collide. Engine numbers are read by a
collector from `Engine.stats()` when /metrics is scraped, so the step loop does no metric
work; per-request numbers (requests, tokens, errors, TTFT, latency, inter-token latency, queue
time) are observed once, when a request ends. `adapter` is the request's `model` (the base's name
included); `version` the adapter version it ran on ("support@2"; empty when it never reached the
engine, e.g. a 404), so a rollout's two versions are told apart on one dashboard.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lorakit.serve.engine import Engine, RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PREFIX = "lorakit"

# (stats key, metric name, help, kind)
_ENGINE_METRICS = [
    ("running", "num_requests_running", "Requests running in the engine (decoding or in prefill).", "gauge"),
    ("waiting", "num_requests_waiting", "Requests admitted by the server and waiting for the engine.", "gauge"),
    ("kv_blocks_used", "kv_cache_blocks_used", "KV cache blocks in use.", "gauge"),
    ("kv_blocks_total", "kv_cache_blocks_total", "KV cache blocks in the budget.", "gauge"),
    ("tokens_per_s", "generation_tokens_per_second", "Output tokens per second over the last 10 s.", "gauge"),
    ("adapters_resident", "adapters_resident", "Adapter versions resident on the model.", "gauge"),
    ("tokens_out", "generation_tokens", "Output tokens generated.", "counter"),
    ("prompt_tokens", "prompt_tokens", "Prompt tokens admitted.", "counter"),
    ("steps", "engine_steps", "Engine steps (forwards) run.", "counter"),
    ("adapter_hits", "adapter_cache_hits", "Requests whose adapter was resident.", "counter"),
    ("adapter_misses", "adapter_cache_misses", "Requests whose adapter had to be loaded.", "counter"),
    ("adapter_evictions", "adapter_cache_evictions", "Adapters evicted (LRU) to stay within max_cpu_loras.", "counter"),
    ("adapter_loads", "adapter_cache_loads", "Adapter loads completed.", "counter"),
    ("adapter_load_s", "adapter_cache_load_seconds", "Seconds spent loading adapters (off the step loop).", "counter"),
]


class _EngineCollector:
    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        for key, name, documentation, kind in _ENGINE_METRICS:
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(f"{_PREFIX}_{name}", documentation, value=stats[key])
        total = stats["kv_blocks_total"] or 1
        yield GaugeMetricFamily(f"{_PREFIX}_kv_cache_usage_ratio", "Share of KV cache blocks in use.",
                                value=stats["kv_blocks_used"] / total)
        asked = stats["adapter_hits"] + stats["adapter_misses"]
        yield GaugeMetricFamily(f"{_PREFIX}_adapter_cache_hit_ratio", "Share of adapter requests that found it "
                                "resident (1 before any).", value=stats["adapter_hits"] / asked if asked else 1.0)
        resident = GaugeMetricFamily(f"{_PREFIX}_adapter_resident", "1 per adapter version on the model now.",
                                     labels=["adapter", "version"])
        for version in self.engine.adapters.resident_versions():
            resident.add_metric([version.rpartition("@")[0] or version, version], 1.0)
        yield resident


class ServerMetrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        labels = ["adapter", "version"]
        self.requests = Counter(f"{_PREFIX}_requests", "Requests by adapter (the request's model), HTTP status "
                                "(499: the client went away) and adapter version.", ["adapter", "status", "version"],
                                registry=self.registry)
        self.errors = Counter(f"{_PREFIX}_request_errors", "Requests that ended in an error, by OpenAI error type.",
                              [*labels, "type"], registry=self.registry)
        self.tokens = Counter(f"{_PREFIX}_request_tokens", "Tokens of finished requests: prompt or generation.",
                              [*labels, "kind"], registry=self.registry)
        histogram = {"buckets": _LATENCY_BUCKETS, "registry": self.registry}
        self.ttft = Histogram(f"{_PREFIX}_time_to_first_token_seconds", "Time from arrival to the first token.",
                              labels, **histogram)
        self.latency = Histogram(f"{_PREFIX}_request_latency_seconds", "Time from arrival to the last token.",
                                 labels, **histogram)
        self.itl = Histogram(f"{_PREFIX}_inter_token_latency_seconds", "Time between two tokens of a request.",
                             labels, **histogram)
        self.queue = Histogram(f"{_PREFIX}_queue_time_seconds", "Time from arrival to the first step that ran it.",
                               labels, **histogram)

    def request_done(self, adapter: str, status: int, outputs: list[RequestOutput] = (), version: str = "",
                     error_type: str | None = None) -> None:
        """One HTTP request ended with `status`; `outputs`: its choices (none when it never reached the engine)."""
        self.requests.labels(adapter, str(status), version).inc()
        if error_type is not None:
            self.errors.labels(adapter, version, error_type).inc()
        if not outputs:
            return
        prompt = sum(len(o.prompt_ids) for o in outputs if o.choice == 0)  # a prompt's choices share it
        self.tokens.labels(adapter, version, "prompt").inc(prompt)
        self.tokens.labels(adapter, version, "generation").inc(sum(len(o.token_ids) for o in outputs))
        first = [o.ttft_s for o in outputs if o.ttft_s is not None]
        if first:
            self.ttft.labels(adapter, version).observe(min(first))
            self.latency.labels(adapter, version).observe(max(o.ttft_s + sum(o.itl_s) for o in outputs
                                                              if o.ttft_s is not None))
        self.queue.labels(adapter, version).observe(min(o.queue_s for o in outputs))
        itl = self.itl.labels(adapter, version)
        for output in outputs:
            for gap in output.itl_s:
                itl.observe(gap)

    def render(self) -> bytes:
        return generate_latest(self.registry)
