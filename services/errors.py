"""Errors a scoring service reports to its callers, each with its gRPC status code.

Raised anywhere below the transport; the gRPC interceptor and the HTTP routes turn them into a
status and a readable message. Anything else is an internal fault: logged, never shown.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    http_status: int = 500

    def __init__(self, message: str, *, retry_after_ms: int | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms


class InvalidArgument(ServiceError):
    code, http_status = grpc.StatusCode.INVALID_ARGUMENT, 400


class OutOfRange(ServiceError):
    code, http_status = grpc.StatusCode.OUT_OF_RANGE, 400


class ResourceExhausted(ServiceError):
    code, http_status = grpc.StatusCode.RESOURCE_EXHAUSTED, 429


class Unavailable(ServiceError):
    code, http_status = grpc.StatusCode.UNAVAILABLE, 503


class DeadlineExceeded(ServiceError):
    code, http_status = grpc.StatusCode.DEADLINE_EXCEEDED, 504


class Cancelled(ServiceError):
    code, http_status = grpc.StatusCode.CANCELLED, 499


class Internal(ServiceError):
    code, http_status = grpc.StatusCode.INTERNAL, 500
