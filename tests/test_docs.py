"""Docs that cannot drift: architecture.md's module table, and wire-protocol.md's SAMPLED draw."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from adpa.protocol import SupportSpec

ROOT = Path(__file__).resolve().parents[1]


def test_the_architecture_table_names_exactly_the_modules_of_services():
    text = (ROOT / "docs/architecture.md").read_text()
    table = text.split("## Where is what", 1)[1].split("\n## ", 1)[0]
    named = set()
    for row in table.splitlines():
        cells = row.split("|")
        if len(cells) < 3:
            continue
        folder = re.fullmatch(r"\s*`(services/(?:\w+/)?)(\w+\.py)?`\s*", cells[1])
        if folder is None:
            continue
        if folder.group(2):  # a module row: `services/engine.py`
            named.add(folder.group(1) + folder.group(2))
        # a module row or a folder row names its modules in the second cell: `servicer.py` (...)
        named |= {folder.group(1) + name for name in re.findall(r"`(\w+\.py)`", cells[2])}
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "services").rglob("*.py") if p.name != "__init__.py"}
    assert named == modules, f"missing: {sorted(modules - named)}; not a module: {sorted(named - modules)}"


def mt19937(seed: int):
    """The 32-bit Mersenne Twister (init_genrand), as wire-protocol.md names it."""
    state = [seed & 0xFFFFFFFF]
    for i in range(1, 624):
        state.append((1812433253 * (state[-1] ^ (state[-1] >> 30)) + i) & 0xFFFFFFFF)
    index = 624
    while True:
        if index == 624:
            for i in range(624):
                y = (state[i] & 0x80000000) | (state[(i + 1) % 624] & 0x7FFFFFFF)
                state[i] = state[(i + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            index = 0
        y = state[index]
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        y ^= y >> 18
        index += 1
        yield y


def documented_draws(logp: np.ndarray, n: int, seed: int) -> np.ndarray:
    """SAMPLED ids at T = 1, following wire-protocol.md step by step (no torch)."""
    words = mt19937(seed % 2**32)
    uniforms = np.empty((logp.shape[0], n))
    for i in range(logp.shape[0]):
        for j in range(n):
            a, b = next(words), next(words)
            uniforms[i, j] = ((a << 32 | b) % 2**53) * 2.0**-53
    cdf = np.cumsum(np.exp(logp.astype(np.float64)), axis=-1)
    cdf /= cdf[:, -1:]
    ids = np.stack([np.searchsorted(cdf[i], uniforms[i], side="right") for i in range(len(cdf))])
    return np.minimum(ids, logp.shape[-1] - 1)


@pytest.mark.parametrize("seed", [7, 2**40 + 12345])
def test_the_documented_sampled_draw_is_the_engines(teacher_path, seed):
    from adpa.services.engine import ScoringEngine

    engine = ScoringEngine.from_pretrained(str(teacher_path), device="cpu", dtype="float32")
    sequences = [torch.tensor([5, 37, 7, 8, 17, 2, 6]), torch.tensor([1, 40, 41, 42, 43])]
    ranges = [(0, 7), (1, 5)]
    sampled = engine.score(sequences, ranges, SupportSpec("sampled", n=16, seed=seed))
    dense = engine.score(sequences, ranges, SupportSpec("dense"))
    want = documented_draws(dense.logprobs.numpy(), 16, seed)
    assert np.array_equal(sampled.indices.numpy(), want)
