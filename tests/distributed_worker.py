"""One rank of a multi-process test (tests/test_distributed.py), started by torchrun / accelerate launch.

    python tests/distributed_worker.py train SPEC.json     # `adpa train` runs, one after another
    python tests/distributed_worker.py generate SPEC.json  # rollouts from a student sharded with raw FSDP1/FSDP2

`train` runs each `argv` of the spec through `adpa.training.cli.train_main`, with spies on the
trainer that record what this rank did (plan items trained, staged, fetched; records sampled), and
writes them to OUTPUT_DIR/rank-R.json. `generate` wraps the tiny student in FSDP on CPU (gloo; the
Trainer can't, see docs/training.md) and samples through `rollout.generation_model`, so the
unwrapping and synced generation are exercised on sharded parameters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def train(spec: dict) -> None:
    import torch.distributed as dist

    from adpa.training import distill_trainer as dt
    from adpa.training.cli import train_main

    record: dict = {}

    def spy(name, wrap):
        original = getattr(dt.DistillTrainer, name)
        setattr(dt.DistillTrainer, name, wrap(original))

    spy("compute_loss", lambda f: lambda self, model, inputs, **kw: (
        record["items"].append(int(inputs["item"][0])), f(self, model, inputs, **kw))[1])
    spy("_stage", lambda f: lambda self, j: (record["staged"].append(j), f(self, j))[1])
    spy("_fetch", lambda f: lambda self, j, staged: (record["fetched"].append(j), f(self, j, staged))[1])

    def train_spy(f):
        def wrapped(self, *args, **kwargs):
            record["trainer"] = self
            return f(self, *args, **kwargs)
        return wrapped

    spy("train", train_spy)
    generate = dt.generate_responses

    def generate_spy(model, tokenizer, prompts, **kw):
        record["sampled_seeds"].append(kw.get("row_seeds") or kw["seed"])
        return generate(model, tokenizer, prompts, **kw)

    dt.generate_responses = generate_spy

    for argv in spec["runs"]:
        record.clear()
        record.update(items=[], staged=[], fetched=[], sampled_seeds=[])
        assert train_main(argv) == 0
        trainer = record.pop("trainer")
        out = Path(argv[argv.index("--output_dir") + 1])
        (out / f"rank-{trainer.rank}.json").write_text(json.dumps({
            **record,
            "rank": trainer.rank,
            "world_size": trainer.world_size,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "plan": trainer.plan,
            "samples": trainer._samples,
            "log_history": trainer.state.log_history,
        }))
        dist.barrier()


def generate(spec: dict) -> None:
    """Greedy and per-row-seeded sampled rollouts of this rank's prompts, unsharded and under FSDP."""
    import torch.distributed as dist
    from accelerate import Accelerator
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adpa.training.rollout import generate_responses, generation_model

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    # Ranks get different prompts and numbers of prompts, so they stop at different steps.
    prompts = spec["prompts"][rank]
    kinds = {"greedy": dict(do_sample=False), "sampled": dict(row_seeds=[1000 + k for k in range(len(prompts))])}
    result: dict = {"rank": rank}
    for wrapper in ("none", "fsdp1", "fsdp2"):
        model = AutoModelForCausalLM.from_pretrained(spec["model"])
        layer = type(model.model.layers[0])
        if wrapper == "fsdp1":
            model = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({layer}),
                                             device_id=torch.device("cpu"), use_orig_params=True)
        elif wrapper == "fsdp2":
            for block in model.model.layers:
                fully_shard(block)
            fully_shard(model)
        # The parameters really are sharded: this rank holds about half of them.
        held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
        result[f"{wrapper}_params"] = held
        for kind, kwargs in kinds.items():
            with generation_model(model, accelerator) as unwrapped:
                result[f"{wrapper}_{kind}"] = generate_responses(
                    unwrapped, tokenizer, prompts, max_new_tokens=spec["max_new_tokens"][rank],
                    synced_gpus=wrapper != "none", **kwargs,
                )
    Path(spec["out"], f"rank-{rank}.json").write_text(json.dumps(result))
    dist.barrier()


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, path = sys.argv[1], sys.argv[2]
    {"train": train, "generate": generate}[mode](json.loads(Path(path).read_text()))
