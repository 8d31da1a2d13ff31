"""`adpa serve`: one teacher or reference service in this process, over gRPC and HTTP, drained on SIGTERM.

    adpa serve --role reference --model runs/ref --port 50052
    adpa serve --role teacher --model runs/dpo --reference grpc://127.0.0.1:50052 --beta 0.1
    adpa serve --role teacher --model runs/dpo --reference runs/ref     # reference in process
"""

from __future__ import annotations

import logging
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

    def __init__(self, service: ScoringService, config: ServeConfig, metrics: ServiceMetrics | None = None):
        """`metrics`: those the service's engine reports its batches to (`open_service(observer=...)`)."""
        self.config = config
        token = config.auth_token.get_secret_value() if config.auth_token else None
        self.frontend = Frontend(service, max_inflight=config.max_inflight, metrics=metrics, token=token)
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
        app = create_app(self.frontend, config)
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
        self.frontend.close()
        logger.info("stopped")

    def serve_forever(self) -> None:
        """Start, then block until SIGTERM or SIGINT, and drain."""
        stop = stop_requested()
        self.start()
        stop.wait()
        self.stop()


def serve(config: ServeConfig) -> None:
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with ExitStack() as stack:
        try:
            metrics = ServiceMetrics()
            service = stack.enter_context(open_service(config, observer=metrics.observe_batch))
        except IncompatibleModels as err:  # a refusal, not a fault: one line, exit 2 (as a usage error)
            logger.error("cannot start the %s service: %s", config.role, err)
            raise SystemExit(2) from None
        except (OSError, ValueError, RuntimeError) as err:  # missing model, tokenizer mismatch, reference down
            logger.error("cannot start the %s service: %s", config.role, err)
            raise SystemExit(1) from None
        StandaloneServer(service, config, metrics).serve_forever()
