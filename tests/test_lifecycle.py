"""Overload, deadlines, graceful drain on SIGTERM, and client failover, against real servers."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
import torch

from adpa.client import TeacherClient
from adpa import codec
from adpa.services.launch import ServiceProcess, free_port
from adpa.protocol import ScoreQuery, SupportSpec
from adpa.v1 import scoring_pb2_grpc

from .conftest import SERVER_ENV, metric_value

# Heavy enough for a tiny model to take a while: 64 sequences forwarded one at a time.
HEAVY = [torch.randint(7, 77, (250,), generator=torch.Generator().manual_seed(i)) for i in range(64)]
HEAVY_RANGES = [(0, 250)] * 64


def heavy_request():
    query = ScoreQuery(sequences=HEAVY, ranges=HEAVY_RANGES, signal="logprobs", support=SupportSpec("topk", k=4))
    return codec.query_to_pb(query)


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory, reference_path):
    """A reference that admits one request at a time and forwards one sequence per micro-batch. The
    tests below share it, in order: the last one stops it with SIGTERM."""
    server = ServiceProcess(
        ["--role", "reference", "--model", str(reference_path), "--max-inflight", "1", "--max-batch-tokens", "256",
         "--grace-period-s", "30"],
        env=SERVER_ENV, log_path=tmp_path_factory.mktemp("slow") / "serve.log",
    )
    server.start()
    yield server
    server.stop()


def test_overload_is_refused_with_a_retry_hint(slow_server):
    outcomes = []
    with grpc.insecure_channel(f"127.0.0.1:{slow_server.port}") as channel:
        stub = scoring_pb2_grpc.ScorerStub(channel)

        def call():
            try:
                stub.Score(heavy_request(), timeout=60)
                outcomes.append(("OK", None))
            except grpc.RpcError as err:
                hint = dict(err.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
                outcomes.append((err.code().name, hint))

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    codes = [code for code, _ in outcomes]
    assert "OK" in codes and "RESOURCE_EXHAUSTED" in codes, codes
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert all(int(hint) > 0 for code, hint in outcomes if code == "RESOURCE_EXHAUSTED")

    # The client retries on RESOURCE_EXHAUSTED, so concurrent callers all get through.
    results = []
    with TeacherClient(slow_server.endpoint, max_retries=50, backoff_s=0.05) as client:
        def scored():
            results.append(client.score(HEAVY[:8], HEAVY_RANGES[:8], support=SupportSpec("topk", k=4)))

        threads = [threading.Thread(target=scored) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 4
    assert all(torch.equal(r.indices, results[0].indices) for r in results)


def score_counts(server, code: str) -> list[float]:
    """Score calls that ended `code`, Score calls answered OK, positions scored: the server is shared,
    so a test compares what it adds."""
    return [*(metric_value(server.http_port, "adpa_requests_total", code=c, transport="grpc", method="Score")
              for c in (code, "OK")), metric_value(server.http_port, "adpa_scored_positions_total")]


def assert_abandoned_then_answering(server, code: str, before: list[float]) -> None:
    """The abandoned call ended `code` with none of its positions answered, and the server answers
    the next one (the client retries while the abandoned call still holds the only slot)."""
    with TeacherClient(server.endpoint, backoff_s=0.01, max_retries=50) as client:
        answer = client.score(HEAVY[:1], [(0, 5)], support=SupportSpec("topk", k=2))
    assert answer.indices.shape == (5, 2)
    assert [after - was for after, was in zip(score_counts(server, code), before)] == [1, 1, 5]


def test_missed_deadline_is_deadline_exceeded(slow_server):
    # ~1.5 s of forwards on 2 cores (512 micro-batches), one scored position each.
    huge = ScoreQuery(sequences=HEAVY * 8, ranges=[(249, 250)] * 512, signal="logprobs",
                      support=SupportSpec("topk", k=4))
    before = score_counts(slow_server, "DEADLINE_EXCEEDED")
    with grpc.insecure_channel(f"127.0.0.1:{slow_server.port}") as channel:
        stub = scoring_pb2_grpc.ScorerStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(codec.query_to_pb(huge), timeout=0.1)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server abandons the expired request between micro-batches.
    assert_abandoned_then_answering(slow_server, "DEADLINE_EXCEEDED", before)


def test_a_caller_that_leaves_stops_the_work(slow_server):
    """No deadline: the caller cancels its call while it runs. The server's task is cancelled and the
    work stops between micro-batches (CANCELLED), instead of running to its end."""
    distinct = [torch.randint(7, 77, (250,), generator=torch.Generator().manual_seed(100 + i)) for i in range(2048)]
    huge = ScoreQuery(sequences=distinct, ranges=[(249, 250)] * 2048, signal="logprobs",  # seconds of forwards
                      support=SupportSpec("topk", k=4))
    before = score_counts(slow_server, "CANCELLED")
    with grpc.insecure_channel(f"127.0.0.1:{slow_server.port}") as channel:
        call = scoring_pb2_grpc.ScorerStub(channel).Score.future(codec.query_to_pb(huge))
        waited = time.monotonic() + 60
        while metric_value(slow_server.http_port, "adpa_inflight_requests") < 1:  # admitted: queued or running
            assert not call.done() and time.monotonic() < waited
            time.sleep(0.05)
        assert call.cancel()
    assert_abandoned_then_answering(slow_server, "CANCELLED", before)


def test_sigterm_finishes_running_work_then_exits(slow_server):
    outcome = {}
    with grpc.insecure_channel(f"127.0.0.1:{slow_server.port}") as channel:
        stub = scoring_pb2_grpc.ScorerStub(channel)

        def call():
            try:
                outcome["answer"] = codec.result_from_pb(stub.Score(heavy_request(), timeout=60))
            except grpc.RpcError as err:
                outcome["error"] = err.code()

        running = threading.Thread(target=call)
        running.start()
        time.sleep(0.3)  # the request is in the model now
        slow_server.proc.send_signal(signal.SIGTERM)
        running.join()
    assert "error" not in outcome, outcome
    assert outcome["answer"].indices.shape == (64 * 250, 4)
    assert slow_server.proc.wait(timeout=30) == 0
    with grpc.insecure_channel(f"127.0.0.1:{slow_server.port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            scoring_pb2_grpc.ScorerStub(channel).Score(heavy_request(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_fails_over_to_a_live_endpoint(reference_server):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens here
    with TeacherClient([dead, reference_server.endpoint], backoff_s=0.01, timeout=30) as client:
        for _ in range(4):  # round-robin starts on each endpoint in turn
            answer = client.score([[5, 6, 7]], [(0, 3)], support=SupportSpec("topk", k=2))
            assert answer.indices.shape == (3, 2)


def test_a_port_taken_before_the_server_binds_it(tmp_path, reference_path, monkeypatch):
    """Another process binds the HTTP port ServiceProcess chose before `adpa serve` does: the server
    stops at once with one line naming the port (it used to serve gRPC alone, while the other process
    answered its HTTP checks), and ServiceProcess starts it again on other ports."""
    import socket

    import httpx

    from adpa.services import launch

    choose = launch.free_port
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        picks = iter([choose(), taken])  # the gRPC port, then the HTTP port
        monkeypatch.setattr(launch, "free_port", lambda: next(picks, None) or choose())
        log = tmp_path / "serve.log"
        server = ServiceProcess(["--role", "reference", "--model", str(reference_path)], env=SERVER_ENV, log_path=log)
        assert server.http_port == taken
        try:
            server.start()
            assert server.http_port != taken
            assert httpx.get(f"http://127.0.0.1:{server.http_port}/healthz", timeout=10).status_code == 200
        finally:
            server.stop()
    errors = [line.split(" ERROR ", 1)[1] for line in log.read_text().splitlines() if " ERROR " in line]
    assert errors == [f"adpa.services.standalone: cannot start the reference service: HTTP cannot listen on "
                      f"127.0.0.1:{taken} (--http-port): Address already in use"]


def test_a_grpc_port_in_use_is_refused_not_shared():
    """gRPC's default SO_REUSEPORT let a second server bind a port in use and take half of its calls."""
    import socket

    from adpa.services.config import ServeConfig
    from adpa.services.grpc.server import GrpcServer

    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as a gRPC server's own socket
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = ServeConfig(role="reference", model="m", port=port)
        with pytest.raises(OSError, match=rf"gRPC cannot listen on 127\.0\.0\.1:{port} \(--port\)"):
            GrpcServer(None, config)  # binding needs no service


def test_teacher_reports_a_lost_reference(tmp_path, teacher_path, reference_path):
    """Reference gone: readiness and gRPC health say so, advantages are UNAVAILABLE, log-probs still work."""
    import httpx
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reference = ServiceProcess(["--role", "reference", "--model", str(reference_path)], env=SERVER_ENV,
                               log_path=tmp_path / "reference.log", http=False).start()
    teacher = ServiceProcess(["--role", "teacher", "--model", str(teacher_path), "--reference", reference.endpoint,
                              "--watch-reference-s", "0.5"],
                             env=SERVER_ENV, log_path=tmp_path / "teacher.log")
    try:
        teacher.start()
        ready = f"http://127.0.0.1:{teacher.http_port}/readyz"
        assert httpx.get(ready).status_code == 200
        reference.stop()
        assert httpx.get(ready, timeout=10).status_code == 503
        with grpc.insecure_channel(f"127.0.0.1:{teacher.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 15
            while health.Check(health_pb2.HealthCheckRequest(service="adpa.v1.Scorer")).status != \
                    health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "gRPC health never reported the lost reference"
                time.sleep(0.5)
        with TeacherClient(teacher.endpoint, max_retries=1, backoff_s=0.01) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.score([[5, 6, 7]], [(0, 3)], signal="advantage", support=SupportSpec("topk", k=2))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "reference" in err.value.details()
            assert client.score([[5, 6, 7]], [(0, 3)], support=SupportSpec("topk", k=2)).indices.shape == (3, 2)
    finally:
        teacher.stop()
        reference.stop()
