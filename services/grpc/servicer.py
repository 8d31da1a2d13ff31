"""The adpa.v1.Scorer gRPC servicer: protobuf <-> records around the front end, nothing more."""

from __future__ import annotations

import time

import grpc

from adpa import codec
from adpa.errors import ResourceExhausted
from adpa.services.frontend import Frontend
from adpa.v1 import scoring_pb2 as pb
from adpa.v1 import scoring_pb2_grpc as pb_grpc


class ScorerServicer(pb_grpc.ScorerServicer):
    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfoResponse:
        return codec.info_to_pb(self.frontend.info())

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        query = codec.query_from_pb(request)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        result = self.frontend.score(
            query, deadline=deadline, is_cancelled=lambda: not context.is_active(), caller=context.peer()
        )
        response = codec.result_to_pb(result, request.request_id, query.value_dtype)
        size, limit = response.ByteSize(), self.frontend.service.limits.max_message_bytes
        if size > limit:
            raise ResourceExhausted(
                f"the answer takes {size} bytes, over the message limit {limit}; score fewer positions per request"
            )
        return response
