"""The demo's stage 0: the teacher's SFT (pi_ref) and DPO (pi_dpo), the SFT student, and the
reference and teacher services, each started as soon as its model is on disk.

Every model, here and in the student methods, trains through `adpa.training.run.train`, the
entry point of `adpa train`: the demo only chooses the configs.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
from tqdm.auto import tqdm

from adpa.demo.config import Stage
from adpa.services.launch import ServiceProcess

if TYPE_CHECKING:
    from adpa.demo.pipeline import DemoRun

logger = logging.getLogger(__name__)

# The services run with one torch thread each, beside the pipeline's own training.
SERVICE_ENV = {"ADPA_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
# One request forwarded at a time: with several student workers, a batched forward would make an
# answer depend on which requests happened to share it (padding changes the last bits).
SERVICE_ARGS = ["--no-batching"]

# Stage 0, in order: label -> (method, model it starts from, split, model it makes, its config field).
# The SFT student needs neither teacher, so with jobs > 1 it trains in a worker beside them.
STAGE0 = {
    "teacher SFT (pi_ref)": ("sft", "teacher_base", "sft", "reference", "teacher_sft"),
    "teacher DPO (pi_dpo)": ("dpo", "reference", "pairs", "teacher", "teacher_dpo"),
    "student SFT": ("sft", "student_base", "sft", "student_sft", "student_sft"),
}


def common_args(out: Path, steps: int, lr: float, batch_size: int, seed: int) -> dict:
    """The Trainer arguments every demo training shares."""
    return dict(
        output_dir=str(out), max_steps=steps, learning_rate=lr, per_device_train_batch_size=batch_size,
        logging_steps=max(1, steps // 20), save_strategy="no", report_to=[], use_cpu=True, seed=seed,
        disable_tqdm=True, lr_scheduler_type="constant_with_warmup", warmup_steps=min(10, steps // 10),
        # TRL turns it on by default; on these tiny models it only costs a second forward per step.
        gradient_checkpointing=False,
        # TRL's configs also default to bf16 autocast. A CPU without bf16 units emulates it: the
        # teacher SFT ran 4x slower (100 steps: 18.0 s vs 4.2 s), and stage 0 and the TRL baselines
        # (DPO, SimPO, SeqKD) trained at another precision than the distilled students. All fp32.
        bf16=False,
    )


def train_trl(method: str, model: Path, records: datasets.Dataset, dataset: Path, out: Path, stage: Stage,
              seed: int = 0):
    """Train `model` into `out` with one of `adpa train`'s TRL methods (sft, dpo, simpo) on `records`
    (read from `dataset`, or derived from it); returns the trainer."""
    from adpa.training.run import RunArguments, config_class, train

    args = {**common_args(out, stage.steps, stage.lr, stage.batch_size, seed), **stage.options}
    if method == "simpo":  # what `adpa train simpo` sets; CPOTrainer turns remove_unused_columns off itself, noisily
        args = {"loss_type": "simpo", "cpo_alpha": 0.0, "remove_unused_columns": False, **args}
    run = RunArguments(model=str(model), dataset=str(dataset))
    return train(method, run, config_class(method)(**args), records, silent=True)


def loss_curve(trainer) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]


def train_stage0(run: DemoRun, label: str) -> list[tuple[int, float]]:
    """One stage-0 model (a key of STAGE0); returns its loss curve (also kept in `run.curves`)."""
    method, start, split, out, stage = STAGE0[label]
    if out == "reference" and "teacher_sft" in run.paths:  # a world whose teacher was SFT'd on its own corpus
        split = "teacher_sft"
    started = time.perf_counter()
    trainer = train_trl(method, getattr(run, start), run.data[split], run.paths[split], getattr(run, out),
                        getattr(run.config, stage), seed=run.replicate)
    run.curves[label] = loss_curve(trainer)
    logger.info("%s: %d steps in %.0fs", label, getattr(run.config, stage).steps, time.perf_counter() - started)
    return run.curves[label]


def train_teachers(run: DemoRun, stack: ExitStack, bar: tqdm | None = None) -> list[ServiceProcess]:
    """pi_ref, then pi_dpo, in this process; each one's service starts loading as soon as its model
    is on disk (stopped when `stack` closes). Returns the reference and teacher services."""
    log = run.workdir / "logs"
    log.mkdir(parents=True, exist_ok=True)
    services = []
    for label, role in zip(STAGE0, ("reference", "teacher")):
        if bar is not None:
            bar.set_postfix_str(label)
        train_stage0(run, label)
        if bar is not None:
            bar.update()
        args = ["--role", role, "--model", str(getattr(run, role)), *SERVICE_ARGS]
        if role == "teacher":  # it waits for its reference to answer
            args += ["--reference", services[0].endpoint, "--beta", str(run.config.beta)]
        service = ServiceProcess(args, env=SERVICE_ENV, log_path=log / f"{role}.log")
        stack.callback(service.stop)
        services.append(service.launch())
    return services


def services_ready(services: list[ServiceProcess]) -> dict[str, str]:
    """Wait for the reference and teacher services; their endpoints by role."""
    reference, teacher = (service.wait_ready() for service in services)
    logger.info("services up: reference %s, teacher %s", reference.endpoint, teacher.endpoint)
    return {"teacher": teacher.endpoint, "reference": reference.endpoint}
