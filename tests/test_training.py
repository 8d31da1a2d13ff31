"""Distillation runs against the real teacher service and the in-process teacher, resume, caching,
and the method registry as the config and the trainer read it."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adpa.tiny_model import make_tiny_model
from adpa.training.data import load_records
from adpa.training.distill_config import DistillConfig
from adpa.training.methods import METHODS
from adpa.training.run import RunArguments, run_adpa_plus, run_distill
from adpa.training.teacher import LocalTeacher

from .conftest import metric_value

ITEMS = "red blue green cat dog fox one two three".split()


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        items = rng.sample(ITEMS, 3)
        records.append({
            "prompt": [{"role": "user", "content": "sort " + " ".join(items)}],
            "chosen": [{"role": "assistant", "content": " ".join(sorted(items)) + " thanks"}],
            "rejected": [{"role": "assistant", "content": " ".join(items) + " stupid"}],
        })
    return records


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in make_records(16)))
    return path


@pytest.fixture(scope="module")
def student_path(models_dir) -> Path:
    return make_tiny_model(models_dir / "student", layers=1, hidden=32, heads=2, seed=5)


@pytest.fixture(scope="module")
def local_teacher(teacher_path, reference_path):
    return LocalTeacher.from_paths(str(teacher_path), str(reference_path), beta=0.5)


def config(out: Path, method: str, **overrides) -> DistillConfig:
    base = dict(
        output_dir=str(out), method=method, max_steps=8, per_device_train_batch_size=4, learning_rate=3e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, support_k=8, max_new_tokens=8,
        disable_tqdm=True,
    )
    return DistillConfig(**{**base, **overrides})


def losses_of(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def score_requests(server) -> float:
    return metric_value(server.http_port, "adpa_requests_total", transport="grpc", method="Score", code="OK")


# -- the config reads the method registry ------------------------------------------------------


def test_config_takes_defaults_from_the_method_spec(tmp_path):
    release = DistillConfig(output_dir=str(tmp_path), method="adpa-release")
    assert (release.gamma, release.support_k) == (1.6, 50)
    adpa = DistillConfig(output_dir=str(tmp_path), method="adpa")
    assert (adpa.gamma, adpa.support_k) == (1.0, 32)
    explicit = DistillConfig(output_dir=str(tmp_path), method="adpa-release", gamma=2.0, support_k=7)
    assert (explicit.gamma, explicit.support_k) == (2.0, 7)
    assert release.method_spec is METHODS["adpa-release"]


def test_config_refuses_unknown_methods_and_supports_a_method_does_not_accept(tmp_path):
    with pytest.raises(ValueError) as error:
        DistillConfig(output_dir=str(tmp_path), method="adpa++")
    assert all(name in str(error.value) for name in METHODS)
    with pytest.raises(ValueError, match="adpa-release accepts support \\['topk'\\] only; got support='indices'"):
        DistillConfig(output_dir=str(tmp_path), method="adpa-release", support="indices")


class RecordingTeacher:
    """The in-process teacher, recording what each score call asks for."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def check_compatible(self, *args, **kwargs):
        return self.inner.check_compatible(*args, **kwargs)

    def score(self, sequences, ranges, **kwargs):
        self.calls.append((len(sequences), kwargs["signal"], kwargs["support"].kind, kwargs["include_logprobs"]))
        return self.inner.score(sequences, ranges, **kwargs)


@pytest.mark.parametrize(
    "method, extra, call",
    [
        ("dckd", {}, (8, "logprobs", "topk", False)),  # y_w and y_l of 4 records, one request
        ("dckd-no-rejected", {}, (4, "logprobs", "topk", False)),  # y_w only
        ("vanilla-kd", {}, (4, "logprobs", "topk", False)),
        ("adpa", {"support": "indices", "support_floor": 1e-3}, (4, "advantage", "indices", True)),  # samples
        ("adpa-no-ref", {"support_floor": 1e-3}, (4, "logprobs", "topk", False)),
    ],
)
def test_the_teacher_is_asked_what_the_method_spec_says(tmp_path, prefs, student_path, local_teacher, method, extra,
                                                        call):
    teacher = RecordingTeacher(local_teacher)
    records = load_records(str(prefs))
    trainer = run_distill(str(student_path), config(tmp_path, method, max_steps=1, prefetch=0, **extra), records,
                          teacher=teacher)
    assert teacher.calls == [call]
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert set(METHODS[method].parts) <= set(logged)


# -- runs ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, extra",
    [
        ("dckd", {}),
        ("adpa", {"support": "indices", "student_k": 4, "support_floor": 1e-3}),
    ],
)
def test_remote_and_local_teacher_give_the_same_run(
    tmp_path, prefs, student_path, teacher_server, local_teacher, method, extra
):
    records = load_records(str(prefs))
    remote = run_distill(str(student_path), config(tmp_path / "remote", method, teacher=teacher_server.endpoint, **extra),
                         records)
    local = run_distill(str(student_path), config(tmp_path / "local", method, **extra), records, teacher=local_teacher)
    remote_losses, local_losses = losses_of(remote), losses_of(local)
    assert len(remote_losses) == 8
    assert remote_losses == pytest.approx(local_losses, abs=1e-4)
    # Training works: the last steps' loss is below the first steps'.
    assert sum(remote_losses[-3:]) < sum(remote_losses[:3])


@pytest.mark.slow
def test_sample_methods_and_adpa_plus_run_locally(tmp_path, prefs, student_path, local_teacher):
    records = load_records(str(prefs))
    for method in ("adpa-no-ref", "adpa-release", "q-argmax", "q-softmax", "vanilla-kd", "dckd-no-rejected"):
        trainer = run_distill(str(student_path), config(tmp_path / method, method, max_steps=2), records,
                              teacher=local_teacher)
        assert all(torch.isfinite(torch.tensor(losses_of(trainer)))), method
    online = run_distill(str(student_path), config(tmp_path / "online", "adpa", max_steps=3, rollout="online",
                                                   prefetch=0), records, teacher=local_teacher)
    assert len(losses_of(online)) == 3
    plus = run_adpa_plus(RunArguments(model=str(student_path), dataset=str(prefs), plus_dckd_steps=2),
                         config(tmp_path / "plus", "adpa", max_steps=2), records, teacher=local_teacher)
    assert (tmp_path / "plus/dckd/model.safetensors").exists()
    assert plus.model.config._name_or_path.endswith("plus/dckd")


@pytest.mark.slow
def test_offline_adpa_reuses_cached_samples_and_signals(tmp_path, prefs, student_path, teacher_server):
    records = load_records(str(prefs))
    overrides = dict(teacher=teacher_server.endpoint, cache_dir=str(tmp_path / "cache"), max_steps=4)
    before = score_requests(teacher_server)
    first = run_distill(str(student_path), config(tmp_path / "first", "adpa", **overrides), records)
    after_first = score_requests(teacher_server)
    assert after_first - before == 4  # one request per micro-batch
    second = run_distill(str(student_path), config(tmp_path / "second", "adpa", **overrides), records)
    assert score_requests(teacher_server) == after_first  # the teacher was not asked again
    assert losses_of(second) == pytest.approx(losses_of(first), abs=1e-6)


def _train_args(out: Path, student: Path, prefs: Path, teacher: Path, reference: Path, *extra: str) -> list[str]:
    """`adpa train` arguments of a 24-step DCKD run that saves a checkpoint every 4 steps."""
    return [
        "dckd", "--model", str(student), "--dataset", str(prefs),
        "--output_dir", str(out), "--teacher", f"local:{teacher}", "--reference", str(reference),
        "--max_steps", "24", "--per_device_train_batch_size", "2", "--learning_rate", "3e-3", "--save_steps", "4",
        "--report_to", "none", "--use_cpu", "true", "--support_k", "8", "--seed", "0", "--disable_tqdm", "true",
        *extra,
    ]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path, prefs, student_path, teacher_path, reference_path):
    """A run SIGKILLed as a process (`adpa train` in a subprocess), resumed from its last checkpoint,
    ends with the weights of an uninterrupted run (the uninterrupted run and the resumption call the
    same entry point in this process)."""
    from adpa.training.cli import train_main

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = (student_path, prefs, teacher_path, reference_path)
    assert train_main(_train_args(tmp_path / "full", *args)) == 0

    killed = subprocess.Popen([sys.executable, "-m", "adpa.cli", "train", *_train_args(tmp_path / "killed", *args)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (tmp_path / "killed/checkpoint-8/trainer_state.json").exists():
            try:  # poll every 50 ms; the run must still be going when checkpoint-8 appears
                killed.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            pytest.fail("the run ended before it could be killed")
        killed.send_signal(signal.SIGKILL)
    finally:
        killed.kill()
        killed.wait()
    checkpoints = sorted((tmp_path / "killed").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    latest = [c for c in checkpoints if (c / "trainer_state.json").exists()][-1]
    assert int(latest.name.split("-")[1]) < 24
    assert train_main(_train_args(tmp_path / "killed", *args, "--resume_from_checkpoint", str(latest))) == 0

    full = load_file(tmp_path / "full/model.safetensors")
    resumed = load_file(tmp_path / "killed/model.safetensors")
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=1e-5, rtol=1e-4)


def test_sampled_support_trains_with_importance_weights(tmp_path, prefs, student_path, local_teacher):
    """support=sampled: DCKD's KL and ADPA's term from teacher draws with importance weights (their
    unbiasedness is tested in test_losses.py); here: the methods that accept it train, the others refuse it."""
    records = load_records(str(prefs))
    for method in ("dckd", "vanilla-kd", "adpa", "adpa-no-ref"):
        trainer = run_distill(str(student_path), config(tmp_path / method, method, support="sampled", sample_n=6,
                                                        max_steps=3), records, teacher=local_teacher)
        losses = losses_of(trainer)
        assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))), method
    for method in ("q-argmax", "q-softmax", "adpa-release"):
        with pytest.raises(ValueError, match="accepts support"):
            config(tmp_path / method, method, support="sampled")
    with pytest.raises(ValueError, match="support_floor needs floor_penalty"):
        config(tmp_path / "floor", "adpa", support="sampled", support_floor=1e-3)


def test_indices_answers_are_not_cached(tmp_path, prefs, student_path, local_teacher):
    """support=indices asks for the current student's top-k: only the samples may be reused."""
    records = load_records(str(prefs))
    run_distill(str(student_path), config(tmp_path / "run", "adpa", support="indices", student_k=4, max_steps=2,
                                          cache_dir=str(tmp_path / "cache")), records, teacher=local_teacher)
    cached = {p.name.split("-")[0] for p in (tmp_path / "cache").glob("*/*")}
    assert cached == {"samples"}
