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

import functools
import math
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


# -- decisions at the world level -------------------------------------------------------------------
#
# The unit of replication is the world: its data, teachers and SFT student are redrawn, so two runs in
# one world share all of that noise. A primary claim is decided on the n per-world mean differences
# d_1..d_n (one number per test world), never on prompts or seeds pooled across worlds.


@dataclass(frozen=True)
class WorldTest:
    """A paired comparison decided over worlds: the t-interval, the t-test and the sign-flip test."""

    mean: float  # mean over worlds of the per-world mean differences
    low: float  # 95% t-interval over worlds
    high: float
    p_t: float  # two-sided one-sample t-test of mean 0 on the per-world differences
    p_sign_flip: float  # two-sided exact sign-flip permutation test (all 2^n sign patterns)
    worlds_positive: int
    worlds_negative: int
    worlds: int
    per_world: tuple[float, ...]

    def as_dict(self) -> dict:
        return {**asdict(self), "per_world": list(self.per_world)}


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
            if aa == 0.0:
                break
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    if not math.isfinite(t):
        return 0.0
    return regularized_beta(df / 2.0, 0.5, df / (df + t * t))


@functools.lru_cache(maxsize=None)
def t_quantile(q: float, df: int) -> float:
    """The q-quantile (q > 0.5) of Student's t, by bisection on the two-sided tail: P(|T| >= t) = 2(1 - q)."""
    low, high = 0.0, 1e3
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_two_sided_p(mid, df) > 2 * (1 - q) else (low, mid)
    return (low + high) / 2


def sign_flip_p(per_world: np.ndarray) -> float:
    """Exact two-sided sign-flip permutation p-value of mean 0: under the null each world's difference is
    as likely to have either sign, so p = #{s in {-1,1}^n : |mean(s * d)| >= |mean(d)|} / 2^n.
    Its smallest value is 2 / 2^n (all n worlds agree): 0.0078 with 8 worlds."""
    d = np.asarray(per_world, dtype=np.float64)
    n = d.size
    if n > 20:
        raise ValueError(f"exact enumeration of 2^{n} sign patterns is too large")
    signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)  # (2^n, n) of +-1
    means = np.abs(signs @ d) / n
    # A small tolerance so that the observed pattern always counts itself despite round-off.
    return float((means >= abs(d.mean()) - 1e-12).mean())


def world_test(per_world: np.ndarray, level: float = LEVEL) -> WorldTest:
    """The paired comparison of two methods over n test worlds, from their per-world mean differences d_w.

    mean = d_bar = (1/n) sum_w d_w;  s = sd of d_w (ddof 1);  se = s / sqrt(n);  t = d_bar / se
    interval: d_bar -+ t_{(1+level)/2, n-1} * se;  p_t = P(|T_{n-1}| >= |t|);  p_sign_flip: see sign_flip_p.
    """
    d = np.asarray(per_world, dtype=np.float64).ravel()
    n = d.size
    if n < 2 or not np.isfinite(d).all():
        raise ValueError(f"need at least 2 finite per-world differences; got {d.tolist()}")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    if se == 0.0:
        t, half = (math.inf if mean else 0.0), 0.0
    else:
        t, half = mean / se, t_quantile((1 + level) / 2, n - 1) * se
    p_t = 1.0 if (se == 0.0 and mean == 0.0) else t_two_sided_p(t, n - 1)
    return WorldTest(mean, mean - half, mean + half, p_t, sign_flip_p(d), int((d > 0).sum()), int((d < 0).sum()), n,
                     tuple(float(x) for x in d))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment, in the input order: with p_(1) <= ... <= p_(m) sorted,
    p_adj_(i) = min(1, max_{j <= i} (m - j + 1) * p_(j)). Rejecting where p_adj < alpha keeps the chance
    of any false rejection among the m tests at most alpha, whatever their dependence."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * p_values[i])
        adjusted[i] = min(1.0, running)
    return adjusted


def decide(mean: float, p_adjusted: float, alpha: float = 1 - LEVEL) -> str:
    """A primary claim's verdict ("better > worse"): 'holds' when the Holm-adjusted p is below alpha and the
    mean difference is positive, 'reversed' when below alpha and negative, else 'undecided'."""
    if p_adjusted < alpha:
        return "holds" if mean > 0 else "reversed"
    return "undecided"
