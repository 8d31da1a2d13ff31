"""Sparse supports of a distribution: pure functions on fp32 log-probability rows.

Shared by the scoring engine (which builds supports) and the training losses (which read them),
so a tail bucket means the same thing on both sides. Every function takes `logp` of shape
(P, V): log pi(. | s_i) for P scored positions, normalised over the full vocabulary. Index tensors use -1 as padding; values at pads are 0.

`vocab` (where taken) keeps support ids below it: the tokenizer's real ids, when the model's
output has padding rows above them (`V > vocab`). Those rows stay in the normaliser and their mass
in the tail bucket, so the tail is always 1 - sum over the returned ids.
"""

from __future__ import annotations

import torch

PAD = -1


def gather(logp: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """values[i, j] = logp[i, indices[i, j]], and 0 where indices[i, j] == -1."""
    valid = indices >= 0
    values = logp.gather(-1, indices.clamp(min=0))
    return values.masked_fill(~valid, 0.0)


def log_tail_mass(logp: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log sum_{a not in S} pi(a | s), with S the valid entries of the last axis of `indices`.

    logp (..., V), indices (..., m) -> (...). Computed as a logsumexp over the tokens outside the
    support, so it has no cancellation error when the support holds almost all the mass (unlike
    log(1 - sum_S p)); -inf when the support is the whole vocabulary. Differentiable in logp,
    with a finite (zero) gradient at such rows, so training losses use it too.
    """
    vocab = logp.shape[-1]
    # Pads are sent to an extra column, so every write is True (scatter_ with duplicate
    # targets is only deterministic when they write the same value).
    in_support = torch.zeros((*logp.shape[:-1], vocab + 1), dtype=torch.bool, device=logp.device)
    in_support.scatter_(-1, indices.long().masked_fill(indices < 0, vocab), True)
    in_support = in_support[..., :vocab]
    empty = in_support.all(-1)
    # The logsumexp of an all -inf row has a nan gradient: keep such rows finite, then mark them.
    outside = logp.masked_fill(in_support & ~empty[..., None], float("-inf"))
    return outside.logsumexp(-1).masked_fill(empty, float("-inf"))


def topk(logp: torch.Tensor, k: int, vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k most probable tokens per row among ids < vocab (descending), their log-probs, and the
    log tail mass (padding rows included)."""
    values, indices = logp[:, :vocab].topk(k, dim=-1)
    return indices, values, log_tail_mass(logp, indices)


def sorted_union(a: torch.Tensor, b: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Row-wise union of two index tensors, ascending, duplicates and pads removed, -1 padded.

    The width is the largest union of any row.
    """
    sentinel = vocab_size  # sorts after every real id
    both = torch.cat([a, b], dim=-1)
    both = both.masked_fill(both < 0, sentinel).sort(dim=-1).values
    duplicate = torch.zeros_like(both, dtype=torch.bool)
    duplicate[:, 1:] = both[:, 1:] == both[:, :-1]
    both = both.masked_fill(duplicate, sentinel).sort(dim=-1).values
    width = int((both < sentinel).sum(-1).max()) if both.numel() else 0
    both = both[:, :width]
    return both.masked_fill(both == sentinel, PAD)


def union_with_topk(
    logp: torch.Tensor, requested: torch.Tensor, k: int, vocab: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support = requested indices of each row united with the model's top-k among ids < vocab
    (k may be 0).

    Returns (indices ascending, -1 padded; their log-probs; log tail mass).
    """
    extra = logp[:, :vocab].topk(k, dim=-1).indices if k > 0 else requested[:, :0]
    indices = sorted_union(requested, extra, logp.shape[-1])
    return indices, gather(logp, indices), log_tail_mass(logp, indices)


def sample(
    logp: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0, vocab: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw n tokens per row from the proposal q ∝ pi^(1/T) on ids < vocab by inverse CDF of
    `uniforms` (P, n).

    Returns (indices, log pi at them, importance weights w = pi(a) / (n q(a))), so that
    sum_j w[i, j] f(indices[i, j]) is an unbiased estimate of sum_a pi(a | s_i) f(a).
    Drawing from given uniforms keeps the draws independent of how positions are chunked. The
    CDF is accumulated in float64: in float32 the running sum stops growing long before the end
    of a large vocabulary (at T = 0.5 and V = 128k, a fifth of pi's mass could never be drawn).
    With padding rows cut off (`vocab < V`) the estimate is of sum_{a < vocab} pi(a) f(a): q is
    normalised over the real ids, while the values stay pi's own log-probs.
    """
    if vocab is not None and vocab < logp.shape[-1]:
        logp = logp[:, :vocab]
        log_q = (logp / temperature).log_softmax(-1)
    else:
        log_q = logp if temperature == 1.0 else (logp / temperature).log_softmax(-1)
    cdf = log_q.double().exp().cumsum(-1)
    cdf = cdf / cdf[:, -1:]  # guard against round-off leaving the last bucket short of 1
    indices = torch.searchsorted(cdf, uniforms.double().contiguous(), right=True).clamp(max=logp.shape[-1] - 1)
    values = logp.gather(-1, indices)
    n = uniforms.shape[-1]
    weights = (values - log_q.gather(-1, indices)).exp() / n
    return indices, values, weights


def lookup(support: torch.Tensor, values: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """values at `query` ids, read from rows of an ascending, -1 padded `support`.

    Every valid query id must be in its row's support; pads in `query` read 0.
    """
    sentinel = torch.iinfo(torch.int64).max
    keys = support.to(torch.int64).masked_fill(support < 0, sentinel)
    pos = torch.searchsorted(keys, query.to(torch.int64).clamp(min=0)).clamp(max=keys.shape[-1] - 1)
    found = keys.gather(-1, pos) == query
    valid = query >= 0
    if not bool(found[valid].all()):
        raise ValueError("lookup: a queried index is missing from the support")
    return values.gather(-1, pos).masked_fill(~valid, 0.0)


def advantage(logp_dpo: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """A = beta * (log pi_dpo - log pi_ref); 0 where both are -inf (an empty tail bucket)."""
    both_empty = torch.isneginf(logp_dpo) & torch.isneginf(logp_ref)
    return (beta * (logp_dpo - logp_ref)).masked_fill(both_empty, 0.0)
