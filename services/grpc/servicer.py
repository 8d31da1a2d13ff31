"""The adpa.v1.Scorer gRPC servicer (asyncio): protobuf <-> records around the front end, nothing more.

The event loop only decides: ModelInfo is answered on it (cheap), and a Score call is admitted or
refused on it at once (`Frontend.admit`), so a full server answers RESOURCE_EXHAUSTED without a
thread. Admitted calls are decoded, scored and encoded on a worker thread (`executor`, one
thread per admission slot): the engine is blocking torch code and never runs on the loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Executor

from adpa import codec
from adpa.errors import ResourceExhausted
from adpa.services.admission import Admission
from adpa.services.frontend import Frontend
from adpa.v1 import scoring_pb2 as pb
from adpa.v1 import scoring_pb2_grpc as pb_grpc


class ScorerServicer(pb_grpc.ScorerServicer):
    def __init__(self, frontend: Frontend, executor: Executor):
        self.frontend = frontend
        self.executor = executor

    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:
        return codec.info_to_pb(self.frontend.info())

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        gone = threading.Event()  # set when the call ends, however it ends (read by the worker)
        context.add_done_callback(lambda _: gone.set())
        admission = self.frontend.admit()
        try:
            work = self.executor.submit(self._score, request, admission, deadline, gone.is_set, context.peer())
        except BaseException:
            admission.close()
            raise
        answer = asyncio.wrap_future(work)
        try:
            return await asyncio.shield(answer)
        except asyncio.CancelledError:
            if work.cancel():  # never started: nobody else will give the slot back
                admission.close()
                raise
            # The call ended under us (deadline, or the caller left). The worker stops at its next
            # micro-batch; wait for it, so what is counted is its outcome (DEADLINE_EXCEEDED, ...).
            return await answer

    def _score(self, request: pb.ScoreRequest, admission: Admission, deadline, is_cancelled, peer: str):
        """On a worker thread: decode (sizes checked before the request is split), score, encode."""
        with admission:
            query = codec.query_from_pb(request, check_size=self.frontend.check_size)
            result = self.frontend.score(
                query, deadline=deadline, is_cancelled=is_cancelled, caller=peer, admission=admission
            )
        response = codec.result_to_pb(result, request.request_id, query.value_dtype)
        size, limit = response.ByteSize(), self.frontend.service.limits.max_message_bytes
        if size > limit:
            raise ResourceExhausted(
                f"the answer takes {size} bytes, over the message limit {limit}; score fewer positions per request"
            )
        return response
