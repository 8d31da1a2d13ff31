"""One rank of a multi-process test (tests/test_distributed.py), started by torchrun / accelerate launch.

    python tests/distributed_worker.py train SPEC.json     # `adpa train` runs, one after another
    python tests/distributed_worker.py generate SPEC.json  # rollouts from a student sharded with raw FSDP1/FSDP2
    python tests/distributed_worker.py compare SPEC.json   # one layout's train records against another's

`train` runs each `argv` of the spec through `adpa.training.cli.train_main`, with spies on the
trainer that record what this rank did (plan items trained, staged, fetched; records sampled), and
writes them to OUTPUT_DIR/rank-R.json (also without a launcher: one process). `compare` checks a
multi-process layout's records against a one-process run's (bench/gpu_fsdp_check.sh). `generate` wraps the tiny student in FSDP on CPU (gloo; the
Trainer can't, see docs/training.md) and samples through `rollout.generation_model`, so the
unwrapping and synced generation are exercised on sharded parameters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from adpa.cli import _loading_for_life


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
        if dist.is_initialized():
            dist.barrier()


def compare(spec: dict) -> None:
    """Each run of `spec["runs"]`: the layout in `candidate/NAME` against the one process in
    `reference/NAME` (same plan, every record once per epoch, each rank staging and fetching its own
    items, the same offline samples, loss curves and final weights within the tolerances)."""
    from collections import Counter

    from safetensors.torch import load_file

    report, failures = {}, []
    for name in spec["runs"]:
        one = json.loads(Path(spec["reference"], name, "rank-0.json").read_text())
        world = json.loads(Path(spec["candidate"], name, "rank-0.json").read_text())["world_size"]
        ranks = [json.loads(Path(spec["candidate"], name, f"rank-{r}.json").read_text()) for r in range(world)]
        plan, items = ranks[0]["plan"], len(ranks[0]["plan"])
        checks = {"same plan": plan == one["plan"]}
        per_epoch = items // world
        epochs = len(ranks[0]["items"]) // per_epoch
        for rank, r in enumerate(ranks):
            mine = list(range(rank, items, world))
            checks[f"rank {rank} trains its items"] = r["items"] == mine * epochs
            checks[f"rank {rank} stages and fetches its items"] = set(r["staged"]) == set(r["fetched"]) == set(mine)
        for epoch in range(epochs):
            seen = Counter(i for r in ranks for j in r["items"][epoch * per_epoch : (epoch + 1) * per_epoch]
                           for i in plan[j])
            checks[f"epoch {epoch}: every record once"] = seen == Counter(range(sum(len(b) for b in plan)))
        if one["samples"] is not None:
            merged = {i: s for r in ranks for i, s in r["samples"].items()}
            checks["same offline samples"] = merged == one["samples"]
        losses = [[e for e in history if "loss" in e] for history in (one["log_history"], ranks[0]["log_history"])]
        keys = [k for k in losses[0][0] if k not in ("epoch", "grad_norm", "learning_rate", "step")]
        dloss = max(abs(a[k] - b[k]) for a, b in zip(*losses) for k in keys)
        w1 = load_file(Path(spec["reference"], name, "model.safetensors"))
        w2 = load_file(Path(spec["candidate"], name, "model.safetensors"))
        dweight = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
        checks["same number of logged steps"] = len(losses[0]) == len(losses[1])
        checks[f"loss curve within {spec['loss_tol']}"] = dloss <= spec["loss_tol"]
        checks[f"weights within {spec['weight_tol']}"] = dweight <= spec["weight_tol"]
        report[name] = {"world_size": world, "distributed_type": ranks[0]["distributed_type"],
                        "max_dloss": dloss, "max_dweight": dweight, "checks": checks}
        failures += [f"{name}: {check}" for check, ok in checks.items() if not ok]
    print(json.dumps(report, indent=1))
    if failures:
        raise SystemExit("FAILED: " + "; ".join(failures))


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
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    torch.set_num_threads(1)
    # The libraries every mode runs on, imported as `adpa train` imports them (the cyclic collector off,
    # then frozen): each Trainer.train starts with a full collection (accelerate's free_memory) that
    # would walk them all.
    with _loading_for_life():
        import adpa.training.cli  # noqa: F401
    mode, path = sys.argv[1], sys.argv[2]
    {"train": train, "generate": generate, "compare": compare}[mode](json.loads(Path(path).read_text()))
