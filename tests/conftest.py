"""Shared fixtures: tiny models built offline once per session, and real servers as subprocesses."""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from adpa.services.launch import ServiceProcess

# This file imports neither torch nor the package at its top: xdist's controller reads it before it
# starts the workers, and runs no test (importing them took it about 4 s, before any worker started).

# Two cores: keep the servers a test process starts from oversubscribing them (one_torch_thread: the
# test process itself).
SERVER_ENV = {"OMP_NUM_THREADS": "1", "ADPA_TORCH_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

# How every Ray the suite starts (its own, and those of the processes it runs) shares the cores with
# the other tests; each reads these from the environment.
# - Serve's controller replaces a proxy that has not answered its ready or health check within 5 or
#   10 s, three times: on cores shared by every worker of the suite, a proxy that is merely slow to
#   start is killed, and serve.start fails.
# - Ray runs its workers (Serve's controller, proxies and replicas) at nice 15: behind busy test
#   processes they starved. The autoscaling test, which loads a replica in a loop until Serve adds
#   another, took 33-48 s of CPU-burning waits; at nice 0, 30-31 s.
RAY_ON_SHARED_CORES = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
                       "RAY_worker_niceness": "0"}
for _name, _value in RAY_ON_SHARED_CORES.items():
    os.environ.setdefault(_name, _value)

# Every process the suite starts (xdist's workers included, which start after this file is read)
# imports what is not `adpa` untraced: see tests/untraced_imports/sitecustomize.py.
UNTRACED_IMPORTS = str(Path(__file__).parent / "untraced_imports")
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [UNTRACED_IMPORTS, os.environ.get("PYTHONPATH")]))


# Tests that need one of these start server processes: they are `slow` (see `pytest -m "not slow"`).
SERVER_FIXTURES = {
    "reference_server", "teacher_server", "local_teacher_server", "auth_server", "slow_server", "ray_serve", "ray_app",
    "small_demo",
}


# pytest-xdist (`--dist loadfile --no-loadscope-reorder`, see the Makefile) hands whole files to its
# workers in collection order: the longest first (by their time in `make test`), so that the workers
# finish together rather than one running a long file alone at the end. test_batching.py mostly
# waits (timed batch windows): it goes early, where the other worker's servers use the idle core;
# test_signals.py starts session servers of its own (local_teacher_server): not in the last seconds.
LONGEST_FIRST = ("test_ray_serve.py", "test_demo.py", "test_deploy.py", "test_bench.py", "test_reliability.py",
                 "test_batching.py", "test_distributed.py", "test_fuzz.py", "test_lifecycle.py",
                 "test_real_checkpoints.py", "test_signals.py", "test_faults.py", "test_bad_input.py",
                 "test_training.py", "test_stage0_eval.py", "test_layers.py")


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


# Collecting imports every test module, and with them torch, transformers and the rest: objects that
# live as long as the process. Python's cyclic collector walked them all, again and again, while they
# were made (0.8 s of a worker's 4.7 s of collection): it is off until they are collected and frozen.
gc.disable()


def pytest_sessionstart(session) -> None:
    if session.config.pluginmanager.has_plugin("dsession"):  # xdist's controller: it collects nothing
        gc.enable()


def pytest_collection_finish(session) -> None:
    # Frozen, Python's full collections (dozens during the in-process trainings) no longer walk the
    # collected modules' objects: half of this process's time in GC.
    gc.freeze()
    gc.enable()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def teacher_path(models_dir) -> Path:
    from adpa.tiny_model import make_tiny_model

    return make_tiny_model(models_dir / "teacher", layers=2, hidden=64, seed=1)


@pytest.fixture(scope="session")
def reference_path(models_dir) -> Path:
    from adpa.tiny_model import make_tiny_model

    return make_tiny_model(models_dir / "reference", layers=2, hidden=64, seed=2)


@pytest.fixture(scope="session")
def other_tokenizer_path(models_dir) -> Path:
    """A model whose tokenizer has one extra word: every fingerprint check must refuse it."""
    from adpa.tiny_model import DEFAULT_WORDS, make_tiny_model

    return make_tiny_model(models_dir / "other", seed=3, words=[*DEFAULT_WORDS, "zebra"])


def metric_value(http_port: int, name: str, **labels: str) -> float:
    """The value of one Prometheus sample of a running server (0 when it has not been counted yet)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    text = urlopen(f"http://127.0.0.1:{http_port}/metrics").read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def start_service(tmp_path_factory, args: list[str], env: dict[str, str] | None = None) -> ServiceProcess:
    from adpa.services.launch import ServiceProcess

    log = tmp_path_factory.mktemp("logs") / "serve.log"
    return ServiceProcess(args, env={**SERVER_ENV, **(env or {})}, log_path=log).start()


@pytest.fixture(scope="session")
def reference_server(tmp_path_factory, reference_path):
    server = start_service(tmp_path_factory, ["--role", "reference", "--model", str(reference_path)])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def teacher_server(tmp_path_factory, teacher_path, reference_server):
    """A teacher whose reference is the remote reference_server (the deployment shape)."""
    server = start_service(
        tmp_path_factory,
        ["--role", "teacher", "--model", str(teacher_path), "--reference", reference_server.endpoint,
         "--beta", "0.5", "--max-k", "32", "--max-samples", "4096", "--max-positions", "512",
         "--max-message-mb", "1"],
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def local_teacher_server(tmp_path_factory, teacher_path, reference_path):
    """A teacher with its reference in the same process."""
    server = start_service(
        tmp_path_factory,
        ["--role", "teacher", "--model", str(teacher_path), "--reference", str(reference_path), "--beta", "0.5"],
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory, reference_path):
    server = start_service(
        tmp_path_factory,
        ["--role", "reference", "--model", str(reference_path)],
        env={"ADPA_AUTH_TOKEN": "s3cret-token"},
    )
    yield server
    server.stop()


RAY_TOKEN = "ray-s3cret"


@contextlib.contextmanager
def children_unmeasured():
    """Processes started inside this block are not measured by coverage.

    `make test` measures every Python process the suite starts (coverage's subprocess patch passes
    COVERAGE_PROCESS_CONFIG down the environment), and tracing makes Python code several times
    slower. Two kinds of process are better left out:
    - Ray's own (raylet workers, Serve's controller, proxies and replicas): Ray ends them without the
      normal exit that writes coverage data, so tracing them costs time and records nothing;
    - servers and workers that run only code other processes of the suite measure already (the
      servers a fault test kills, those a benchmark loads): left out, every module's coverage is the
      same (checked with per-test coverage contexts when they were chosen).
    """
    saved = os.environ.pop("COVERAGE_PROCESS_CONFIG", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["COVERAGE_PROCESS_CONFIG"] = saved


@contextlib.contextmanager
def coverage_paused():
    """This process is not traced inside this block (the processes it starts still are, unless
    children_unmeasured says otherwise).

    For code that other tests measure already, driven by work that is not the package's: Ray's
    driver side, hypothesis generating inputs, clients in a loop. In Python 3.11 a coverage tracer
    slows every Python line of its process, measured or not (the gRPC fuzz test ran 2.3x longer
    traced). The tests marked `coverage_elsewhere` run inside it; each was chosen from a run that
    labelled every test's coverage (pytest --cov-context=test): nothing they trace here is traced
    by them alone.
    """
    try:
        import coverage
    except ImportError:  # the suite without its dev extras: nothing is measured anyway
        yield
        return
    current = coverage.Coverage.current()
    if current is not None:
        current.stop()
    try:
        yield
    finally:
        if current is not None:
            current.start()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with coverage_paused() if item.get_closest_marker("coverage_elsewhere") else contextlib.nullcontext():
        yield


@pytest.fixture(scope="module")
def module_children_unmeasured():
    """children_unmeasured() for a whole test module: list it first among a module fixture's
    arguments (or autouse it) so that the module's own servers start inside it."""
    with children_unmeasured():
        yield


@pytest.fixture(scope="module")
def ray_serve(tmp_path_factory):
    """One local Ray with Serve (gRPC and HTTP proxies on free loopback ports) for a test module
    (test_ray_serve.py): stopped after it, since an idle Ray with its application still takes about
    an eighth of a core, from the other tests of its worker."""
    import ray
    from ray import serve

    from adpa.services.launch import free_port
    from adpa.services.ray.app import GRPC_SERVICER_FUNCTIONS

    # Logical CPUs: replicas reserve a share each; the work itself is what 2 cores give.
    with children_unmeasured(), coverage_paused():  # Ray's driver side, traced, doubled this fixture's time
        ray.init(address="local", include_dashboard=False, num_cpus=4, log_to_driver=False,
                 _temp_dir=str(tmp_path_factory.mktemp("ray")),
                 runtime_env={"env_vars": {**SERVER_ENV, "ADPA_AUTH_TOKEN": RAY_TOKEN}})
    try:
        ports = {"grpc": free_port(), "http": free_port()}
        with coverage_paused():
            serve.start(http_options={"host": "127.0.0.1", "port": ports["http"]},
                        grpc_options={"port": ports["grpc"], "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS})
        yield ports
    finally:
        with coverage_paused():
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="module")
def ray_app(ray_serve, teacher_path, reference_path):
    """The adpa application (2 teacher replicas, 1 reference) on the module's Ray, as deploy/serve.yaml
    would start it; yields its endpoints."""
    from ray import serve

    from adpa.services.ray.app import build_app

    args = {"model": str(teacher_path), "reference": str(reference_path), "beta": 0.5, "torch_threads": 1,
            "ray_replicas": 2, "ray_cpus_per_replica": 0.5, "max_k": 32, "max_samples": 4096, "batch_wait_ms": 20,
            "max_message_mb": 1}
    with coverage_paused():  # build_app is measured in `adpa serve --ray`'s own tests
        serve.run(build_app(args), name="adpa", route_prefix="/")
    yield {"endpoint": f"grpc://127.0.0.1:{ray_serve['grpc']}", "http": f"http://127.0.0.1:{ray_serve['http']}",
           "token": RAY_TOKEN}
    with coverage_paused():
        serve.delete("adpa")
