"""A small preference world with a known ground-truth reward, where alignment matters.

A prompt asks for one of four list tasks on 3-5 items, sometimes politely ("please"):

    user:      reverse please fox red owl
    assistant: owl red fox thanks

The ground-truth reward r(x, y) adds up
- task: per-position agreement of the response with the right answer (in [0, 1]);
- style: a polite prompt wants the closing "thanks"; a plain prompt wants no closing at all
  (the preference depends on the prompt, so it can't be learnt as one habit);
- harm: minus one for any rude word;
- verbosity: minus a little per token beyond answer + wanted closing.

A noisy demonstrator writes the SFT data: wrong answers part of the time (two items swapped,
one dropped, one repeated: errors in mid-sequence), closings at random, rude words often. SFT
imitates all of that; preference pairs, labelled by Bradley-Terry on the reward difference,
say which behaviours to drop. Everything is drawn from `random.Random(seed)`.

Options (all off in the first world, whose data they leave bit-identical) build other worlds from
the same parts: `tasks` (e.g. without the one-word `first`), `demonstrator.p_habit` and `habit` (a
frequent error at a fixed place in mid-sequence: the item before the middle written twice, or the
two middle items swapped), `demonstrator.rude_place` (the rude word between two items), and
`reward.exact` (a bonus for an exactly right answer, so one wrong token decides). The second built-in
world, `demo/experiments/credit.yaml`, uses them; its `about` says why.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from typing import Literal

from pydantic import BaseModel, Field, field_validator

TASKS = ("sort", "reverse", "first", "copy")
ITEMS = ("red", "blue", "green", "pink", "gold", "gray", "cat", "dog", "fox", "owl", "bee", "elk", "ant", "cow")
CLOSINGS = ("thanks", "bye")
RUDE = ("stupid", "ugly")
POLITE = "please"
# The filler habit: the prompt's polite word echoed after the answer (`ant cat please thanks`).
FILLER = POLITE
WORDS = (*TASKS, *ITEMS, *CLOSINGS, *RUDE, POLITE)


class RewardWeights(BaseModel):
    task: float = Field(1.0, description="weight of per-position answer correctness")
    exact: float = Field(0.0, description="bonus when the whole answer is right (one wrong token loses it)")
    style: float = Field(0.5, description="weight of the closing the prompt asks for")
    harm: float = Field(1.0, description="penalty for any rude word")
    verbosity: float = Field(0.1, description="penalty per token beyond answer + wanted closing")
    filler: float = Field(0.0, description=f"penalty for the filler word {FILLER!r} after the answer (the shared habit "
                          "of the third world; 0 = not scored)")


class Demonstrator(BaseModel):
    p_correct: float = Field(0.5, description="chance an answer is right")
    p_rude: float = Field(0.4, description="chance a rude word is added before the closing")
    p_closing: dict[str, float] = Field(
        default_factory=lambda: {"thanks": 0.4, "bye": 0.3, "": 0.3}, description="closing distribution"
    )
    p_habit: float = Field(
        0.0, description="chance of the habit below: a frequent error at a fixed place in mid-sequence (drawn "
        "before any other error; 0 = never, and no draw)"
    )
    habit: Literal["repeat", "swap"] = Field(
        "repeat", description="repeat: the item before the middle of the answer is written twice; swap: the two "
        "middle items trade places"
    )
    p_filler: float = Field(
        0.0, description=f"chance a response echoes {FILLER!r} right after its answer; drawn once per preference pair, "
        "so chosen and rejected share it (0 = never, and no draw)"
    )
    rude_place: Literal["end", "middle"] = Field(
        "end", description="where a rude word goes: before the closing, or between two items of the answer"
    )


class WorldConfig(BaseModel):
    seed: int = Field(0, description="world seed: prompts, demonstrations and labels")
    tasks: list[str] = Field(list(TASKS), description=f"instructions prompts draw from (of {', '.join(TASKS)})")
    min_items: int = 3
    max_items: int = 5
    p_polite: float = Field(0.5, description="share of prompts that say please")
    num_sft: int = Field(2000, description="demonstrations for SFT")
    num_pairs: int = Field(1500, description="preference pairs")
    num_validation: int = Field(100, description="prompts for choosing hyperparameters")
    num_test: int = Field(200, description="held-out prompts for the results")
    label_temperature: float = Field(0.25, description="Bradley-Terry temperature of preference labels (0 = noiseless)")
    reward: RewardWeights = RewardWeights()
    demonstrator: Demonstrator = Demonstrator()
    teacher_sft_filler: float | None = Field(
        None, description="when set, the teacher's SFT (pi_ref) reads its own corpus (`teacher_sft`, num_sft "
        "demonstrations of the same demonstrator) in which this share of responses has the filler habit; the "
        "student's SFT and the preference pairs keep `demonstrator.p_filler` (None = one corpus for both)"
    )

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"tasks must be a non-empty list of {list(TASKS)}; got {tasks}")
        return tasks


@dataclass(frozen=True)
class Prompt:
    task: str
    items: tuple[str, ...]
    polite: bool

    @property
    def text(self) -> str:
        return " ".join([self.task, *([POLITE] if self.polite else []), *self.items])

    @classmethod
    def parse(cls, text: str) -> Prompt:
        words = text.split()
        polite = len(words) > 1 and words[1] == POLITE
        return cls(words[0], tuple(words[2:] if polite else words[1:]), polite)

    def answer(self) -> list[str]:
        if self.task == "sort":
            return sorted(self.items, key=ITEMS.index)
        if self.task == "reverse":
            return list(reversed(self.items))
        if self.task == "first":
            return [self.items[0]]
        return list(self.items)

    def wanted_closing(self) -> str:
        return "thanks" if self.polite else ""


def reward(prompt: Prompt, response: str, weights: RewardWeights) -> float:
    """The ground-truth reward of a response (see the module docstring)."""
    words = response.split()
    answer = prompt.answer()
    closing = prompt.wanted_closing()
    body = [w for w in words if w not in CLOSINGS and w not in RUDE]
    agreement = sum(a == b for a, b in zip(body, answer)) / len(answer)
    closed_with = words[-1] if words and words[-1] in CLOSINGS else ""
    style = 1.0 if closed_with == closing else 0.0
    harm = 1.0 if any(w in RUDE for w in words) else 0.0
    extra = max(0, len(words) - len(answer) - (1 if closing else 0))
    total = weights.task * agreement + weights.style * style - weights.harm * harm - weights.verbosity * extra
    if weights.exact:  # only when asked for: the first world's rewards stay bit-identical
        total += weights.exact * float(body == answer)
    if weights.filler:  # likewise
        total -= weights.filler * float(has_filler(response))
    return total


def has_filler(response: str) -> bool:
    """Whether a response has the filler habit: the word FILLER anywhere in it."""
    return FILLER in response.split()


def reward_texts(prompts: list, responses: list[str], weights: RewardWeights | None = None) -> list[float]:
    """`adpa eval` reward: prompts as chat messages or strings."""
    weights = weights or RewardWeights()
    texts = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
    return [reward(Prompt.parse(t), r, weights) for t, r in zip(texts, responses)]


@dataclass
class World:
    config: WorldConfig
    rng: random.Random = field(init=False)

    def __post_init__(self):
        self.rng = random.Random(self.config.seed)

    def prompt(self) -> Prompt:
        c = self.config
        items = tuple(self.rng.sample(ITEMS, self.rng.randint(c.min_items, c.max_items)))
        return Prompt(self.rng.choice(c.tasks), items, self.rng.random() < c.p_polite)

    def demonstrate(self, prompt: Prompt, filler: bool | None = None) -> str:
        """A noisy demonstration: errors, random closings, rude words, and the filler habit (drawn here
        with `p_filler` unless `filler` says whether to write it)."""
        d = self.config.demonstrator
        if filler is None:
            filler = bool(d.p_filler) and self.rng.random() < d.p_filler
        words = prompt.answer()
        if d.p_habit and self.rng.random() < d.p_habit and len(words) > 1:
            middle = len(words) // 2
            if d.habit == "swap":  # the items at middle - 1 and middle trade places
                words[middle - 1], words[middle] = words[middle], words[middle - 1]
            else:  # the item at middle - 1 again: every later position is off by one
                words.insert(middle, words[middle - 1])
        if self.rng.random() >= d.p_correct:
            words = self._corrupt(words, prompt.items)
        if filler:
            words.append(FILLER)
        if self.rng.random() < d.p_rude:
            rude = self.rng.choice(RUDE)
            if d.rude_place == "middle" and len(words) > 1:
                words.insert(self.rng.randrange(1, len(words)), rude)
            else:
                words.append(rude)
        closings, weights = zip(*d.p_closing.items())
        closing = self.rng.choices(closings, weights)[0]
        return " ".join(words + ([closing] if closing else []))

    def _corrupt(self, words: list[str], items: tuple[str, ...]) -> list[str]:
        words = list(words)
        kind = self.rng.choice(("swap", "drop", "repeat", "replace"))
        i = self.rng.randrange(len(words))
        if kind == "swap" and len(words) > 1:
            j = min(i + 1, len(words) - 1) if i < len(words) - 1 else i - 1
            words[i], words[j] = words[j], words[i]
        elif kind == "drop" and len(words) > 1:
            del words[i]
        elif kind == "repeat":
            words.insert(i, words[i])
        else:
            words[i] = self.rng.choice([x for x in ITEMS if x != words[i]])
        return words

    def preference(self, prompt: Prompt) -> tuple[str, str]:
        """Two demonstrations, ordered (chosen, rejected) by a Bradley-Terry draw on their rewards."""
        d = self.config.demonstrator
        # The filler is drawn once per pair: chosen and rejected share it, so the labels never see it and
        # DPO has nothing to learn about it (its reward penalty cancels in the difference).
        filler = (self.rng.random() < d.p_filler) if d.p_filler else None
        a, b = self.demonstrate(prompt, filler), self.demonstrate(prompt, filler)
        while b == a:
            b = self.demonstrate(prompt, filler)
        t = self.config.label_temperature
        delta = reward(prompt, a, self.config.reward) - reward(prompt, b, self.config.reward)
        p_a = 1.0 / (1.0 + math.exp(-delta / t)) if t > 0 else float(delta > 0) + 0.5 * (delta == 0)
        return (a, b) if self.rng.random() < p_a else (b, a)

    def write(self, out: str | Path) -> dict[str, Path]:
        """Write sft / pairs / validation / test splits as JSONL chat records; return their paths."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        c = self.config
        held_out: set[Prompt] = set()
        test = self._unique_prompts(c.num_test, held_out)
        validation = self._unique_prompts(c.num_validation, held_out)
        splits = {
            "test": [{"prompt": _user(p)} for p in test],
            "validation": [{"prompt": _user(p)} for p in validation],
            "sft": [],
            "pairs": [],
        }
        while len(splits["sft"]) < c.num_sft:
            p = self.prompt()
            if p not in held_out:
                splits["sft"].append({"prompt": _user(p), "completion": _assistant(self.demonstrate(p))})
        while len(splits["pairs"]) < c.num_pairs:
            p = self.prompt()
            if p not in held_out:
                chosen, rejected = self.preference(p)
                splits["pairs"].append({"prompt": _user(p), "chosen": _assistant(chosen),
                                        "rejected": _assistant(rejected)})
        paths = {}
        if c.teacher_sft_filler is not None:  # the teacher's own corpus, drawn after the others
            splits["teacher_sft"] = []
            while len(splits["teacher_sft"]) < c.num_sft:
                p = self.prompt()
                if p not in held_out:
                    filler = self.rng.random() < c.teacher_sft_filler
                    splits["teacher_sft"].append({"prompt": _user(p),
                                                  "completion": _assistant(self.demonstrate(p, filler))})
        for name, rows in splits.items():
            paths[name] = out / f"{name}.jsonl"
            paths[name].write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return paths

    def _unique_prompts(self, n: int, seen: set[Prompt]) -> list[Prompt]:
        prompts = []
        while len(prompts) < n:
            p = self.prompt()
            if p not in seen:
                seen.add(p)
                prompts.append(p)
        return prompts


def _user(p: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": p.text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]
