"""Scoring the demo's models with the ground-truth reward: a setting's validation score (what the
grid search maximises) and the test-split table (mean rewards, win rates, example answers)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from adpa.demo.provenance import environment
from adpa.training.evaluate import EvalResult, win_rate

if TYPE_CHECKING:
    from adpa.demo.pipeline import DemoRun

# The rows every table has besides the student methods: label -> the DemoRun attribute of its model.
FIXED_ROWS = {"Teacher (DPO)": "teacher", "Teacher SFT (reference)": "reference",
              "Student (untrained)": "student_base", "SFT": "student_sft"}
WIN_RATE_BASELINES = ("ADPA", "SFT")


def validation_score(run: DemoRun, model: Path) -> float:
    """The mean reward on the validation split, in the modes the search selects on."""
    modes = ("greedy",) if run.config.search.select_on == "greedy" else ("greedy", "sampled")
    result = run.evaluate(model, "validation", modes=modes)
    return statistics.fmean(result.modes[m].mean_reward for m in modes)


def score_all(run: DemoRun, trained: dict[str, dict], seeds: int) -> dict:
    """Every model on the test split (kept in `run.evals` and `run.rows`); the results' table."""
    rows = {**{label: {"models": [getattr(run, model)]} for label, model in FIXED_ROWS.items()}, **trained}
    evals: dict[str, list[EvalResult]] = {}
    for name, row in tqdm(rows.items(), desc="evaluating on test", unit="method"):
        evals[name] = [run.evaluate(m, "test", seed=i) for i, m in enumerate(row["models"])]
    run.evals, run.rows = evals, rows
    table = {name: _entry(row, evals, name, run.data["test"]["prompt"]) for name, row in rows.items()}
    return {"config": run.config.model_dump(), "seeds": seeds, "methods": table, "curves": run.curves,
            "environment": environment()}


def _entry(row: dict, evals: dict[str, list[EvalResult]], name: str, prompts: list) -> dict:
    """One row of the table: its settings, models, rewards and win rates per mode, three examples."""
    entry = {k: v for k, v in row.items() if k != "models"}
    entry["models"] = [str(m) for m in row["models"]]
    for mode in ("greedy", "sampled"):
        means = [e.modes[mode].mean_reward for e in evals[name]]
        entry[f"reward_{mode}"] = _mean_std(means)
        for baseline in WIN_RATE_BASELINES:
            if baseline in evals:
                rates = [win_rate(e.modes[mode].rewards, evals[baseline][i % len(evals[baseline])].modes[mode].rewards)
                         for i, e in enumerate(evals[name])]
                entry[f"win_rate_vs_{baseline}_{mode}"] = _mean_std(rates)
    entry["examples"] = [
        {"prompt": p[-1]["content"], "greedy": r}
        for p, r in list(zip(prompts, evals[name][0].modes["greedy"].responses))[:3]
    ]
    return entry


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}
