"""The scoring service: request validation and the teacher/reference logic, for any transport.

A reference answers LOGPROBS. A teacher answers LOGPROBS from pi_dpo, and ADVANTAGE
A = beta * (log pi_dpo - log pi_ref), exact at every returned index: pi_dpo chooses the support,
then pi_ref (in process or remote) is asked for exactly those indices. The gRPC servicer and the
HTTP routes wrap this one class; any other server (a Ray Serve deployment, say) can do the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import grpc
import torch

from adpa import __version__
from adpa.services import support as sup
from adpa.services.engine import ScoringEngine
from adpa.services.errors import Internal, InvalidArgument, OutOfRange, ResourceExhausted, Unavailable
from adpa.services.protocol import (
    Limits,
    ModelFingerprint,
    ModelInfo,
    Role,
    ScoreQuery,
    ScoreResult,
    SupportSpec,
    SupportValues,
    VALUE_BYTES,
    answer_bytes_per_position,
)

if TYPE_CHECKING:
    from adpa.client import TeacherClient

StopFn = Callable[[], bool]


class ReferenceModel(Protocol):
    """Where a teacher gets pi_ref: an engine in the same process or a remote reference service."""

    @property
    def fingerprint(self) -> ModelFingerprint: ...

    def score(
        self, sequences: list[torch.Tensor], ranges: list[tuple[int, int]], support: SupportSpec, should_stop: StopFn | None
    ) -> SupportValues: ...

    def ready(self) -> bool: ...


class LocalReference:
    """pi_ref in the same process: one more forward, no transfer."""

    def __init__(self, engine: ScoringEngine):
        self.engine = engine

    @property
    def fingerprint(self) -> ModelFingerprint:
        return self.engine.fingerprint

    def score(self, sequences, ranges, support, should_stop=None) -> SupportValues:
        return self.engine.score(sequences, ranges, support, should_stop)

    def ready(self) -> bool:
        return True


class RemoteReference:
    """pi_ref behind a reference endpoint, asked only for the indices a teacher needs."""

    def __init__(self, client: TeacherClient):
        self.client = client
        self._fingerprint: ModelFingerprint | None = None

    @property
    def fingerprint(self) -> ModelFingerprint:
        if self._fingerprint is None:
            self._fingerprint = self.client.info().model
        return self._fingerprint

    def score(self, sequences, ranges, support, should_stop=None) -> SupportValues:
        try:
            answer = self.client.score(sequences, ranges, signal="logprobs", support=support, value_dtype="FP32")
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(f"reference model unavailable ({err.code().name}): {err.details()}") from None
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise ResourceExhausted(f"reference model busy: {err.details()}", retry_after_ms=1000) from None
            # The teacher built this request: a refusal is this deployment's fault, not the caller's.
            raise Internal(f"reference model refused the teacher's request ({err.code().name}): {err.details()}") from None
        return SupportValues(indices=answer.indices, logprobs=answer.values, log_tail=answer.tail)

    def max_indices(self) -> int:
        return self.client.info().limits.max_indices

    def ready(self) -> bool:
        try:
            self.client.info(timeout=2.0)
            return True
        except Exception:
            return False


def reference_at(
    reference: ReferenceModel,
    sequences: list[torch.Tensor],
    ranges: list[tuple[int, int]],
    indices: torch.Tensor | None,
    should_stop: StopFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi_ref at `indices` (P, m) (or everywhere when None), and its log tail mass outside them."""
    if indices is None:
        dense = reference.score(sequences, ranges, SupportSpec("dense"), should_stop)
        return dense.logprobs, None
    # Ask for each distinct id once (sampled supports repeat ids), then read them back in order.
    unique = sup.sorted_union(indices, indices[:, :0], reference.fingerprint.vocab_size)
    answer = reference.score(sequences, ranges, SupportSpec("indices", k=0, indices=unique), should_stop)
    return sup.lookup(answer.indices, answer.logprobs, indices), answer.log_tail


class ScoringService:
    """Validates queries and answers them with one model (reference) or two (teacher)."""

    def __init__(
        self,
        engine: ScoringEngine,
        *,
        role: Role,
        reference: ReferenceModel | None = None,
        beta: float = 0.1,
        limits: Limits = Limits(),
    ):
        if role == "teacher" and reference is None:
            raise ValueError("a teacher needs a reference model (in process or remote)")
        if role == "reference" and reference is not None:
            raise ValueError("a reference service does not take a reference model")
        self.engine = engine
        self.role = role
        self.reference = reference
        self.beta = beta
        self.limits = limits
        if reference is not None:
            check_same_tokenizer(engine.fingerprint, reference.fingerprint)
        if isinstance(reference, RemoteReference):
            # The widest support the teacher may forward: an INDICES support, or n distinct draws.
            widest = min(engine.vocab_size, max(limits.max_indices, limits.max_samples))
            if reference.max_indices() < widest:
                raise ValueError(
                    f"the reference accepts {reference.max_indices()} indices per position, but this teacher may "
                    f"forward {widest} (its max_indices or max_samples); start the reference with "
                    f"--max-indices {widest} or lower the teacher's limits"
                )

    def info(self) -> ModelInfo:
        return ModelInfo(
            role=self.role,
            model=self.engine.fingerprint,
            reference=self.reference.fingerprint if self.reference else None,
            beta=self.beta if self.role == "teacher" else 0.0,
            server_version=__version__,
            limits=self.limits,
        )

    def ready(self) -> bool:
        return self.reference is None or self.reference.ready()

    def score(self, query: ScoreQuery, should_stop: StopFn | None = None) -> ScoreResult:
        self.validate(query)
        own = self.engine.score(query.sequences, query.ranges, query.support, should_stop)
        if query.signal == "logprobs":
            return ScoreResult(
                signal="logprobs",
                support=query.support.kind,
                model=self.engine.fingerprint,
                reference=None,
                indices=own.indices,
                values=own.logprobs,
                tail=own.log_tail,
                weights=own.weights,
            )
        ref_logp, ref_tail = reference_at(self.reference, query.sequences, query.ranges, own.indices, should_stop)
        extras = {}
        if query.include_logprobs:
            extras = {"logprobs": own.logprobs, "reference_logprobs": ref_logp}
            if own.log_tail is not None:
                extras |= {"tail_logprobs": own.log_tail, "reference_tail_logprobs": ref_tail}
        return ScoreResult(
            signal="advantage",
            support=query.support.kind,
            model=self.engine.fingerprint,
            reference=self.reference.fingerprint,
            indices=own.indices,
            values=sup.advantage(own.logprobs, ref_logp, self.beta),
            tail=sup.advantage(own.log_tail, ref_tail, self.beta) if own.log_tail is not None else None,
            weights=own.weights,
            extras=extras,
        )

    # -- validation: every check names the offending value --------------------------------------

    def validate(self, query: ScoreQuery) -> None:
        limits, vocab = self.limits, self.engine.vocab_size
        if query.signal == "advantage" and self.role != "teacher":
            raise InvalidArgument("ADVANTAGE needs a teacher; this service is a reference (LOGPROBS only)")
        if query.signal not in ("logprobs", "advantage"):
            raise InvalidArgument(f"signal must be LOGPROBS or ADVANTAGE, got {query.signal!r}")
        if not query.sequences:
            raise InvalidArgument("the request holds no sequences")
        if len(query.ranges) != len(query.sequences):
            raise InvalidArgument(f"{len(query.sequences)} sequences but {len(query.ranges)} score ranges")
        for b, (seq, (start, end)) in enumerate(zip(query.sequences, query.ranges)):
            if len(seq) == 0:
                raise InvalidArgument(f"sequence {b} is empty")
            if len(seq) > self.engine.max_seq_len:
                raise OutOfRange(f"sequence {b} has {len(seq)} tokens, over max_seq_len {self.engine.max_seq_len}")
            bad = ((seq < 0) | (seq >= vocab)).nonzero()
            if len(bad):
                i = int(bad[0])
                raise InvalidArgument(
                    f"sequence {b} has token id {int(seq[i])} at index {i}, outside the vocabulary [0, {vocab})"
                )
            if not 0 <= start < end <= len(seq):
                raise OutOfRange(
                    f"score range [{start}, {end}) of sequence {b} must satisfy 0 <= start < end <= {len(seq)}"
                )
        positions = query.num_positions
        if positions > limits.max_positions:
            raise ResourceExhausted(
                f"{positions} scored positions in one request, over the limit {limits.max_positions}; split the batch"
            )
        if query.value_dtype not in VALUE_BYTES:
            raise InvalidArgument(f"value dtype must be one of {list(VALUE_BYTES)}, got {query.value_dtype!r}")
        self._validate_support(query.support, positions, vocab)
        answer_bytes = positions * answer_bytes_per_position(
            query.support, query.value_dtype, vocab, query.include_logprobs
        )
        if answer_bytes > limits.max_message_bytes:
            raise ResourceExhausted(
                f"the answer would take about {answer_bytes} bytes, over the message limit "
                f"{limits.max_message_bytes}; score fewer positions per request"
            )

    def _validate_support(self, support: SupportSpec, positions: int, vocab: int) -> None:
        limits = self.limits
        max_k = min(limits.max_k, vocab)
        if support.kind == "topk":
            if not 1 <= support.k <= max_k:
                raise InvalidArgument(f"TOPK needs 1 <= k <= {max_k}, got k={support.k}")
        elif support.kind == "indices":
            if not 0 <= support.k <= max_k:
                raise InvalidArgument(f"INDICES needs 0 <= k <= {max_k}, got k={support.k}")
            idx = support.indices
            if idx is None or idx.dim() != 2 or idx.shape[0] != positions:
                shape = None if idx is None else list(idx.shape)
                raise InvalidArgument(f"INDICES needs support.indices of shape [{positions}, m], got {shape}")
            if idx.shape[1] + support.k > limits.max_indices:
                raise InvalidArgument(
                    f"INDICES support of {idx.shape[1]} ids + k={support.k} per position, over the limit "
                    f"{limits.max_indices}"
                )
            if bool(((idx < -1) | (idx >= vocab)).any()):
                raise InvalidArgument(f"support.indices must be -1 (padding) or in [0, {vocab})")
            if support.k == 0 and not bool((idx >= 0).any(-1).all()):
                raise InvalidArgument("INDICES with k=0 needs at least one index (not -1) per position")
        elif support.kind == "sampled":
            if not 1 <= support.n <= limits.max_samples:
                raise InvalidArgument(f"SAMPLED needs 1 <= n <= {limits.max_samples}, got n={support.n}")
            if not (math.isfinite(support.temperature) and support.temperature > 0):
                raise InvalidArgument(f"SAMPLED needs a finite temperature > 0, got {support.temperature}")
        elif support.kind == "dense":
            if positions > limits.max_dense_positions:
                raise ResourceExhausted(
                    f"DENSE answers are capped at {limits.max_dense_positions} positions per request, got {positions}"
                )
        else:
            raise InvalidArgument(f"support kind must be TOPK, INDICES, SAMPLED or DENSE, got {support.kind!r}")


def check_same_tokenizer(teacher: ModelFingerprint, reference: ModelFingerprint) -> None:
    """A teacher and its reference must share a tokenizer, or their log-probs don't line up."""
    if teacher.tokenizer_hash != reference.tokenizer_hash or teacher.vocab_size != reference.vocab_size:
        raise ValueError(
            f"teacher {teacher.model_name} (tokenizer {teacher.tokenizer_hash}, vocab {teacher.vocab_size}) and "
            f"reference {reference.model_name} (tokenizer {reference.tokenizer_hash}, vocab {reference.vocab_size}) "
            "do not share a tokenizer"
        )
