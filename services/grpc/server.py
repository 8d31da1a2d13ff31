"""The gRPC server of one front end: Scorer, standard health checking and reflection, auth, TLS."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adpa.services.config import ServeConfig
from adpa.services.frontend import Frontend
from adpa.services.grpc.interceptors import AuthInterceptor, ServiceInterceptor
from adpa.services.grpc.servicer import ScorerServicer
from adpa.v1 import scoring_pb2, scoring_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = scoring_pb2.DESCRIPTOR.services_by_name["Scorer"].full_name


class GrpcServer:
    """adpa.v1.Scorer, grpc.health.v1 and reflection on `config.host:config.port`."""

    def __init__(self, frontend: Frontend, config: ServeConfig):
        self.frontend = frontend
        self.config = config
        interceptors = [ServiceInterceptor(frontend)]
        if config.auth_token is not None:
            interceptors.append(AuthInterceptor(config.auth_token.get_secret_value()))
        self.server = grpc.server(
            # Threads beyond max_inflight so that refusals are answered rather than queued.
            ThreadPoolExecutor(max_workers=config.max_inflight + 4, thread_name_prefix="adpa-grpc"),
            interceptors=interceptors,
            options=[  # gRPC's default is 4 MiB
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_receive_message_length", config.max_message_bytes),
            ],
        )
        scoring_pb2_grpc.add_ScorerServicer_to_server(ScorerServicer(frontend), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        address = f"{config.host}:{config.port}"
        if config.tls_cert is not None:
            creds = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)

    def start(self) -> None:
        self.server.start()
        self._set_health(True)
        if self.frontend.service.reference is not None:
            threading.Thread(target=self._watch_reference, name="adpa-reference-watch", daemon=True).start()

    def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def _watch_reference(self, period_s: float = 5.0) -> None:
        """Keep gRPC health in step with the reference (HTTP /readyz asks it directly)."""
        serving = True
        while not self.frontend.wait_drained(period_s):
            ready = self.frontend.service.ready()
            if ready != serving:
                status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
                self.health.set(SERVICE_NAME, status)
                logger.warning("reference %s", "reachable again" if ready else "unreachable: reporting NOT_SERVING")
                serving = ready

    def stop(self, grace: float) -> None:
        """Report NOT_SERVING, let running calls finish within `grace` seconds, then stop."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
