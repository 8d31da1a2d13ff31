"""Engine and support functions against dense computations, and the memory budget of chunking."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from adpa import sparse
from adpa.services.engine import ScoringEngine
from adpa.protocol import SupportSpec

SEQUENCES = [torch.tensor(s) for s in ([5, 37, 7, 8, 17, 2, 6, 9, 10], [5, 7, 7, 2, 6, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])]
RANGES = [(0, 9), (3, 6), (5, 12)]


@pytest.fixture(scope="module")
def engine(teacher_path):
    return ScoringEngine.from_pretrained(str(teacher_path), device="cpu", dtype="float32")


def test_log_tail_mass_with_pads_and_duplicates():
    logp = torch.randn(3, 10).log_softmax(-1)
    idx = torch.tensor([[0, 0, -1], [9, -1, -1], [1, 2, 3]])
    expected = torch.stack([
        torch.log(logp[0].exp().sum() - logp[0, 0].exp()),
        torch.log(logp[1].exp().sum() - logp[1, 9].exp()),
        torch.log(logp[2].exp().sum() - logp[2, 1:4].exp().sum()),
    ])
    torch.testing.assert_close(sparse.log_tail_mass(logp, idx), expected)
    assert torch.isneginf(sparse.log_tail_mass(logp, torch.arange(10).expand(3, 10))).all()


def test_sorted_union_and_lookup():
    a = torch.tensor([[3, 1, -1], [2, 2, 2]])
    b = torch.tensor([[1, 5], [0, 9]])
    union = sparse.sorted_union(a, b, vocab_size=10)
    assert union.tolist() == [[1, 3, 5], [0, 2, 9]]
    values = union.float() * 10
    assert sparse.lookup(union, values, torch.tensor([[5, -1, 1], [9, 2, 2]])).tolist() == [[50, 0, 10], [90, 20, 20]]
    with pytest.raises(ValueError, match="missing"):
        sparse.lookup(union, values, torch.tensor([[4], [0]]))


def test_advantage_of_empty_tails_is_zero():
    inf = float("-inf")
    out = sparse.advantage(torch.tensor([inf, -1.0, inf]), torch.tensor([inf, -2.0, -1.0]), beta=2.0)
    assert out[0] == 0 and out[1] == pytest.approx(2.0) and torch.isneginf(out[2])


def test_engine_matches_plain_transformers(engine, teacher_path):
    model = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
    with torch.no_grad():
        expected = torch.cat([model(s[None]).logits[0].log_softmax(-1)[a:b] for s, (a, b) in zip(SEQUENCES, RANGES)])
    dense = engine.score(SEQUENCES, RANGES, SupportSpec("dense"))
    torch.testing.assert_close(dense.logprobs, expected, atol=2e-5, rtol=0)


def test_chunking_and_micro_batching_do_not_change_answers(teacher_path):
    big = ScoringEngine.from_pretrained(str(teacher_path), device="cpu", dtype="float32")
    small = ScoringEngine.from_pretrained(
        str(teacher_path), device="cpu", dtype="float32", max_batch_tokens=8, logits_budget_bytes=1
    )
    assert small.rows_per_chunk == 1
    for spec in (SupportSpec("topk", k=4), SupportSpec("sampled", n=8, seed=5), SupportSpec("dense"),
                 SupportSpec("indices", k=2, indices=torch.randint(-1, 77, (19, 3)))):
        a = big.score(SEQUENCES, RANGES, spec)
        b = small.score(SEQUENCES, RANGES, spec)
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
        if a.indices is not None:
            assert torch.equal(a.indices, b.indices)


def test_no_fp32_block_above_budget(teacher_path, monkeypatch):
    """With a 3-row budget, the head + log-softmax never see more than 3 rows at once."""
    engine = ScoringEngine.from_pretrained(
        str(teacher_path), device="cpu", dtype="float32", logits_budget_bytes=3 * 4 * 77
    )
    seen = []
    original = engine._log_softmax
    monkeypatch.setattr(engine, "_log_softmax", lambda f: seen.append(f.shape[0]) or original(f))
    engine.score(SEQUENCES, RANGES, SupportSpec("topk", k=2))
    assert max(seen) == 3 and sum(seen) == 19


def test_bfloat16_engine_stays_close(teacher_path, engine):
    bf16 = ScoringEngine.from_pretrained(str(teacher_path), device="cpu", dtype="bfloat16")
    assert bf16.fingerprint.dtype == "bfloat16"
    a = engine.score(SEQUENCES, RANGES, SupportSpec("dense")).logprobs
    b = bf16.score(SEQUENCES, RANGES, SupportSpec("dense")).logprobs
    assert b.dtype == torch.float32  # log-softmax in fp32 whatever the weights
    assert (a - b).abs().max() < 0.25


def test_sampling_reaches_the_whole_vocabulary():
    """T = 0.5 on a 128k Zipf row: with a float32 CDF the running sum stops growing and a fifth of
    the mass can never be drawn (its weights' expectation then falls short of 1 by about 6e-4).
    Aim a uniform at the middle of deep-tail tokens' slices: each must be the token drawn, with
    weight pi(a) / q(a)."""
    V = 128256
    p = torch.arange(1, V + 1, dtype=torch.float64) ** -1.1
    logp = (p / p.sum()).log().float()[None]  # (1, V)
    log_q = (logp / 0.5).log_softmax(-1)
    cdf = log_q.double().exp().cumsum(-1)
    cdf = cdf / cdf[:, -1:]
    tokens = torch.tensor([10, 1000, 50_000, 100_000, V - 2])
    uniforms = ((cdf[0, tokens - 1] + cdf[0, tokens]) / 2)[None]  # (1, 5) float64
    indices, values, weights = sparse.sample(logp, uniforms, temperature=0.5)
    assert indices[0].tolist() == tokens.tolist()
    torch.testing.assert_close(weights[0], (logp[0, tokens] - log_q[0, tokens]).exp() / 5)
