"""Paired differences between methods, with bootstrap intervals over world replicates, seeds and prompts.

A comparison of method A with method B on one world kind uses per-prompt rewards shaped
(worlds, seeds, prompts): world replicate w (its own data, teachers and SFT student), student
seed s, test prompt p of world w. A and B are paired: same world, same seed (and sampling seed),
same prompts. The difference is `d[w, s, p] = r_A[w, s, p] - r_B[w, s, p]`, its estimate the mean
of d.

The 95% interval is a percentile bootstrap that resamples every source of noise: the worlds
with replacement, then within each drawn world its seeds and its prompts with replacement (seeds
and prompts are crossed within a world, so they are drawn independently: a conservative choice).
A difference counts as a result only when its interval excludes 0. With few worlds (3) the
bootstrap over worlds sees few distinct draws and tends to be narrow: the share of worlds whose own
mean difference has the interval's sign is reported beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

LEVEL = 0.95
BOOTSTRAP_DRAWS = 4000


@dataclass(frozen=True)
class Interval:
    mean: float  # the estimate: mean over worlds, seeds and prompts
    low: float
    high: float
    worlds_positive: int  # worlds whose mean difference is > 0
    worlds_negative: int  # ... < 0
    worlds: int
    draws: int

    def excludes(self, value: float = 0.0) -> bool:
        return self.low > value or self.high < value

    def as_dict(self) -> dict:
        return asdict(self)


def bootstrap(values: np.ndarray, *, draws: int = BOOTSTRAP_DRAWS, level: float = LEVEL, seed: int = 0,
              center: float = 0.0) -> Interval:
    """Mean of `values` (worlds, seeds, prompts) and its percentile bootstrap interval (see the module
    docstring). `center` is what per-world signs are counted against (0 for differences, 0.5 for win
    rates). Deterministic for a given `seed`."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 3 or 0 in values.shape:
        raise ValueError(f"values must be shaped (worlds, seeds, prompts), non-empty; got {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("values must be finite")
    worlds, seeds, prompts = values.shape
    rng = np.random.default_rng(seed)
    means = np.empty(draws)
    chunk = max(1, 2_000_000 // (worlds * seeds * prompts))  # bound the memory of one vectorised step
    for start in range(0, draws, chunk):
        n = min(chunk, draws - start)
        w = rng.integers(0, worlds, (n, worlds))
        s = rng.integers(0, seeds, (n, worlds, seeds))
        p = rng.integers(0, prompts, (n, worlds, prompts))
        picked = values[w[:, :, None, None], s[:, :, :, None], p[:, :, None, :]]  # (n, worlds, seeds, prompts)
        means[start:start + n] = picked.mean(axis=(1, 2, 3))
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    per_world = values.mean(axis=(1, 2))
    return Interval(float(values.mean()), float(low), float(high), int((per_world > center).sum()),
                    int((per_world < center).sum()), worlds, draws)


def paired_difference(a: np.ndarray, b: np.ndarray, **kw) -> Interval:
    """Reward of A minus reward of B (both (worlds, seeds, prompts), paired), with its interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired rewards must have one shape; got {a.shape} and {b.shape}")
    return bootstrap(a - b, **kw)


def win_rate(a: np.ndarray, b: np.ndarray, **kw) -> Interval:
    """Share of (world, seed, prompt) where A's reward beats B's, ties 1/2, with its interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired rewards must have one shape; got {a.shape} and {b.shape}")
    return bootstrap(np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0)), center=0.5, **kw)


def verdict(interval: Interval, center: float = 0.0) -> str:
    """'holds' when the interval lies above `center` (the claim is A > B), 'reversed' below, else 'undecided'."""
    if interval.low > center:
        return "holds"
    if interval.high < center:
        return "reversed"
    return "undecided"


def run_means(values: np.ndarray) -> dict[str, float]:
    """Mean and sd over all runs (world, seed) of each run's mean reward over prompts."""
    per_run = np.asarray(values, dtype=np.float64).mean(axis=2).ravel()
    return {"mean": float(per_run.mean()), "std": float(per_run.std(ddof=1)) if per_run.size > 1 else 0.0,
            "n": int(per_run.size)}
