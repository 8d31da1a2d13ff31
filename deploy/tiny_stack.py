"""The built-in tiny models and a small preference dataset, for the CPU stack (deploy/compose.cpu.yaml).

    python deploy/tiny_stack.py /models/tiny [--pairs 64]

Writes, offline, in a few seconds:
    OUT/teacher      pi_dpo stand-in: a random tiny Llama (2 layers, d=64, seed 0)
    OUT/reference    pi_ref stand-in: the same shape, seed 1 (so advantages are not zero)
    OUT/student      a thinner student (1 layer, d=32, seed 2)
    OUT/data/pairs.jsonl  preference records (prompt / chosen / rejected chat messages) of the built-in
                     world (adpa.demo.world), for `adpa train`
and then OUT/.complete. All three models share one word-level tokenizer, so the teacher accepts its
reference and a trainer accepts the teacher. A second run finds OUT/.complete and does nothing: the
compose service that runs it can start with every `docker compose up`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODELS = {  # name: make_tiny_model keyword arguments
    "teacher": dict(layers=2, hidden=64, heads=4, seed=0),
    "reference": dict(layers=2, hidden=64, heads=4, seed=1),
    "student": dict(layers=1, hidden=32, heads=2, seed=2),
}


def build(out: Path, pairs: int, seed: int) -> None:
    from adpa.demo.world import WORDS, World, WorldConfig
    from adpa.tiny_model import DEFAULT_WORDS, make_tiny_model

    words = list(dict.fromkeys([*DEFAULT_WORDS, *WORDS]))  # every word of the world is in the vocabulary
    for name, kwargs in MODELS.items():
        make_tiny_model(out / name, words=words, **kwargs)
    world = World(WorldConfig(seed=seed))
    rows = []
    for _ in range(pairs):
        prompt = world.prompt()
        chosen, rejected = world.preference(prompt)
        rows.append({
            "prompt": [{"role": "user", "content": prompt.text}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        })
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "data" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the tiny models and preference data of the CPU stack.")
    parser.add_argument("out", type=Path, help="output folder (e.g. /models/tiny)")
    parser.add_argument("--pairs", type=int, default=64, help="preference records (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (default: %(default)s)")
    args = parser.parse_args(argv)
    marker = args.out / ".complete"
    if marker.exists():
        print(f"tiny models already in {args.out}")
        return 0
    build(args.out, args.pairs, args.seed)
    marker.write_text(json.dumps({"models": MODELS, "pairs": args.pairs, "seed": args.seed}) + "\n")
    print(f"tiny models {', '.join(MODELS)} and data/pairs.jsonl ({args.pairs} records) written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
