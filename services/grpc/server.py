"""The gRPC server of one front end: Scorer, standard health checking and reflection, auth, TLS.

It is the asyncio server (`grpc.aio`) on an event loop of its own thread, behind a blocking
facade (`start`, `stop`, `port`) for `adpa serve`. On the loop a call costs a coroutine, not a
thread: callers that connect and never send their message (or never authenticate) cannot
exhaust a thread pool and take health checks down with them. Scoring runs on the front end's
threads, one per admission slot (see `Frontend.answer_pb_async`).
"""

from __future__ import annotations

import asyncio
import logging
import threading

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from adpa.services.config import ServeConfig
from adpa.services.frontend import Frontend
from adpa.services.grpc.interceptors import ServiceInterceptor
from adpa.services.grpc.servicer import ScorerServicer
from adpa.v1 import scoring_pb2, scoring_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = scoring_pb2.DESCRIPTOR.services_by_name["Scorer"].full_name
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _register_reflection_v1_descriptor() -> None:
    """grpc.reflection.v1 is v1alpha under another package name, message for message; grpcio-reflection
    ships only v1alpha, so describe v1 from it (reflection can then describe itself in both)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(REFLECTION_V1)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    file.name = "grpc/reflection/v1/reflection.proto"
    file.package = "grpc.reflection.v1"
    for message in file.message_type:
        for field in message.field:
            if field.type_name.startswith(".grpc.reflection.v1alpha."):
                field.type_name = field.type_name.replace(".v1alpha.", ".v1.", 1)
    for service in file.service:
        for method in service.method:
            method.input_type = method.input_type.replace(".v1alpha.", ".v1.", 1)
            method.output_type = method.output_type.replace(".v1alpha.", ".v1.", 1)
    pool.Add(file)


def enable_reflection(server: aio.Server, service_names: tuple[str, ...]) -> None:
    """Server reflection, both versions clients ask for: v1 (grpcurl and current tools) and v1alpha."""
    _register_reflection_v1_descriptor()
    servicer = reflection.aio.ReflectionServicer((*service_names, reflection.SERVICE_NAME, REFLECTION_V1))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    # The two versions' messages are identical on the wire: serve v1 with v1alpha's classes.
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1}),))


class GrpcServer:
    """adpa.v1.Scorer, grpc.health.v1 and reflection on `config.host:config.port`."""

    def __init__(self, frontend: Frontend, config: ServeConfig):
        self.frontend = frontend
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="adpa-grpc-loop", daemon=True)
        self._thread.start()
        self._watcher: asyncio.Task | None = None
        try:
            self.port = self._run(self._build())
        except BaseException:
            self._close_loop()
            raise

    def _run(self, coro):
        """Run `coro` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _build(self) -> int:
        config = self.config
        self.server = aio.server(
            interceptors=[ServiceInterceptor(self.frontend, receive_timeout_s=config.receive_timeout_s)],
            options=[  # gRPC's default is 4 MiB
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_receive_message_length", config.max_message_bytes),
                # gRPC's default shares a port: a second server on it started, and took half the calls
                ("grpc.so_reuseport", 0),
            ],
        )
        scoring_pb2_grpc.add_ScorerServicer_to_server(ScorerServicer(self.frontend), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection(self.server, (SERVICE_NAME, health.SERVICE_NAME))
        address = f"{config.host}:{config.port}"
        try:
            if config.tls_cert is not None:
                creds = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
                return self.server.add_secure_port(address, creds)
            return self.server.add_insecure_port(address)
        except RuntimeError:  # gRPC's "Failed to bind to address", without the reason
            raise OSError(f"gRPC cannot listen on {address} (--port): the port is in use, "
                          "or the host is not an address of this machine") from None

    def start(self) -> None:
        self._run(self._start())

    async def _start(self) -> None:
        await self.server.start()
        await self._set_health(True)
        if self.frontend.has_reference:
            self._watcher = asyncio.create_task(self._watch_reference())

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _watch_reference(self) -> None:
        """Keep gRPC health in step with the reference (HTTP /readyz asks it directly)."""
        loop, period_s = asyncio.get_running_loop(), self.config.watch_reference_s
        serving = True
        while not self.frontend.draining:
            await asyncio.sleep(period_s)
            if self.frontend.draining:
                return
            ready = await loop.run_in_executor(None, self.frontend.ready)  # a blocking RPC
            if ready != serving and not self.frontend.draining:
                status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
                await self.health.set(SERVICE_NAME, status)
                logger.warning("reference %s", "reachable again" if ready else "unreachable: reporting NOT_SERVING")
                serving = ready

    def stop(self, grace: float) -> None:
        """Report NOT_SERVING, let running calls finish within `grace` seconds, then stop."""
        try:
            self._run(self._stop(grace))
        finally:
            self._close_loop()

    async def _stop(self, grace: float) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
