"""The adpa.v1.Scorer gRPC servicer: protobuf <-> domain objects around one ScoringService."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from adpa.services import convert
from adpa.services.errors import Cancelled, DeadlineExceeded, ResourceExhausted
from adpa.services.metrics import ServiceMetrics
from adpa.services.scoring import ScoringService
from adpa.v1 import scoring_pb2 as pb
from adpa.v1 import scoring_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


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


class ScorerServicer(pb_grpc.ScorerServicer):
    def __init__(self, service: ScoringService, gate: AdmissionGate, metrics: ServiceMetrics):
        self.service = service
        self.gate = gate
        self.metrics = metrics

    def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfoResponse:
        return convert.info_to_pb(self.service.info())

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        with self.gate.admit():
            query = convert.query_from_pb(request)
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded("the request's deadline passed before scoring started")
            started = time.perf_counter()
            try:
                result = self.service.score(query, should_stop=lambda: not context.is_active())
            except Cancelled:
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded("the request's deadline passed while it was being scored") from None
                raise
            response = convert.result_to_pb(result, request.request_id, query.value_dtype)
            logger.debug(
                "request %s: %d sequences, %d positions, %s/%s, %.1f ms", request.request_id or "-",
                len(query.sequences), query.num_positions, query.signal, query.support.kind,
                1000 * (time.perf_counter() - started),
            )
        size = response.ByteSize()
        if size > self.service.limits.max_message_bytes:
            raise ResourceExhausted(
                f"the answer takes {size} bytes, over the message limit {self.service.limits.max_message_bytes}; "
                "score fewer positions per request"
            )
        self.metrics.positions.labels(result.signal, result.support).inc(query.num_positions)
        return response
