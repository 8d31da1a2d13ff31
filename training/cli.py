"""`adpa train METHOD` and `adpa eval`.

    adpa train sft  --model runs/base --dataset data/sft.jsonl --output_dir runs/sft
    adpa train dpo  --model runs/sft --dataset data/prefs.jsonl --output_dir runs/dpo --beta 0.1
    adpa train dckd --model runs/student-sft --dataset data/prefs.jsonl --output_dir runs/dckd \
        --teacher grpc://127.0.0.1:50051
    adpa train adpa --config adpa.yaml --teacher local:runs/dpo --reference runs/sft
    adpa train adpa-plus --model runs/student-sft --dataset data/prefs.jsonl --output_dir runs/adpa-plus
    adpa eval --model runs/adpa --prompts data/test.jsonl --reward mypkg.rewards:score --out runs/adpa/eval.json
    torchrun --nproc_per_node 8 -m adpa.cli train adpa ...          # data parallel (docs/training.md)
    accelerate launch --config_file training/accelerate/ddp.yaml -m adpa.cli train adpa ...

Every field of the method's config is a flag (`--name value`) and a key of the `--config` YAML
file; flags win over the file. `adpa train METHOD --help` lists them. This module only parses
arguments; what a run does is `adpa.training.run` (`train`, `run_distill`, `run_adpa_plus`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from adpa.training.run import DISTILL, STAGE0, RunArguments, config_class, train

logger = logging.getLogger(__name__)


def _usage() -> str:
    lines = ["usage: adpa train METHOD [--config FILE.yaml] [--FIELD VALUE ...]", "", "methods:"]
    lines += [f"  {name:<18} {desc}" for name, desc in {**STAGE0, **DISTILL}.items()]
    lines += ["", "`adpa train METHOD --help` lists every field of that method's config."]
    return "\n".join(lines)


def train_main(argv: list[str]) -> int:
    """`adpa train METHOD ...`: parse the run's arguments and the method's config, then `run.train`."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    method, rest = argv[0], argv[1:]
    if method not in STAGE0 and method not in DISTILL:
        print(f"adpa train: unknown method {method!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from trl import TrlParser

    if method == "simpo" and "--loss_type" not in rest:
        rest = ["--loss_type", "simpo", "--cpo_alpha", "0", *rest]
    elif method in DISTILL:
        rest = ["--method", "adpa" if method == "adpa-plus" else method, *rest]
    parser = TrlParser((RunArguments, config_class(method)), prog=f"adpa train {method}")
    try:
        run, config = parser.parse_args_and_config(rest)
    except ValueError as err:  # a config's own checks (__post_init__)
        print(f"adpa train {method}: {err}", file=sys.stderr)
        return 2
    if method == "seqkd" and not run.teacher_model:
        print("adpa train seqkd: --teacher_model is required", file=sys.stderr)
        return 2
    # Under torchrun / accelerate launch every rank runs this: only the first one logs at INFO.
    rank, ranks = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s {f'[rank {rank}] ' if ranks > 1 else ''}%(name)s: %(message)s")
    from adpa.client import IncompatibleTeacher

    try:
        train(method, run, config)
    except IncompatibleTeacher as err:  # a refusal, not a fault: one line, no traceback
        print(f"adpa train {method}: {err}", file=sys.stderr)
        return 2
    logger.info("saved to %s", config.output_dir)
    return 0


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
