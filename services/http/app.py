"""The HTTP side of a scoring server: probes, model info, Prometheus metrics, JSON scoring for debugging.

    curl localhost:8080/healthz        # live: the process answers
    curl localhost:8080/readyz         # ready: models loaded, reference reachable, not draining
    curl localhost:8080/v1/info
    curl localhost:8080/metrics
    curl -X POST localhost:8080/v1/score -H 'content-type: application/json' \
         -d '{"sequences": [[5, 37, 7, 8]], "support": {"kind": "topk", "k": 3}}'

The OpenAPI schema is at /docs (from the models in `schema.py`).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import TypeVar

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adpa.errors import ServiceError, Unauthenticated
from adpa.services.frontend import Frontend
from adpa.services.http.schema import ModelInfoJSON, ScoreRequestJSON, ScoreResponseJSON

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Service error code -> HTTP status.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


def error_response(err: ServiceError) -> JSONResponse:
    headers = {"retry-after": str(max(1, err.retry_after_ms // 1000))} if err.retry_after_ms else None
    return JSONResponse(
        {"error": err.code, "message": err.message}, status_code=HTTP_STATUS.get(err.code, 500), headers=headers
    )


def create_app(frontend: Frontend, token: str | None = None) -> FastAPI:
    app = FastAPI(title="adpa scoring service", version=frontend.service.info().server_version)
    expected = f"Bearer {token}".encode() if token is not None else None

    def call(method: str, authorization: str | None, work: Callable[[], T]) -> T | JSONResponse:
        """Run `work` as one observed call of `method`, with auth, errors mapped to statuses."""
        try:
            with frontend.observe(method, "http"):
                if expected is not None and not hmac.compare_digest((authorization or "").encode(), expected):
                    raise Unauthenticated("missing or invalid bearer token")
                return work()
        except ServiceError as err:
            return error_response(err)
        except Exception:
            logger.exception("internal error in HTTP %s", method)
            return JSONResponse({"error": "INTERNAL", "message": "internal error; the server log has the details"},
                                status_code=500)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ready = frontend.ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(frontend.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info", response_model=ModelInfoJSON)
    def info(authorization: str | None = Header(None)):
        return call("ModelInfo", authorization, lambda: ModelInfoJSON.from_record(frontend.info()))

    @app.post("/v1/score", response_model=ScoreResponseJSON)
    def score(body: ScoreRequestJSON, request: Request, authorization: str | None = Header(None)):
        caller = f"{request.client.host}:{request.client.port}" if request.client else "http"

        def work() -> ScoreResponseJSON:
            return ScoreResponseJSON.from_record(frontend.score(body.to_record(), caller=caller), body.request_id)

        return call("Score", authorization, work)

    return app
