"""Stage 0 and the student baselines on TRL's trainers: SFT, DPO, SimPO, and SeqKD.

SFT makes the reference teacher pi_ref and the student's starting point; DPO makes the teacher
pi_dpo (and is the student DPO baseline); SimPO is a baseline; SeqKD is SFT on the teacher's
greedy generations.
"""

from __future__ import annotations

import logging

import datasets
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer

from adpa.training.data import encode_prompt
from adpa.training.rollout import generate_responses

logger = logging.getLogger(__name__)


def quiet(trainer):
    """Drop the per-step log printer and progress bar (for pipelines that show their own progress)."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def as_sft_records(records: datasets.Dataset) -> datasets.Dataset:
    """SFT records as TRL reads them; preference records train on their chosen response."""
    columns = set(records.column_names)
    if "messages" in columns or {"prompt", "completion"} <= columns:
        return records
    if {"prompt", "chosen"} <= columns:
        return records.map(
            lambda r: {"prompt": r["prompt"], "completion": r["chosen"]},
            remove_columns=sorted(columns - {"prompt"}),
        )
    raise ValueError(f"SFT needs `messages`, `prompt`+`completion` or `prompt`+`chosen` columns; got {sorted(columns)}")


def _fit(trainer_cls, model_path: str, records: datasets.Dataset, args, silent: bool):
    """Load the model and tokenizer, train with a TRL trainer, save to args.output_dir."""
    model = AutoModelForCausalLM.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    trainer = trainer_cls(model=model, args=args, train_dataset=records, processing_class=tokenizer)
    if silent:
        quiet(trainer)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    return trainer


def train_sft(model_path: str, records: datasets.Dataset, args: SFTConfig, *, silent: bool = False) -> SFTTrainer:
    return _fit(SFTTrainer, model_path, as_sft_records(records), args, silent)


def train_dpo(model_path: str, records: datasets.Dataset, args: DPOConfig, *, silent: bool = False) -> DPOTrainer:
    """DPO against a frozen copy of the starting model as pi_ref."""
    return _fit(DPOTrainer, model_path, records, args, silent)


def train_simpo(model_path: str, records: datasets.Dataset, args: CPOConfig, *, silent: bool = False) -> CPOTrainer:
    if args.loss_type != "simpo":
        raise ValueError(f"SimPO needs loss_type='simpo', got {args.loss_type!r}")
    return _fit(CPOTrainer, model_path, records, args, silent)


def teacher_generations(
    teacher_path: str, records: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int = 64
) -> datasets.Dataset:
    """SeqKD data: the teacher's greedy response to every prompt, as prompt/completion token text."""
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path)
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in records]
    responses = generate_responses(teacher, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=False)
    logger.info("generated %d teacher responses for SeqKD", len(responses))
    rows = []
    for record, response in zip(records, responses):
        text = tokenizer.decode(response, skip_special_tokens=True)
        completion = [{"role": "assistant", "content": text}] if isinstance(record["prompt"], list) else text
        rows.append({"prompt": record["prompt"], "completion": completion})
    return datasets.Dataset.from_list(rows)


__all__ = ["CPOConfig", "DPOConfig", "SFTConfig", "as_sft_records", "teacher_generations", "train_dpo",
           "train_simpo", "train_sft"]
