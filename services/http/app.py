"""The HTTP side of a scoring server: probes, model info, Prometheus metrics, JSON scoring for debugging.

    curl localhost:8080/healthz        # live: the process answers
    curl localhost:8080/readyz         # ready: models loaded, reference reachable, not draining
    curl localhost:8080/v1/info
    curl localhost:8080/metrics
    curl -X POST localhost:8080/v1/score -H 'content-type: application/json' \
         -d '{"sequences": [[5, 37, 7, 8]], "support": {"kind": "topk", "k": 3}}'

The OpenAPI schema is at /docs (from the models in `schema.py`).

Every request passes `Guard` (an ASGI middleware) before any route sees it: with a token set,
the token is checked first (before the body is read), then the body's size (413 over
`max_body_bytes`, from its content-length or while it arrives) and the time it takes to arrive
(408 after `receive_timeout_s`). Only then is the body parsed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adpa.errors import ServiceError
from adpa.services.frontend import Frontend
from adpa.services.http.schema import ModelInfoJSON, ScoreRequestJSON, ScoreResponseJSON

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Service error code -> HTTP status. RESOURCE_EXHAUSTED is 429 (retry later) only with a retry hint;
# without one it is a size limit, which retrying cannot help: 413.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 413,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
INTERNAL_MESSAGE = "internal error; the server log has the details"
# HTTP status -> error code, for refusals that come from the framework rather than the service.
CODE_OF_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                  405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED", 422: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
                  500: "INTERNAL", 503: "UNAVAILABLE"}
# Routes answered without a token, whatever the configuration (Kubernetes probes send none).
PROBES = ("/healthz", "/readyz")
# Metric labels of the routes (others share one label: callers choose paths).
METHODS = {"/v1/score": "Score", "/v1/info": "ModelInfo"}


def http_status(err: ServiceError) -> int:
    if err.code == "RESOURCE_EXHAUSTED" and err.retry_after_ms is not None:
        return 429
    return HTTP_STATUS.get(err.code, 500)


def error_response(err: ServiceError) -> JSONResponse:
    headers = {"retry-after": str(max(1, err.retry_after_ms // 1000))} if err.retry_after_ms else None
    return JSONResponse({"error": err.code, "message": err.message}, status_code=http_status(err), headers=headers)


class Guard:
    """ASGI middleware: auth before the body is read, a body-size limit, a deadline for the body."""

    def __init__(self, app, frontend: Frontend, *, token: str | None, max_body_bytes: int,
                 receive_timeout_s: float, open_metrics: bool):
        self.app = app
        self.frontend = frontend
        self.expected = f"Bearer {token}".encode() if token is not None else None
        self.max_body_bytes = max_body_bytes
        self.receive_timeout_s = receive_timeout_s
        self.open_paths = PROBES + (("/metrics",) if open_metrics else ())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        path = scope["path"]
        method = METHODS.get(path, "other")
        headers = scope.get("headers") or []
        if self.expected is not None and path not in self.open_paths:
            offered = [value for key, value in headers if key.lower() == b"authorization"]
            matches = [hmac.compare_digest(value, self.expected) for value in offered]  # every entry, constant time
            if not any(matches):
                message = "missing bearer token" if not offered else "invalid bearer token"
                await self._refuse(send, method, 401, "UNAUTHENTICATED", message, {"www-authenticate": "Bearer"})
                return
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = next((value for key, value in headers if key.lower() == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(send, method, 413, "RESOURCE_EXHAUSTED", self._too_large(int(declared)))
            return
        body = bytearray()
        while True:
            remaining = started + self.receive_timeout_s - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.001))
            except asyncio.TimeoutError:
                await self._refuse(send, method, 408, "DEADLINE_EXCEEDED",
                                   f"the request body did not arrive within {self.receive_timeout_s:g} s")
                return
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await self._refuse(send, method, 413, "RESOURCE_EXHAUSTED", self._too_large(len(body), "at least "))
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self, size: int, qualifier: str = "") -> str:
        return (f"the request body takes {qualifier}{size} bytes, over the limit {self.max_body_bytes} "
                "(http_max_body_mb); use gRPC for large requests")

    async def _refuse(self, send, method: str, status: int, code: str, message: str,
                      headers: dict[str, str] | None = None) -> None:
        self.frontend.metrics.requests.labels("http", method, code).inc()
        logger.info("http %s refused (%s): %s", method, code, message)
        body = json.dumps({"error": code, "message": message}).encode()
        raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
        raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body})


def create_app(
    frontend: Frontend,
    token: str | None = None,
    *,
    max_body_bytes: int = 4 << 20,
    receive_timeout_s: float = 30.0,
    open_metrics: bool = True,
) -> FastAPI:
    app = FastAPI(title="adpa scoring service", version=frontend.service.info().server_version)
    app.add_middleware(Guard, frontend=frontend, token=token, max_body_bytes=max_body_bytes,
                       receive_timeout_s=receive_timeout_s, open_metrics=open_metrics)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (unparsable JSON, unknown route, wrong method) in the same format."""
        code = CODE_OF_STATUS.get(exc.status_code, "UNKNOWN")
        return JSONResponse({"error": code, "message": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming the problem. Never echoes the input: it may be huge, or not JSON (Infinity)."""
        errors = [
            {"loc": [str(part) for part in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()[:20]
        ]
        message = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors[:3]) or "invalid request body"
        if len(exc.errors()) > 3:
            message += f"; and {len(exc.errors()) - 3} more"
        method = METHODS.get(request.url.path, "other")
        frontend.metrics.requests.labels("http", method, "INVALID_ARGUMENT").inc()
        return JSONResponse({"error": "INVALID_ARGUMENT", "message": message, "detail": errors}, status_code=422)

    def call(method: str, work: Callable[[], T]) -> T | JSONResponse:
        """Run `work` as one observed call of `method`, errors mapped to statuses."""
        try:
            with frontend.observe(method, "http"):
                return work()
        except ServiceError as err:
            return error_response(err)
        except Exception:
            logger.exception("internal error in HTTP %s", method)
            return JSONResponse({"error": "INTERNAL", "message": INTERNAL_MESSAGE}, status_code=500)

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
    def info():
        return call("ModelInfo", lambda: ModelInfoJSON.from_record(frontend.info()))

    @app.post("/v1/score", response_model=ScoreResponseJSON)
    def score(body: ScoreRequestJSON, request: Request):
        caller = f"{request.client.host}:{request.client.port}" if request.client else "http"

        def work() -> ScoreResponseJSON:
            query = body.to_record(check_size=frontend.check_size)  # sizes checked before the split
            return ScoreResponseJSON.from_record(frontend.score(query, caller=caller), body.request_id)

        return call("Score", work)

    return app

