"""Prometheus metrics of one scoring server (own registry, so several servers can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "adpa_requests", "Calls answered, by transport (grpc, http, ray), method and status code",
            ["transport", "method", "code"], registry=self.registry,
        )
        self.latency = Histogram(
            "adpa_request_seconds",
            "Call latency in seconds, by transport and method",
            ["transport", "method"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.positions = Counter(
            "adpa_scored_positions", "Scored positions answered, by signal and support", ["signal", "support"],
            registry=self.registry,
        )
        self.inflight = Gauge("adpa_inflight_requests", "Scoring requests running or queued", registry=self.registry)
