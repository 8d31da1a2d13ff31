"""The front end every transport calls: auth, admission, draining, deadlines and cancellation,
size checks, decode -> score -> encode, the answer-size check, and metrics.

gRPC, HTTP and Ray Serve are thin adapters around one `Frontend`: they read their transport's
request (message, metadata, deadline, caller), call one method here, and map the `ServiceError`s
it raises to their statuses through `status.py`. Everything a caller can observe besides the
transport (who is admitted, when and why a request is refused, what the metrics count) is decided
here, once.

    frontend = Frontend(service, max_inflight=16, metrics=metrics, token="s3cret")
    with frontend.observe("Score", "grpc"):
        frontend.authenticate(metadata)
        response = await frontend.answer_pb_async(request, deadline=deadline, caller=peer)
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from prometheus_client import generate_latest

from adpa import codec
from adpa.errors import Cancelled, DeadlineExceeded, ResourceExhausted, ServiceError, Unavailable
from adpa.protocol import ModelInfo, QuerySize, ScoreQuery, ScoreResult
from adpa.services.admission import Admission, AdmissionGate
from adpa.services.auth import BearerAuth, Pairs
from adpa.services.metrics import ServiceMetrics
from adpa.services.scoring import ScoringService
from adpa.v1 import scoring_pb2 as pb

logger = logging.getLogger(__name__)

R = TypeVar("R")
Decode = Callable[[Callable[[QuerySize], None]], ScoreQuery]  # the size check -> the query


class Frontend:
    """One scoring service as its transports see it."""

    def __init__(
        self,
        service: ScoringService,
        *,
        max_inflight: int = 16,
        replica: str | None = None,
        metrics: ServiceMetrics | None = None,
        token: str | None = None,
        more_metrics: Callable[[], bytes] | None = None,
        warning: str | None = None,
    ):
        """`metrics` should be the ones whose `observe_batch` the service's engine was built with
        (`build_service(config, observer=...)`), so its batches are counted with its calls.
        `more_metrics` adds another exposition to `metrics_text` (a Ray app's reference deployment).
        `warning` says how this service is degraded (readiness detail), e.g. replicas not placed."""
        self.service = service
        self.replica = replica if replica is not None else f"{socket.gethostname()}:{os.getpid()}"
        self.metrics = metrics or ServiceMetrics()
        self.gate = AdmissionGate(max_inflight, self.metrics)
        self.auth = BearerAuth(token)
        self.warning = warning
        self._more_metrics = more_metrics
        self._draining = threading.Event()
        model = service.engine.fingerprint
        self.metrics.model.info({"model_name": model.model_name, "role": service.role, "model_hash": model.model_hash,
                                 "tokenizer_hash": model.tokenizer_hash, "vocab_size": str(model.vocab_size),
                                 "shared_vocab": str(model.shared_vocab)})
        # One thread per admission slot: an admitted request never waits for a thread.
        self._executor = ThreadPoolExecutor(max_workers=max_inflight, thread_name_prefix="adpa-score")

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def drain(self) -> None:
        """Refuse new work from now on (work already admitted runs to its end)."""
        self._draining.set()

    def close(self) -> None:
        """Stop the scoring threads (queued work is dropped; call after the transports stopped)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def ready(self) -> bool:
        """Models loaded (they are, once this exists), a remote reference reachable, not draining."""
        return not self.draining and self.service.ready()

    @property
    def has_reference(self) -> bool:
        """Whether readiness depends on a reference reached elsewhere (worth watching)."""
        return self.service.reference is not None

    def metrics_text(self) -> bytes:
        """The Prometheus exposition of this front end (and of `more_metrics`, when given)."""
        text = generate_latest(self.metrics.registry)
        if self._more_metrics is not None:
            try:
                text += self._more_metrics()
            except Exception as err:  # a scrape must not fail because a dependency is down
                logger.warning("metrics of a dependency unavailable: %r", err)
        return text

    def count(self, transport: str, method: str, code: str) -> None:
        """Count a call a transport refused before it reached `observe` (a framework's refusal)."""
        self.metrics.requests.labels(transport, method, code).inc()

    def authenticate(self, pairs: Pairs | None) -> None:
        """Raise Unauthenticated unless the call's metadata or headers carry the token (if one is set)."""
        self.auth.check(pairs)

    # -- calls --------------------------------------------------------------------------------

    def info(self) -> ModelInfo:
        self._refuse_if_draining()
        return self.service.info()

    def info_pb(self) -> pb.ModelInfoResponse:
        return codec.info_to_pb(self.info())

    def admit(self) -> Admission:
        """Refuse at once (UNAVAILABLE while draining, RESOURCE_EXHAUSTED with a retry hint when
        `max_inflight` requests are in), or hold a slot until the returned Admission is closed.

        For transports that decide on an event loop and score on a worker thread: the worker
        passes the admission to `score`, which closes it when the work is done.
        """
        self._refuse_if_draining()
        return self.gate.admit()

    def score(
        self,
        query: ScoreQuery,
        *,
        deadline: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        caller: str = "",
        admission: Admission | None = None,
    ) -> ScoreResult:
        """Admit (unless `admission` is given), validate and answer one query.

        `deadline` is a `time.monotonic()` instant; `is_cancelled` tells whether the caller has
        gone. Both are polled between forward micro-batches, so abandoned work stops early.
        `caller` names the caller (e.g. its address): concurrent callers' sequences share
        forwards, taken in turn from each caller. The admission is closed when this returns.
        """
        with admission if admission is not None else self.admit():
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("the request's deadline passed before scoring started")

            def should_stop() -> bool:
                past = deadline is not None and time.monotonic() >= deadline
                return past or (is_cancelled is not None and is_cancelled())

            started = time.perf_counter()
            try:
                result = self.service.score(query, should_stop=should_stop, caller=caller, deadline=deadline)
            except Cancelled:
                if deadline is not None and time.monotonic() >= deadline:
                    raise DeadlineExceeded("the request's deadline passed while it was being scored") from None
                raise
        logger.debug(
            "request %s: %d sequences, %d positions, %s/%s, %.1f ms", query.request_id or "-",
            len(query.sequences), query.num_positions, query.signal, query.support.kind,
            1000 * (time.perf_counter() - started),
        )
        self.metrics.positions.labels(result.signal, result.support).inc(query.num_positions)
        result.replica = self.replica
        return result

    def answer(
        self,
        decode: Decode,
        encode: Callable[[ScoreResult, ScoreQuery], R],
        *,
        size: Callable[[R], int] | None = None,
        deadline: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        caller: str = "",
        admission: Admission | None = None,
    ) -> R:
        """One scoring call end to end: admit, decode (the sizes checked before the request is
        split), score, encode, and refuse an answer whose `size` is over the message limit."""
        with admission if admission is not None else self.admit() as admitted:
            query = decode(self.service.check_size)
            result = self.score(query, deadline=deadline, is_cancelled=is_cancelled, caller=caller, admission=admitted)
        response = encode(result, query)
        limit = self.service.limits.max_message_bytes
        if size is not None and (taken := size(response)) > limit:
            raise ResourceExhausted(
                f"the answer takes {taken} bytes, over the message limit {limit}; score fewer positions per request"
            )
        return response

    def answer_pb(self, request: pb.ScoreRequest, **call) -> pb.ScoreResponse:
        """`answer` for an adpa.v1 ScoreRequest message (gRPC, Ray Serve's gRPC proxy)."""
        return self.answer(
            lambda check_size: codec.query_from_pb(request, check_size=check_size),
            lambda result, query: codec.result_to_pb(result, request.request_id, query.value_dtype),
            size=pb.ScoreResponse.ByteSize, **call,
        )

    async def answer_pb_async(self, request: pb.ScoreRequest, *, deadline: float | None, caller: str) -> pb.ScoreResponse:
        """`answer_pb` from an event loop: admitted or refused on the loop at once (a full server
        answers RESOURCE_EXHAUSTED without a thread), then run on a scoring thread, since the
        engine is blocking torch code. If the awaiting task is cancelled (the caller left, or its
        deadline passed), the work stops at its next forward micro-batch."""
        gone = threading.Event()  # read by the worker between micro-batches
        admission = self.admit()
        try:
            work = self._executor.submit(
                self.answer_pb, request, deadline=deadline, is_cancelled=gone.is_set, caller=caller, admission=admission
            )
        except BaseException:
            admission.close()
            raise
        answer = asyncio.wrap_future(work)
        try:
            return await asyncio.shield(answer)
        except asyncio.CancelledError:
            gone.set()
            if work.cancel():  # never started: nobody else will give the slot back
                admission.close()
                raise
            # Wait for the worker, so what is counted is its outcome (DEADLINE_EXCEEDED, ...).
            return await answer

    @contextmanager
    def observe(self, method: str, transport: str) -> Iterator[None]:
        """Count and time one call of any transport, by method and final status code."""
        started = time.perf_counter()
        code = "OK"
        try:
            yield
        except ServiceError as err:
            code = err.code
            logger.info("%s %s refused (%s): %s", transport, method, code, err.message)
            raise
        except asyncio.CancelledError:  # an asyncio transport's call ended under it (the caller left)
            code = "CANCELLED"
            raise
        except BaseException:
            code = "INTERNAL"
            raise
        finally:
            self.metrics.requests.labels(transport, method, code).inc()
            self.metrics.latency.labels(transport, method).observe(time.perf_counter() - started)

    def _refuse_if_draining(self) -> None:
        if self.draining:
            raise Unavailable("server is shutting down; retry on another replica")
