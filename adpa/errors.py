"""Errors a scoring service reports to its callers, independent of the transport.

Raised anywhere below the transports. Each error carries a `code`, the name of the gRPC status
it stands for (gRPC's names are the common vocabulary of RPC errors); each transport maps codes
to its own statuses in one place (`services/grpc/interceptors.py`, `services/http/app.py`).
Anything that is not a `ServiceError` is an internal fault: logged, never shown to a caller.
"""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    code: ClassVar[str] = "UNKNOWN"

    def __init__(self, message: str, *, retry_after_ms: int | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms


class InvalidArgument(ServiceError):
    code = "INVALID_ARGUMENT"


class OutOfRange(ServiceError):
    code = "OUT_OF_RANGE"


class ResourceExhausted(ServiceError):
    """Over a limit: load when it carries `retry_after_ms` (retry later), size when it does not."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    code = "UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(ServiceError):
    code = "CANCELLED"


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"


class Internal(ServiceError):
    code = "INTERNAL"
