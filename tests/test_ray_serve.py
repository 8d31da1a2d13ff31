"""The teacher cluster on a local Ray Serve: the same answers as `adpa serve`, two replicas, batches
shared by several clients, auth, and the KubeRay manifest agreeing with deploy/serve.yaml."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
import torch
import yaml

from adpa.client import TeacherClient
from adpa.protocol import SupportSpec

from .conftest import RAY_TOKEN
from .test_concurrent_trainings import alone, assert_same_weights, records, student, train_concurrently  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SEQUENCES = [[5, 37, 7, 8, 17, 2, 6, 9, 10, 11, 12], [5, 7, 7, 2, 6, 11], [1, 40, 41, 42, 43, 44, 45, 2, 6, 20]]
RANGES = [(0, 11), (2, 6), (5, 10)]
P = sum(b - a for a, b in RANGES)
SUPPORTS = {
    "topk": SupportSpec("topk", k=5),
    "indices": SupportSpec("indices", k=2, indices=torch.randint(-1, 77, (P, 3), generator=torch.Generator().manual_seed(0))),
    "sampled": SupportSpec("sampled", n=16, seed=7),
    "dense": SupportSpec("dense"),
}


@pytest.fixture(scope="module")
def on_ray(ray_app):
    with TeacherClient(ray_app["endpoint"], token=ray_app["token"], timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def standalone(teacher_server):
    with TeacherClient(teacher_server.endpoint, timeout=60) as client:
        yield client


@pytest.mark.parametrize("support", list(SUPPORTS))
@pytest.mark.parametrize("signal", ["logprobs", "advantage"])
def test_same_answers_as_the_standalone_services(on_ray, standalone, signal, support):
    spec = SUPPORTS[support]
    kwargs = dict(signal=signal, support=spec, include_logprobs=signal == "advantage")
    got = on_ray.score(SEQUENCES, RANGES, **kwargs)
    want = standalone.score(SEQUENCES, RANGES, **kwargs)
    assert got.model == want.model and got.reference == want.reference  # same fingerprints
    torch.testing.assert_close(got.values, want.values, atol=2e-5, rtol=0)
    for name in ("indices", "tail", "weights"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    assert got.extras.keys() == want.extras.keys()


def test_the_handshake_names_both_models(on_ray, teacher_path, reference_path):
    info = on_ray.info()
    assert info.role == "teacher" and info.beta == 0.5
    assert info.model.model_name == str(teacher_path) and info.reference.model_name == str(reference_path)


def test_concurrent_clients_get_their_own_rows_from_both_replicas(ray_app, standalone):
    """Six clients at once, each with its own request; the replicas' micro-batches mix them."""
    g = torch.Generator().manual_seed(1)
    requests = []
    for i in range(6):
        seqs = [torch.randint(7, 77, (int(n),), generator=g).tolist() for n in torch.randint(4, 30, (3,), generator=g)]
        requests.append((seqs, [(1, len(s)) for s in seqs]))
    answers, replicas = [None] * 6, [set() for _ in range(6)]

    def client(i):
        with TeacherClient(ray_app["endpoint"], token=ray_app["token"], timeout=60) as c:
            for _ in range(3):
                answer = c.score(*requests[i], signal="advantage", support=SupportSpec("topk", k=4))
                replicas[i].add(answer.replica)
            answers[i] = answer

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for (seqs, ranges), answer in zip(requests, answers):
        want = standalone.score(seqs, ranges, signal="advantage", support=SupportSpec("topk", k=4))
        assert answer.values.shape == want.values.shape
        torch.testing.assert_close(answer.values, want.values, atol=2e-5, rtol=0)
        assert torch.equal(answer.indices, want.indices)
    served_by = set().union(*replicas)
    assert len(served_by) == 2 and all("teacher" in r for r in served_by)
    # Batches formed: some micro-batch of a replica held more than one request.
    text = ""
    for _ in range(8):  # /metrics answers from one replica at a time
        text += httpx.get(f"{ray_app['http']}/metrics", timeout=30).text
    shared = [line for line in text.splitlines() if line.startswith("adpa_batch_requests_bucket")
              and 'le="1.0"' in line]
    counts = [line for line in text.splitlines() if line.startswith("adpa_batch_requests_count")]
    assert any(float(c.split()[-1]) > float(s.split()[-1]) for c, s in zip(counts, shared)), text[-2000:]


def test_auth_refuses_a_missing_token(ray_app):
    with TeacherClient(ray_app["endpoint"], timeout=30) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.info()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert httpx.get(f"{ray_app['http']}/v1/info", timeout=30).status_code == 401
    assert httpx.get(f"{ray_app['http']}/healthz", timeout=30).status_code == 200  # probes need no token
    ok = httpx.get(f"{ray_app['http']}/v1/info", headers={"authorization": f"Bearer {ray_app['token']}"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["role"] == "teacher"


def test_bad_input_gets_its_status_not_a_trace(on_ray):
    with pytest.raises(grpc.RpcError) as err:
        on_ray.score([[5, 6, 999]], [(0, 3)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "outside the vocabulary" in err.value.details() and "Traceback" not in err.value.details()
    assert on_ray.score([[5, 6, 7]], [(0, 3)]).values.shape == (3, 32)  # still serving


def test_grpc_health_and_readiness(ray_app):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(ray_app["endpoint"].removeprefix("grpc://")) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="adpa.v1.Scorer"))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert httpx.get(f"{ray_app['http']}/readyz", timeout=30).json() == {"ready": True}


def test_kuberay_manifest_runs_the_same_application():
    serve_yaml = yaml.safe_load((ROOT / "deploy/serve.yaml").read_text())
    service = yaml.safe_load((ROOT / "deploy/kuberay/rayservice.yaml").read_text())
    in_cluster = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert in_cluster["applications"] == serve_yaml["applications"]
    assert in_cluster["grpc_options"]["grpc_servicer_functions"] == serve_yaml["grpc_options"]["grpc_servicer_functions"]


def test_kuberay_pods_start_ray_with_the_request_path_of_adpa_serve_ray():
    from adpa.services.ray.launch import SERVE_ENV

    cluster = yaml.safe_load((ROOT / "deploy/kuberay/rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert {k: env.get(k) for k in SERVE_ENV} == SERVE_ENV, container["name"]
    assert cluster["enableInTreeAutoscaling"]  # nodes for the replicas Serve's autoscaler adds


def test_serve_yaml_is_a_valid_serve_config_of_this_application():
    from ray.serve.schema import ServeDeploySchema

    from adpa.services.ray.app import GRPC_SERVICER_FUNCTIONS, build_app

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy/serve.yaml").read_text()))
    assert config.grpc_options.grpc_servicer_functions == GRPC_SERVICER_FUNCTIONS
    (app,) = config.applications
    assert app.import_path == "adpa.services.ray.app:build_app"
    assert {d.name for d in app.deployments} == {"teacher", "reference"}
    build_app(app.args)  # every argument is a ServeConfig field with a valid value


def test_ray_flag_refuses_an_open_grpc_proxy_without_a_token(capsys):
    from adpa.cli import main

    assert main(["serve", "--ray", "--role", "teacher", "--model", "m", "--reference", "r"]) == 2
    assert "listens on every interface" in capsys.readouterr().err
    assert main(["serve", "--ray", "--role", "reference", "--model", "m", "--auth-token", "t"]) == 2
    assert "serve the teacher" in capsys.readouterr().err


# -- the same call path as `adpa serve` (services/frontend.py) -----------------------------------


def _stub_call(ray_app, query, timeout: float):
    from adpa import codec
    from adpa.v1 import scoring_pb2_grpc

    with grpc.insecure_channel(ray_app["endpoint"].removeprefix("grpc://")) as channel:
        return scoring_pb2_grpc.ScorerStub(channel).Score(
            codec.query_to_pb(query), timeout=timeout, metadata=(("authorization", f"Bearer {ray_app['token']}"),)
        )


def _metric(ray_app, name: str, **labels: str) -> float:
    """The largest value of a sample over the replicas /metrics answered from (one per scrape)."""
    from prometheus_client.parser import text_string_to_metric_families

    best = 0.0
    for _ in range(6):
        text = httpx.get(f"{ray_app['http']}/metrics", timeout=30).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    best = max(best, sample.value)
    return best


def test_the_answer_size_limit_holds_on_ray(ray_app):
    """ray_app's max_message_mb is 1, like teacher_server's: the same refusal as test_bad_input's."""
    from adpa.protocol import ScoreQuery

    query = ScoreQuery([torch.full((41,), 9)], [(0, 40)], "logprobs", SupportSpec("sampled", n=4096))
    with pytest.raises(grpc.RpcError) as err:
        _stub_call(ray_app, query, timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the answer would take about" in err.value.details() and f"message limit {1 << 20}" in err.value.details()


def test_a_missed_deadline_stops_the_work_on_ray(ray_app):
    """The caller's deadline ends the call; the replica stops between micro-batches (CANCELLED: the
    deadline itself does not reach a replica, docs/architecture.md) instead of finishing it."""
    from adpa.protocol import ScoreQuery

    g = torch.Generator().manual_seed(3)
    heavy = [torch.randint(7, 77, (250,), generator=g) for _ in range(512)]
    query = ScoreQuery(heavy, [(249, 250)] * 512, "logprobs", SupportSpec("topk", k=4))
    with pytest.raises(grpc.RpcError) as err:
        _stub_call(ray_app, query, timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    labels = dict(transport="ray", method="Score", code="CANCELLED")
    for _ in range(30):
        if _metric(ray_app, "adpa_requests_total", **labels) >= 1:
            break
        time.sleep(1)
    assert _metric(ray_app, "adpa_requests_total", **labels) >= 1


def test_the_reference_deployment_is_in_the_metrics(on_ray, ray_app):
    on_ray.score(SEQUENCES, RANGES, signal="advantage", support=SUPPORTS["topk"])
    assert _metric(ray_app, "adpa_reference_requests_total", transport="ray", method="Score", code="OK") >= 1
    assert _metric(ray_app, "adpa_reference_scored_positions_total") >= P
    assert httpx.get(f"{ray_app['http']}/readyz", timeout=30).json() == {"ready": True}  # fits: no warning


# -- `adpa serve --ray` as a process: the start-up check, and SIGTERM in every state ---------------


@contextlib.contextmanager
def serve_ray_process(tmp_path, teacher_path, reference_path, *flags: str):
    """`adpa serve --ray` with its own local Ray in a short temp dir (Ray's socket paths must stay
    under 108 bytes); whatever of that Ray is left at the end is reported, then stopped."""
    from adpa.services.launch import free_port

    from .conftest import SERVER_ENV

    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ports = {"grpc": free_port(), "http": free_port()}
    env = {**os.environ, **SERVER_ENV, "ADPA_AUTH_TOKEN": "cli-token", "RAY_TMPDIR": ray_tmp}
    log = tmp_path / f"serve-{Path(ray_tmp).name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "children_unmeasured.py"), "adpa.cli", "serve", "--ray",
             "--role", "teacher", "--model", str(teacher_path), "--reference", str(reference_path), "--port", str(ports["grpc"]), "--http-port", str(ports["http"]),
             "--grace-period-s", "1", *flags],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        yield proc, ports, log, ray_tmp
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for leftover in ray_processes(ray_tmp):  # only this test's Ray: its processes name its temp dir
            leftover.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def ray_processes(ray_tmp: str) -> list:
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(ray_tmp in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found


def stopped_cleanly(proc, ray_tmp: str, within_s: float) -> float:
    """SIGTERM `proc`; return how long it took to exit 0, after checking no process of its Ray is left."""
    import psutil

    started = time.monotonic()
    family = psutil.Process(proc.pid).children(recursive=True) + ray_processes(ray_tmp)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(within_s) == 0
    took = time.monotonic() - started
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [p.cmdline() for p in alive]
    assert not ray_processes(ray_tmp)
    return took


@pytest.mark.slow
def test_an_over_asking_start_fails_with_one_line(tmp_path, teacher_path, reference_path):
    with serve_ray_process(tmp_path, teacher_path, reference_path, "--ray-cpus-per-replica", "1000") as run:
        proc, _, log, ray_tmp = run
        assert proc.wait(120) == 2
        lines = [line for line in log.read_text().splitlines() if line.startswith("adpa serve:")]
        assert len(lines) == 1 and "ask for 2000 CPUs" in lines[0] and "--ray-allow-degraded" in lines[0], lines
        assert not ray_processes(ray_tmp)


@pytest.mark.slow
def test_sigterm_stops_adpa_serve_ray_in_every_state(tmp_path, teacher_path, reference_path):
    """Starting (Ray coming up), then serving degraded with a replica that cannot be placed: each
    stops within its grace period (1 s, plus Ray's own teardown), and no process of its Ray is left."""
    from ray._private.utils import get_num_cpus

    with serve_ray_process(tmp_path, teacher_path, reference_path) as (proc, _, log, ray_tmp):
        deadline = time.monotonic() + 60
        while not ray_processes(ray_tmp):  # Ray is starting
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        stopped_cleanly(proc, ray_tmp, within_s=60)

    # Two teacher replicas (the reference in each) asking for all CPUs each: one is placed.
    cpus = str(get_num_cpus())
    flags = ("--ray-colocate-reference", "--ray-replicas", "2", "--ray-cpus-per-replica", cpus, "--ray-allow-degraded")
    with serve_ray_process(tmp_path, teacher_path, reference_path, *flags) as (proc, ports, log, ray_tmp):
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                ready = httpx.get(f"http://127.0.0.1:{ports['http']}/readyz", timeout=5)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "adpa serve --ray never served"
            time.sleep(1)
        assert "some replicas cannot be placed" in ready.json()["detail"]
        assert "serving degraded" in log.read_text()
        # The pending replica is dropped after the grace period (1 s); then Serve and Ray stop.
        assert stopped_cleanly(proc, ray_tmp, within_s=60) < 1 + 15


def test_three_trainings_at_once_on_ray_serve(tmp_path, student, records, ray_app, alone):
    """test_concurrent_trainings.py's property on Ray Serve: three trainings at once end with the
    weights each reaches alone against the standalone teacher."""
    weights = train_concurrently(tmp_path, student, records, ray_app["endpoint"], ray_app["token"])
    assert_same_weights(weights, alone)


# -- autoscaling: replicas follow the callers, and no request fails or runs twice ----------------


def test_every_reference_prefixed_setting_names_a_setting_of_the_reference():
    """build_app gives the reference deployment `reference_X` as its X: a ServeConfig field named
    reference_* must be such an override (reference_token aside: it comes from the environment)."""
    from adpa.services.config import ServeConfig

    prefixed = [name for name in ServeConfig.model_fields if name.startswith("reference_") and name != "reference_token"]
    assert all(name.removeprefix("reference_") in ServeConfig.model_fields for name in prefixed), prefixed


def test_ray_autoscale_settings_become_serves_autoscaling_config():
    from adpa.services.config import ServeConfig
    from adpa.services.ray.app import autoscaling_config, build_app
    from adpa.services.ray.placement import app_asks

    base = {"role": "teacher", "model": "m", "reference": "r", "max_inflight": 32}
    config = ServeConfig.load(**base, ray_autoscale="1:4")
    assert autoscaling_config(config) == {
        "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16.0,  # half of max_inflight
        "upscale_delay_s": 10.0, "downscale_delay_s": 300.0, "metrics_interval_s": 10.0, "look_back_period_s": 30.0}
    # The application's teacher deployment gets it instead of a replica count (Serve keeps the
    # deployment's settings private; the autoscaling test below runs such an application).
    teacher = build_app({"model": "m", "reference": "r", "max_inflight": 32, "ray_autoscale": "1:4"})._bound_deployment
    scaling = teacher._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 4, 16.0)
    # The start-up check counts the replicas it starts with; the maximum only warns (nodes may be added).
    assert [a.replicas for a in app_asks(config)] == [1, 1]
    assert [a.replicas for a in app_asks(config, most=True)] == [4, 1]
    for bad in ("4:1", "0:2", "1-4", "1:x"):
        with pytest.raises(ValueError, match="ray_autoscale"):
            ServeConfig.load(**base, ray_autoscale=bad)
    for target in (33, 0):  # a replica never holds more than max_inflight
        with pytest.raises(ValueError, match="max_inflight"):
            ServeConfig.load(**base, ray_autoscale="1:4", ray_target_ongoing_requests=target)


def _teacher_replicas() -> dict[str, int]:
    from ray import serve

    app = serve.status().applications.get("autoscale")
    if app is None or "teacher" not in app.deployments:
        return {}
    return {str(getattr(k, "value", k)): v for k, v in app.deployments["teacher"].replica_states.items()}


def _wait_for(condition, within_s: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within_s, f"{what} not seen within {within_s} s: {_teacher_replicas()}"
        time.sleep(0.2)
    return time.monotonic() - started


@pytest.mark.coverage_elsewhere  # here: Serve's driver side and three clients in a loop
def test_autoscaling_adds_a_replica_under_load_and_removes_it_after_without_a_failure(
        ray_serve, teacher_path, reference_path):
    """Three callers raise the load over the target (1 request per replica): a second replica starts
    and answers; two callers leave and it is removed while the third keeps calling; no call fails."""
    from ray import serve

    from adpa.services.ray.app import build_app

    serve.run(build_app({
        "model": str(teacher_path), "reference": str(reference_path), "torch_threads": 1,
        "ray_colocate_reference": True, "ray_cpus_per_replica": 0.5, "ray_autoscale": "1:2",
        "ray_target_ongoing_requests": 1, "ray_upscale_delay_s": 0.5, "ray_downscale_delay_s": 1.0,
        "ray_autoscale_metrics_s": 0.25,
    }), name="autoscale", route_prefix="/autoscale")
    endpoint = f"grpc://127.0.0.1:{ray_serve['grpc']}?application=autoscale"
    leave = [threading.Event() for _ in range(3)]
    outcomes: list[tuple[int, str, str]] = []  # (caller, error or "", replica)

    def caller(i: int) -> None:
        # No retries: a request lost while a replica is added or removed shows as a failure.
        with TeacherClient(endpoint, token=RAY_TOKEN, timeout=60, max_retries=0) as client:
            while not leave[i].is_set():
                try:
                    answer = client.score(SEQUENCES, RANGES, signal="advantage", support=SUPPORTS["topk"])
                    outcomes.append((i, "", answer.replica))
                except Exception as err:  # noqa: BLE001 - every failure is reported by the assertion
                    outcomes.append((i, repr(err), ""))

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(3)]
    try:
        for t in threads:
            t.start()
        _wait_for(lambda: _teacher_replicas().get("RUNNING", 0) == 2, 60, "a second RUNNING replica")
        answered_before = len(outcomes)
        _wait_for(lambda: len({r for _, e, r in outcomes[answered_before:] if not e}) == 2, 20,
                  "answers from both replicas")
        leave[1].set()
        leave[2].set()
        _wait_for(lambda: _teacher_replicas() == {"RUNNING": 1}, 60, "back to one replica")
        done = len(outcomes)
        _wait_for(lambda: len(outcomes) > done + 3, 20, "answers after the removal")
    finally:
        for event in leave:
            event.set()
        for t in threads:
            t.join(60)
        serve.delete("autoscale")
    failures = [o for o in outcomes if o[1]]
    assert not failures, failures[:3]
    assert len({r for _, _, r in outcomes}) == 2
