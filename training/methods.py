"""Distillation methods as declarative specs: one registry, `METHODS`, read by the config and the trainer.

A `MethodSpec` says what a method asks the teacher for (`signal`), which responses the teacher
scores (`sides`), its own defaults (written here once), the supports it accepts, and its loss:
a function from the student's logits and the teacher's signals to `(loss, named parts)`. The
trainer runs the forwards and calls `spec.loss`; it never branches on a method's name.

To add a method: write its math in `losses.py` (a pure function on tensors), a loss function
below composing it, and one `MethodSpec` in `METHODS`. `DistillConfig(method=...)`,
`adpa train METHOD` and the docs' method list pick it up from there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from adpa.training import losses
from adpa.training.batch import TeacherSignals, TokenBatch

Signal = Literal["logprobs", "advantage"]
# What the teacher scores, per micro-batch:
#   "chosen":  y_w only;
#   "pair":    y_w and y_l, in one request;
#   "samples": the student's samples y_hat (y_w still feeds the SFT term, on the student side only).
Sides = Literal["chosen", "pair", "samples"]
SUPPORTS = ("topk", "indices", "dense", "sampled")
# The losses that read a support as a list of tokens (argmax, a softmax over it) have no
# importance-weighted form: they take the deterministic supports only.
_DETERMINISTIC = ("topk", "indices", "dense")

# Defaults of the `DistillConfig` fields a method may override (fields left at None there).
COMMON_DEFAULTS: dict[str, Any] = {"gamma": 1.0, "support_k": 32}


@dataclass
class Scored:
    """One response kind of a micro-batch, as a loss sees it."""

    batch: TokenBatch  # targets (B, T) and mask (B, T) of the scored positions
    logits: torch.Tensor  # (B, T, V): the student's
    signals: TeacherSignals | None  # the teacher's answer on the same grid; None where not sent


@dataclass
class LossInputs:
    """Everything a method's loss reads: the student's forwards, the teacher's signals, the weights."""

    chosen: Scored  # y_w
    other: Scored | None  # y_l ("pair"), y_hat ("samples"), None ("chosen")
    alpha: float = 0.1
    gamma: float = 1.0
    sft_weight: float = 1.0
    beta: float = 0.1  # the teacher's advantage scale (its handshake; a local teacher's --beta)
    reduction: losses.Reduction = "mean"
    support_floor: float | None = None
    floor_penalty: float | None = None


LossOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]  # (loss, named parts for logging)
LossFn = Callable[[LossInputs], LossOutput]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    signal: Signal  # what the teacher is asked for
    sides: Sides  # which responses the teacher scores
    loss: LossFn
    parts: tuple[str, ...]  # the named parts `loss` returns (logged as their means)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # overrides of COMMON_DEFAULTS
    supports: tuple[str, ...] = SUPPORTS  # the `support` settings it accepts

    @property
    def uses_samples(self) -> bool:
        return self.sides == "samples"

    @property
    def teacher_batches(self) -> tuple[str, ...]:
        """The batches of a staged micro-batch (`chosen`, `other`) sent to the teacher, in request order."""
        return {"chosen": ("chosen",), "pair": ("chosen", "other"), "samples": ("other",)}[self.sides]

    def default(self, name: str) -> Any:
        return self.defaults.get(name, COMMON_DEFAULTS[name])


# -- shared terms ----------------------------------------------------------------------------


def _sft(x: LossInputs) -> torch.Tensor:
    """L_SFT on y_w."""
    return losses.sft_loss(x.chosen.logits, x.chosen.batch.targets, x.chosen.batch.mask, reduction=x.reduction)


def _kl(side: Scored, reduction: losses.Reduction) -> torch.Tensor:
    """KL(pi_dpo || pi_theta) on one response, reduced over its own positions (importance-weighted
    draws for a sampled support)."""
    s = side.signals
    if s.weights is not None:
        return losses.sampled_kl(s.indices, s.values, s.weights, side.logits, side.batch.mask, reduction=reduction)
    return losses.kl_loss(s.indices, s.values, s.tail, side.logits, side.batch.mask, reduction=reduction)


def _advantage(x: LossInputs, *, from_logprobs: bool = False):
    """(indices or None for dense, A on the support, A_tail or None) on the samples.

    `from_logprobs`: the teacher sent log pi_dpo, and A = beta * log pi_dpo (no reference). The
    support floor applies where the teacher sent both models' log-probs (include_logprobs).
    """
    s = x.other.signals
    values, tail = s.values, s.tail
    if from_logprobs:
        values = losses.advantage_without_reference(values, x.beta)
        tail = losses.advantage_without_reference(tail, x.beta) if tail is not None else None
    if x.support_floor is not None and s.logprobs is not None:
        values = losses.support_floor(
            values, s.logprobs, s.reference_logprobs, floor=x.support_floor, penalty=x.floor_penalty, tail=tail,
        )
    return s.indices, values, tail


def _token_ids(indices: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    """The support's token ids; a dense answer's support is the whole vocabulary, in order."""
    if indices is not None:
        return indices
    return torch.arange(values.shape[-1], device=values.device).expand_as(values)


def _with_sft(x: LossInputs, term: torch.Tensor) -> LossOutput:
    """sft_weight * L_SFT(y_w) + the term on the samples."""
    sft = _sft(x)
    return x.sft_weight * sft + term, {"sft": sft, "advantage_term": term}


def _adpa_term(x: LossInputs, indices, values, tail, teacher_logprobs=None) -> torch.Tensor:
    """-gamma * mean_t G_t: dense, on the support with its tail bucket, or importance-weighted draws
    (which need log pi_dpo at the draws)."""
    mask = x.other.batch.mask
    weights = x.other.signals.weights
    if weights is not None:
        return losses.sampled_adpa_loss(indices, values, teacher_logprobs, weights, x.other.logits, mask,
                                        gamma=x.gamma, reduction=x.reduction)
    if indices is None:
        return losses.dense_adpa_loss(values, x.other.logits, mask, gamma=x.gamma, reduction=x.reduction)
    return losses.sparse_adpa_loss(indices, values, tail, x.other.logits, mask, gamma=x.gamma, reduction=x.reduction)


# -- the methods' losses ---------------------------------------------------------------------


def dckd(x: LossInputs) -> LossOutput:
    """sft_weight * L_SFT(y_w) + alpha * (KL(y_w) + KL(y_l))."""
    sft, kl_chosen, kl_rejected = _sft(x), _kl(x.chosen, x.reduction), _kl(x.other, x.reduction)
    loss = losses.dckd_loss(sft, kl_chosen, kl_rejected, alpha=x.alpha, sft_weight=x.sft_weight)
    return loss, {"sft": sft, "kl_chosen": kl_chosen, "kl_rejected": kl_rejected}


def dckd_no_rejected(x: LossInputs) -> LossOutput:
    """sft_weight * L_SFT(y_w) + alpha * KL(y_w)."""
    sft, kl_chosen = _sft(x), _kl(x.chosen, x.reduction)
    loss = losses.dckd_loss(sft, kl_chosen, None, alpha=x.alpha, sft_weight=x.sft_weight)
    return loss, {"sft": sft, "kl_chosen": kl_chosen}


def vanilla_kd(x: LossInputs) -> LossOutput:
    """KL(y_w) alone; L_SFT(y_w) is logged, not trained on."""
    kl_chosen = _kl(x.chosen, x.reduction)
    return kl_chosen, {"sft": _sft(x).detach(), "kl_chosen": kl_chosen}


def adpa(x: LossInputs) -> LossOutput:
    """sft_weight * L_SFT(y_w) - gamma * mean_t G_t on y_hat, A the service's advantage."""
    return _with_sft(x, _adpa_term(x, *_advantage(x), teacher_logprobs=x.other.signals.logprobs))


def adpa_no_ref(x: LossInputs) -> LossOutput:
    """As `adpa`, with A = beta * log pi_dpo (tail: beta * log tail_dpo)."""
    return _with_sft(x, _adpa_term(x, *_advantage(x, from_logprobs=True), teacher_logprobs=x.other.signals.values))


def adpa_release(x: LossInputs) -> LossOutput:
    """sft_weight * L_SFT - gamma * mean_t sum_{a in S_t} q(a) clamp(A(a) / beta, 1e-8, 1), no tail."""
    indices, values, _ = _advantage(x)
    clamped = losses.release_advantage(values / x.beta)
    term = losses.release_adpa_loss(_token_ids(indices, values), clamped, x.other.logits, x.other.batch.mask,
                                    gamma=x.gamma, reduction=x.reduction)
    return _with_sft(x, term)


def q_argmax(x: LossInputs) -> LossOutput:
    """sft_weight * L_SFT + gamma * mean_t -log q(argmax_{a in S_t} A(a))."""
    indices, values, _ = _advantage(x)
    ce = losses.q_argmax_kd_loss(_token_ids(indices, values), values, x.other.logits, x.other.batch.mask,
                                 reduction=x.reduction)
    return _with_sft(x, x.gamma * ce)


def q_softmax(x: LossInputs) -> LossOutput:
    """sft_weight * L_SFT + gamma * mean_t KL(softmax(A on S_t) || q renormalised on S_t)."""
    indices, values, _ = _advantage(x)
    kl = losses.q_softmax_kd_loss(_token_ids(indices, values), values, x.other.logits, x.other.batch.mask,
                                  reduction=x.reduction)
    return _with_sft(x, x.gamma * kl)


# -- the registry ----------------------------------------------------------------------------

_PAIR_PARTS = ("sft", "kl_chosen")
_SAMPLE_PARTS = ("sft", "advantage_term")

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("dckd", "SFT(y_w) + alpha * (KL(pi_dpo || pi_theta) on y_w + on y_l)",
               "logprobs", "pair", dckd, (*_PAIR_PARTS, "kl_rejected")),
    MethodSpec("dckd-no-rejected", "SFT(y_w) + alpha * KL on y_w only (ablation)",
               "logprobs", "chosen", dckd_no_rejected, _PAIR_PARTS),
    MethodSpec("vanilla-kd", "KL(pi_dpo || pi_theta) on y_w, no SFT term",
               "logprobs", "chosen", vanilla_kd, _PAIR_PARTS),
    MethodSpec("adpa", "SFT(y_w) - gamma * E_t sum_a pi_theta(a) A(a) on student samples",
               "advantage", "samples", adpa, _SAMPLE_PARTS),
    MethodSpec("adpa-no-ref", "ADPA with A = beta * log pi_dpo (ablation: no reference)",
               "logprobs", "samples", adpa_no_ref, _SAMPLE_PARTS),
    MethodSpec("adpa-release", "the paper release: A clamped to [1e-8, 1], no beta, teacher top-k only, no tail bucket",
               "advantage", "samples", adpa_release, _SAMPLE_PARTS,
               defaults={"gamma": 1.6, "support_k": 50}, supports=("topk",)),
    MethodSpec("q-argmax", "SFT(y_w) + CE to argmax_a A(a) on samples",
               "advantage", "samples", q_argmax, _SAMPLE_PARTS, supports=_DETERMINISTIC),
    MethodSpec("q-softmax", "SFT(y_w) + KL(softmax(A) || pi_theta) on samples",
               "advantage", "samples", q_softmax, _SAMPLE_PARTS, supports=_DETERMINISTIC),
)}


def get_method(name: str) -> MethodSpec:
    """The method registered under `name`; an unknown name raises ValueError listing the valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid names: {', '.join(METHODS)}") from None


def default_note(name: str) -> str:
    """'default 1.0; 1.6 for adpa-release': a field's common default and the methods that override it."""
    overrides = [f"{spec.default(name)} for {spec.name}" for spec in METHODS.values() if name in spec.defaults]
    return "; ".join([f"default {COMMON_DEFAULTS[name]}", *overrides])
