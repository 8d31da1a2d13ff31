"""training/losses.py against independent computations written here with plain per-position loops.

Each reference below walks the scored positions one by one and builds the loss from explicit
softmaxes and sums (tail masses as 1 - sum over the support, not as a logsumexp), so it shares no
code with the module. DPO and SimPO are also compared with TRL's own implementations.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from adpa import sparse
from adpa.training import losses
from adpa.training.batch import TeacherSignals, TokenBatch
from adpa.training.methods import COMMON_DEFAULTS, METHODS, LossInputs, Scored, get_method

B, T, V, M = 2, 5, 11, 6  # batch, positions, vocabulary, support width (with pads)
BETA, GAMMA = 0.5, 1.3
ATOL = 1e-5
MASK = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 1, 1]], dtype=torch.bool)
SCORED = [(b, t) for b in range(B) for t in range(T) if MASK[b, t]]
REDUCTIONS = ["mean", "sum"]


# -- independent references -------------------------------------------------------------------


def ref_log_softmax(z: torch.Tensor) -> torch.Tensor:
    """log softmax of one row, by hand."""
    z = z.double()
    shift = z.max()
    return z - shift - torch.log(torch.exp(z - shift).sum())


def ref_reduce(per_position: list[torch.Tensor], reduction: str) -> torch.Tensor:
    total = sum(per_position)
    return total / len(per_position) if reduction == "mean" else total


def support_of(indices: torch.Tensor, b: int, t: int) -> list[int]:
    return [int(a) for a in indices[b, t] if a >= 0]


def ref_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_a p (log p - log q) over a row of buckets."""
    return sum(math.exp(float(lp)) * (lp - lq) for lp, lq in zip(logp, logq))


# -- problems ---------------------------------------------------------------------------------


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(seed: int, scale: float = 2.0) -> torch.Tensor:
    return (scale * torch.randn(B, T, V, generator=generator(seed))).requires_grad_()


def random_logprobs(seed: int) -> torch.Tensor:
    return (2.0 * torch.randn(B, T, V, generator=generator(seed))).log_softmax(-1)


def random_support(seed: int, min_size: int = 2) -> torch.Tensor:
    """(B, T, M) unique token ids with -1 pads, in random order (pads included)."""
    g = generator(seed)
    indices = torch.full((B, T, M), -1, dtype=torch.int64)
    for b in range(B):
        for t in range(T):
            size = int(torch.randint(min_size, M + 1, (1,), generator=g))
            row = torch.full((M,), -1, dtype=torch.int64)
            row[:size] = torch.randperm(V, generator=g)[:size]
            indices[b, t] = row[torch.randperm(M, generator=g)]
    return indices


def full_support(seed: int) -> torch.Tensor:
    """Every token of the vocabulary, shuffled per position."""
    g = generator(seed)
    return torch.stack([torch.stack([torch.randperm(V, generator=g) for _ in range(T)]) for _ in range(B)])


def on_support(dense: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """dense[b, t, indices[b, t, j]] by loops, 0 at pads."""
    out = torch.zeros(indices.shape)
    for b in range(B):
        for t in range(T):
            for j, a in enumerate(indices[b, t]):
                if a >= 0:
                    out[b, t, j] = dense[b, t, a]
    return out


def log_tail(logp: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log of the mass outside the support, by summing the tokens outside it; -inf when empty."""
    out = torch.empty(B, T)
    for b in range(B):
        for t in range(T):
            inside = set(support_of(indices, b, t))
            mass = sum(math.exp(float(logp[b, t, a])) for a in range(V) if a not in inside)
            out[b, t] = math.log(mass) if mass > 0 else float("-inf")
    return out


def advantage_signals(seed: int, indices: torch.Tensor):
    """Dense A = beta (log pi_dpo - log pi_ref), and its sparse form with the service's tail."""
    logp_dpo, logp_ref = random_logprobs(seed), random_logprobs(seed + 1)
    dense = BETA * (logp_dpo - logp_ref)
    tail_dpo, tail_ref = log_tail(logp_dpo, indices), log_tail(logp_ref, indices)
    tail = torch.where(torch.isneginf(tail_dpo) & torch.isneginf(tail_ref), 0.0, BETA * (tail_dpo - tail_ref))
    return dense, on_support(dense, indices), tail


def grad(loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(loss, logits)[0]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


# -- SFT and sequence log-probs -------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sft_loss_matches_reference(reduction):
    logits = random_logits(0)
    labels = torch.randint(0, V, (B, T), generator=generator(1)).masked_fill(~MASK, -100)
    expected = ref_reduce([-ref_log_softmax(logits[b, t])[labels[b, t]] for b, t in SCORED], reduction)
    got = losses.sft_loss(logits, labels, MASK, reduction=reduction)
    assert got.item() == pytest.approx(expected.item(), abs=ATOL)
    assert torch.allclose(grad(got, logits), grad(expected, logits).float(), atol=ATOL)


def test_sequence_logprobs_sum_and_average():
    logits = random_logits(2)
    labels = torch.randint(0, V, (B, T), generator=generator(3))
    total = losses.sequence_logprobs(logits, labels, MASK)  # (B,)
    average = losses.sequence_logprobs(logits, labels, MASK, average=True)  # (B,)
    for b in range(B):
        token_logps = [ref_log_softmax(logits[b, t])[labels[b, t]] for t in range(T) if MASK[b, t]]
        assert total[b].item() == pytest.approx(sum(token_logps).item(), abs=ATOL)
        assert average[b].item() == pytest.approx(sum(token_logps).item() / len(token_logps), abs=ATOL)


def test_half_precision_logits_are_scored_in_fp32():
    logits = random_logits(4).detach().bfloat16()
    labels = torch.randint(0, V, (B, T), generator=generator(5))
    got = losses.sft_loss(logits, labels, MASK)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(losses.sft_loss(logits.float(), labels, MASK).item(), abs=1e-6)


def test_mean_over_no_scored_position_is_zero_not_nan():
    logits = random_logits(6)
    labels = torch.zeros(B, T, dtype=torch.int64)
    none = torch.zeros(B, T, dtype=torch.bool)
    assert losses.sft_loss(logits, labels, none).item() == 0.0
    assert losses.dense_adpa_loss(torch.randn(B, T, V), logits, none, gamma=GAMMA).item() == 0.0


def test_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        losses.sft_loss(random_logits(0), torch.zeros(B, T, dtype=torch.int64), MASK, reduction="avg")


# -- DPO and SimPO ------------------------------------------------------------------------------


def sequence_inputs(seed: int, n: int = 4) -> list[torch.Tensor]:
    g = generator(seed)
    return [(-20 + 5 * torch.randn(n, generator=g)).requires_grad_() for _ in range(4)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_dpo_loss_matches_formula(reduction):
    pc, pr, rc, rr = sequence_inputs(7)
    loss, chosen_rewards, rejected_rewards = losses.dpo_loss(pc, pr, rc, rr, beta=BETA, reduction=reduction)
    per_pair = [-math.log(1 / (1 + math.exp(-BETA * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()))) for i in range(4)]
    expected = sum(per_pair) / 4 if reduction == "mean" else sum(per_pair)
    assert loss.item() == pytest.approx(expected, abs=ATOL)
    assert torch.allclose(chosen_rewards, BETA * (pc - rc).detach())
    assert torch.allclose(rejected_rewards, BETA * (pr - rr).detach())
    assert not chosen_rewards.requires_grad


def test_dpo_loss_matches_trl():
    """TRL 1.16 has no standalone DPO loss: the sigmoid loss lives inside DPOTrainer._compute_loss.

    We call that method unbound with a SimpleNamespace `self` holding the attributes it reads
    (reference log-probs precomputed, loss_type ["sigmoid"], f_divergence_type "reverse_kl", no
    length desensitisation, no WPO weighting) and a fake model returning the per-token log-probs
    TRL's fused LM head would (log pi of input_ids[:, 1:], 0 off the completion). Compared:
    the loss, its gradient with respect to the logits, and the logged rewards.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    pairs, length = 3, 7
    g = generator(8)
    input_ids = torch.randint(0, V, (2 * pairs, length), generator=g)  # [chosen; rejected]
    completion_mask = torch.zeros(2 * pairs, length, dtype=torch.long)
    for row, start in enumerate([2, 3, 2, 4, 1, 3]):
        completion_mask[row, start:] = 1
    completion_mask[1, -1] = 0  # a padded completion
    logits = (2 * torch.randn(2 * pairs, length, V, generator=g)).requires_grad_()
    ref_logps = -15 + 3 * torch.randn(2 * pairs, generator=g)

    class FakeModel:
        training = False

        def __call__(self, input_ids, labels, fused_lm_head, **kwargs):
            logp = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            logp = logp * (labels[:, 1:] != -100)
            zeros = torch.zeros_like(logp)
            return SimpleNamespace(log_probs=logp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    model = FakeModel()
    identity = lambda x: x  # noqa: E731
    trainer = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device="cpu", gather_for_metrics=identity, gather=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=["sigmoid"], loss_weights=[1.0], beta=BETA, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )
    inputs = {
        "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": completion_mask,
        "ref_chosen_logps": ref_logps[:pairs], "ref_rejected_logps": ref_logps[pairs:],
    }
    trl_loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)

    logps = losses.sequence_logprobs(logits[:, :-1], input_ids[:, 1:], completion_mask[:, 1:])
    ours, chosen_rewards, _ = losses.dpo_loss(logps[:pairs], logps[pairs:], ref_logps[:pairs], ref_logps[pairs:], BETA)
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    assert torch.allclose(grad(ours, logits), grad(trl_loss, logits), atol=1e-7)
    assert trainer._metrics["eval"]["rewards/chosen"][0] == pytest.approx(chosen_rewards.mean().item(), abs=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_simpo_loss_matches_formula_and_trl(reduction):
    """Also against TRL's CPOTrainer.cpo_loss (loss_type "simpo"), called unbound."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    chosen, rejected, _, _ = sequence_inputs(9)
    chosen, rejected = chosen / 10, rejected / 10  # length-normalised log-probs
    loss = losses.simpo_loss(chosen, rejected, beta=2.0, gamma=0.8, reduction=reduction)
    per_pair = [math.log(1 + math.exp(-(2.0 * (chosen[i] - rejected[i]).item() - 0.8))) for i in range(4)]
    assert loss.item() == pytest.approx(sum(per_pair) / (4 if reduction == "mean" else 1), abs=ATOL)

    cpo = SimpleNamespace(alpha=0.0, accelerator=SimpleNamespace(device="cpu"), loss_type="simpo", simpo_gamma=0.8,
                          beta=2.0, label_smoothing=0.0)
    trl_losses, _, _ = CPOTrainer.cpo_loss(cpo, chosen, rejected)
    trl_loss = trl_losses.mean() if reduction == "mean" else trl_losses.sum()
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)


# -- KL: DCKD and VanillaKD -------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_dense_kl_matches_reference(reduction):
    logits, teacher = random_logits(10), random_logprobs(11)
    expected = ref_reduce(
        [ref_kl(teacher[b, t], ref_log_softmax(logits[b, t])) for b, t in SCORED], reduction
    )
    got = losses.dense_kl(teacher, logits, MASK, reduction=reduction)
    assert got.item() == pytest.approx(expected.item(), abs=ATOL)
    assert torch.allclose(grad(got, logits), grad(expected, logits).float(), atol=ATOL)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sparse_kl_matches_reference(reduction):
    """Support buckets plus one tail bucket; tails as 1 - sum over the support."""
    logits, teacher, indices = random_logits(12), random_logprobs(13), random_support(14)
    values, tail = on_support(teacher, indices), log_tail(teacher, indices)
    per_position = []
    for b, t in SCORED:
        support = support_of(indices, b, t)
        logq = ref_log_softmax(logits[b, t])
        p_tail = 1 - sum(math.exp(float(teacher[b, t, a])) for a in support)
        q_tail = 1 - torch.exp(logq[support]).sum()
        buckets_p = torch.cat([teacher[b, t, support].double(), torch.tensor([math.log(p_tail)]).double()])
        buckets_q = torch.cat([logq[support], torch.log(q_tail)[None]])
        per_position.append(ref_kl(buckets_p, buckets_q))
    expected = ref_reduce(per_position, reduction)
    got = losses.sparse_kl(indices, values, tail, logits, MASK, reduction=reduction)
    assert got.item() == pytest.approx(expected.item(), abs=ATOL)
    assert torch.allclose(grad(got, logits), grad(expected, logits).float(), atol=ATOL)


def test_sparse_kl_is_a_lower_bound_of_dense_kl_at_every_position():
    logits, teacher, indices = random_logits(15), random_logprobs(16), random_support(17)
    values, tail = on_support(teacher, indices), log_tail(teacher, indices)
    for b, t in SCORED:
        one = torch.zeros(B, T, dtype=torch.bool)
        one[b, t] = True
        sparse = losses.sparse_kl(indices, values, tail, logits, one)
        dense = losses.dense_kl(teacher, logits, one)
        assert 0 <= sparse.item() <= dense.item() + 1e-6
        assert sparse.item() < dense.item() - 1e-4  # strict here: a random subset loses something


def test_sparse_kl_equals_dense_kl_on_the_whole_vocabulary():
    logits, teacher, indices = random_logits(18), random_logprobs(19), full_support(20)
    values, tail = on_support(teacher, indices), log_tail(teacher, indices)
    assert torch.isneginf(tail).all()
    sparse = losses.sparse_kl(indices, values, tail, logits, MASK)
    dense = losses.dense_kl(teacher, logits, MASK)
    assert sparse.item() == pytest.approx(dense.item(), abs=1e-6)
    sparse_grad, dense_grad = grad(sparse, logits), grad(dense, logits)
    assert torch.isfinite(sparse_grad).all()
    assert torch.allclose(sparse_grad, dense_grad, atol=1e-6)


def test_identical_distributions_give_zero_kl():
    logits = random_logits(21)
    same = logits.detach().log_softmax(-1)
    indices = random_support(22)
    assert losses.dense_kl(same, logits, MASK).item() == pytest.approx(0.0, abs=1e-6)
    sparse = losses.sparse_kl(indices, on_support(same, indices), log_tail(same, indices), logits, MASK)
    assert sparse.item() == pytest.approx(0.0, abs=1e-6)
    assert grad(sparse, logits).abs().max().item() < 1e-6


def test_kl_loss_is_dense_or_sparse_kl_by_the_signal_it_gets():
    logits, teacher, indices = random_logits(23), random_logprobs(24), random_support(25)
    values, tail = on_support(teacher, indices), log_tail(teacher, indices)
    assert losses.kl_loss(None, teacher, None, logits, MASK).item() == pytest.approx(
        losses.dense_kl(teacher, logits, MASK).item())
    assert losses.kl_loss(indices, values, tail, logits, MASK).item() == pytest.approx(
        losses.sparse_kl(indices, values, tail, logits, MASK).item())
    with pytest.raises(ValueError, match="tail"):
        losses.kl_loss(indices, values, None, logits, MASK)


def test_dckd_composes_sft_and_both_kls():
    sft, kl_w, kl_l = torch.tensor(2.0), torch.tensor(0.3), torch.tensor(0.5)
    assert losses.dckd_loss(sft, kl_w, kl_l, alpha=0.1).item() == pytest.approx(2.0 + 0.1 * 0.8)
    assert losses.dckd_loss(sft, kl_w, None, alpha=0.1).item() == pytest.approx(2.0 + 0.1 * 0.3)
    assert losses.dckd_loss(sft, kl_w, kl_l, alpha=0.1, sft_weight=0.5).item() == pytest.approx(1.0 + 0.1 * 0.8)


# -- ADPA -------------------------------------------------------------------------------------


def ref_expected_advantage(logq: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    return sum(torch.exp(logq[a]) * advantage[a] for a in range(V))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_dense_adpa_matches_reference_and_gradient_formula(reduction):
    """Value by loops; gradient on logit j is -gamma/N * q(j) (A(j) - G_t), 0 off the mask."""
    logits = random_logits(26)
    advantage, _, _ = advantage_signals(27, random_support(28))
    got = losses.dense_adpa_loss(advantage, logits, MASK, gamma=GAMMA, reduction=reduction)
    per_position = [ref_expected_advantage(ref_log_softmax(logits[b, t]), advantage[b, t]) for b, t in SCORED]
    expected = -GAMMA * ref_reduce(per_position, reduction)
    assert got.item() == pytest.approx(expected.item(), abs=ATOL)

    n = len(SCORED) if reduction == "mean" else 1
    formula = torch.zeros(B, T, V)
    for b, t in SCORED:
        q = torch.exp(ref_log_softmax(logits[b, t].detach()))
        g_t = (q * advantage[b, t]).sum()
        formula[b, t] = -GAMMA / n * q * (advantage[b, t] - g_t)
    assert torch.allclose(grad(got, logits), formula, atol=1e-6)


def test_adpa_gradient_is_shift_invariant_in_the_advantage():
    logits = random_logits(29)
    advantage, _, _ = advantage_signals(30, random_support(31))
    shifted = advantage + torch.arange(B * T, dtype=torch.float32).reshape(B, T, 1)  # a constant per position
    loss = losses.dense_adpa_loss(advantage, logits, MASK, gamma=GAMMA)
    loss_shifted = losses.dense_adpa_loss(shifted, logits, MASK, gamma=GAMMA)
    assert abs(loss.item() - loss_shifted.item()) > 1.0
    assert torch.allclose(grad(loss, logits), grad(loss_shifted, logits), atol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sparse_adpa_matches_reference_and_gradient_formula(reduction):
    """G_t = sum_S q A + (1 - sum_S q) A_tail; gradient q(j) (A(j) - G_t), A(j) = A_tail off S."""
    logits, indices = random_logits(32), random_support(33)
    _, values, tail = advantage_signals(34, indices)
    got = losses.sparse_adpa_loss(indices, values, tail, logits, MASK, gamma=GAMMA, reduction=reduction)
    n = len(SCORED) if reduction == "mean" else 1
    per_position, formula = [], torch.zeros(B, T, V)
    for b, t in SCORED:
        logq = ref_log_softmax(logits[b, t])
        advantage_of = {int(a): float(values[b, t, j]) for j, a in enumerate(indices[b, t]) if a >= 0}
        q_support = sum(torch.exp(logq[a]) for a in advantage_of)
        g_t = sum(torch.exp(logq[a]) * A for a, A in advantage_of.items()) + (1 - q_support) * tail[b, t]
        per_position.append(g_t)
        q = torch.exp(logq.detach()).float()
        full = torch.tensor([advantage_of.get(a, float(tail[b, t])) for a in range(V)])
        formula[b, t] = -GAMMA / n * q * (full - g_t.detach().float())
    expected = -GAMMA * ref_reduce(per_position, reduction)
    assert got.item() == pytest.approx(expected.item(), abs=ATOL)
    assert torch.allclose(grad(got, logits), formula, atol=1e-6)


def test_sparse_adpa_equals_dense_adpa_on_the_whole_vocabulary():
    """Full support: the tail term vanishes whatever the tail value (0, -inf or anything)."""
    logits, indices = random_logits(35), full_support(36)
    dense_advantage, values, tail = advantage_signals(37, indices)
    assert (tail == 0).all()  # both tails empty: the service sends 0
    dense = losses.dense_adpa_loss(dense_advantage, logits, MASK, gamma=GAMMA)
    dense_grad = grad(dense, logits)
    for tail_value in (tail, torch.full((B, T), float("-inf")), torch.full((B, T), 7.0)):
        sparse = losses.sparse_adpa_loss(indices, values, tail_value, logits, MASK, gamma=GAMMA)
        sparse_grad = grad(sparse, logits)
        assert sparse.item() == pytest.approx(dense.item(), abs=1e-6)
        assert torch.isfinite(sparse_grad).all()
        assert cosine(sparse_grad, dense_grad) == pytest.approx(1.0, abs=1e-9)
        assert torch.allclose(sparse_grad, dense_grad, atol=1e-6)


def test_sparse_adpa_gradient_follows_dense_when_support_holds_the_students_top_tokens():
    """A peaked student whose top-3 are in the support: the tail bucket costs little accuracy."""
    logits = random_logits(38, scale=5.0)
    indices = torch.cat([logits.detach().topk(3, dim=-1).indices, torch.full((B, T, 1), -1)], dim=-1)
    dense_advantage, values, tail = advantage_signals(39, indices)
    dense = losses.dense_adpa_loss(dense_advantage, logits, MASK, gamma=GAMMA)
    sparse = losses.sparse_adpa_loss(indices, values, tail, logits, MASK, gamma=GAMMA)
    sparse_grad = grad(sparse, logits)
    assert torch.isfinite(sparse_grad).all()
    assert cosine(sparse_grad, grad(dense, logits)) > 0.9


def test_adpa_without_reference_uses_beta_log_pi_dpo():
    logits, teacher, indices = random_logits(40), random_logprobs(41), full_support(42)
    assert torch.equal(losses.advantage_without_reference(teacher, BETA), BETA * teacher)
    dense = losses.dense_adpa_loss(losses.advantage_without_reference(teacher, BETA), logits, MASK, gamma=GAMMA)
    # On the whole vocabulary the no-reference tail is beta * log 0 = -inf; it must not poison the loss.
    tail = losses.advantage_without_reference(log_tail(teacher, indices), BETA)
    sparse = losses.sparse_adpa_loss(
        indices, losses.advantage_without_reference(on_support(teacher, indices), BETA), tail, logits, MASK, gamma=GAMMA
    )
    assert torch.isneginf(tail).all()
    assert sparse.item() == pytest.approx(dense.item(), abs=1e-6)
    assert torch.isfinite(grad(sparse, logits)).all()


def test_support_floor_replaces_only_where_both_models_are_below_it():
    probs = torch.tensor([[5e-4, 5e-4, 0.2, 0.3], [1e-5, 0.5, 1e-5, 1.0]])  # pi_dpo
    ref_probs = torch.tensor([[1e-4, 0.1, 1e-4, 0.3], [1e-6, 1e-6, 0.4, 1.0]])  # pi_ref; last column: pads (log 0)
    teacher, reference = probs.log()[None], ref_probs.log()[None]  # (1, 2, 4)
    advantage = torch.tensor([[[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 6.0, 0.0]]])
    both_below = torch.tensor([[[True, False, False, False], [True, False, False, False]]])
    before = advantage.clone()

    with_penalty = losses.support_floor(advantage, teacher, reference, floor=1e-3, penalty=-9.0)
    assert torch.equal(with_penalty, torch.where(both_below, -9.0, advantage))
    tail = torch.tensor([[-0.25, 0.75]])
    with_tail = losses.support_floor(advantage, teacher, reference, floor=1e-3, tail=tail)
    assert torch.equal(with_tail, torch.where(both_below, tail[..., None], advantage))
    assert torch.equal(advantage, before)  # pure
    with pytest.raises(ValueError, match="penalty"):
        losses.support_floor(advantage, teacher, reference)


def test_release_advantage_clamps_to_the_release_range():
    teacher = torch.tensor([-1.0, -2.0, -3.0, -0.5])
    reference = torch.tensor([-1.5, -2.0, -1.0, -4.0])  # log-ratios 0.5, 0, -2, 3.5
    expected = torch.tensor([0.5, 1e-8, 1e-8, 1.0])
    assert torch.allclose(losses.release_advantage(teacher, reference), expected, rtol=0, atol=1e-12)
    assert torch.equal(losses.release_advantage(teacher - reference), losses.release_advantage(teacher, reference))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_release_adpa_loss_has_no_tail_bucket(reduction):
    logits, indices = random_logits(43), random_support(44)
    teacher, reference = random_logprobs(45), random_logprobs(46)
    advantage = losses.release_advantage(on_support(teacher, indices), on_support(reference, indices))
    release_gamma = get_method("adpa-release").default("gamma")
    got = losses.release_adpa_loss(indices, advantage, logits, MASK, gamma=release_gamma, reduction=reduction)
    per_position = []
    for b, t in SCORED:
        logq = ref_log_softmax(logits[b, t])
        per_position.append(sum(
            torch.exp(logq[a]) * advantage[b, t, j] for j, a in enumerate(indices[b, t].tolist()) if a >= 0
        ))
    expected = -release_gamma * ref_reduce(per_position, reduction)
    assert release_gamma == 1.6
    assert got.item() == pytest.approx(expected.item(), abs=ATOL)
    assert torch.allclose(grad(got, logits), grad(expected, logits).float(), atol=ATOL)


# -- Q-argmax and Q-softmax KD ----------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_q_argmax_kd_is_cross_entropy_to_the_best_token(reduction):
    logits, indices = random_logits(47), random_support(48)
    _, values, _ = advantage_signals(49, indices)
    best = torch.zeros(B, T, dtype=torch.int64)
    for b, t in SCORED:
        pairs = [(float(values[b, t, j]), int(a)) for j, a in enumerate(indices[b, t]) if a >= 0]
        best[b, t] = max(pairs)[1]
        assert all(A <= float(values[b, t][indices[b, t] == best[b, t]]) for A, _ in pairs)
    expected = ref_reduce([-ref_log_softmax(logits[b, t])[best[b, t]] for b, t in SCORED], reduction)
    got = losses.q_argmax_kd_loss(indices, values, logits, MASK, reduction=reduction)
    assert got.item() == pytest.approx(expected.item(), abs=ATOL)
    assert got.item() == pytest.approx(losses.sft_loss(logits, best, MASK, reduction=reduction).item(), abs=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_q_softmax_kd_matches_reference_with_student_renormalised_on_the_support(reduction):
    logits, indices = random_logits(50), random_support(51)
    _, values, _ = advantage_signals(52, indices)
    temperature = 0.7
    per_position = []
    for b, t in SCORED:
        support = support_of(indices, b, t)
        A = torch.tensor([float(values[b, t][indices[b, t] == a]) for a in support]).double() / temperature
        target = torch.exp(A) / torch.exp(A).sum()
        q = torch.exp(ref_log_softmax(logits[b, t])[support])
        q_support = q / q.sum()
        per_position.append((target * torch.log(target / q_support)).sum())
    expected = ref_reduce(per_position, reduction)
    got = losses.q_softmax_kd_loss(indices, values, logits, MASK, temperature=temperature, reduction=reduction)
    assert got.item() == pytest.approx(expected.item(), abs=ATOL)
    assert torch.allclose(grad(got, logits), grad(expected, logits).float(), atol=ATOL)


def test_q_softmax_kd_on_the_whole_vocabulary_is_kl_to_softmax_of_the_advantage():
    logits, indices = random_logits(53), full_support(54)
    dense_advantage, values, _ = advantage_signals(55, indices)
    got = losses.q_softmax_kd_loss(indices, values, logits, MASK)
    assert got.item() == pytest.approx(losses.dense_kl(dense_advantage.log_softmax(-1), logits, MASK).item(), abs=1e-6)


# -- masking, for every loss on the (B, T) grid ------------------------------------------------


def grid_signals(seed: int) -> dict[str, torch.Tensor]:
    """Signals as the trainer places them: unscored positions have no support (all -1, values 0, tail 0)."""
    indices = random_support(seed).masked_fill(~MASK[..., None], -1)
    teacher = random_logprobs(seed + 1)
    dense_advantage, values, tail = advantage_signals(seed + 2, indices)
    return {
        "indices": indices,
        "teacher_dense": teacher,
        "teacher_values": on_support(teacher, indices),
        "teacher_tail": log_tail(teacher, indices).masked_fill(~MASK, 0.0),
        "advantage_dense": dense_advantage,
        "advantage_values": values,
        "advantage_tail": tail.masked_fill(~MASK, 0.0),
        "labels": torch.randint(0, V, (B, T), generator=generator(seed + 3)),
    }


GRID_LOSSES = {
    "sft": lambda s, z, r: losses.sft_loss(z, s["labels"], MASK, r),
    "dense_kl": lambda s, z, r: losses.dense_kl(s["teacher_dense"], z, MASK, r),
    "sparse_kl": lambda s, z, r: losses.sparse_kl(s["indices"], s["teacher_values"], s["teacher_tail"], z, MASK, r),
    "dense_adpa": lambda s, z, r: losses.dense_adpa_loss(s["advantage_dense"], z, MASK, GAMMA, r),
    "sparse_adpa": lambda s, z, r: losses.sparse_adpa_loss(
        s["indices"], s["advantage_values"], s["advantage_tail"], z, MASK, GAMMA, r),
    "release_adpa": lambda s, z, r: losses.release_adpa_loss(
        s["indices"], losses.release_advantage(s["advantage_values"] / BETA), z, MASK, gamma=GAMMA, reduction=r),
    "q_argmax_kd": lambda s, z, r: losses.q_argmax_kd_loss(s["indices"], s["advantage_values"], z, MASK, r),
    "q_softmax_kd": lambda s, z, r: losses.q_softmax_kd_loss(s["indices"], s["advantage_values"], z, MASK, reduction=r),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", sorted(GRID_LOSSES))
def test_unscored_positions_affect_neither_value_nor_gradient(name, reduction):
    signals = grid_signals(56)
    logits = random_logits(57)
    loss = GRID_LOSSES[name](signals, logits, reduction)
    gradient = grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(gradient).all()
    assert (gradient[~MASK] == 0).all()

    # Other logits, labels and dense teacher values at the unscored positions.
    noise = 10 * torch.randn(B, T, V, generator=generator(58))
    changed_logits = torch.where(MASK[..., None], logits.detach(), noise).requires_grad_()
    changed = dict(signals)
    changed["labels"] = torch.where(MASK, signals["labels"], (signals["labels"] + 3) % V)
    for key in ("teacher_dense", "advantage_dense"):
        changed[key] = torch.where(MASK[..., None], signals[key], noise.log_softmax(-1))
    changed_loss = GRID_LOSSES[name](changed, changed_logits, reduction)
    assert changed_loss.item() == pytest.approx(loss.item(), abs=1e-6)
    assert torch.allclose(grad(changed_loss, changed_logits), gradient, atol=1e-7)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_no_nan_even_in_intermediate_gradients():
    """Empty supports (unscored positions) and empty tails (full supports) under detect_anomaly,
    which raises as soon as any backward step produces a nan."""
    signals, logits = grid_signals(59), random_logits(60)
    indices = full_support(61)
    teacher = random_logprobs(62)
    dense_advantage, values, tail = advantage_signals(63, indices)
    with torch.autograd.detect_anomaly():
        for loss_fn in GRID_LOSSES.values():
            grad(loss_fn(signals, logits, "mean"), logits)
        grad(losses.sparse_kl(indices, on_support(teacher, indices), log_tail(teacher, indices), logits, MASK), logits)
        grad(losses.sparse_adpa_loss(indices, values, torch.full((B, T), float("-inf")), logits, MASK, GAMMA), logits)


# -- method specs: the registry, and each method's loss as composed from the functions above ---


def test_registry_lists_valid_names_for_an_unknown_method():
    assert get_method("adpa").name == "adpa"
    with pytest.raises(ValueError) as error:
        get_method("adpa++")
    message = str(error.value)
    assert "adpa++" in message
    for name in METHODS:
        assert name in message


def test_method_specs_declare_what_they_ask_and_their_defaults():
    assert set(METHODS) == {"dckd", "dckd-no-rejected", "vanilla-kd", "adpa", "adpa-no-ref", "adpa-release",
                            "q-argmax", "q-softmax"}
    assert {name: (spec.signal, spec.sides) for name, spec in METHODS.items()} == {
        "dckd": ("logprobs", "pair"),
        "dckd-no-rejected": ("logprobs", "chosen"),
        "vanilla-kd": ("logprobs", "chosen"),
        "adpa": ("advantage", "samples"),
        "adpa-no-ref": ("logprobs", "samples"),
        "adpa-release": ("advantage", "samples"),
        "q-argmax": ("advantage", "samples"),
        "q-softmax": ("advantage", "samples"),
    }
    release = get_method("adpa-release")
    assert (release.default("gamma"), release.default("support_k"), release.supports) == (1.6, 50, ("topk",))
    assert (get_method("adpa").default("gamma"), get_method("adpa").default("support_k")) == (1.0, 32)
    assert COMMON_DEFAULTS == {"gamma": 1.0, "support_k": 32}


def grid_batch(labels: torch.Tensor) -> TokenBatch:
    """A TokenBatch with only what a loss reads: targets and the scored mask."""
    return TokenBatch(input_ids=labels, attention_mask=torch.ones_like(labels), targets=labels, mask=MASK, ranges=[])


def sparse_logprob_signals(seed: int) -> TeacherSignals:
    indices = random_support(seed)
    teacher = random_logprobs(seed + 1)
    return TeacherSignals("logprobs", indices, on_support(teacher, indices), log_tail(teacher, indices))


def sample_inputs(seed: int, signals: TeacherSignals, **settings) -> LossInputs:
    labels = torch.randint(0, V, (B, T), generator=generator(seed))
    chosen = Scored(grid_batch(labels), random_logits(seed + 1), None)
    other = Scored(grid_batch(labels), random_logits(seed + 2), signals)
    return LossInputs(chosen, other, **{"gamma": GAMMA, "beta": BETA, **settings})


@pytest.mark.parametrize("name", ["dckd", "dckd-no-rejected", "vanilla-kd"])
def test_kl_methods_compose_sft_and_kl_per_side(name):
    labels = torch.randint(0, V, (B, T), generator=generator(70))
    chosen = Scored(grid_batch(labels), random_logits(71), sparse_logprob_signals(72))
    rejected = Scored(grid_batch(labels), random_logits(73), sparse_logprob_signals(74))
    spec = get_method(name)
    x = LossInputs(chosen, rejected if spec.sides == "pair" else None, alpha=0.3, sft_weight=0.7)
    loss, parts = spec.loss(x)
    assert tuple(parts) == spec.parts

    def kl(side):
        s = side.signals
        return losses.sparse_kl(s.indices, s.values, s.tail, side.logits, MASK)

    sft = losses.sft_loss(chosen.logits, labels, MASK)
    expected = {"dckd": 0.7 * sft + 0.3 * (kl(chosen) + kl(rejected)),
                "dckd-no-rejected": 0.7 * sft + 0.3 * kl(chosen),
                "vanilla-kd": kl(chosen)}[name]
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert parts["sft"].item() == pytest.approx(sft.item(), abs=1e-6)
    assert torch.allclose(grad(loss, chosen.logits), grad(expected, chosen.logits), atol=1e-7)


def test_adpa_method_on_a_sparse_and_a_dense_support():
    indices = random_support(75)
    dense_advantage, values, tail = advantage_signals(76, indices)
    x = sample_inputs(77, TeacherSignals("advantage", indices, values, tail), sft_weight=0.5)
    loss, parts = get_method("adpa").loss(x)
    term = losses.sparse_adpa_loss(indices, values, tail, x.other.logits, MASK, gamma=GAMMA)
    sft = losses.sft_loss(x.chosen.logits, x.chosen.batch.targets, MASK)
    assert tuple(parts) == ("sft", "advantage_term")
    assert parts["advantage_term"].item() == pytest.approx(term.item(), abs=1e-6)
    assert loss.item() == pytest.approx((0.5 * sft + term).item(), abs=1e-6)

    dense = sample_inputs(77, TeacherSignals("advantage", None, dense_advantage, None))
    _, parts = get_method("adpa").loss(dense)
    expected = losses.dense_adpa_loss(dense_advantage, dense.other.logits, MASK, gamma=GAMMA)
    assert parts["advantage_term"].item() == pytest.approx(expected.item(), abs=1e-6)


def test_adpa_no_ref_uses_beta_times_the_teachers_logprobs():
    signals = sparse_logprob_signals(78)
    x = sample_inputs(79, signals)
    _, parts = get_method("adpa-no-ref").loss(x)
    expected = losses.sparse_adpa_loss(signals.indices, BETA * signals.values, BETA * signals.tail, x.other.logits,
                                       MASK, gamma=GAMMA)
    assert parts["advantage_term"].item() == pytest.approx(expected.item(), abs=1e-6)


def test_adpa_release_method_clamps_the_unscaled_advantage_and_drops_the_tail():
    indices = random_support(80)
    _, values, tail = advantage_signals(81, indices)
    x = sample_inputs(82, TeacherSignals("advantage", indices, values, tail))
    _, parts = get_method("adpa-release").loss(x)
    per_position = []
    for b, t in SCORED:
        logq = ref_log_softmax(x.other.logits[b, t])
        per_position.append(sum(torch.exp(logq[a]) * min(max(float(values[b, t, j]) / BETA, 1e-8), 1.0)
                                for j, a in enumerate(indices[b, t].tolist()) if a >= 0))
    expected = -GAMMA * ref_reduce(per_position, "mean")
    assert parts["advantage_term"].item() == pytest.approx(expected.item(), abs=ATOL)


@pytest.mark.parametrize("name, loss_fn", [("q-argmax", losses.q_argmax_kd_loss),
                                           ("q-softmax", losses.q_softmax_kd_loss)])
def test_q_methods_scale_their_term_by_gamma_and_read_a_dense_answer_as_the_whole_vocabulary(name, loss_fn):
    indices = random_support(83)
    dense_advantage, values, tail = advantage_signals(84, indices)
    x = sample_inputs(85, TeacherSignals("advantage", indices, values, tail))
    _, parts = get_method(name).loss(x)
    assert parts["advantage_term"].item() == pytest.approx(
        GAMMA * loss_fn(indices, values, x.other.logits, MASK).item(), abs=1e-6)
    dense = sample_inputs(85, TeacherSignals("advantage", None, dense_advantage, None))
    _, parts = get_method(name).loss(dense)
    vocabulary = torch.arange(V).expand(B, T, V)
    assert parts["advantage_term"].item() == pytest.approx(
        GAMMA * loss_fn(vocabulary, dense_advantage, dense.other.logits, MASK).item(), abs=1e-6)


def test_support_floor_applies_where_the_teacher_sent_both_models_logprobs():
    indices = random_support(86)
    teacher, reference = random_logprobs(87), random_logprobs(88)
    values = BETA * (on_support(teacher, indices) - on_support(reference, indices))
    tail = BETA * (log_tail(teacher, indices) - log_tail(reference, indices))
    signals = TeacherSignals("advantage", indices, values, tail, logprobs=on_support(teacher, indices),
                             reference_logprobs=on_support(reference, indices))
    x = sample_inputs(89, signals, support_floor=0.05, floor_penalty=-3.0)
    _, parts = get_method("adpa").loss(x)
    floored = losses.support_floor(values, signals.logprobs, signals.reference_logprobs, floor=0.05, penalty=-3.0)
    assert not torch.equal(floored, values)  # the floor changes something here
    expected = losses.sparse_adpa_loss(indices, floored, tail, x.other.logits, MASK, gamma=GAMMA)
    assert parts["advantage_term"].item() == pytest.approx(expected.item(), abs=1e-6)


# -- nothing at an unscored position reaches a loss or its gradient ---------------------------


def _unscored_cases():
    """(name, fn(logits, mask, teacher inputs...) -> scalar, teacher inputs (B, T, ...)) for every loss."""
    B, T, V, m = 2, 3, 6, 3
    g = torch.Generator().manual_seed(11)
    idx = torch.stack([torch.randperm(V, generator=g)[:m] for _ in range(B * T)]).reshape(B, T, m)
    idx[1, 2, 2] = -1
    vals = torch.randn(B, T, m, generator=g).log_softmax(-1) - 0.5
    tail = torch.randn(B, T, generator=g) - 2.0
    dense_t = torch.randn(B, T, V, generator=g).log_softmax(-1)
    labels = torch.randint(0, V, (B, T), generator=g)
    return (B, T, V), [
        ("sft", lambda z, msk: losses.sft_loss(z, labels, msk), {}),
        ("sequence_logprobs", lambda z, msk: losses.sequence_logprobs(z, labels, msk, average=True).sum(), {}),
        ("dense_kl", lambda z, msk, p: losses.dense_kl(p, z, msk), {"p": dense_t}),
        ("sparse_kl", lambda z, msk, v, tl, ix: losses.sparse_kl(ix, v, tl, z, msk), {"v": vals, "tl": tail, "ix": idx}),
        ("dense_adpa", lambda z, msk, a: losses.dense_adpa_loss(a, z, msk, 1.0), {"a": dense_t}),
        ("sparse_adpa", lambda z, msk, v, tl, ix: losses.sparse_adpa_loss(ix, v, tl, z, msk, 1.0),
         {"v": vals, "tl": tail, "ix": idx}),
        ("release_adpa", lambda z, msk, v, ix: losses.release_adpa_loss(ix, v, z, msk, 1.6), {"v": vals, "ix": idx}),
        ("q_argmax", lambda z, msk, v, ix: losses.q_argmax_kd_loss(ix, v, z, msk), {"v": vals, "ix": idx}),
        ("q_softmax", lambda z, msk, v, ix: losses.q_softmax_kd_loss(ix, v, z, msk), {"v": vals, "ix": idx}),
    ]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("case", range(9), ids=[c[0] for c in _unscored_cases()[1]])
def test_non_finite_values_at_unscored_positions_change_nothing(case, bad):
    """The module's promise, for every loss: a nan or inf at an unscored position (in the student's
    logits or in any teacher input) changes neither the value nor the gradient (issue's reproduction:
    a -inf advantage there made dense ADPA's gradient nan)."""
    (B, T, V), cases = _unscored_cases()
    name, fn, teacher = cases[case]
    mask = torch.tensor([[True, False, True], [True, True, False]])
    logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(3))

    def run(z, inputs):
        z = z.clone().requires_grad_(True)
        value = fn(z, mask, **inputs)
        value.backward()
        return value.detach(), z.grad

    clean_value, clean_grad = run(logits, teacher)
    dirty_logits = logits.clone()
    dirty_logits[0, 1] = bad
    dirty_logits[1, 2, 0] = bad
    dirty = {}
    for key, tensor in teacher.items():
        tensor = tensor.clone()
        if tensor.is_floating_point():
            tensor[0, 1] = bad
            tensor[1, 2] = bad
        else:  # indices: anything at unscored positions
            tensor[0, 1] = torch.tensor([5, 5, -7])[: tensor.shape[-1]]
        dirty[key] = tensor
    value, grad = run(dirty_logits, dirty)
    assert torch.isfinite(value) and torch.isfinite(grad).all(), name
    torch.testing.assert_close(value, clean_value)
    torch.testing.assert_close(grad, clean_grad)
    assert (grad[~mask] == 0).all()


# -- the sampled support: unbiased estimates of the dense values and gradients -----------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_losses_average_to_the_dense_ones(temperature):
    """Mean over many independent draws (through the service's own `sparse.sample`) = dense value
    and gradient, for the KL and for the ADPA term."""
    g = torch.Generator().manual_seed(5)
    V, n, draws = 12, 4, 20000
    teacher = (torch.randn(1, 1, V, generator=g) * 1.5).log_softmax(-1)  # (1, 1, V)
    advantage = torch.randn(1, 1, V, generator=g)
    student = torch.randn(1, 1, V, generator=g)
    mask = torch.ones(draws, 1, dtype=torch.bool)
    uniforms = torch.rand(draws, n, generator=g, dtype=torch.float64)
    ids, logp, w = sparse.sample(teacher[0].expand(draws, V), uniforms, temperature)  # (draws, n)
    ids, logp, w = ids[:, None], logp[:, None], w[:, None]  # (draws, 1, n)

    def estimate(fn):
        z = student.clone().requires_grad_(True)
        per_draw = fn(z.expand(draws, 1, V))  # summed over draws
        per_draw.backward()
        return per_draw.detach() / draws, z.grad / draws

    def dense(fn):
        z = student.clone().requires_grad_(True)
        value = fn(z)
        value.backward()
        return value.detach(), z.grad

    cases = {
        "kl": (lambda z: losses.sampled_kl(ids, logp, w, z, mask, reduction="sum"),
               lambda z: losses.dense_kl(teacher, z, mask[:1])),
        "adpa": (lambda z: losses.sampled_adpa_loss(ids, advantage.expand(draws, 1, V).gather(-1, ids), logp, w, z,
                                                    mask, gamma=1.0, reduction="sum"),
                 lambda z: losses.dense_adpa_loss(advantage, z, mask[:1], gamma=1.0)),
    }
    for name, (sampled, exact) in cases.items():
        value, grad = estimate(sampled)
        want_value, want_grad = dense(exact)
        assert abs(float(value - want_value)) < 0.03 * max(1.0, abs(float(want_value))), name
        assert torch.nn.functional.cosine_similarity(grad.flatten(), want_grad.flatten(), dim=0) > 0.995, name
        torch.testing.assert_close(grad, want_grad, atol=0.02, rtol=0.05, msg=name)
