"""The teacher cluster on Ray Serve: a teacher and a reference deployment, scaled independently.

    serve run deploy/serve.yaml                       # a local Ray, or: serve deploy on a cluster
    adpa serve --ray --role teacher --model runs/dpo --reference runs/sft   # the same, from flags

The teacher deployment is the application's ingress: Serve's gRPC proxy routes adpa.v1.Scorer
(and grpc.health.v1 Check) to its methods of the same names, Serve's HTTP proxy routes the HTTP
side (`/healthz`, `/readyz`, `/v1/info`, `/metrics`, `/v1/score`) to its FastAPI app. Each replica
holds pi_dpo behind the same `Frontend` as `adpa serve` (admission, batching across callers,
metrics) and reaches pi_ref through a deployment handle:

    Teacher(config) ──handle──▶ Reference(config)        or   Teacher(config) ──gRPC──▶ reference service

so advantages stay exact at every returned id and carry both fingerprints (`reference.py`).
The caller's deadline does not reach a replica (docs/architecture.md, "Ray Serve"). The application's
arguments are `ServeConfig` fields (plus `reference_*` overrides for the reference deployment);
replicas, autoscaling and resources are Serve's own per-deployment options (deploy/serve.yaml).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import ray
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.handle import DeploymentHandle

from adpa.services.config import ServeConfig
from adpa.services.ray.placement import app_asks, shortfall
from adpa.services.ray.reference import HandleReference, Reference, replica_frontend
from adpa.services.status import as_service_error, grpc_status
from adpa.v1 import scoring_pb2 as pb

logger = logging.getLogger(__name__)

# autoscaling_config's metrics_interval_s is deprecated for environment variables that this Ray does
# not read yet: it is still the one setting of how often the load is reported (each time Serve
# validates the config, it would warn).
warnings.filterwarnings("ignore", message="The `metrics_interval_s` field", category=DeprecationWarning)

# Serve's gRPC proxy imports these to learn the services it serves (grpc_options in serve.yaml).
GRPC_SERVICER_FUNCTIONS = [
    "adpa.v1.scoring_pb2_grpc.add_ScorerServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


@serve.deployment(name="teacher", max_ongoing_requests=32)
@serve.ingress()
class Teacher:
    """pi_dpo behind the adpa.v1 contract: the ingress of the application. Its gRPC methods only
    read the call (message, metadata, peer) and map the front end's errors to statuses."""

    async def __init__(self, config: dict[str, Any], reference: DeploymentHandle | None = None):
        settings = ServeConfig.load(**{**config, "role": "teacher"})
        handle_reference = await HandleReference.connect(reference) if reference is not None else None
        warning = shortfall(app_asks(settings), ray.cluster_resources())
        if warning:
            logger.warning("serving degraded: %s", warning)
        self.frontend = replica_frontend(settings, "adpa", handle_reference, warning)
        self.settings = settings

    def __serve_build_asgi_app__(self):
        from adpa.services.http.app import create_app

        return create_app(self.frontend, self.settings)

    async def _grpc(self, method: str, grpc_context, work: Callable[[], Awaitable[Any]], empty):
        """One gRPC call: auth, metrics and statuses as `adpa serve` answers them."""
        try:
            with self.frontend.observe(method, "ray"):
                self.frontend.authenticate(grpc_context.invocation_metadata())
                return await work()
        except Exception as failure:
            err = as_service_error(failure, method)
            if err.retry_after_ms is not None:
                grpc_context.set_trailing_metadata([("grpc-retry-pushback-ms", str(err.retry_after_ms))])
            grpc_context.set_code(grpc_status(err))
            grpc_context.set_details(err.message)
        return empty

    async def ModelInfo(self, request: pb.ModelInfoRequest, grpc_context) -> pb.ModelInfoResponse:
        async def work() -> pb.ModelInfoResponse:
            return self.frontend.info_pb()

        return await self._grpc("ModelInfo", grpc_context, work, pb.ModelInfoResponse())

    async def Score(self, request: pb.ScoreRequest, grpc_context) -> pb.ScoreResponse:
        def work() -> Awaitable[pb.ScoreResponse]:
            return self.frontend.answer_pb_async(request, deadline=None, caller=grpc_context.peer())

        return await self._grpc("Score", grpc_context, work, pb.ScoreResponse())

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
            graceful_shutdown_timeout_s=config.grace_period_s,  # running requests' time on a stop, as `adpa serve`
            ray_actor_options={"num_cpus": config.ray_cpus_per_replica, "num_gpus": config.ray_gpus_per_replica},
        )

    teacher_options = options(config.ray_replicas)
    if config.ray_autoscale is not None:
        teacher_options.pop("num_replicas")
        teacher_options["autoscaling_config"] = autoscaling_config(config)
    teacher = Teacher.options(**teacher_options)
    if config.remote_reference or config.ray_colocate_reference:  # no reference deployment
        return teacher.bind(args)
    reference_args = {**{k: v for k, v in args.items() if k != "reference"}, **overrides, "model": config.reference}
    return teacher.bind(args, Reference.options(**options(config.ray_reference_replicas)).bind(reference_args))


def autoscaling_config(config: ServeConfig) -> dict[str, Any]:
    """Serve's autoscaling_config of the teacher deployment from `ray_autoscale` and its companions.

    The target counts requests running or queued on a replica; a replica's batches are made of the
    requests it holds (at most max_ongoing_requests = max_inflight), so a target well under that
    cap lets each replica batch several callers before another replica is added, instead of
    spreading trainers one per replica where batching would have served them.
    """
    low, high = config.ray_autoscale_range
    return {
        "min_replicas": low,
        "max_replicas": high,
        "target_ongoing_requests": config.autoscale_target,
        "upscale_delay_s": config.ray_upscale_delay_s,
        "downscale_delay_s": config.ray_downscale_delay_s,
        "metrics_interval_s": config.ray_autoscale_metrics_s,
        "look_back_period_s": 3 * config.ray_autoscale_metrics_s,
    }
