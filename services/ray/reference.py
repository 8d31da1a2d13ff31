"""The reference deployment of the Ray Serve app, and the handle through which teacher replicas reach it.

pi_ref answers behind a `Frontend` of its own, like every service: admission, validation and
metrics (its families named `adpa_reference_*`, served on the teacher's `/metrics` with its own).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from adpa.errors import DeadlineExceeded, Internal, ServiceError, Unavailable
from adpa.protocol import ModelInfo, ScoreQuery, SupportSpec, SupportValues
from adpa.services.config import ServeConfig
from adpa.services.factory import build_service
from adpa.services.frontend import Frontend
from adpa.services.metrics import ServiceMetrics

logger = logging.getLogger(__name__)


def replica_id() -> str:
    return serve.get_replica_context().replica_id.to_full_id_str()


def spread_over_gpus(settings: ServeConfig) -> ServeConfig:
    """A replica given several GPUs (ray_gpus_per_replica > 1) spans them with device_map=auto unless
    a device map is set: Ray makes exactly those GPUs visible to it."""
    if settings.ray_gpus_per_replica > 1 and settings.device_map is None:
        return settings.model_copy(update={"device_map": "auto"})
    return settings


def replica_frontend(settings: ServeConfig, metrics_prefix: str, reference: HandleReference | None = None,
                     warning: str | None = None) -> Frontend:
    """A replica's front end, its engine reporting batches to its metrics (and the reference's
    metrics served with them)."""
    metrics = ServiceMetrics(prefix=metrics_prefix)
    service = build_service(spread_over_gpus(settings), reference, observer=metrics.observe_batch)
    token = settings.auth_token.get_secret_value() if settings.auth_token else None
    return Frontend(service, max_inflight=settings.max_inflight, replica=replica_id(), metrics=metrics, token=token,
                    more_metrics=reference.metrics if reference is not None else None, warning=warning)


@serve.deployment(name="reference", max_ongoing_requests=32)
class Reference:
    """pi_ref: log-probs at the ids a teacher asks for, through its own front end. Requests of all
    teacher replicas share forward micro-batches (the engine's batching)."""

    def __init__(self, config: dict[str, Any]):
        # reference="" overrides an ADPA_REFERENCE in the environment (meant for the teacher).
        settings = ServeConfig.load(**{**config, "role": "reference", "reference": ""})
        self.frontend = replica_frontend(settings, "adpa_reference")

    def info(self) -> ModelInfo:
        return self.frontend.info()

    def metrics(self) -> bytes:
        return self.frontend.metrics_text()

    def score(
        self, sequences: list, ranges: list[tuple[int, int]], support: SupportSpec, caller: str = ""
    ) -> SupportValues:
        query = ScoreQuery(sequences=sequences, ranges=ranges, signal="logprobs", support=support)
        with self.frontend.observe("Score", "ray"):
            result = self.frontend.answer(lambda check_size: query, lambda result, _: result, caller=caller)
        return SupportValues(indices=result.indices, logprobs=result.values, log_tail=result.tail,
                             weights=result.weights)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class HandleReference:
    """The `ReferenceModel` of a teacher replica: the reference deployment, through its handle.

    The engine calls it from its scoring threads, but each call is made and awaited on the
    replica's event loop: a blocking `.result()` needs Serve's router on a loop of its own
    (RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP), which SERVE_ENV turns off to save a hand-off per call.
    """

    def __init__(self, handle: DeploymentHandle, info: ModelInfo, loop: asyncio.AbstractEventLoop,
                 timeout_s: float = 600.0):
        self.handle = handle
        self.fingerprint = info.model
        self._max_indices = info.limits.max_indices
        self.loop = loop
        self.timeout_s = timeout_s

    @classmethod
    async def connect(cls, handle: DeploymentHandle) -> HandleReference:
        """The handshake, awaited on the replica's event loop (its constructor runs there)."""
        return cls(handle, await handle.info.remote(), asyncio.get_running_loop())

    def _call(self, method: str, *args, timeout_s: float | None = None, deadline: float | None = None):
        """`deadline`: the caller's `time.monotonic()` instant; the call waits no longer than what is
        left of it, and missing it is DEADLINE_EXCEEDED (not UNAVAILABLE, which callers retry)."""
        wait = timeout_s or self.timeout_s
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
            if wait <= 0:
                raise DeadlineExceeded(f"the request's deadline passed before the reference was asked ({method})")
        if _running_loop() is self.loop:  # blocking here would stop the loop that must answer
            raise Internal(f"reference {method} asked for from the replica's event loop; ask from a thread")

        async def call():
            return await getattr(self.handle, method).remote(*args)

        future = asyncio.run_coroutine_threadsafe(call(), self.loop)
        try:
            return future.result(timeout=wait)
        except concurrent.futures.TimeoutError:
            future.cancel()  # the reference stops the work it no longer needs to answer
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded(f"the reference did not answer {method} within the request's deadline") from None
            raise Unavailable(f"reference deployment did not answer {method} in time") from None
        except ServiceError:
            raise
        except Exception as err:  # a replica died, the deployment is gone, ...
            logger.warning("reference deployment failed on %s: %r", method, err)
            raise Internal(f"reference deployment failed ({type(err).__name__})") from None

    def score(self, sequences, ranges, support, should_stop=None, caller="", deadline=None) -> SupportValues:
        return self._call("score", sequences, ranges, support, caller, deadline=deadline)

    def metrics(self) -> bytes:
        return self._call("metrics", timeout_s=5.0)

    def max_indices(self) -> int:
        return self._max_indices

    def ready(self) -> bool:
        try:
            self._call("info", timeout_s=2.0)
            return True
        except ServiceError:
            return False

    def close(self) -> None:
        pass
