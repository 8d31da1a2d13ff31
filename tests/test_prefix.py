"""Shared prefixes: which sequences are grouped, and answers equal to scoring every token."""

from __future__ import annotations

import pytest
import torch

from adpa.protocol import SupportSpec
from adpa.services.engine import ScoringEngine
from adpa.services.prefix import shared_prefix_groups


def t(*ids):
    return torch.tensor(ids)


def test_groups_need_a_long_enough_common_prefix():
    prompt = list(range(10, 30))  # 20 tokens
    seqs = [t(*prompt, 1, 2), t(*prompt, 3), t(*range(40, 60), 5), t(*prompt[:5], 9, 9)]
    assert shared_prefix_groups(seqs, min_prefix=16) == [((0, 1), 20)]
    assert shared_prefix_groups(seqs, min_prefix=21) == []
    assert shared_prefix_groups(seqs, min_prefix=0) == []  # 0 = sharing off


def test_each_member_keeps_a_token_of_its_own():
    assert shared_prefix_groups([t(*range(20)), t(*range(20), 7)], min_prefix=4) == [((0, 1), 19)]
    assert shared_prefix_groups([t(*range(20)), t(*range(20))], min_prefix=4) == [((0, 1), 19)]


def test_a_run_stops_growing_when_it_would_save_less():
    a = list(range(100, 140))  # two pairs with 40-token prompts that share their first 16 tokens
    b = a[:16] + list(range(200, 224))
    seqs = [t(*a, 1), t(*a, 2), t(*b, 3), t(*b, 4)]
    groups = shared_prefix_groups(seqs, min_prefix=8)
    # one group of four saves 3 * 16 = 48 tokens; two pairs save 39 + 39 = 78.
    assert sorted(groups) == [((0, 1), 40), ((2, 3), 40)]


def test_many_responses_to_one_long_prompt_form_one_group():
    prompt = list(range(7, 47))
    seqs = [t(*prompt, *range(50, 50 + n)) for n in (1, 5, 3, 8)]
    assert shared_prefix_groups(seqs, min_prefix=16) == [((0, 1, 2, 3), 40)]


@pytest.fixture(scope="module")
def engines(teacher_path):
    plain = ScoringEngine.from_pretrained(str(teacher_path), device="cpu", dtype="float32", min_shared_prefix=0)
    shared = ScoringEngine.from_pretrained(str(teacher_path), device="cpu", dtype="float32", min_shared_prefix=8)
    assert shared.min_shared_prefix == 8  # the start-up self-check kept sharing on for this model
    return plain, shared


def dckd_like(seed=0, prompt_len=40, response_len=12):
    """y_w and y_l of three prompts: [w1, w2, w3, l1, l2, l3], each scored on its response."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(7, 77, (prompt_len + i,), generator=g) for i in range(3)]
    responses = [torch.randint(7, 77, (response_len + j,), generator=g) for j in range(6)]
    seqs = [torch.cat([prompts[i % 3], responses[i]]) for i in range(6)]
    ranges = [(len(prompts[i % 3]) - 1, len(seqs[i]) - 1) for i in range(6)]
    return seqs, ranges


@pytest.mark.parametrize("kind", ["topk", "sampled", "dense", "indices"])
def test_shared_prefixes_answer_like_scoring_every_token(engines, kind):
    plain, shared = engines
    seqs, ranges = dckd_like()
    positions = sum(e - s for s, e in ranges)
    spec = {
        "topk": SupportSpec("topk", k=5), "sampled": SupportSpec("sampled", n=8, seed=1), "dense": SupportSpec("dense"),
        "indices": SupportSpec("indices", k=3, indices=torch.randint(
            -1, 77, (positions, 4), generator=torch.Generator().manual_seed(2))),
    }[kind]
    assert [p for _, p in shared_prefix_groups(seqs, 8)] == [40, 41, 42]  # y_w and y_l of each prompt
    forwarded = []
    shared.scheduler.observer = lambda jobs, sequences, tokens: forwarded.append(sequences)
    got, want = shared.score(seqs, ranges, spec), plain.score(seqs, ranges, spec)
    shared.scheduler.observer = None
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-5, rtol=0)  # fp32 round-off only
    if spec.kind in ("topk", "indices"):
        assert torch.equal(got.indices, want.indices)
        torch.testing.assert_close(got.log_tail, want.log_tail, atol=1e-5, rtol=0)
    assert sum(forwarded) == 6


def test_prefix_rows_inside_the_scored_range(engines):
    """A range that starts inside the shared prefix reads those rows from the prefix forward."""
    plain, shared = engines
    seqs, _ = dckd_like()
    ranges = [(3, len(s) - 1) for s in seqs]
    torch.testing.assert_close(shared.score(seqs, ranges, SupportSpec("dense")).logprobs,
                               plain.score(seqs, ranges, SupportSpec("dense")).logprobs, atol=1e-5, rtol=0)
