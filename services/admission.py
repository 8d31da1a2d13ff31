"""Admission control shared by every transport: a bound on requests running or queued."""

from __future__ import annotations

import threading
import time

from adpa.errors import ResourceExhausted
from adpa.services.metrics import ServiceMetrics


class Admission:
    """One admitted request's slot in the gate; `close()` (idempotent) gives it back.

    A context manager, so a transport that admits on one thread (an event loop) and works on
    another can hand the slot to the worker, which closes it when the work is really done.
    """

    def __init__(self, gate: AdmissionGate):
        self._gate = gate
        self._started = time.monotonic()
        self._closed = False
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._gate._leave(time.monotonic() - self._started)

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AdmissionGate:
    """Bounds the requests running or waiting for the model; the rest are refused at once with a
    retry hint, so a burst of trainers can't grow an unbounded queue (or memory)."""

    def __init__(self, limit: int, metrics: ServiceMetrics):
        self.limit = limit
        self.metrics = metrics
        self._count = 0
        self._lock = threading.Lock()
        self._mean_s = 0.1  # running mean of a request's time, for the retry hint

    def admit(self) -> Admission:
        """A slot, or ResourceExhausted with `retry_after_ms` when all `limit` slots are taken."""
        with self._lock:
            if self._count >= self.limit:
                wait_ms = int(1000 * self._mean_s * max(1, self._count) / 2)
                raise ResourceExhausted(
                    f"server busy: {self._count} requests in flight (limit {self.limit}); retry later",
                    retry_after_ms=max(wait_ms, 10),
                )
            self._count += 1
            self.metrics.inflight.set(self._count)
        return Admission(self)

    def _leave(self, seconds: float) -> None:
        with self._lock:
            self._count -= 1
            self.metrics.inflight.set(self._count)
            self._mean_s = 0.9 * self._mean_s + 0.1 * seconds
