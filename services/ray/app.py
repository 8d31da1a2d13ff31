"""The teacher cluster on Ray Serve: a teacher and a reference deployment, scaled independently.

    serve run deploy/serve.yaml                       # a local Ray, or: serve deploy on a cluster
    adpa serve --ray --role teacher --model runs/dpo --reference runs/sft   # the same, from flags

The teacher deployment is the application's ingress: Serve's gRPC proxy routes adpa.v1.Scorer
(and grpc.health.v1 Check) to its methods of the same names, Serve's HTTP proxy routes the HTTP
side (`/healthz`, `/readyz`, `/v1/info`, `/metrics`, `/v1/score`) to its FastAPI app. Each replica
holds pi_dpo behind the same `Frontend` as `adpa serve` (admission, batching across callers,
metrics) and reaches pi_ref through a deployment handle:

    Teacher(config) ──handle──▶ Reference(config)        or   Teacher(config) ──gRPC──▶ reference service

so advantages stay exact at every returned id and carry both fingerprints. The application's
arguments are `ServeConfig` fields (plus `reference_*` overrides for the reference deployment);
replicas, autoscaling and resources are Serve's own per-deployment options (deploy/serve.yaml).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.handle import DeploymentHandle

from adpa import codec
from adpa.errors import DeadlineExceeded, Internal, ServiceError, Unavailable
from adpa.protocol import ModelFingerprint, SupportSpec, SupportValues
from adpa.services.config import ServeConfig
from adpa.services.factory import build_service
from adpa.services.frontend import Frontend
from adpa.services.grpc.interceptors import check_bearer, status_of
from adpa.v1 import scoring_pb2 as pb

logger = logging.getLogger(__name__)

# Serve's gRPC proxy imports these to learn the services it serves (grpc_options in serve.yaml).
GRPC_SERVICER_FUNCTIONS = [
    "adpa.v1.scoring_pb2_grpc.add_ScorerServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


def _replica_id() -> str:
    return serve.get_replica_context().replica_id.to_full_id_str()


def spread_over_gpus(settings: ServeConfig) -> ServeConfig:
    """A replica given several GPUs (ray_gpus_per_replica > 1) spans them with device_map=auto unless
    a device map is set: Ray makes exactly those GPUs visible to it."""
    if settings.ray_gpus_per_replica > 1 and settings.device_map is None:
        return settings.model_copy(update={"device_map": "auto"})
    return settings


@serve.deployment(name="reference", max_ongoing_requests=32)
class Reference:
    """pi_ref: log-probs at the ids a teacher asks for. Requests of all teacher replicas share
    forward micro-batches (the engine's batching)."""

    def __init__(self, config: dict[str, Any]):
        # reference="" overrides an ADPA_REFERENCE in the environment (meant for the teacher).
        self.service = build_service(spread_over_gpus(ServeConfig.load(**{**config, "role": "reference", "reference": ""})))

    def fingerprint(self) -> ModelFingerprint:
        return self.service.engine.fingerprint

    def max_indices(self) -> int:
        return self.service.limits.max_indices

    def score(
        self, sequences: list, ranges: list[tuple[int, int]], support: SupportSpec, caller: str = ""
    ) -> SupportValues:
        # The teacher built this request from a validated one: no second validation here.
        return self.service.engine.score(sequences, ranges, support, caller=caller)


class HandleReference:
    """The `ReferenceModel` of a teacher replica: the reference deployment, through its handle."""

    def __init__(self, handle: DeploymentHandle, fingerprint: ModelFingerprint, max_indices: int,
                 timeout_s: float = 600.0):
        self.handle = handle
        self.fingerprint = fingerprint
        self._max_indices = max_indices
        self.timeout_s = timeout_s

    @classmethod
    async def connect(cls, handle: DeploymentHandle) -> HandleReference:
        """The handshake, awaited (a replica's constructor runs on its event loop)."""
        return cls(handle, await handle.fingerprint.remote(), await handle.max_indices.remote())

    def _call(self, method: str, *args, timeout_s: float | None = None, deadline: float | None = None):
        """`deadline`: the caller's `time.monotonic()` instant; the call waits no longer than what is
        left of it, and missing it is DEADLINE_EXCEEDED (not UNAVAILABLE, which callers retry)."""
        wait = timeout_s or self.timeout_s
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
            if wait <= 0:
                raise DeadlineExceeded(f"the request's deadline passed before the reference was asked ({method})")
        try:
            return getattr(self.handle, method).remote(*args).result(timeout_s=wait)
        except TimeoutError:
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

    def max_indices(self) -> int:
        return self._max_indices

    def ready(self) -> bool:
        try:
            self._call("fingerprint", timeout_s=2.0)
            return True
        except ServiceError:
            return False

    def close(self) -> None:
        pass


@serve.deployment(name="teacher", max_ongoing_requests=32)
@serve.ingress()
class Teacher:
    """pi_dpo behind the adpa.v1 contract: the ingress of the application."""

    async def __init__(self, config: dict[str, Any], reference: DeploymentHandle | None = None):
        settings = spread_over_gpus(ServeConfig.load(**{**config, "role": "teacher"}))
        handle_reference = await HandleReference.connect(reference) if reference is not None else None
        self.service = build_service(settings, handle_reference)
        self.frontend = Frontend(self.service, max_inflight=settings.max_inflight, replica=_replica_id())
        self.token = settings.auth_token.get_secret_value() if settings.auth_token else None
        self.settings = settings

    def __serve_build_asgi_app__(self):
        from adpa.services.http.app import create_app

        s = self.settings
        return create_app(self.frontend, self.token, max_body_bytes=int(s.http_max_body_mb * (1 << 20)),
                          receive_timeout_s=s.receive_timeout_s, open_metrics=s.open_metrics)

    def _grpc(self, method: str, grpc_context, work, empty):
        """One gRPC call: auth, metrics and errors as `adpa serve` answers them."""
        try:
            with self.frontend.observe(method, "ray"):
                if self.token is not None:
                    check_bearer(grpc_context.invocation_metadata(), self.token)
                return work()
        except ServiceError as err:
            if err.retry_after_ms is not None:
                grpc_context.set_trailing_metadata([("grpc-retry-pushback-ms", str(err.retry_after_ms))])
            grpc_context.set_code(status_of(err))
            grpc_context.set_details(err.message)
        except Exception:
            logger.exception("internal error in %s", method)
            grpc_context.set_code(grpc.StatusCode.INTERNAL)
            grpc_context.set_details("internal error; the server log has the details")
        return empty

    def ModelInfo(self, request: pb.ModelInfoRequest, grpc_context) -> pb.ModelInfoResponse:
        return self._grpc(
            "ModelInfo", grpc_context, lambda: codec.info_to_pb(self.frontend.info()), pb.ModelInfoResponse()
        )

    def Score(self, request: pb.ScoreRequest, grpc_context) -> pb.ScoreResponse:
        def work() -> pb.ScoreResponse:
            query = codec.query_from_pb(request, check_size=self.frontend.check_size)  # sizes before the split
            result = self.frontend.score(query, caller=grpc_context.peer())
            return codec.result_to_pb(result, request.request_id, query.value_dtype)

        return self._grpc("Score", grpc_context, work, pb.ScoreResponse())

    def Check(self, request: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1: SERVING while this replica is ready (no token needed, like `adpa serve`)."""
        ready = self.frontend.ready()
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application of deploy/serve.yaml: `args` are ServeConfig fields of the teacher.

    `reference` is a model (a reference deployment is created for it, with the same settings
    but for `reference_*` keys, e.g. `reference_dtype`; or, with `ray_colocate_reference`, each
    teacher replica loads it beside pi_dpo), or the endpoint grpc://host:port of a reference
    service running elsewhere (no reference deployment). `ray_*` fields give each
    deployment's replicas and resources; a `deployments:` entry of a Serve config overrides them.
    Tokens come from the environment (ADPA_AUTH_TOKEN, ADPA_REFERENCE_TOKEN; runtime_env
    env_vars in a Serve config), never from the arguments, so they stay out of Serve's config.
    """
    args = {k: v for k, v in args.items() if v is not None}
    if {"auth_token", "reference_token"} & set(args):
        raise ValueError("pass auth_token / reference_token as ADPA_AUTH_TOKEN / ADPA_REFERENCE_TOKEN in the "
                         "environment (runtime_env env_vars), not as application arguments")
    overrides = {k.removeprefix("reference_"): args.pop(k) for k in [k for k in args if k.startswith("reference_")]}
    config = ServeConfig.load(**{**args, "role": "teacher"})  # checks the arguments now, not in a replica

    def options(replicas: int) -> dict[str, Any]:
        return dict(
            num_replicas=replicas,
            max_ongoing_requests=config.max_inflight,  # so requests of several callers can batch
            ray_actor_options={"num_cpus": config.ray_cpus_per_replica, "num_gpus": config.ray_gpus_per_replica},
        )

    teacher = Teacher.options(**options(config.ray_replicas))
    if config.remote_reference or config.ray_colocate_reference:  # no reference deployment
        return teacher.bind(args)
    # The teacher's own name is not the reference's (reference_served_model_name names that one).
    reference_args = {**{k: v for k, v in args.items() if k not in ("reference", "served_model_name")}, **overrides,
                      "model": config.reference}
    return teacher.bind(args, Reference.options(**options(config.ray_reference_replicas)).bind(reference_args))
