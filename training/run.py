"""The runnable training API: what `adpa train METHOD` does, callable from Python.

    from adpa.training.run import RunArguments, run_distill, run_adpa_plus
    trainer = run_distill("runs/student-sft", DistillConfig(output_dir="runs/dckd", method="dckd"), records)

`training/cli.py` only parses arguments into `RunArguments` and a method's config and calls `train`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from adpa.training.distill_config import DistillConfig
from adpa.training.methods import METHODS

logger = logging.getLogger(__name__)

# Stage 0 and the student baselines, on TRL's trainers (training/stage0.py).
STAGE0 = {
    "sft": "supervised fine-tuning (TRL SFTTrainer): pi_ref, the student init, or the SFT baseline",
    "dpo": "DPO (TRL DPOTrainer): the teacher pi_dpo, or the student DPO baseline",
    "simpo": "SimPO (TRL CPOTrainer, loss_type=simpo): student baseline",
    "seqkd": "SeqKD: SFT on the teacher's greedy generations (needs --teacher_model)",
}
# The distillation methods (the registry in training/methods.py), and ADPA+ (two of them in a row).
DISTILL = {**{name: spec.description for name, spec in METHODS.items()},
           "adpa-plus": "DCKD, then ADPA from its checkpoint"}


@dataclass
class RunArguments:
    model: str = field(metadata={"help": "model to train: a local folder or hub id"})
    dataset: str = field(metadata={"help": "training records: a .jsonl/.json/.parquet file or a hub dataset name"})
    dataset_split: str = field(default="train", metadata={"help": "split of a hub dataset"})
    max_records: int | None = field(default=None, metadata={"help": "use only the first N records"})
    teacher_model: str | None = field(default=None, metadata={"help": "seqkd: the teacher model that generates"})
    plus_dckd_steps: int | None = field(
        default=None, metadata={"help": "adpa-plus: max steps of the DCKD stage (default: as many as ADPA's)"}
    )


def config_class(method: str) -> type:
    """The config dataclass of `adpa train METHOD` (a TRL config for stage 0, else DistillConfig)."""
    if method in STAGE0:
        from adpa.training import stage0

        return {"sft": stage0.SFTConfig, "dpo": stage0.DPOConfig, "simpo": stage0.CPOConfig,
                "seqkd": stage0.SFTConfig}[method]
    if method in DISTILL:
        return DistillConfig
    raise ValueError(f"unknown method {method!r}; valid names: {', '.join([*STAGE0, *DISTILL])}")


def load_run_records(run: RunArguments):
    """The run's training records (`dataset`, `dataset_split`, at most `max_records`)."""
    from adpa.training.data import load_records

    records = load_records(run.dataset, run.dataset_split)
    if run.max_records is not None:
        records = records.select(range(min(run.max_records, len(records))))
    return records


def train(method: str, run: RunArguments, config, records=None, *, silent: bool = False, examples=None):
    """Train `run.model` with `method` (a stage-0 method, a distillation method, or adpa-plus); saves
    to config.output_dir and returns the trainer. `records` default to `load_run_records(run)`;
    `examples`: a distillation's records already tokenised (see `run_distill`)."""
    records = load_run_records(run) if records is None else records
    if method in STAGE0:
        from adpa.training import stage0

        if method == "seqkd":
            if not run.teacher_model:
                raise ValueError("seqkd needs --teacher_model")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(run.model)
            records = stage0.teacher_generations(run.teacher_model, records, tokenizer)
        fit = {"sft": stage0.train_sft, "dpo": stage0.train_dpo, "simpo": stage0.train_simpo,
               "seqkd": stage0.train_sft}[method]
        return fit(run.model, records, config, silent=silent)
    if method == "adpa-plus":
        return run_adpa_plus(run, config, records, silent=silent, examples=examples)
    return run_distill(run.model, config, records, silent=silent, examples=examples)


def run_distill(
    model_path: str, config: DistillConfig, records, teacher=None, *, silent: bool = False, examples=None
):
    """Train `model_path` with a distillation config; returns the trainer (model saved to output_dir).

    `teacher` defaults to `connect_teacher(config.teacher, ...)` (a service, or `local:PATH`).
    `examples` are `records` already tokenised with this model's tokenizer (`tokenize_preferences`),
    for callers that train many students on the same records.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adpa.training.data import tokenize_preferences
    from adpa.training.distill_trainer import DistillTrainer
    from adpa.training.teacher import connect_teacher

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    if examples is None:
        examples = tokenize_preferences(records, tokenizer, max_length=config.max_length)
    teacher = teacher or connect_teacher(
        config.teacher, reference=config.reference, beta=config.beta, token=config.teacher_token
    )
    trainer = DistillTrainer(model, config, examples, tokenizer, teacher)
    if silent:
        from adpa.training.stage0 import quiet

        quiet(trainer)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)  # written by rank 0 only
    # Every rank returns once the model is on disk: the next stage (adpa-plus) loads it on every rank.
    trainer.accelerator.wait_for_everyone()
    return trainer


def run_adpa_plus(
    run: RunArguments, config: DistillConfig, records, teacher=None, *, silent: bool = False, examples=None
):
    """ADPA+: DCKD into OUTPUT/dckd, then ADPA from that checkpoint into OUTPUT."""
    dckd = dataclasses.replace(
        config, method="dckd", output_dir=f"{config.output_dir}/dckd",
        max_steps=run.plus_dckd_steps if run.plus_dckd_steps is not None else config.max_steps,
        support="topk" if config.support == "indices" else config.support, resume_from_checkpoint=None,
    )
    run_distill(run.model, dckd, records, teacher, silent=silent, examples=examples)
    return run_distill(dckd.output_dir, config, records, teacher, silent=silent, examples=examples)
