"""`adpa serve`: one teacher or reference service in this process, over gRPC and HTTP, drained on SIGTERM.

    adpa serve --role reference --model runs/ref --port 50052
    adpa serve --role teacher --model runs/dpo --reference grpc://127.0.0.1:50052 --beta 0.1
    adpa serve --role teacher --model runs/dpo --reference runs/ref     # reference in process
"""

from __future__ import annotations

import logging
import socket
import threading
from contextlib import ExitStack

from adpa.services.config import ServeConfig
from adpa.services.factory import open_service
from adpa.services.frontend import Frontend
from adpa.services.grpc.server import GrpcServer
from adpa.services.metrics import ServiceMetrics
from adpa.services.scoring import IncompatibleModels, ScoringService
from adpa.services.stop import stop_requested

logger = logging.getLogger(__name__)


class StandaloneServer:
    """gRPC (Scorer, health, reflection) and optionally HTTP in front of one service."""

    def __init__(self, service: ScoringService, config: ServeConfig, metrics: ServiceMetrics | None = None,
                 http_socket: socket.socket | None = None):
        """`metrics`: those the service's engine reports its batches to (`open_service(observer=...)`);
        `http_socket`: bound to `config.http_port` (`http_listener`), where HTTP is served."""
        self.config = config
        token = config.auth_token.get_secret_value() if config.auth_token else None
        self.frontend = Frontend(service, max_inflight=config.max_inflight, metrics=metrics, token=token)
        self.grpc = GrpcServer(self.frontend, config)
        self._http_socket = http_socket
        self._http = None
        self._http_thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.grpc.port

    def start(self) -> None:
        self.grpc.start()
        info = self.frontend.service.info()
        logger.info(
            "serving %s %s (model %s, tokenizer %s of %d tokens, vocab %d, signals on ids < %d) on %s:%d",
            info.role, info.model.model_name, info.model.model_hash, info.model.tokenizer_hash,
            info.model.tokenizer_size, info.model.vocab_size, info.model.shared_vocab, self.config.host, self.port,
        )
        if self._http_socket is not None:
            self._start_http()

    def _start_http(self) -> None:
        import uvicorn

        from adpa.services.http.app import create_app

        config = self.config
        app = create_app(self.frontend, config)
        self._http = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.http_port, log_level="warning"))
        self._http_thread = threading.Thread(target=self._http.run, kwargs={"sockets": [self._http_socket]},
                                             name="adpa-http", daemon=True)
        self._http_thread.start()
        logger.info("HTTP (health, readiness, info, metrics) on %s:%d", self.config.host, self.config.http_port)

    def stop(self, grace: float | None = None) -> None:
        """Refuse new work, let running requests finish within `grace` seconds, then stop."""
        grace = self.config.grace_period_s if grace is None else grace
        self.frontend.drain()
        logger.info("draining: finishing running requests (grace %.1fs)", grace)
        self.grpc.stop(grace)
        if self._http is not None:
            self._http.should_exit = True
            self._http_thread.join(timeout=5)
        self.frontend.close()
        logger.info("stopped")

    def serve_forever(self) -> None:
        """Start, then block until SIGTERM or SIGINT, and drain."""
        stop = stop_requested()
        self.start()
        stop.wait()
        self.stop()


def http_listener(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, for the HTTP side to listen on.

    Bound before the model loads, so that a port in use stops the start-up at once, with an error
    that names it. (uvicorn binding it itself, in its thread, only logged the error: the server went
    on without HTTP, and whatever held the port answered the health checks.)"""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)  # as uvicorn
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"HTTP cannot listen on {host}:{port} (--http-port): {err.strerror}") from None
    return sock


def serve(config: ServeConfig) -> None:
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with ExitStack() as stack:
        try:
            http_socket = None
            if config.http_port:
                http_socket = stack.enter_context(http_listener(config.host, config.http_port))
            metrics = ServiceMetrics()
            service = stack.enter_context(open_service(config, observer=metrics.observe_batch))
            server = StandaloneServer(service, config, metrics, http_socket)
        except IncompatibleModels as err:  # a refusal, not a fault: one line, exit 2 (as a usage error)
            logger.error("cannot start the %s service: %s", config.role, err)
            raise SystemExit(2) from None
        except (OSError, ValueError, RuntimeError) as err:  # a busy port, no model, tokenizer mismatch, no reference
            logger.error("cannot start the %s service: %s", config.role, err)
            raise SystemExit(1) from None
        server.serve_forever()
