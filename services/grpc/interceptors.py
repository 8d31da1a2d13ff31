"""gRPC server interceptors: bearer-token auth, and errors -> status codes (with metrics).

Transport concerns live here, never in the servicer: a servicer raises `ServiceError`s, and an
unexpected exception becomes INTERNAL with a generic message (the traceback goes to the log).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable

import grpc

from adpa.errors import ServiceError, Unauthenticated
from adpa.services.frontend import Frontend

logger = logging.getLogger(__name__)

# Probes (Kubernetes, load balancers) can't send tokens; health reveals nothing else.
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)


def status_of(err: ServiceError) -> grpc.StatusCode:
    """The gRPC status of a service error (the error codes are gRPC's names)."""
    return grpc.StatusCode[err.code]


def _replace_behavior(handler: grpc.RpcMethodHandler, behavior: Callable) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler`, running `behavior` instead."""
    if handler.unary_unary:
        factory = grpc.unary_unary_rpc_method_handler
    elif handler.unary_stream:
        factory = grpc.unary_stream_rpc_method_handler
    elif handler.stream_unary:
        factory = grpc.stream_unary_rpc_method_handler
    else:
        factory = grpc.stream_stream_rpc_method_handler
    return factory(
        behavior, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


def check_bearer(metadata, token: str) -> None:
    """Raise Unauthenticated unless some `authorization` entry of `metadata` is `Bearer <token>`."""
    expected = f"Bearer {token}".encode()
    offered = [
        value.encode() if isinstance(value, str) else value
        for key, value in (metadata or ())
        if key.lower() == "authorization"
    ]
    # Compare against every entry, without stopping early, in constant time per entry.
    matches = [hmac.compare_digest(value, expected) for value in offered]
    if not any(matches):
        raise Unauthenticated("missing bearer token" if not offered else "invalid bearer token")


class AuthInterceptor(grpc.ServerInterceptor):
    """Accepts a call only if some `authorization` metadata entry is exactly `Bearer <token>`."""

    def __init__(self, token: str):
        self._token = token

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(UNAUTHENTICATED_PREFIXES):
            return handler
        try:
            check_bearer(handler_call_details.invocation_metadata, self._token)
            return handler
        except Unauthenticated as err:
            refusal = err

        def refuse(request_or_iterator, context):
            raise refusal

        return _replace_behavior(handler, refuse)


class ServiceInterceptor(grpc.ServerInterceptor):
    """Maps ServiceError to its status (with a retry hint), hides internal faults, and counts every
    unary call in the front end's metrics."""

    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]

        def guarded(request, context):
            try:
                with self.frontend.observe(method, "grpc"):
                    return handler.unary_unary(request, context)
            except ServiceError as err:
                if err.retry_after_ms is not None:
                    context.set_trailing_metadata((("grpc-retry-pushback-ms", str(err.retry_after_ms)),))
                context.abort(status_of(err), err.message)
            except Exception:
                if context.code() not in (None, grpc.StatusCode.OK):  # aborted deeper down: pass it on
                    raise
                logger.exception("internal error in %s", handler_call_details.method)
                context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")

        return _replace_behavior(handler, guarded)
