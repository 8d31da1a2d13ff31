"""Admission control shared by every transport: a bound on requests running or queued."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from adpa.errors import ResourceExhausted
from adpa.services.metrics import ServiceMetrics


class AdmissionGate:
    """Bounds the requests running or waiting for the model; the rest are refused at once with a
    retry hint, so a burst of trainers can't grow an unbounded queue (or memory)."""

    def __init__(self, limit: int, metrics: ServiceMetrics):
        self.limit = limit
        self.metrics = metrics
        self._count = 0
        self._lock = threading.Lock()
        self._mean_s = 0.1  # running mean of a request's time, for the retry hint

    @contextmanager
    def admit(self) -> Iterator[None]:
        with self._lock:
            if self._count >= self.limit:
                wait_ms = int(1000 * self._mean_s * max(1, self._count) / 2)
                raise ResourceExhausted(
                    f"server busy: {self._count} requests in flight (limit {self.limit}); retry later",
                    retry_after_ms=max(wait_ms, 10),
                )
            self._count += 1
            self.metrics.inflight.set(self._count)
        started = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1
                self.metrics.inflight.set(self._count)
                self._mean_s = 0.9 * self._mean_s + 0.1 * (time.monotonic() - started)
