"""Faults during training (issue 11): a teacher killed with SIGKILL mid-run, restarted, and restarted
with another model, while a DistillTrainer trains against two teacher endpoints.

- The trainer fails over to the surviving teacher and finishes with exactly the weights of an
  undisturbed run: no step lost, none applied twice (a Score call is a pure function of its request,
  so one retried on the other endpoint gets the same answer).
- The killed teacher, restarted on its port, gets requests again (the client's cool-off ends and
  its channel reconnects).
- A teacher restarted with other weights is caught by the fingerprint in its first answer, and the
  run stops with TeacherChanged naming the endpoint and both models.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from adpa.client import TeacherChanged, TeacherClient
from adpa.protocol import SupportSpec
from adpa.services.launch import ServiceProcess
from adpa.tiny_model import make_tiny_model
from adpa.training.data import load_records
from adpa.training.distill_config import DistillConfig
from adpa.training.run import run_distill

from .conftest import SERVER_ENV
from .test_training import make_records

pytestmark = pytest.mark.slow

STEPS = 10
KILL_AT = 4  # the call (one per step, prefetched one ahead) during which one teacher is killed


class RecordingClient(TeacherClient):
    """A TeacherClient that notes which replica answered each call, and can run an action at call n."""

    def __init__(self, *args, at: int | None = None, action=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.action = at, action
        self.replicas: list[str] = []
        self._count = 0
        self._count_lock = threading.Lock()

    def _answer(self, query, timeout):
        with self._count_lock:
            self._count += 1
            now = self._count
        if now == self.at and self.action is not None:
            # While this call is on its way: the kill may land before, during or after it is served.
            threading.Timer(0.01, self.action).start()
        answer = super()._answer(query, timeout)
        self.replicas.append(answer.replica)
        return answer


def teacher(tmp_path, name: str, model, reference, **kwargs) -> ServiceProcess:
    return ServiceProcess(["--role", "teacher", "--model", str(model), "--reference", str(reference), "--beta", "0.5"],
                          env=SERVER_ENV, log_path=tmp_path / f"{name}.log", **kwargs)


def config(out, teacher_spec: str) -> DistillConfig:
    return DistillConfig(
        output_dir=str(out), method="dckd", teacher=teacher_spec, max_steps=STEPS, per_device_train_batch_size=4,
        learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, support_k=8,
        max_new_tokens=8, disable_tqdm=True,
    )


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in make_records(48)))
    return path


@pytest.fixture(scope="module")
def student(models_dir):
    return make_tiny_model(models_dir / "fault-student", layers=1, hidden=32, heads=2, seed=5)


class Teachers:
    """Two teachers on the same model, shared by the tests below: each test leaves `a` and `b` running
    the original model (a killed `a` replaced on its port), so the next one needs no new starts."""

    def __init__(self, folder, model, reference):
        self.folder, self.model, self.reference = folder, model, reference
        self.a, self.b = (teacher(folder, name, model, reference).launch() for name in ("a", "b"))
        for server in (self.a, self.b):  # both load at once
            server.wait_ready()

    def restart_a(self, name: str, model=None) -> ServiceProcess:
        """Start another `a` on the killed one's ports (`model`: other weights)."""
        self.a = teacher(self.folder, name, model or self.model, self.reference, port=self.a.port,
                         http_port=self.a.http_port).start()
        return self.a

    def running(self) -> tuple[ServiceProcess, ServiceProcess]:
        if self.a.proc.poll() is not None:  # a test before this one failed half way
            self.restart_a("a-again")
        return self.a, self.b

    def stop(self) -> None:
        for server in (self.a, self.b):
            server.stop()


@pytest.fixture(scope="module")
def teachers(module_children_unmeasured, tmp_path_factory, teacher_path, reference_path):
    pair = Teachers(tmp_path_factory.mktemp("teachers"), teacher_path, reference_path)
    yield pair
    pair.stop()


def test_kill_9_mid_training_fails_over_to_the_same_weights_and_the_teacher_rejoins(
    tmp_path, prefs, student, teachers, caplog
):
    records = load_records(str(prefs))
    a, b = teachers.running()
    try:
        endpoints = [a.endpoint, b.endpoint]
        with RecordingClient(endpoints) as client:
            undisturbed = run_distill(str(student), config(tmp_path / "undisturbed", ",".join(endpoints)), records,
                                      teacher=client, silent=True)
        assert {r.split(":")[-1] for r in client.replicas} == {str(a.proc.pid), str(b.proc.pid)}  # both served
        n_requests = len(client.replicas)

        killed_pid = a.proc.pid
        with RecordingClient(endpoints, at=KILL_AT, action=a.proc.kill, max_cooldown_s=2.0) as client:
            disturbed = run_distill(str(student), config(tmp_path / "disturbed", ",".join(endpoints)), records,
                                    teacher=client, silent=True)
            assert a.proc.wait(timeout=30) == -9  # it really was SIGKILLed
            after_kill = client.replicas[KILL_AT + 1:]
            assert after_kill and all(r.endswith(f":{b.proc.pid}") for r in after_kill)
            assert any("failing over" in r.message for r in caplog.records)  # a call met the dead teacher
            assert len(client.replicas) == n_requests  # as many answers as undisturbed: none lost, none twice

            # Same weights as the undisturbed run, bit for bit.
            want = load_file(tmp_path / "undisturbed/model.safetensors")
            got = load_file(tmp_path / "disturbed/model.safetensors")
            assert want.keys() == got.keys()
            assert all(torch.equal(want[k], got[k]) for k in want)
            assert [e["loss"] for e in disturbed.state.log_history if "loss" in e] == \
                   [e["loss"] for e in undisturbed.state.log_history if "loss" in e]

            # Restarted on its port, it gets requests again once its cool-off is over.
            restarted = teachers.restart_a("a-restarted")
            deadline = time.monotonic() + 60
            while not any(r.endswith(f":{restarted.proc.pid}") for r in client.replicas):
                assert time.monotonic() < deadline, "the restarted teacher never got a request"
                client.score([[5, 6, 7]], [(0, 3)], support=SupportSpec("topk", k=2))
                time.sleep(0.2)
            assert restarted.proc.pid != killed_pid
    finally:
        a.stop()  # the killed one (its log file closed); `teachers` stops the one now on its port


def test_a_teacher_restarted_with_another_model_stops_the_run(tmp_path, prefs, student, teachers, teacher_path,
                                                              models_dir):
    other = make_tiny_model(models_dir / "fault-other-teacher", layers=2, hidden=64, seed=11)  # same tokenizer
    records = load_records(str(prefs))
    a, b = teachers.running()
    try:
        with RecordingClient([b.endpoint, a.endpoint], max_cooldown_s=1.0) as client:
            client.info()  # the handshake: b, the original model
            a.proc.kill()  # a dies and comes back, on its port, serving other weights
            a.proc.wait()
            teachers.restart_a("a-other", other)
            with pytest.raises(TeacherChanged) as err:
                run_distill(str(student), config(tmp_path / "run", f"{b.endpoint},{a.endpoint}"), records,
                            teacher=client, silent=True)
    finally:
        a.stop()  # the killed one (its log file closed); `teachers` stops the one now on its port
    message = str(err.value)
    assert a.endpoint in message and str(other) in message and str(teacher_path) in message, message
    assert "must not be mixed" in message and "stops" in message
