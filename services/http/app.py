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
import json
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from adpa import __version__
from adpa.errors import ServiceError, Unauthenticated
from adpa.services.config import ServeConfig
from adpa.services.frontend import Frontend
from adpa.services.http.schema import ModelInfoJSON, ScoreRequestJSON, ScoreResponseJSON
from adpa.services.status import CODE_OF_HTTP_STATUS, as_service_error, http_status

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Routes answered without a token, whatever the configuration (Kubernetes probes send none).
PROBES = ("/healthz", "/readyz")
# Metric labels of the routes (others share one label: callers choose paths).
METHODS = {"/v1/score": "Score", "/v1/info": "ModelInfo"}


def error_response(err: ServiceError) -> JSONResponse:
    headers = {"retry-after": str(max(1, err.retry_after_ms // 1000))} if err.retry_after_ms else None
    return JSONResponse({"error": err.code, "message": err.message}, status_code=http_status(err), headers=headers)


class Guard:
    """ASGI middleware: auth before the body is read, a body-size limit, a deadline for the body."""

    def __init__(self, app, frontend: Frontend, *, max_body_bytes: int, receive_timeout_s: float, open_metrics: bool):
        self.app = app
        self.frontend = frontend
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
        if path not in self.open_paths:
            try:
                self.frontend.authenticate(headers)
            except Unauthenticated as err:
                await self._refuse(send, method, 401, err.code, err.message, {"www-authenticate": "Bearer"})
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
        self.frontend.count("http", method, code)
        logger.info("http %s refused (%s): %s", method, code, message)
        body = json.dumps({"error": code, "message": message}).encode()
        raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
        raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body})


def create_app(frontend: Frontend, config: ServeConfig) -> FastAPI:
    """The HTTP app of `frontend` (whose token, if any, every route but the probes asks for)."""
    app = FastAPI(title="adpa scoring service", version=__version__)
    app.add_middleware(Guard, frontend=frontend, max_body_bytes=int(config.http_max_body_mb * (1 << 20)),
                       receive_timeout_s=config.receive_timeout_s, open_metrics=config.open_metrics)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (unparsable JSON, unknown route, wrong method) in the same format."""
        code = CODE_OF_HTTP_STATUS.get(exc.status_code, "UNKNOWN")
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
        frontend.count("http", method, "INVALID_ARGUMENT")
        return JSONResponse({"error": "INVALID_ARGUMENT", "message": message, "detail": errors}, status_code=422)

    def call(method: str, work: Callable[[], T]) -> T | JSONResponse:
        """Run `work` as one observed call of `method`, errors mapped to statuses."""
        try:
            with frontend.observe(method, "http"):
                return work()
        except Exception as err:
            return error_response(as_service_error(err, f"HTTP {method}"))

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ready = frontend.ready()
        detail = {"detail": frontend.warning} if frontend.warning else {}
        return JSONResponse({"ready": ready, **detail}, status_code=200 if ready else 503)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(frontend.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info", response_model=ModelInfoJSON)
    def info():
        return call("ModelInfo", lambda: ModelInfoJSON.from_record(frontend.info()))

    @app.post("/v1/score", response_model=ScoreResponseJSON)
    def score(body: ScoreRequestJSON, request: Request):
        caller = f"{request.client.host}:{request.client.port}" if request.client else "http"

        encode = lambda result, query: ScoreResponseJSON.from_record(result, body.request_id)  # noqa: E731
        return call("Score", lambda: frontend.answer(body.to_record, encode, caller=caller))

    return app

