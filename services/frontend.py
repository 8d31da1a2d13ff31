"""The front end every transport calls: admission, draining, deadlines, limits and metrics.

gRPC, HTTP and Ray Serve are thin adapters around one `Frontend`: they decode a request into a
`ScoreQuery`, call `Frontend.score`, encode the `ScoreResult`, and map `ServiceError`s to their
own statuses. Everything a caller can observe besides the encoding (who is admitted, when a
request is refused, what the metrics count) is decided here, once.

    frontend = Frontend(service, max_inflight=16)
    with frontend.observe("Score", "grpc"):
        result = frontend.score(query, deadline=time.monotonic() + 30, is_cancelled=lambda: False)
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from adpa.errors import Cancelled, DeadlineExceeded, ServiceError, Unavailable
from adpa.protocol import ModelInfo, QuerySize, ScoreQuery, ScoreResult
from adpa.services.admission import Admission, AdmissionGate
from adpa.services.metrics import ServiceMetrics
from adpa.services.scoring import ScoringService

logger = logging.getLogger(__name__)


class Frontend:
    """One scoring service as its transports see it."""

    def __init__(
        self,
        service: ScoringService,
        *,
        max_inflight: int = 16,
        replica: str | None = None,
        metrics: ServiceMetrics | None = None,
    ):
        self.service = service
        self.replica = replica if replica is not None else f"{socket.gethostname()}:{os.getpid()}"
        self.metrics = metrics or ServiceMetrics()
        self.gate = AdmissionGate(max_inflight, self.metrics)
        self._draining = threading.Event()
        service.engine.scheduler.observer = self.metrics.observe_batch
        model = service.engine.fingerprint
        self.metrics.model.info({"model_name": model.model_name, "role": service.role, "model_hash": model.model_hash,
                                 "tokenizer_hash": model.tokenizer_hash, "vocab_size": str(model.vocab_size),
                                 "shared_vocab": str(model.shared_vocab)})

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def drain(self) -> None:
        """Refuse new work from now on (work already admitted runs to its end)."""
        self._draining.set()

    def wait_drained(self, period_s: float) -> bool:
        """Block until draining starts or `period_s` passes; True once draining."""
        return self._draining.wait(period_s)

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Models loaded (they are, once this exists), a remote reference reachable, not draining."""
        return not self.draining and self.service.ready()

    # -- calls --------------------------------------------------------------------------------

    def info(self) -> ModelInfo:
        self._refuse_if_draining()
        return self.service.info()

    def check_size(self, size: QuerySize) -> None:
        """Refuse a request over the limits from its sizes, before it is taken apart (see
        `ScoringService.check_size`); transports pass this to the decoder."""
        self.service.check_size(size)

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
