"""Evaluation: generate responses to held-out prompts, score them with a reward, compare to a baseline.

The reward is a Python function `module:function` taking (prompts, responses) as lists of strings
and returning a list of floats, or a folder/hub id of a `AutoModelForSequenceClassification`
reward model (scored on prompt + response). Both are reported under greedy decoding and under
sampling (T = 1): distribution-level alignment shows under sampling.

Win rate against a baseline: per prompt, 1 if our reward is higher, 1/2 on a tie, 0 otherwise.
"""

from __future__ import annotations

import importlib
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from adpa.training.data import Text, encode_prompt
from adpa.training.rollout import generate_responses

RewardFn = Callable[[Sequence[Text], Sequence[str]], list[float]]
MODES = {"greedy": False, "sampled": True}


def load_reward(spec: str) -> RewardFn:
    """'package.module:function' or the path / hub id of a sequence-classification reward model."""
    if ":" in spec and not Path(spec).exists():
        module, _, name = spec.partition(":")
        fn = getattr(importlib.import_module(module), name, None)
        if fn is None:
            raise ValueError(f"reward {spec!r}: module {module} has no attribute {name}")
        return fn
    model = AutoModelForSequenceClassification.from_pretrained(spec).eval()
    tokenizer = AutoTokenizer.from_pretrained(spec)

    @torch.no_grad()
    def reward_model(prompts: Sequence[Text], responses: Sequence[str]) -> list[float]:
        scores = []
        for prompt, response in zip(prompts, responses):
            if isinstance(prompt, list):
                text = tokenizer.apply_chat_template(
                    [*prompt, {"role": "assistant", "content": response}], tokenize=False
                )
            else:
                text = prompt + response
            inputs = tokenizer(text, return_tensors="pt", truncation=True)
            scores.append(float(model(**inputs).logits[0, 0]))
        return scores

    return reward_model


def win_rate(ours: Sequence[float], theirs: Sequence[float]) -> float:
    if len(ours) != len(theirs):
        raise ValueError(f"{len(ours)} rewards against {len(theirs)} baseline rewards")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs)) / len(ours)


@dataclass
class ModeResult:
    mean_reward: float
    std_reward: float
    rewards: list[float]
    responses: list[str]
    win_rate: dict[str, float] = field(default_factory=dict)  # baseline name -> win rate


@dataclass
class EvalResult:
    model: str
    num_prompts: int
    modes: dict[str, ModeResult]

    def to_json(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def from_json(cls, path: str | Path) -> EvalResult:
        data = json.loads(Path(path).read_text())
        return cls(data["model"], data["num_prompts"], {m: ModeResult(**r) for m, r in data["modes"].items()})


def evaluate(
    model_path: str,
    prompts: Sequence[Text],
    reward: RewardFn,
    *,
    baselines: dict[str, EvalResult] | None = None,
    max_new_tokens: int = 64,
    seed: int = 0,
    modes: Sequence[str] = tuple(MODES),
) -> EvalResult:
    """Mean reward of `model_path`'s greedy and sampled responses, and win rates against baselines."""
    model = AutoModelForCausalLM.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    by_mode = {}
    for mode in modes:
        do_sample = MODES[mode]
        ids = generate_responses(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 seed=seed)
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in ids]
        rewards = [float(x) for x in reward(prompts, texts)]
        result = ModeResult(
            mean_reward=statistics.fmean(rewards),
            std_reward=statistics.pstdev(rewards),
            rewards=rewards,
            responses=texts,
        )
        for name, base in (baselines or {}).items():
            result.win_rate[name] = win_rate(rewards, base.modes[mode].rewards)
        by_mode[mode] = result
    return EvalResult(model=model_path, num_prompts=len(prompts), modes=by_mode)


def format_table(results: dict[str, EvalResult]) -> str:
    """One row per model: mean reward (greedy, sampled) and win rates."""
    baselines = sorted({b for r in results.values() for m in r.modes.values() for b in m.win_rate})
    header = ["model", "reward greedy", "reward sampled", *[f"WR vs {b} (g/s)" for b in baselines]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        g, s = r.modes["greedy"], r.modes["sampled"]
        cells = [name, f"{g.mean_reward:.3f}", f"{s.mean_reward:.3f}"]
        cells += [f"{g.win_rate.get(b, float('nan')):.2f} / {s.win_rate.get(b, float('nan')):.2f}" for b in baselines]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
