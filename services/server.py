"""Lifecycle of a teacher or reference server: load models, serve gRPC (+ HTTP), drain on SIGTERM.

    adpa serve --role reference --model runs/ref --port 50052
    adpa serve --role teacher --model runs/dpo --reference grpc://127.0.0.1:50052 --beta 0.1
    adpa serve --role teacher --model runs/dpo --reference runs/ref     # reference in process
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adpa.client import TeacherClient
from adpa.services.config import ServeConfig
from adpa.services.engine import ScoringEngine
from adpa.services.interceptors import AuthInterceptor, ServiceInterceptor
from adpa.services.metrics import ServiceMetrics
from adpa.services.scoring import LocalReference, RemoteReference, ScoringService
from adpa.services.admission import AdmissionGate
from adpa.services.servicer import ScorerServicer
from adpa.v1 import scoring_pb2, scoring_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = scoring_pb2.DESCRIPTOR.services_by_name["Scorer"].full_name


def build_service(config: ServeConfig) -> ScoringService:
    """Load the model(s) a config names and wire them into a ScoringService."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    engine_args = dict(
        max_seq_len=config.max_seq_len,
        max_batch_tokens=config.max_batch_tokens,
        logits_budget_bytes=int(config.logits_budget_mb * (1 << 20)),
    )
    load_args = dict(
        device=config.device, dtype=config.dtype, revision=config.revision, trust_remote_code=config.trust_remote_code
    )
    logger.info("loading %s model %s", config.role, config.model)
    engine = ScoringEngine.from_pretrained(config.model, **load_args, **engine_args)
    reference = None
    if config.role == "teacher":
        if config.remote_reference:
            token = config.reference_token.get_secret_value() if config.reference_token else None
            client = TeacherClient(config.reference, token=token, max_message_bytes=config.max_message_bytes)
            reference = RemoteReference(client)
            wait_for_reference(reference, config.reference)
        else:
            logger.info("loading reference model %s in process", config.reference)
            reference = LocalReference(ScoringEngine.from_pretrained(config.reference, **load_args, **engine_args))
    return ScoringService(engine, role=config.role, reference=reference, beta=config.beta, limits=config.limits())


def wait_for_reference(reference: RemoteReference, endpoint: str, timeout_s: float = 600.0) -> None:
    """A teacher may start before its reference has loaded; wait for the handshake."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fp = reference.fingerprint
            logger.info("reference %s at %s (model %s)", fp.model_name, endpoint, fp.model_hash)
            return
        except grpc.RpcError as err:
            if time.monotonic() > deadline:
                raise RuntimeError(f"reference at {endpoint} did not answer within {timeout_s:.0f}s") from err
            logger.info("waiting for reference at %s (%s)", endpoint, err.code().name)
            time.sleep(2.0)


class ScoringServer:
    """gRPC (Scorer, health, reflection) and optionally HTTP in front of one ScoringService."""

    def __init__(self, service: ScoringService, config: ServeConfig):
        self.service = service
        self.config = config
        self.metrics = ServiceMetrics()
        self.draining = threading.Event()
        self.gate = AdmissionGate(config.max_inflight, self.metrics)
        interceptors = [ServiceInterceptor(self.metrics, self.draining.is_set)]
        if config.auth_token is not None:
            interceptors.append(AuthInterceptor(config.auth_token.get_secret_value()))
        self.grpc_server = grpc.server(
            # Threads beyond max_inflight so that refusals are answered rather than queued.
            ThreadPoolExecutor(max_workers=config.max_inflight + 4, thread_name_prefix="adpa-grpc"),
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_receive_message_length", config.max_message_bytes),
            ],
        )
        scoring_pb2_grpc.add_ScorerServicer_to_server(
            ScorerServicer(service, self.gate, self.metrics), self.grpc_server
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server
        )
        address = f"{config.host}:{config.port}"
        if config.tls_cert is not None:
            creds = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
            self.port = self.grpc_server.add_secure_port(address, creds)
        else:
            self.port = self.grpc_server.add_insecure_port(address)
        self._http = None
        self._http_thread: threading.Thread | None = None

    def start(self) -> None:
        self.grpc_server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        info = self.service.info()
        logger.info(
            "serving %s %s (model %s, tokenizer %s, vocab %d) on %s:%d",
            info.role, info.model.model_name, info.model.model_hash, info.model.tokenizer_hash,
            info.model.vocab_size, self.config.host, self.port,
        )
        if self.config.http_port:
            self._start_http()
        if isinstance(self.service.reference, RemoteReference):
            threading.Thread(target=self._watch_reference, name="adpa-reference-watch", daemon=True).start()

    def _watch_reference(self, period_s: float = 5.0) -> None:
        """Keep gRPC health in step with the remote reference (HTTP /readyz asks it directly)."""
        serving = True
        while not self.draining.wait(period_s):
            ready = self.service.ready()
            if ready != serving:
                status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
                for name in ("", SERVICE_NAME):
                    self.health.set(name, status)
                logger.warning("reference %s", "reachable again" if ready else "unreachable: reporting NOT_SERVING")
                serving = ready

    def _start_http(self) -> None:
        import uvicorn

        from adpa.services.http import create_app

        token = self.config.auth_token.get_secret_value() if self.config.auth_token else None
        app = create_app(self.service, self.metrics, self.gate, self.draining.is_set, token)
        self._http = uvicorn.Server(
            uvicorn.Config(app, host=self.config.host, port=self.config.http_port, log_level="warning")
        )
        self._http_thread = threading.Thread(target=self._http.run, name="adpa-http", daemon=True)
        self._http_thread.start()
        logger.info("HTTP (health, readiness, info, metrics) on %s:%d", self.config.host, self.config.http_port)

    def stop(self, grace: float | None = None) -> None:
        """Refuse new work, let running requests finish within `grace` seconds, then stop."""
        grace = self.config.grace_period_s if grace is None else grace
        self.draining.set()
        self.health.enter_graceful_shutdown()
        logger.info("draining: finishing running requests (grace %.1fs)", grace)
        self.grpc_server.stop(grace).wait()
        if self._http is not None:
            self._http.should_exit = True
            self._http_thread.join(timeout=5)
        logger.info("stopped")

    def serve_forever(self) -> None:
        """Start, then block until SIGTERM or SIGINT, and drain."""
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        self.start()
        stop.wait()
        self.stop()


def serve(config: ServeConfig) -> None:
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        service = build_service(config)
    except (OSError, ValueError, RuntimeError) as err:  # missing model, tokenizer mismatch, reference down
        logger.error("cannot start the %s service: %s", config.role, err)
        raise SystemExit(1) from None
    ScoringServer(service, config).serve_forever()
