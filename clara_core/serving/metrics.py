"""Prometheus metrics, one registry per app (so that several servers in one process never collide)."""

from __future__ import annotations

from typing import Any

from .requestlog import RequestRecord

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_WAIT_BUCKETS = (0.0, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "clara_requests",
            "Requests by endpoint, adapter and HTTP status",
            ["endpoint", "adapter", "status"],
            registry=r,
        )
        self.tokens = Counter(
            "clara_tokens", "Tokens by adapter and kind (prompt, completion)", ["adapter", "kind"], registry=r
        )
        self.latency = Histogram(
            "clara_request_latency_seconds",
            "Request latency by adapter",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "clara_time_to_first_token_seconds",
            "Time to first token by adapter",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "clara_queue_seconds",
            "Time from arrival to generation start",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "clara_adapter_queue_wait_seconds",
            "Time a request waited for its adapter's slot (0 when it was loaded), by adapter",
            ["adapter"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.queue_waiting = Gauge(
            "clara_adapter_queue_waiting", "Requests waiting for an adapter slot now", registry=r
        )
        self.queue_timeouts = Counter(
            "clara_adapter_queue_timeouts",
            "Requests answered 503 after waiting --queue-timeout for an adapter slot, by adapter",
            ["adapter"],
            registry=r,
        )
        self.loads = Counter(
            "clara_adapter_loads", "Adapter loads (explicit and hot-swap)", ["adapter"], registry=r
        )
        self.load_seconds = Histogram(
            "clara_adapter_load_seconds",
            "Time to check and load an adapter",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.evictions = Counter(
            "clara_adapter_evictions", "Least-recently-used adapters unloaded", ["adapter"], registry=r
        )
        self.unloads = Counter(
            "clara_adapter_unloads", "Adapters unloaded on request", ["adapter"], registry=r
        )
        self.refusals = Counter(
            "clara_adapter_refusals",
            "Adapters refused at load (hash or checksum mismatch)",
            ["adapter"],
            registry=r,
        )
        self.routes = Counter(
            "clara_route_decisions", "Routing decisions by chosen adapter", ["adapter"], registry=r
        )
        self.engine_errors = Counter(
            "clara_engine_errors",
            "Requests that failed in the engine (answered 500 engine_error), by adapter",
            ["adapter"],
            registry=r,
        )
        self.in_flight = Gauge("clara_in_flight_requests", "Requests admitted and not finished", registry=r)
        self.loaded = Gauge("clara_loaded_adapters", "Adapters loaded now", registry=r)

    def record(self, rec: RequestRecord) -> None:
        adapter = rec.adapter_id or ("-" if rec.selection == "none" else "base")
        self.requests.labels(rec.endpoint, adapter, str(rec.status)).inc()
        if rec.status < 400:
            self.tokens.labels(adapter, "prompt").inc(rec.prompt_tokens)
            self.tokens.labels(adapter, "completion").inc(rec.completion_tokens)
            self.latency.labels(adapter).observe(rec.latency_seconds)
            self.queue_time.labels(adapter).observe(rec.queue_seconds)
            if rec.first_token_seconds is not None:
                self.first_token.labels(adapter).observe(rec.first_token_seconds)
        if rec.error_code == "engine_error":
            self.engine_errors.labels(adapter).inc()
        if rec.selection == "routed":
            self.routes.labels(adapter).inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def describe(self) -> dict[str, Any]:  # pragma: no cover - debugging aid
        return {m.name: [s.value for s in m.samples] for m in self.registry.collect()}
