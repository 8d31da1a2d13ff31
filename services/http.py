"""The HTTP side of a scoring server: probes, model info, Prometheus metrics, JSON scoring for debugging.

    curl localhost:8080/healthz        # live: the process answers
    curl localhost:8080/readyz         # ready: models loaded, remote reference reachable, not draining
    curl localhost:8080/v1/info
    curl localhost:8080/metrics
    curl -X POST localhost:8080/v1/score -H 'content-type: application/json' \
         -d '{"sequences": [[5, 37, 7, 8]], "support": {"kind": "topk", "k": 3}}'
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
from collections.abc import Callable
from typing import Literal

import torch
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from adpa.services.errors import ServiceError, Unavailable
from adpa.services.metrics import ServiceMetrics
from adpa.services.protocol import ScoreQuery, SupportSpec
from adpa.services.scoring import ScoringService
from adpa.services.admission import AdmissionGate

logger = logging.getLogger(__name__)


class SupportJSON(BaseModel):
    kind: Literal["topk", "indices", "sampled", "dense"] = "topk"
    k: int = 8
    n: int = 0
    seed: int = 0
    temperature: float = 1.0
    indices: list[list[int]] | None = Field(None, description="INDICES: [P, m] ids per scored position, -1 pads")


class ScoreJSON(BaseModel):
    sequences: list[list[int]] = Field(description="token ids of each sequence")
    ranges: list[tuple[int, int]] | None = Field(
        None, description="[start, end) positions to score per sequence (default: all positions)"
    )
    signal: Literal["logprobs", "advantage"] = "logprobs"
    support: SupportJSON = SupportJSON()
    include_logprobs: bool = False
    request_id: str = ""


def create_app(
    service: ScoringService,
    metrics: ServiceMetrics,
    gate: AdmissionGate,
    is_draining: Callable[[], bool],
    token: str | None = None,
) -> FastAPI:
    app = FastAPI(title="adpa scoring service", version=service.info().server_version)

    def authorized(authorization: str | None = Header(None)) -> None:
        if token is not None and not hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or invalid bearer token")

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ready = not is_draining() and service.ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info", dependencies=[Depends(authorized)])
    def info() -> dict:
        return dataclasses.asdict(service.info())

    @app.post("/v1/score", dependencies=[Depends(authorized)])
    def score(body: ScoreJSON) -> JSONResponse:
        code = "OK"
        try:
            if is_draining():
                raise Unavailable("server is shutting down; retry on another replica")
            with gate.admit():
                spec = body.support
                query = ScoreQuery(
                    sequences=[torch.tensor(s, dtype=torch.long) for s in body.sequences],
                    ranges=body.ranges or [(0, len(s)) for s in body.sequences],
                    signal=body.signal,
                    support=SupportSpec(
                        kind=spec.kind,
                        k=spec.k,
                        n=spec.n,
                        seed=spec.seed,
                        temperature=spec.temperature,
                        indices=_indices_tensor(spec.indices),
                    ),
                    include_logprobs=body.include_logprobs,
                    request_id=body.request_id,
                )
                result = service.score(query)
        except ServiceError as err:
            code = err.code.name
            headers = {"retry-after": str(max(1, err.retry_after_ms // 1000))} if err.retry_after_ms else None
            return JSONResponse({"error": code, "message": err.message}, status_code=err.http_status, headers=headers)
        except Exception:
            code = "INTERNAL"
            logger.exception("internal error in /v1/score")
            return JSONResponse({"error": code, "message": "internal error; the server log has the details"},
                                status_code=500)
        finally:
            metrics.requests.labels("http_score", code).inc()
        metrics.positions.labels(result.signal, result.support).inc(query.num_positions)
        answer = {
            "request_id": body.request_id,
            "signal": result.signal,
            "support": result.support,
            "model": dataclasses.asdict(result.model),
            "reference": dataclasses.asdict(result.reference) if result.reference else None,
        }
        for name in ("indices", "values", "tail", "weights"):
            answer[name] = _jsonable(getattr(result, name))
        answer |= {name: _jsonable(t) for name, t in result.extras.items()}
        return JSONResponse(answer)

    return app


def _indices_tensor(rows: list[list[int]] | None) -> torch.Tensor | None:
    if rows is None:
        return None
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)


def _jsonable(tensor: torch.Tensor | None) -> list | None:
    """Tensor -> nested lists; -inf (an empty tail) becomes None, since JSON has no infinity."""
    if tensor is None:
        return None
    if tensor.is_floating_point():
        return [_finite_or_none(row) for row in tensor.tolist()]
    return tensor.tolist()


def _finite_or_none(x):
    if isinstance(x, list):
        return [_finite_or_none(v) for v in x]
    return None if x in (float("inf"), float("-inf")) or x != x else x
