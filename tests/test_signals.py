"""Signals from the real servers match an independent dense computation with plain transformers.

The reference computation below runs each sequence alone through `AutoModelForCausalLM`, takes the
full fp32 log-softmax, and builds every expected value from it directly.
"""

from __future__ import annotations

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adpa.client import IncompatibleTeacher, TeacherClient
from adpa.protocol import SupportSpec

BETA = 0.5
ATOL = 2e-5

# Varied lengths and ranges; the first range covers the whole sequence.
SEQUENCES = [
    [5, 37, 7, 8, 17, 2, 6, 9, 10, 11, 12],
    [5, 7, 7, 2, 6, 11],
    [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 2, 6, 20, 21],
    [3],
]
RANGES = [(0, 11), (4, 6), (13, 17), (0, 1)]


@pytest.fixture(scope="module")
def dense(teacher_path, reference_path):
    """Per scored position, in request order: (log pi_dpo, log pi_ref), each (P, V) fp32."""
    out = []
    for path in (teacher_path, reference_path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        rows = []
        with torch.no_grad():
            for seq, (start, end) in zip(SEQUENCES, RANGES):
                logits = model(torch.tensor([seq])).logits[0].float()
                rows.append(logits.log_softmax(-1)[start:end])
        out.append(torch.cat(rows))
    return out


@pytest.fixture(scope="module")
def teacher(teacher_server):
    with TeacherClient(teacher_server.endpoint) as client:
        yield client


@pytest.fixture(scope="module")
def reference(reference_server):
    with TeacherClient(reference_server.endpoint) as client:
        yield client


def log_tail(logp: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside each row's valid indices, summed directly."""
    mask = torch.ones_like(logp, dtype=torch.bool)
    for i, row in enumerate(indices):
        mask[i, row[row >= 0]] = False
    return torch.log((logp.exp() * mask).sum(-1))


def at(logp: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.where(r >= 0, logp[i, r.clamp(min=0)], 0.0) for i, r in enumerate(indices)])


def expected_signal(signal, dense, indices):
    lt, lr = dense
    if signal == "logprobs":
        return at(lt, indices), log_tail(lt, indices)
    return BETA * (at(lt, indices) - at(lr, indices)), BETA * (log_tail(lt, indices) - log_tail(lr, indices))


def test_handshake_reports_both_fingerprints(teacher, reference):
    info = teacher.info()
    ref_info = reference.info()
    assert info.role == "teacher" and ref_info.role == "reference"
    assert info.beta == pytest.approx(BETA)
    assert info.reference == ref_info.model
    assert info.model.tokenizer_hash == ref_info.model.tokenizer_hash
    assert info.model.model_hash != ref_info.model.model_hash
    assert info.model.vocab_size == 77 and info.model.dtype == "float32"


@pytest.mark.parametrize("signal", ["logprobs", "advantage"])
def test_topk_matches_dense(teacher, dense, signal):
    answer = teacher.score(SEQUENCES, RANGES, signal=signal, support=SupportSpec("topk", k=5))
    lt = dense[0]
    assert answer.indices.shape == (lt.shape[0], 5)
    assert torch.equal(answer.indices, lt.topk(5, dim=-1).indices)
    values, tail = expected_signal(signal, dense, answer.indices)
    torch.testing.assert_close(answer.values, values, atol=ATOL, rtol=0)
    torch.testing.assert_close(answer.tail, tail, atol=ATOL, rtol=1e-5)
    assert answer.model == teacher.info().model
    assert (answer.reference == teacher.info().reference) == (signal == "advantage")


def test_topk_tail_mass_completes_the_distribution(teacher, dense):
    answer = teacher.score(SEQUENCES, RANGES, support=SupportSpec("topk", k=7))
    total = answer.values.exp().sum(-1) + answer.tail.exp()
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)


@pytest.mark.parametrize("signal", ["logprobs", "advantage"])
@pytest.mark.parametrize("k", [0, 4])
def test_indices_contain_every_request_and_are_exact(teacher, dense, signal, k):
    positions = dense[0].shape[0]
    gen = torch.Generator().manual_seed(0)
    requested = torch.randint(0, 77, (positions, 6), generator=gen)
    requested[::3, 4:] = -1  # padded rows
    requested[1, 1] = requested[1, 0]  # a duplicate
    answer = teacher.score(SEQUENCES, RANGES, signal=signal, support=SupportSpec("indices", k=k, indices=requested))
    top = dense[0].topk(k, dim=-1).indices if k else requested[:, :0]
    for row, want, extra in zip(answer.indices, requested, top):
        got = set(row[row >= 0].tolist())
        assert set(want[want >= 0].tolist()) <= got
        assert set(extra.tolist()) <= got
        assert len(got) == int((row >= 0).sum())  # no duplicates
    values, tail = expected_signal(signal, dense, answer.indices)
    torch.testing.assert_close(answer.values, values, atol=ATOL, rtol=0)
    torch.testing.assert_close(answer.tail, tail, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("signal", ["logprobs", "advantage"])
def test_dense_matches(teacher, dense, signal):
    answer = teacher.score(SEQUENCES, RANGES, signal=signal, support=SupportSpec("dense"))
    lt, lr = dense
    expected = lt if signal == "logprobs" else BETA * (lt - lr)
    assert answer.indices is None and answer.tail is None
    torch.testing.assert_close(answer.values, expected, atol=ATOL, rtol=0)


def test_advantage_include_logprobs(teacher, dense):
    answer = teacher.score(
        SEQUENCES, RANGES, signal="advantage", support=SupportSpec("topk", k=3), include_logprobs=True
    )
    lt, lr = dense
    torch.testing.assert_close(answer.extras["logprobs"], at(lt, answer.indices), atol=ATOL, rtol=0)
    torch.testing.assert_close(answer.extras["reference_logprobs"], at(lr, answer.indices), atol=ATOL, rtol=0)
    torch.testing.assert_close(answer.extras["reference_tail_logprobs"], log_tail(lr, answer.indices), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("dtype, atol", [("BF16", 3e-2), ("FP16", 5e-3)])
def test_half_precision_values(teacher, dense, dtype, atol):
    answer = teacher.score(SEQUENCES, RANGES, signal="advantage", support=SupportSpec("topk", k=4), value_dtype=dtype)
    values, _ = expected_signal("advantage", dense, answer.indices)
    torch.testing.assert_close(answer.values, values, atol=atol, rtol=1e-2)


@pytest.mark.parametrize("signal", ["logprobs", "advantage"])
def test_sampled_is_reproducible_and_exact(teacher, dense, signal):
    spec = SupportSpec("sampled", n=16, seed=7)
    first = teacher.score(SEQUENCES, RANGES, signal=signal, support=spec)
    again = teacher.score(SEQUENCES, RANGES, signal=signal, support=spec)
    other = teacher.score(SEQUENCES, RANGES, signal=signal, support=SupportSpec("sampled", n=16, seed=8))
    assert torch.equal(first.indices, again.indices) and torch.equal(first.values, again.values)
    assert not torch.equal(first.indices, other.indices)
    values, _ = expected_signal(signal, dense, first.indices)
    torch.testing.assert_close(first.values, values, atol=ATOL, rtol=0)
    torch.testing.assert_close(first.weights.sum(-1), torch.ones(len(first.weights)), atol=1e-5, rtol=0)
    assert first.tail is None


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_importance_estimate_converges(teacher, dense, temperature):
    """sum_j w_j f(a_j) estimates sum_a pi(a) f(a): check it within 5 standard errors."""
    lt = dense[0]
    f = torch.randn(77, generator=torch.Generator().manual_seed(1))
    answer = teacher.score(
        SEQUENCES, RANGES, support=SupportSpec("sampled", n=4096, seed=3, temperature=temperature)
    )
    estimate = (answer.weights * f[answer.indices]).sum(-1)
    truth = (lt.exp() * f).sum(-1)
    n = answer.weights.shape[1]
    per_draw = answer.weights * n * f[answer.indices]  # i.i.d. terms whose mean is the estimate
    stderr = per_draw.std(-1) / n**0.5
    assert bool(((estimate - truth).abs() <= 5 * stderr + 1e-4).all())
    assert (estimate - truth).abs().mean() < 0.05


def test_remote_and_local_reference_agree(teacher, local_teacher_server):
    with TeacherClient(local_teacher_server.endpoint) as local:
        for spec in (SupportSpec("topk", k=6), SupportSpec("sampled", n=8, seed=1), SupportSpec("dense")):
            a = teacher.score(SEQUENCES, RANGES, signal="advantage", support=spec)
            b = local.score(SEQUENCES, RANGES, signal="advantage", support=spec)
            assert a.reference == b.reference
            torch.testing.assert_close(a.values, b.values, atol=1e-6, rtol=0)
    # A reference in the teacher's own process is always ready: readiness does not wait on it.
    assert httpx.get(f"http://127.0.0.1:{local_teacher_server.http_port}/readyz", timeout=10).status_code == 200


def test_reference_service_logprobs(reference, dense):
    answer = reference.score(SEQUENCES, RANGES, support=SupportSpec("topk", k=5))
    lr = dense[1]
    assert torch.equal(answer.indices, lr.topk(5, dim=-1).indices)
    torch.testing.assert_close(answer.values, at(lr, answer.indices), atol=ATOL, rtol=0)


def test_client_splits_large_batches(teacher, dense):
    """Over the server's 512-position limit: the client splits, and the joined answer is the same.

    The repeated sequences share prefixes, which the server forwards once (a continued key/value
    cache): values agree to fp32 round-off, not bit for bit."""
    many = SEQUENCES * 40  # 40 * 18 = 720 positions
    ranges = RANGES * 40
    answer = teacher.score(many, ranges, signal="advantage", support=SupportSpec("topk", k=5))
    single = teacher.score(SEQUENCES, RANGES, signal="advantage", support=SupportSpec("topk", k=5))
    assert answer.values.shape[0] == 40 * single.values.shape[0]
    torch.testing.assert_close(answer.values, single.values.repeat(40, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(answer.tail, single.tail.repeat(40), atol=1e-5, rtol=0)
    assert torch.equal(answer.indices, single.indices.repeat(40, 1))


def test_tokenizer_mismatch_is_refused_at_handshake(teacher, teacher_path, other_tokenizer_path):
    teacher.check_compatible(AutoTokenizer.from_pretrained(teacher_path))
    theirs = teacher.info().model.tokenizer_hash
    with pytest.raises(IncompatibleTeacher) as err:
        teacher.check_compatible(AutoTokenizer.from_pretrained(other_tokenizer_path))
    message = str(err.value)
    assert theirs in message and "vocab size 78" in message
    # The tokenizer decides: a student with padding rows (wider logits) trains on the shared ids,
    # one with fewer logits than the tokenizer's ids cannot take them.
    teacher.check_compatible(AutoTokenizer.from_pretrained(teacher_path), vocab_size=100)
    with pytest.raises(IncompatibleTeacher, match="vocab size 70"):
        teacher.check_compatible(AutoTokenizer.from_pretrained(teacher_path), vocab_size=70)
