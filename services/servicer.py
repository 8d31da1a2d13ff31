"""The adpa.v1.Scorer gRPC servicer: protobuf <-> domain objects around one ScoringService."""

from __future__ import annotations

import logging
import time

import grpc

from adpa.services import convert
from adpa.services.admission import AdmissionGate
from adpa.services.errors import Cancelled, DeadlineExceeded, ResourceExhausted
from adpa.services.metrics import ServiceMetrics
from adpa.services.scoring import ScoringService
from adpa.v1 import scoring_pb2 as pb
from adpa.v1 import scoring_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


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
