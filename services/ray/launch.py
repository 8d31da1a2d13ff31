"""`adpa serve --ray`: the Ray Serve application from the same settings as `adpa serve`.

    adpa serve --ray --role teacher --model runs/dpo --reference runs/sft --auth-token "$TOKEN" \\
        --ray-replicas 2 --port 9000 --http-port 8000

Starts (or joins, `--ray-address auto`) a Ray cluster, starts Serve with its gRPC proxy on `port`
and its HTTP proxy on `host:http_port`, deploys `build_app`, and tears it down on SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from adpa.services.config import ServeConfig

logger = logging.getLogger(__name__)

APP_NAME = "adpa"
SECRETS = ("auth_token", "reference_token")


def app_args(config: ServeConfig) -> dict:
    """The application arguments of `config`: every field set, but its role, the Ray start-up
    options and the secrets (those reach the replicas through their environment)."""
    skip = {"role", "ray", "ray_address", "host", "port", "http_port", *SECRETS}
    return {k: v for k, v in config.model_dump(mode="json").items() if k not in skip and v is not None}


def secret_env(config: ServeConfig) -> dict[str, str]:
    return {
        f"ADPA_{name.upper()}": value.get_secret_value()
        for name in SECRETS
        if (value := getattr(config, name)) is not None
    }


def check_settings(config: ServeConfig) -> None:
    """Refuse settings Serve cannot honour, with the reason (ValueError)."""
    if config.role != "teacher":
        raise ValueError("with --ray, serve the teacher: its reference becomes a deployment of the same application")
    # Serve's gRPC proxy listens on every interface (it takes no bind address).
    if config.auth_token is None and config.host in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(
            "with --ray, Serve's gRPC proxy listens on every interface, not only on --host; set --auth-token "
            "(or ADPA_AUTH_TOKEN), or pass --host 0.0.0.0 to accept a service reachable without a token"
        )
    if not config.http_port:
        raise ValueError("with --ray, Serve always runs its HTTP proxy: give --http-port a port (not 0)")
    if config.tls_cert is not None:
        raise ValueError("with --ray, TLS is not available: Serve's gRPC proxy serves plaintext; terminate TLS in "
                         "front of it (a load balancer or Kubernetes ingress)")


def serve_on_ray(config: ServeConfig) -> None:
    # Ray's crash handler in this driver would also catch the SIGTERM that asks for a clean stop
    # (and abort the process after the drain); set before Ray loads. Replicas keep theirs.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray
    from ray import serve

    from adpa.services.ray.app import GRPC_SERVICER_FUNCTIONS, build_app

    check_settings(config)
    ray.init(address=config.ray_address, include_dashboard=False,
             runtime_env={"env_vars": secret_env(config)} if secret_env(config) else None)
    # After ray.init, which installs its own SIGTERM handler (exit at once): a stop asked for
    # while the application deploys waits for the deployment, then tears it down.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(
            http_options={"host": config.host, "port": config.http_port},
            grpc_options={"port": config.port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS},
        )
        serve.run(build_app(app_args(config)), name=APP_NAME, route_prefix="/")
        logger.info("Ray Serve application %r: gRPC on :%d, HTTP on %s:%d", APP_NAME, config.port, config.host,
                    config.http_port)
        stop.wait()
        logger.info("deleting the application")
        serve.delete(APP_NAME)
    finally:
        # Stopping now: a further SIGTERM (a supervisor repeating it, or Ray's process reaper
        # signalling its process group, which includes this driver) must not cut the teardown.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        serve.shutdown()
        ray.shutdown()
        logger.info("stopped")
