"""TeacherClient's retries, budget, failover and deadline, against fake stubs on a fake clock (issue 11,
finding 7). No server, no sleeping: each test runs in milliseconds."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
import torch

from adpa import codec
from adpa.client import TeacherClient
from adpa.protocol import Limits, ModelFingerprint, ModelInfo, ScoreResult, SupportSpec

FINGERPRINT = ModelFingerprint("teacher", "aaaa", "tok", 77, "float32", 256)
OTHER = dataclasses.replace(FINGERPRINT, model_name="other-teacher", model_hash="bbbb")


class Clock:
    """Stands in for the `time` module of the client: sleeping only moves the clock."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Refused(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "", pushback_ms: int | None = None):
        super().__init__(details)
        self._code, self._details = code, details
        self._trailers = (("grpc-retry-pushback-ms", str(pushback_ms)),) if pushback_ms is not None else ()

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers


def answer_to(request, fingerprint=FINGERPRINT):
    query = codec.query_from_pb(request)
    rows = query.num_positions
    result = ScoreResult(signal="logprobs", support="topk", model=fingerprint, reference=None,
                         indices=torch.zeros(rows, query.support.k, dtype=torch.long),
                         values=torch.zeros(rows, query.support.k), tail=torch.zeros(rows))
    return codec.result_to_pb(result, request.request_id, "FP32")


class Stub:
    """A fake ScorerStub: `script(method, request)` answers or raises; each call takes `seconds` of the clock
    and honours its deadline the way a server does."""

    def __init__(self, clock: Clock, script, seconds: float = 0.0, limits: Limits = Limits(), down: bool = False):
        self.clock, self.script, self.seconds, self.limits, self.down = clock, script, seconds, limits, down
        self.calls: list[tuple[str, float]] = []  # (method, timeout)

    def __getattr__(self, method):
        def call(request, timeout, metadata):
            self.calls.append((method, timeout))
            if self.down:
                raise Refused(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
            if self.seconds > timeout:
                self.clock.now += timeout
                raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            self.clock.now += self.seconds
            if method == "ModelInfo":
                return codec.info_to_pb(ModelInfo("teacher", FINGERPRINT, None, 0.1, "0", self.limits))
            return self.script(request)

        return call


@pytest.fixture()
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr("adpa.client.teacher_client.time", fake)
    monkeypatch.setattr("adpa.client.teacher.time", fake, raising=False)
    return fake


def client_with(stubs: list[Stub], **kwargs) -> TeacherClient:
    client = TeacherClient([f"127.0.0.1:{1 + i}" for i in range(len(stubs))], **kwargs)  # never connected
    client._channels = [(endpoint, channel, stub, metadata)
                        for (endpoint, channel, _, metadata), stub in zip(client._channels, stubs)]
    return client


def score(client: TeacherClient, **kwargs) -> ScoreResult:
    return client.score([[5, 6, 7]], [(0, 3)], support=SupportSpec("topk", k=2), **kwargs)


def refuse_first(times: int, refusal):
    count = {"n": 0}

    def script(request):
        count["n"] += 1
        if count["n"] <= times:
            raise refusal()
        return answer_to(request)

    return script


def test_refused_callers_come_back_at_different_times_never_before_the_hint(clock):
    """Before: every refused caller slept exactly the pushback, so they all came back together."""
    first_waits = []
    for _ in range(40):
        busy = lambda: Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy", pushback_ms=200)  # noqa: E731
        client = client_with([Stub(clock, refuse_first(1, busy))])
        clock.sleeps.clear()
        score(client)
        first_waits.append(clock.sleeps[0])
        client.close()
    assert min(first_waits) >= 0.2
    assert max(first_waits) - min(first_waits) > 0.05 and len(set(first_waits)) > 30


def test_a_busy_server_is_retried_past_max_retries_within_the_deadline(clock):
    """Before: the 5th refusal reached the caller (max_retries=4), though the server only asked to wait."""
    busy = lambda: Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy", pushback_ms=100)  # noqa: E731
    stub = Stub(clock, refuse_first(12, busy))
    with client_with([stub], max_retries=4) as client:
        assert score(client).indices.shape == (3, 2)
    assert len([c for c in stub.calls if c[0] == "Score"]) == 13


def test_size_refusals_are_not_retried(clock):
    too_big = lambda: Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "over the message limit")  # noqa: E731
    stub = Stub(clock, refuse_first(1, too_big))
    with client_with([stub]) as client:
        with pytest.raises(grpc.RpcError) as err:
            score(client)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len([c for c in stub.calls if c[0] == "Score"]) == 1


def test_the_retry_budget_stops_retries_when_most_calls_fail(clock):
    """Before: a client retried UNAVAILABLE max_retries times on every call, however many calls failed."""
    stub = Stub(clock, answer_to, down=True)
    with client_with([stub], max_retries=1000, timeout=10**6) as client:
        with pytest.raises(grpc.RpcError):
            score(client)
        first = len(stub.calls)
        with pytest.raises(grpc.RpcError):
            score(client)
        second = len(stub.calls) - first
    assert first <= 6, first  # 10 tokens; retries stop at half
    assert second == 1  # budget spent: no retry at all


def test_failover_is_immediate_and_a_down_endpoint_is_skipped_until_its_cool_off(clock):
    """Before: round-robin sent every other call to the dead endpoint first, and slept before failing over."""
    dead, alive = Stub(clock, answer_to, down=True), Stub(clock, answer_to)
    with client_with([dead, alive]) as client:
        for _ in range(10):
            assert score(client).indices.shape == (3, 2)
        assert len(dead.calls) == 1 and clock.sleeps == []
        clock.now += 1.1  # the cool-off (1 s) is over: the dead endpoint is tried again, once
        for _ in range(10):
            score(client)
        assert len(dead.calls) == 2 and clock.sleeps == []


def test_one_deadline_covers_the_handshake_and_every_part(clock):
    """Before: the handshake and each part of a split batch got the whole timeout (a 1 s call took 3.3 s)."""
    stub = Stub(clock, answer_to, seconds=0.3, limits=Limits(max_positions=3))
    started = clock.now
    with client_with([stub]) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.score([[5, 6, 7]] * 10, [(0, 3)] * 10, support=SupportSpec("topk", k=2), timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert clock.now - started <= 1.0 + 1e-9
    assert stub.calls[0][0] == "ModelInfo" and stub.calls[0][1] == pytest.approx(1.0)
    assert all(timeout <= 1.0 - 0.3 * i + 1e-9 for i, (_, timeout) in enumerate(stub.calls))


def test_a_teacher_restarted_with_another_model_stops_the_caller_with_a_clear_error(clock):
    from adpa.client import TeacherChanged

    calls = {"n": 0}

    def script(request):
        calls["n"] += 1
        return answer_to(request, FINGERPRINT if calls["n"] == 1 else OTHER)

    with client_with([Stub(clock, script)]) as client:
        score(client)
        with pytest.raises(TeacherChanged) as err:
            score(client)
    message = str(err.value)
    assert isinstance(err.value, RuntimeError)
    for needle in ("127.0.0.1:1", "other-teacher (bbbb)", "teacher (aaaa)", "must not be mixed", "new run"):
        assert needle in message, (needle, message)
