"""The one status table: what a `ServiceError` code is on each transport, and the hidden internal fault.

Error codes are gRPC's status names (`adpa.errors`), so gRPC (and Ray Serve's gRPC proxy) send the
code as it is; HTTP looks it up here. A transport added later reads this table and nothing else.
"""

from __future__ import annotations

import logging

import grpc

from adpa.errors import Internal, ServiceError

logger = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the server log has the details"

# code -> HTTP status. RESOURCE_EXHAUSTED is 413 (a size limit, retrying cannot help) unless the
# error carries a retry hint (load): then 429 (see `http_status`).
HTTP_STATUS: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "UNIMPLEMENTED": 405,  # only ever from the framework: a route's wrong method
    "RESOURCE_EXHAUSTED": 413,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
# HTTP status -> code, for refusals that come from the web framework rather than the service.
CODE_OF_HTTP_STATUS: dict[int, str] = {
    **{status: code for code, status in reversed(HTTP_STATUS.items())},
    408: "DEADLINE_EXCEEDED",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
}


def grpc_status(err: ServiceError) -> grpc.StatusCode:
    return grpc.StatusCode[err.code]


def http_status(err: ServiceError) -> int:
    if err.code == "RESOURCE_EXHAUSTED" and err.retry_after_ms is not None:
        return 429
    return HTTP_STATUS.get(err.code, 500)


def as_service_error(err: Exception, where: str) -> ServiceError:
    """`err` if it is a ServiceError; else an internal fault: logged with its traceback, and
    answered as INTERNAL with a generic message (never the details or a stack trace)."""
    if isinstance(err, ServiceError):
        return err
    logger.error("internal error in %s", where, exc_info=err)
    return Internal(INTERNAL_MESSAGE)
