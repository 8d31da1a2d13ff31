"""Prometheus metrics of one scoring server (own registry, so several servers can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info


class ServiceMetrics:
    def __init__(self, prefix: str = "adpa") -> None:
        """`prefix` names the families; another one lets two services share one exposition."""
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{prefix}_requests", "Calls answered, by transport (grpc, http, ray), method and status code",
            ["transport", "method", "code"], registry=self.registry,
        )
        self.latency = Histogram(
            f"{prefix}_request_seconds",
            "Call latency in seconds, by transport and method",
            ["transport", "method"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.positions = Counter(
            f"{prefix}_scored_positions", "Scored positions answered, by signal and support", ["signal", "support"],
            registry=self.registry,
        )
        # The served model, as an info metric (adpa_model_info{model_name=...} 1): join on it by name.
        self.model = Info(f"{prefix}_model", "The served model: its served name, role, hashes and vocabulary",
                          registry=self.registry)
        self.inflight = Gauge(f"{prefix}_inflight_requests", "Scoring requests running or queued", registry=self.registry)
        self.batch_requests = Histogram(
            f"{prefix}_batch_requests", "Requests whose sequences shared one forward micro-batch",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=self.registry,
        )
        self.batch_sequences = Histogram(
            f"{prefix}_batch_sequences", "Sequences per forward micro-batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=self.registry,
        )
        self.batch_tokens = Counter(
            f"{prefix}_batch_padded_tokens", "Padded tokens forwarded (sequences x longest, per micro-batch)",
            registry=self.registry,
        )

    def observe_batch(self, requests: int, sequences: int, padded_tokens: int) -> None:
        """Record one forward micro-batch of the served model."""
        self.batch_requests.observe(requests)
        self.batch_sequences.observe(sequences)
        self.batch_tokens.inc(padded_tokens)
