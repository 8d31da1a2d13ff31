"""TeacherClient: teacher signals over gRPC from one or many endpoints.

    from adpa.client import TeacherClient
    from adpa.protocol import SupportSpec

    with TeacherClient("127.0.0.1:50051") as teacher:
        teacher.check_compatible(student_tokenizer)            # refuses a different tokenizer
        answer = teacher.score([ids], [(prompt_len - 1, len(ids) - 1)],
                               signal="advantage", support=SupportSpec("topk", k=32))
        answer.indices, answer.values, answer.tail             # (P, 32), (P, 32), (P,)

Large batches are split into requests that fit the server's limits and answers are joined back
(`Teacher.score`); transient failures (UNAVAILABLE, RESOURCE_EXHAUSTED with a pushback hint) are
retried with backoff, honouring the server's `grpc-retry-pushback-ms`, moving to the next endpoint
each time.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from adpa import codec
from adpa.client.teacher import Teacher
from adpa.protocol import ModelInfo, ScoreQuery, ScoreResult
from adpa.v1 import scoring_pb2 as pb
from adpa.v1 import scoring_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class Endpoint:
    target: str  # host:port
    tls: bool
    application: str | None = None  # Ray Serve application to route to, when the cluster has several


def parse_endpoint(endpoint: str) -> Endpoint:
    """'grpc://host:port' | 'grpcs://host:port' | 'host:port', optionally '?application=NAME'.

    `application` is sent as the `application` metadata that Ray Serve's gRPC proxy routes by
    (needed only where one Serve cluster runs several applications).
    """
    address, _, query = endpoint.partition("?")
    params = urllib.parse.parse_qs(query, strict_parsing=bool(query)) if query else {}
    unknown = set(params) - {"application"}
    if unknown:
        raise ValueError(f"endpoint {endpoint!r}: unknown parameter(s) {sorted(unknown)}; only 'application'")
    application = params["application"][-1] if "application" in params else None
    for scheme, tls in (("grpcs://", True), ("grpc://", False)):
        if address.startswith(scheme):
            return Endpoint(address[len(scheme) :], tls, application)
    if "://" in address:
        raise ValueError(f"endpoint {endpoint!r}: scheme must be grpc:// or grpcs://")
    return Endpoint(address, False, application)


class TeacherClient(Teacher):
    """A connection to teacher or reference services, with handshake, batching and failover."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        token: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 0.25,
        max_message_bytes: int = 64 << 20,
        root_certificates: bytes | None = None,
    ):
        endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not endpoints:
            raise ValueError("TeacherClient needs at least one endpoint")
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        auth = (("authorization", f"Bearer {token}"),) if token else ()
        self._channels = []
        for endpoint in endpoints:
            parsed = parse_endpoint(endpoint)
            if parsed.tls:
                creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
                channel = grpc.secure_channel(parsed.target, creds, options=options)
            else:
                channel = grpc.insecure_channel(parsed.target, options=options)
            routing = (("application", parsed.application),) if parsed.application else ()
            self._channels.append((endpoint, channel, pb_grpc.ScorerStub(channel), auth + routing))
        self.endpoints = endpoints
        self.where = f" at {endpoints[0]}"
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_message_bytes = max_message_bytes
        self._next = itertools.count()
        self._info: ModelInfo | None = None

    def close(self) -> None:
        for _, channel, _, _ in self._channels:
            channel.close()

    def info(self, timeout: float | None = None, *, refresh: bool = False) -> ModelInfo:
        if self._info is None or refresh:
            answer = self._call("ModelInfo", pb.ModelInfoRequest(), timeout or self.timeout)
            self._info = codec.info_from_pb(answer)
        return self._info

    def _answer(self, query: ScoreQuery, timeout: float | None) -> ScoreResult:
        return codec.result_from_pb(self._call("Score", codec.query_to_pb(query), timeout or self.timeout))

    def _call(self, method: str, request, timeout: float):
        """One RPC with deadline, retries on transient codes and failover across endpoints."""
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            endpoint, _, stub, metadata = self._channels[next(self._next) % len(self._channels)]
            remaining = deadline - time.monotonic()
            try:
                return getattr(stub, method)(request, timeout=max(remaining, 0.001), metadata=metadata)
            except grpc.RpcError as err:
                code = err.code()
                delay = _pushback_s(err)
                # RESOURCE_EXHAUSTED without a pushback hint is a size limit: retrying can't help.
                transient = code == grpc.StatusCode.UNAVAILABLE or (code in RETRYABLE and delay is not None)
                if not transient or attempt >= self.max_retries:
                    raise
                if delay is None:
                    delay = self.backoff_s * (2**attempt) * (0.5 + random.random())
                if time.monotonic() + delay >= deadline:
                    raise
                logger.warning("%s on %s: %s; retrying in %.2fs", code.name, endpoint, err.details(), delay)
                time.sleep(delay)
                attempt += 1


def _pushback_s(err: grpc.RpcError) -> float | None:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-retry-pushback-ms":
            try:
                return max(0.0, int(value) / 1000)
            except ValueError:
                return None
    return None
