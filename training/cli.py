"""`adpa train METHOD` and `adpa eval`.

    adpa train sft  --model runs/base --dataset data/sft.jsonl --output_dir runs/sft
    adpa train dpo  --model runs/sft --dataset data/prefs.jsonl --output_dir runs/dpo --beta 0.1
    adpa train dckd --model runs/student-sft --dataset data/prefs.jsonl --output_dir runs/dckd \
        --teacher grpc://127.0.0.1:50051
    adpa train adpa --config adpa.yaml --teacher local:runs/dpo --reference runs/sft
    adpa train adpa-plus --model runs/student-sft --dataset data/prefs.jsonl --output_dir runs/adpa-plus
    adpa eval --model runs/adpa --prompts data/test.jsonl --reward mypkg.rewards:score --out runs/adpa/eval.json

Every field of the method's config is a flag (`--name value`) and a key of the `--config` YAML
file; flags win over the file. `adpa train METHOD --help` lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field

from adpa.training.distill_config import METHODS, DistillConfig

logger = logging.getLogger(__name__)

STAGE0 = {
    "sft": "supervised fine-tuning (TRL SFTTrainer): pi_ref, the student init, or the SFT baseline",
    "dpo": "DPO (TRL DPOTrainer): the teacher pi_dpo, or the student DPO baseline",
    "simpo": "SimPO (TRL CPOTrainer, loss_type=simpo): student baseline",
    "seqkd": "SeqKD: SFT on the teacher's greedy generations (needs --teacher_model)",
}
DISTILL = {**{name: desc for name, (_, _, desc) in METHODS.items()}, "adpa-plus": "DCKD, then ADPA from its checkpoint"}


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


def _usage() -> str:
    lines = ["usage: adpa train METHOD [--config FILE.yaml] [--FIELD VALUE ...]", "", "methods:"]
    lines += [f"  {name:<18} {desc}" for name, desc in {**STAGE0, **DISTILL}.items()]
    lines += ["", "`adpa train METHOD --help` lists every field of that method's config."]
    return "\n".join(lines)


def train_main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    method, rest = argv[0], argv[1:]
    if method not in STAGE0 and method not in DISTILL:
        print(f"adpa train: unknown method {method!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from trl import TrlParser

    from adpa.training import stage0

    if method in STAGE0:
        config_cls = {"sft": stage0.SFTConfig, "dpo": stage0.DPOConfig, "simpo": stage0.CPOConfig,
                      "seqkd": stage0.SFTConfig}[method]
        if method == "simpo" and "--loss_type" not in rest:
            rest = ["--loss_type", "simpo", "--cpo_alpha", "0", *rest]
    else:
        config_cls = DistillConfig
        rest = ["--method", "adpa" if method == "adpa-plus" else method, *rest]
    parser = TrlParser((RunArguments, config_cls), prog=f"adpa train {method}")
    try:
        run, config = parser.parse_args_and_config(rest)
    except ValueError as err:  # a config's own checks (__post_init__)
        print(f"adpa train {method}: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    records = _load(run)
    if method == "sft":
        stage0.train_sft(run.model, records, config)
    elif method == "dpo":
        stage0.train_dpo(run.model, records, config)
    elif method == "simpo":
        stage0.train_simpo(run.model, records, config)
    elif method == "seqkd":
        if not run.teacher_model:
            print("adpa train seqkd: --teacher_model is required", file=sys.stderr)
            return 2
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(run.model)
        stage0.train_sft(run.model, stage0.teacher_generations(run.teacher_model, records, tokenizer), config)
    elif method == "adpa-plus":
        run_adpa_plus(run, config, records)
    else:
        run_distill(run.model, config, records)
    logger.info("saved to %s", config.output_dir)
    return 0


def _load(run: RunArguments):
    from adpa.training.data import load_records

    records = load_records(run.dataset, run.dataset_split)
    if run.max_records is not None:
        records = records.select(range(min(run.max_records, len(records))))
    return records


def run_distill(model_path: str, config: DistillConfig, records, teacher=None, *, silent: bool = False):
    """Train `model_path` with a distillation config; returns the trainer (model saved to output_dir)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adpa.training.data import tokenize_preferences
    from adpa.training.distill_trainer import DistillTrainer
    from adpa.training.teacher import connect_teacher

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    examples = tokenize_preferences(records, tokenizer, max_length=config.max_length)
    teacher = teacher or connect_teacher(
        config.teacher, reference=config.reference, beta=config.beta, token=config.teacher_token
    )
    trainer = DistillTrainer(model, config, examples, tokenizer, teacher)
    if silent:
        from adpa.training.stage0 import quiet

        quiet(trainer)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    return trainer


def run_adpa_plus(run: RunArguments, config: DistillConfig, records, teacher=None, *, silent: bool = False):
    """ADPA+: DCKD into OUTPUT/dckd, then ADPA from that checkpoint into OUTPUT."""
    dckd = dataclasses.replace(
        config, method="dckd", output_dir=f"{config.output_dir}/dckd",
        max_steps=run.plus_dckd_steps if run.plus_dckd_steps is not None else config.max_steps,
        support="topk" if config.support == "indices" else config.support, resume_from_checkpoint=None,
    )
    run_distill(run.model, dckd, records, teacher, silent=silent)
    return run_distill(dckd.output_dir, config, records, teacher, silent=silent)


def eval_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="adpa eval",
        description="Generate responses for held-out prompts (greedy and sampled), score them with a reward "
        "function or reward model, and compare with baselines' saved results.",
    )
    parser.add_argument("--model", required=True, help="model to evaluate (folder or hub id)")
    parser.add_argument("--prompts", required=True, help=".jsonl/.parquet file (or hub dataset) with a `prompt` column")
    parser.add_argument("--reward", required=True, help="'package.module:function' or a reward model folder/hub id")
    parser.add_argument("--baseline", action="append", default=[], metavar="NAME=RESULTS.json",
                        help="a baseline's saved results (repeatable); win rates are reported against each")
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default: %(default)s")
    parser.add_argument("--max-records", type=int, help="evaluate on the first N prompts only")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    args = parser.parse_args(argv)

    from adpa.training.data import load_records
    from adpa.training.evaluate import EvalResult, evaluate, format_table, load_reward

    baselines = {}
    for spec in args.baseline:
        name, sep, path = spec.partition("=")
        if not sep:
            parser.error(f"--baseline takes NAME=RESULTS.json, got {spec!r}")
        baselines[name] = EvalResult.from_json(path)
    records = load_records(args.prompts)
    if args.max_records is not None:
        records = records.select(range(min(args.max_records, len(records))))
    result = evaluate(args.model, records["prompt"], load_reward(args.reward), baselines=baselines,
                      max_new_tokens=args.max_new_tokens, seed=args.seed)
    if args.out:
        result.to_json(args.out)
    print(format_table({args.model: result}))
    print(json.dumps({m: {"mean_reward": r.mean_reward, "win_rate": r.win_rate} for m, r in result.modes.items()}))
    return 0
