"""`adpa serve --ray`: the Ray Serve application from the same settings as `adpa serve`.

    adpa serve --ray --role teacher --model runs/dpo --reference runs/sft --auth-token "$TOKEN" \\
        --ray-replicas 2 --port 9000 --http-port 8000     # or --ray-autoscale 1:4: Serve adds and removes replicas

Checks that the deployments fit the cluster (exit 2 naming the numbers, or `--ray-allow-degraded`:
before starting a local Ray, whose resources are known, and again once joined), starts (or joins,
`--ray-address auto`) it, starts Serve with its gRPC proxy on `port` and
its HTTP proxy on `host:http_port`, deploys `build_app`, and on SIGTERM, whatever it is doing
(starting Ray, replicas pending, serving), deletes the application and stops the Ray it started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time

from adpa.services.config import ServeConfig
from adpa.services.ray.placement import app_asks, local_resources, shortfall
from adpa.services.stop import stop_requested

logger = logging.getLogger(__name__)

APP_NAME = "adpa"
SECRETS = ("auth_token", "reference_token")

# Serve's request path for adpa's calls (docs/benchmarks.md, "Ray Serve's hops", measures it):
# read by the proxies, the controller and the replicas as they start, so they go in the
# environment of every Ray node (set here for a local Ray; deploy/kuberay sets them in its pods).
SERVE_ENV = {
    # The teacher's methods are async and run the forward on a scoring thread already: a second
    # event loop on another thread for user code only adds a thread hop to each call.
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    # The router on the proxy's (and a replica's) own loop: no hand-off to a router loop per call.
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    # Proxy -> replica and teacher -> reference over gRPC, not Ray actor calls (which go through
    # the object store and Ray's task bookkeeping for every request).
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    # Each access line once, to the replica's log file: not to stderr too, which Ray's log monitor
    # reads and forwards.
    "RAY_SERVE_LOG_TO_STDERR": "0",
}


def app_args(config: ServeConfig) -> dict:
    """The application arguments of `config`: every field set, but its role, the Ray start-up
    options and the secrets (those reach the replicas through their environment)."""
    skip = {"role", "ray", "ray_address", "ray_allow_degraded", "host", "port", "http_port", *SECRETS}
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


def refuse_shortfall(warning: str | None) -> bool:
    """Say in one line why the deployments cannot all be placed; False when they can."""
    if warning:
        print(f"adpa serve: {warning} (or pass --ray-allow-degraded)", file=sys.stderr, flush=True)
    return warning is not None


def watch(stop: threading.Event, warning: str | None, period_s: float = 1.0, remind_s: float = 60.0) -> int:
    """Until `stop`: follow the application's status (exit code 1 if its deployment fails) and, while
    serving degraded, repeat `warning` in the log every `remind_s`."""
    from ray import serve

    last_reminder = time.monotonic()
    while not stop.wait(period_s):
        app = serve.status().applications.get(APP_NAME)
        if app is not None and app.status == "DEPLOY_FAILED":
            logger.error("the application failed to deploy: %s", app.message)
            return 1
        if warning and time.monotonic() - last_reminder >= remind_s:
            logger.warning("serving degraded: %s", warning)
            last_reminder = time.monotonic()
    return 0


@contextlib.contextmanager
def _keep_stop_handler_while_ray_starts():
    """ray.init installs a SIGTERM handler that raises SystemExit wherever the main thread happens
    to be. Raised inside a finalizer (logging's lock release, a __del__), Python only prints it
    ("Exception ignored in"): the stop was lost and the process went on to serve. While Ray starts,
    keep stop_requested's handler instead, which only sets the event checked after ray.init."""
    import ray._private.utils as ray_utils

    install = getattr(ray_utils, "set_sigterm_handler", None)
    if install is None:  # another Ray: its own handler, and the SystemExit path, as before
        yield
        return
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = install


def serve_on_ray(config: ServeConfig) -> int:
    """Start (or join) Ray, deploy, serve until SIGTERM or SIGINT, then delete the application and
    stop a local Ray this started. Returns the exit code: 2 when the deployments cannot all be
    placed (unless `ray_allow_degraded`), 1 when the deployment fails, else 0."""
    # Ray's crash handler in this driver would also catch the SIGTERM that asks for a clean stop
    # (and abort the process after the drain); set before Ray loads. Replicas keep theirs.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    # Serve's gRPC proxy takes its message limit from the environment of the Ray it runs in (2 GiB
    # by default): the same limit as `adpa serve`, for a local Ray this starts.
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(config.max_message_bytes))
    for name, value in SERVE_ENV.items():  # an operator's own setting wins
        os.environ.setdefault(name, value)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray
    from ray import serve

    from adpa.services.ray.app import GRPC_SERVICER_FUNCTIONS, build_app

    check_settings(config)
    # A local Ray's resources are known before it starts: an over-asking start fails in a second.
    if config.ray_address == "local" and not config.ray_allow_degraded:
        if refuse_shortfall(shortfall(app_asks(config), local_resources())):
            return 2
    stop = stop_requested()
    code = 0
    try:
        try:
            with _keep_stop_handler_while_ray_starts():
                ray.init(address=config.ray_address, include_dashboard=False,
                         runtime_env={"env_vars": secret_env(config)} if secret_env(config) else None)
        except SystemExit:  # a Ray whose own SIGTERM handler was installed after all: it raises this
            return 0
        stop = stop_requested(stop)  # in case ray.init replaced the handlers anyway
        if stop.is_set():  # asked for while Ray started
            return 0
        warning = shortfall(app_asks(config), ray.cluster_resources())
        if not config.ray_allow_degraded and refuse_shortfall(warning):
            return 2
        if warning:
            logger.warning("serving degraded (--ray-allow-degraded): %s", warning)
        elif config.ray_autoscale and (beyond := shortfall(app_asks(config, most=True), ray.cluster_resources())):
            # Not refused: a cluster with Ray's autoscaler adds nodes for replicas that wait.
            logger.warning("--ray-autoscale %s: at its maximum, %s", config.ray_autoscale, beyond)
        serve.start(
            http_options={"host": config.host, "port": config.http_port},
            grpc_options={"port": config.port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS},
        )
        # Not `serve.run`: it waits until every replica runs, which may be never (replicas that
        # cannot be placed), and a stop must not wait for it.
        serve._run(build_app(app_args(config)), name=APP_NAME, route_prefix="/", _blocking=False)
        logger.info("Ray Serve application %r: gRPC on :%d, HTTP on %s:%d", APP_NAME, config.port, config.host,
                    config.http_port)
        code = watch(stop, warning)
        logger.info("deleting the application")
        serve.delete(APP_NAME)
    except Exception:
        logger.exception("adpa serve --ray failed")
        code = 1
    finally:
        # Stopping now: a further SIGTERM (a supervisor repeating it, or Ray's process reaper
        # signalling its process group, which includes this driver) must not cut the teardown.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if ray.is_initialized():
            serve.shutdown()
        ray.shutdown()  # a local Ray this started (even half started) stops with it
        logger.info("stopped")
    return code
