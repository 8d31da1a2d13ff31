"""gRPC server interceptors: bearer-token auth, and errors -> status codes (with metrics).

Transport concerns live here, never in the servicer: a servicer raises `ServiceError`s, and an
unexpected exception becomes INTERNAL with a generic message (the traceback goes to the log).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable

import grpc

from adpa.services.errors import ServiceError
from adpa.services.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

# Probes (Kubernetes, load balancers) can't send tokens; health reveals nothing else.
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)


def _wrap_unary(handler: grpc.RpcMethodHandler, wrap: Callable) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        wrap(handler.unary_unary),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that fails every call."""

    def abort(request_or_iterator, context):
        context.abort(code, message)

    if handler.unary_unary:
        factory = grpc.unary_unary_rpc_method_handler
    elif handler.unary_stream:
        factory = grpc.unary_stream_rpc_method_handler
    elif handler.stream_unary:
        factory = grpc.stream_unary_rpc_method_handler
    else:
        factory = grpc.stream_stream_rpc_method_handler
    return factory(
        abort, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


class AuthInterceptor(grpc.ServerInterceptor):
    """Accepts a call only if some `authorization` metadata entry is exactly `Bearer <token>`."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(UNAUTHENTICATED_PREFIXES):
            return handler
        offered = [
            value.encode() if isinstance(value, str) else value
            for key, value in (handler_call_details.invocation_metadata or ())
            if key.lower() == "authorization"
        ]
        # Compare against every entry, without stopping early, in constant time per entry.
        matches = [hmac.compare_digest(value, self._expected) for value in offered]
        if any(matches):
            return handler
        reason = "missing bearer token" if not offered else "invalid bearer token"
        return _deny(handler, grpc.StatusCode.UNAUTHENTICATED, reason)


class ServiceInterceptor(grpc.ServerInterceptor):
    """Maps ServiceError to its status (with a retry hint), hides internal faults, records metrics,
    and refuses new calls with UNAVAILABLE while the server drains."""

    def __init__(self, metrics: ServiceMetrics, is_draining: Callable[[], bool]):
        self.metrics = metrics
        self.is_draining = is_draining

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if self.is_draining() and not handler_call_details.method.startswith(UNAUTHENTICATED_PREFIXES):
            self.metrics.requests.labels(method, "UNAVAILABLE").inc()
            return _deny(handler, grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another replica")

        def wrap(behavior):
            def guarded(request, context):
                started = time.perf_counter()
                code = "OK"
                try:
                    return behavior(request, context)
                except ServiceError as err:
                    code = err.code.name
                    logger.info("%s refused (%s): %s", method, code, err.message)
                    if err.retry_after_ms is not None:
                        context.set_trailing_metadata((("grpc-retry-pushback-ms", str(err.retry_after_ms)),))
                    context.abort(err.code, err.message)
                except Exception:
                    aborted = context.code()
                    if aborted not in (None, grpc.StatusCode.OK):  # aborted deeper down: pass it on
                        code = aborted.name
                        raise
                    code = "INTERNAL"
                    logger.exception("internal error in %s", handler_call_details.method)
                    context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")
                finally:
                    self.metrics.requests.labels(method, code).inc()
                    self.metrics.latency.labels(method).observe(time.perf_counter() - started)

            return guarded

        return _wrap_unary(handler, wrap)
