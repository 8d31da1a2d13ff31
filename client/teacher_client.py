"""TeacherClient: teacher signals over gRPC from one or many endpoints.

    from adpa.client import TeacherClient
    from adpa.protocol import SupportSpec

    with TeacherClient("127.0.0.1:50051") as teacher:
        teacher.check_compatible(student_tokenizer)            # refuses a different tokenizer
        answer = teacher.score([ids], [(prompt_len - 1, len(ids) - 1)],
                               signal="advantage", support=SupportSpec("topk", k=32))
        answer.indices, answer.values, answer.tail             # (P, 32), (P, 32), (P,)

Large batches are split into requests that fit the server's limits and answers are joined back
(`Teacher.score`), all within one deadline (`timeout`, the handshake included). What is retried:

- RESOURCE_EXHAUSTED with a `grpc-retry-pushback-ms` hint (the server is busy and says when a slot
  should free up): after the hint times a random factor in [1, 2), then [1, 4), [1, 8), [1, 16) for
  later refusals of the same call (at most `max_backoff_s`, unless the hint is longer), so callers
  refused together don't come back together; as often as the deadline allows (or
  `max_busy_retries`). These retries don't draw on the retry budget: the server is up and sets the
  pace.
- UNAVAILABLE (endpoint down, draining, restarting): at once on another endpoint when one is
  available, else after a jittered exponential backoff; at most `max_retries` times per call, and
  only while the client's retry budget holds (gRPC's retry throttling: each such failure costs one
  token, each success earns `budget_ratio`; retries stop while half the tokens or fewer are left).
  An endpoint that answered UNAVAILABLE is skipped for a cool-off (1 s, doubling up to
  `max_cooldown_s` = 30 s while it keeps failing), then tried again: a restarted service rejoins
  by itself.
- Nothing else: a refusal of the request itself (INVALID_ARGUMENT, a size limit, ...) would be
  refused again.
"""

from __future__ import annotations

import logging
import random
import threading
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

# A restarted server is reconnected within this (gRPC's default backoff grows to 120 s).
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 500), ("grpc.min_reconnect_backoff_ms", 500),
                   ("grpc.max_reconnect_backoff_ms", 5000),
                   # A connection of its own: channels to one target otherwise share one in a process, and the
                   # server, which takes turns by connection, would see every client of the process as one caller.
                   ("grpc.use_local_subchannel_pool", 1)]


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


class DeadlineExpired(grpc.RpcError):
    """The call's deadline passed on the client side (between retries or parts of a split batch)."""

    def __init__(self, details: str):
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return ()


class RetryBudget:
    """gRPC's retry throttling: a token bucket shared by all calls of one client.

    A failure that would be retried takes one token, a success gives back `ratio`; retries are
    allowed while more than half of `max_tokens` are left. So when most calls fail (every endpoint
    down), retries stop instead of multiplying the load; when most succeed, the occasional failure
    is retried.
    """

    def __init__(self, max_tokens: float = 10.0, ratio: float = 0.1):
        self.max_tokens = max_tokens
        self.ratio = ratio
        self._tokens = max_tokens
        self._lock = threading.Lock()

    @property
    def tokens(self) -> float:
        return self._tokens

    def on_success(self) -> None:
        with self._lock:
            self._tokens = min(self.max_tokens, self._tokens + self.ratio)

    def on_failure(self) -> bool:
        """Take a token for a failure; True when a retry is allowed."""
        with self._lock:
            self._tokens = max(0.0, self._tokens - 1)
            return self._tokens > self.max_tokens / 2


class _EndpointState:
    """Cool-off of one endpoint after it answered UNAVAILABLE (skipped by round-robin until then)."""

    def __init__(self):
        self.down_until = 0.0
        self.cooldown_s = 0.0

    def failed(self, now: float, first_s: float, max_s: float) -> None:
        self.cooldown_s = min(max_s, 2 * self.cooldown_s) if self.cooldown_s else first_s
        self.down_until = now + self.cooldown_s

    def succeeded(self) -> None:
        self.down_until = 0.0
        self.cooldown_s = 0.0


class TeacherClient(Teacher):
    """A connection to teacher or reference services, with handshake, batching, retries and failover."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        token: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 0.25,
        max_backoff_s: float = 10.0,
        retry_budget: float = 10.0,
        budget_ratio: float = 0.1,
        max_cooldown_s: float = 30.0,
        max_busy_retries: int | None = None,
        max_message_bytes: int = 64 << 20,
        root_certificates: bytes | None = None,
    ):
        endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not endpoints:
            raise ValueError("TeacherClient needs at least one endpoint")
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            *CHANNEL_OPTIONS,
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
        self.where = f" at {endpoints[0]}" if len(endpoints) == 1 else f" at {', '.join(endpoints)}"
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.budget = RetryBudget(retry_budget, budget_ratio)
        self.max_cooldown_s = max_cooldown_s
        self.max_busy_retries = max_busy_retries
        self.max_message_bytes = max_message_bytes
        self._state = [_EndpointState() for _ in endpoints]
        self._turn = 0
        self._lock = threading.Lock()
        self._local = threading.local()  # which endpoint answered this thread's last call
        self._info: ModelInfo | None = None

    def close(self) -> None:
        for _, channel, _, _ in self._channels:
            channel.close()

    def info(self, timeout: float | None = None, *, refresh: bool = False) -> ModelInfo:
        if self._info is None or refresh:
            answer = self._call("ModelInfo", pb.ModelInfoRequest(), self.timeout if timeout is None else timeout)
            self._info = codec.info_from_pb(answer)
        return self._info

    def _answer(self, query: ScoreQuery, timeout: float | None) -> ScoreResult:
        answer = self._call("Score", codec.query_to_pb(query), self.timeout if timeout is None else timeout)
        return codec.result_from_pb(answer)

    def _answered_where(self) -> str:
        endpoint = getattr(self._local, "endpoint", None)
        return f" at {endpoint}" if endpoint else self.where

    # -- one RPC: deadline, retries, failover ---------------------------------------------------

    def _pick(self, tried: set[int]) -> int:
        """The next endpoint in turn that is not cooling off (preferring ones this call has not tried);
        when all are cooling off, the one that comes back first."""
        now = time.monotonic()
        with self._lock:
            order = [(self._turn + i) % len(self._channels) for i in range(len(self._channels))]
            self._turn = (self._turn + 1) % len(self._channels)
            up = [i for i in order if self._state[i].down_until <= now]
            fresh = [i for i in up if i not in tried]
            if fresh or up:
                return (fresh or up)[0]
            return min(order, key=lambda i: self._state[i].down_until)

    def _available(self, tried: set[int]) -> bool:
        now = time.monotonic()
        return any(s.down_until <= now and i not in tried for i, s in enumerate(self._state))

    def _call(self, method: str, request, timeout: float):
        """One RPC within `timeout` seconds, retried and failed over as the module docstring says."""
        deadline = time.monotonic() + timeout
        blind_retries = busy_retries = 0
        tried: set[int] = set()
        while True:
            index = self._pick(tried)
            endpoint, _, stub, metadata = self._channels[index]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExpired(f"{method}: the deadline of {timeout:.3g} s passed before an answer")
            tried.add(index)
            try:
                answer = getattr(stub, method)(request, timeout=remaining, metadata=metadata)
            except grpc.RpcError as err:
                code = err.code()
                pushback = _pushback_s(err)
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED and pushback is not None:
                    if self.max_busy_retries is not None and busy_retries >= self.max_busy_retries:
                        raise
                    # Busy, and it says when a slot should free up: never sooner; later by a random
                    # factor whose range widens with each refusal (callers refused together spread out).
                    spread = 2 ** (min(busy_retries, 3) + 1)
                    delay = min(pushback * (1 + (spread - 1) * random.random()), max(pushback, self.max_backoff_s))
                    busy_retries += 1
                elif code == grpc.StatusCode.UNAVAILABLE:
                    with self._lock:
                        self._state[index].failed(time.monotonic(), min(1.0, self.max_cooldown_s), self.max_cooldown_s)
                    allowed = self.budget.on_failure()
                    if blind_retries >= self.max_retries or not allowed:
                        if not allowed:
                            logger.warning("%s on %s: retry budget spent (%.1f tokens left), not retrying",
                                           code.name, endpoint, self.budget.tokens)
                        raise
                    blind_retries += 1
                    # Another endpoint is up: fail over now. Else back off before coming back.
                    delay = 0.0 if self._available(tried) else (
                        min(self.max_backoff_s, self.backoff_s * 2 ** (blind_retries - 1)) * (0.5 + random.random())
                    )
                else:
                    raise
                if time.monotonic() + delay >= deadline:
                    raise
                if delay:
                    # Busy is flow control (INFO); an endpoint down is worth a WARNING.
                    level = logging.INFO if code == grpc.StatusCode.RESOURCE_EXHAUSTED else logging.WARNING
                    logger.log(level, "%s on %s: %s; retrying in %.2fs", code.name, endpoint, err.details(), delay)
                    time.sleep(delay)
                else:
                    logger.warning("%s on %s: %s; failing over", code.name, endpoint, err.details())
                continue
            self.budget.on_success()
            with self._lock:
                self._state[index].succeeded()
            self._local.endpoint = endpoint
            return answer


def _pushback_s(err: grpc.RpcError) -> float | None:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-retry-pushback-ms":
            try:
                return max(0.0, int(value) / 1000)
            except ValueError:
                return None
    return None
