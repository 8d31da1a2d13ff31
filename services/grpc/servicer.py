"""The adpa.v1.Scorer gRPC servicer (asyncio): reads the call (message, deadline, peer) for the front end.

ModelInfo is answered on the event loop (cheap); Score is admitted or refused on the loop and
scored on one of the front end's threads (`Frontend.answer_pb_async`). Auth, errors -> statuses
and metrics are the interceptor's (`interceptors.py`).
"""

from __future__ import annotations

import time

from adpa.services.frontend import Frontend
from adpa.v1 import scoring_pb2 as pb
from adpa.v1 import scoring_pb2_grpc as pb_grpc


class ScorerServicer(pb_grpc.ScorerServicer):
    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:
        return self.frontend.info_pb()

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        return await self.frontend.answer_pb_async(request, deadline=deadline, caller=context.peer())
