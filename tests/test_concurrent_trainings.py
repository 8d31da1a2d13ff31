"""Three student trainings at once against one teacher end with the weights each reaches alone: the
signals a trainer gets do not depend on who shared its batches. (The same on Ray Serve is in
test_ray_serve.py, with the other tests on that module's Ray: `make test` runs each file in one
pytest-xdist worker.)

The trainings run as threads of this process (DistillTrainer holds no global state that two
runs share); ADPA samples greedily so that no run draws from the process-wide RNG another run
is seeding at the same moment.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from adpa.tiny_model import make_tiny_model
from adpa.training.data import load_records
from adpa.training.distill_config import DistillConfig
from adpa.training.run import run_distill
from adpa.training.teacher import connect_teacher

from .test_training import make_records

ADPA = {"support": "indices", "student_k": 4, "support_floor": 1e-3, "rollout_greedy": True}
TRAININGS = {"dckd": ("dckd", {}), "adpa": ("adpa", ADPA), "adpa-seed1": ("adpa", {**ADPA, "seed": 1})}
# Batched with other trainers' sequences, a padded forward may differ in the last bits (see
# services/batching.py); after 8 steps the weights agree to this tolerance.
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in make_records(24, seed=3)))
    return load_records(str(path))


@pytest.fixture(scope="module")
def student(models_dir) -> Path:
    return make_tiny_model(models_dir / "concurrent-student", layers=1, hidden=32, heads=2, seed=7)


def train(name: str, out: Path, student: Path, records, endpoint: str, token: str | None) -> dict[str, torch.Tensor]:
    method, extra = TRAININGS[name]
    config = DistillConfig(
        output_dir=str(out / name), method=method, teacher=endpoint, teacher_token=token, max_steps=8,
        per_device_train_batch_size=3, learning_rate=3e-3, logging_steps=4, save_strategy="no", report_to=[],
        use_cpu=True, support_k=8, max_new_tokens=8, disable_tqdm=True, **{"seed": 0, **extra},
    )
    with connect_teacher(endpoint, token=token) as teacher:
        trainer = run_distill(str(student), config, records, teacher=teacher, silent=True)
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def train_concurrently(out: Path, student, records, endpoint, token=None) -> dict[str, dict]:
    weights, errors = {}, []

    def run(name):
        try:
            weights[name] = train(name, out, student, records, endpoint, token)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append((name, err))

    threads = [threading.Thread(target=run, args=(name,)) for name in TRAININGS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return weights


@pytest.fixture(scope="module")
def alone(tmp_path_factory, student, records, teacher_server):
    out = tmp_path_factory.mktemp("alone")
    return {name: train(name, out, student, records, teacher_server.endpoint, None) for name in TRAININGS}


def assert_same_weights(got: dict, want: dict) -> None:
    for name in TRAININGS:
        assert got[name].keys() == want[name].keys()
        for key in want[name]:
            torch.testing.assert_close(got[name][key], want[name][key], atol=ATOL, rtol=RTOL, msg=f"{name}: {key}")
    # The three runs differ from one another: the comparison above could fail.
    assert not torch.allclose(want["adpa"]["lm_head.weight"], want["adpa-seed1"]["lm_head.weight"])


def test_three_trainings_at_once_on_the_standalone_teacher(tmp_path, student, records, teacher_server, alone):
    assert_same_weights(train_concurrently(tmp_path, student, records, teacher_server.endpoint), alone)
