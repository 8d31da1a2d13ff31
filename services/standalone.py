"""`adpa serve`: one teacher or reference service in this process, over gRPC and HTTP, drained on SIGTERM.

    adpa serve --role reference --model runs/ref --port 50052
    adpa serve --role teacher --model runs/dpo --reference grpc://127.0.0.1:50052 --beta 0.1
    adpa serve --role teacher --model runs/dpo --reference runs/ref     # reference in process
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import ExitStack

from adpa.services.config import ServeConfig
from adpa.services.factory import open_service
from adpa.services.frontend import Frontend
from adpa.services.grpc.server import GrpcServer
from adpa.services.scoring import IncompatibleModels, ScoringService

logger = logging.getLogger(__name__)


class StandaloneServer:
    """gRPC (Scorer, health, reflection) and optionally HTTP in front of one service."""

    def __init__(self, service: ScoringService, config: ServeConfig):
        self.config = config
        self.frontend = Frontend(service, max_inflight=config.max_inflight)
        self.grpc = GrpcServer(self.frontend, config)
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
        if self.config.http_port:
            self._start_http()

    def _start_http(self) -> None:
        import uvicorn

        from adpa.services.http.app import create_app

        config = self.config
        token = config.auth_token.get_secret_value() if config.auth_token else None
        app = create_app(self.frontend, token, max_body_bytes=int(config.http_max_body_mb * (1 << 20)),
                         receive_timeout_s=config.receive_timeout_s, open_metrics=config.open_metrics)
        self._http = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.http_port, log_level="warning"))
        self._http_thread = threading.Thread(target=self._http.run, name="adpa-http", daemon=True)
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
    with ExitStack() as stack:
        try:
            service = stack.enter_context(open_service(config))
        except IncompatibleModels as err:  # a refusal, not a fault: one line, exit 2 (as a usage error)
            logger.error("cannot start the %s service: %s", config.role, err)
            raise SystemExit(2) from None
        except (OSError, ValueError, RuntimeError) as err:  # missing model, tokenizer mismatch, reference down
            logger.error("cannot start the %s service: %s", config.role, err)
            raise SystemExit(1) from None
        StandaloneServer(service, config).serve_forever()
