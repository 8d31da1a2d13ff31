"""The scoring service: request validation and the teacher/reference logic, with no transport.

A reference answers LOGPROBS. A teacher answers LOGPROBS from pi_dpo, and ADVANTAGE
A = beta * (log pi_dpo - log pi_ref), exact at every returned index: pi_dpo chooses the support,
then pi_ref (a `ReferenceModel`: in process, over gRPC or through a Ray handle) is asked for
exactly those indices. Transports reach it through `adpa.services.frontend.Frontend`.
"""

from __future__ import annotations

import math

import torch

from adpa import __version__, sparse
from adpa.errors import InvalidArgument, OutOfRange, ResourceExhausted
from adpa.protocol import (
    MIN_TEMPERATURE,
    VALUE_BYTES,
    Limits,
    ModelFingerprint,
    ModelInfo,
    QuerySize,
    Role,
    ScoreQuery,
    ScoreResult,
    SupportSpec,
    answer_bytes_per_position,
)
from adpa.services.batching import StopFn
from adpa.services.engine import ScoringEngine
from adpa.services.reference import ReferenceModel, reference_at

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
            # The widest support the teacher may forward: an INDICES support, or n distinct draws.
            widest = min(engine.shared_vocab, max(limits.max_indices, limits.max_samples))
            accepted = reference.max_indices()
            if accepted is not None and accepted < widest:
                raise ValueError(
                    f"the reference accepts {accepted} indices per position, but this teacher may "
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

    def close(self) -> None:
        """Release the reference connection (the engines are freed with this object)."""
        if self.reference is not None:
            self.reference.close()

    def score(
        self, query: ScoreQuery, should_stop: StopFn | None = None, caller: str = "", deadline: float | None = None
    ) -> ScoreResult:
        """Validate and answer `query`; `caller` names who asks (fairness when requests are batched);
        `deadline` (a `time.monotonic()` instant) bounds the call to a remote reference."""
        self.validate(query)
        own = self.engine.score(query.sequences, query.ranges, query.support, should_stop, caller)
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
        ref_logp, ref_tail = reference_at(
            self.reference, query.sequences, query.ranges, own.indices, should_stop, caller, deadline
        )
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
            # A dense answer is on the shared ids; a reference with a longer real range is cut to them.
            values=sparse.advantage(own.logprobs, ref_logp[:, : own.logprobs.shape[-1]], self.beta),
            tail=sparse.advantage(own.log_tail, ref_tail, self.beta) if own.log_tail is not None else None,
            weights=own.weights,
            extras=extras,
        )

    # -- validation: every check names the offending value --------------------------------------

    def check_size(self, size: QuerySize) -> None:
        """Refuse a request whose counts are over the limits, from its sizes alone.

        Runs before a request is split into sequences (`codec.query_from_pb`, the HTTP schema), so
        a request that is cheap to send but costly to take apart is refused at once; its cost is
        O(B) vectorized work. Also checks the support's parameters, on which the answer's size
        depends. The content (ids, ranges, indices) is checked by `validate`.
        """
        limits, vocab = self.limits, self.engine.shared_vocab
        sequences = size.sequences
        if sequences == 0:
            raise InvalidArgument("the request holds no sequences")
        if sequences > limits.max_positions:
            raise ResourceExhausted(
                f"{sequences} sequences in one request, over the limit {limits.max_positions} (max_positions: every "
                "sequence scores at least one position); split the batch"
            )
        too_long = (size.lengths > self.engine.max_seq_len).nonzero()
        if len(too_long):
            b = int(too_long[0])
            raise OutOfRange(
                f"sequence {b} has {int(size.lengths[b])} tokens, over max_seq_len {self.engine.max_seq_len}"
            )
        positions = size.positions
        if positions > limits.max_positions:
            raise ResourceExhausted(
                f"{positions} scored positions in one request, over the limit {limits.max_positions}; split the batch"
            )
        if size.value_dtype not in VALUE_BYTES:
            raise InvalidArgument(f"value dtype must be one of {list(VALUE_BYTES)}, got {size.value_dtype!r}")
        self._check_support_parameters(size.support, positions, vocab)
        answer_bytes = positions * answer_bytes_per_position(
            size.support, size.value_dtype, vocab, size.include_logprobs
        )
        if answer_bytes > limits.max_message_bytes:
            raise ResourceExhausted(
                f"the answer would take about {answer_bytes} bytes, over the message limit "
                f"{limits.max_message_bytes}; score fewer positions per request"
            )

    def validate(self, query: ScoreQuery) -> None:
        """Everything `check_size` checks, then the content: ids, ranges and INDICES ids (vectorized)."""
        if query.signal == "advantage" and self.role != "teacher":
            raise InvalidArgument("ADVANTAGE needs a teacher; this service is a reference (LOGPROBS only)")
        if query.signal not in ("logprobs", "advantage"):
            raise InvalidArgument(f"signal must be LOGPROBS or ADVANTAGE, got {query.signal!r}")
        if len(query.ranges) != len(query.sequences):
            raise InvalidArgument(f"{len(query.sequences)} sequences but {len(query.ranges)} score ranges")
        size = QuerySize.of(query)
        self.check_size(size)
        vocab, lengths = self.engine.shared_vocab, size.lengths
        empty = (lengths == 0).nonzero()
        if len(empty):
            raise InvalidArgument(f"sequence {int(empty[0])} is empty")
        ids = torch.cat([s.reshape(-1) for s in query.sequences])
        bad = ((ids < 0) | (ids >= vocab)).nonzero()
        if len(bad):
            flat = int(bad[0])
            ends = lengths.cumsum(0)
            b = int(torch.searchsorted(ends, flat, right=True))
            i = flat - int(ends[b] - lengths[b])
            raise InvalidArgument(
                f"sequence {b} has token id {int(ids[flat])} at index {i}, outside the vocabulary [0, {vocab})"
            )
        start, end = size.ranges[:, 0], size.ranges[:, 1]
        broken = ~((start >= 0) & (start < end) & (end <= lengths))
        if bool(broken.any()):
            b = int(broken.nonzero()[0])
            raise OutOfRange(
                f"score range [{int(start[b])}, {int(end[b])}) of sequence {b} must satisfy "
                f"0 <= start < end <= {int(lengths[b])}"
            )
        self._check_indices(query.support, query.num_positions, vocab)

    def _check_support_parameters(self, support: SupportSpec, positions: int, vocab: int) -> None:
        """The support's scalar parameters (O(1)): they decide the answer's size."""
        limits = self.limits
        max_k = min(limits.max_k, vocab)
        if support.kind == "topk":
            if not 1 <= support.k <= max_k:
                raise InvalidArgument(f"TOPK needs 1 <= k <= {max_k}, got k={support.k}")
        elif support.kind == "indices":
            if not 0 <= support.k <= max_k:
                raise InvalidArgument(f"INDICES needs 0 <= k <= {max_k}, got k={support.k}")
            columns = support.indices.shape[-1] if support.indices is not None and support.indices.dim() else 0
            if columns + support.k > limits.max_indices:
                raise InvalidArgument(
                    f"INDICES support of {columns} ids + k={support.k} per position, over the limit "
                    f"{limits.max_indices}"
                )
        elif support.kind == "sampled":
            if not 1 <= support.n <= limits.max_samples:
                raise InvalidArgument(f"SAMPLED needs 1 <= n <= {limits.max_samples}, got n={support.n}")
            # Checked as the engine will use it: in fp32 (1e-300 is a float64 > 0, but 0 in fp32).
            used = torch.tensor(support.temperature, dtype=torch.float64).float().item()
            if not (math.isfinite(used) and used >= MIN_TEMPERATURE):
                raise InvalidArgument(
                    f"SAMPLED needs a finite temperature >= {MIN_TEMPERATURE}, got {support.temperature}"
                )
        elif support.kind == "dense":
            if positions > limits.max_dense_positions:
                raise ResourceExhausted(
                    f"DENSE answers are capped at {limits.max_dense_positions} positions per request, got {positions}"
                )
        else:
            raise InvalidArgument(f"support kind must be TOPK, INDICES, SAMPLED or DENSE, got {support.kind!r}")

    def _check_indices(self, support: SupportSpec, positions: int, vocab: int) -> None:
        """An INDICES support's ids: one row per scored position, each id a pad or in the vocabulary."""
        if support.kind != "indices":
            return
        idx = support.indices
        if idx is None or idx.dim() != 2 or idx.shape[0] != positions:
            shape = None if idx is None else list(idx.shape)
            raise InvalidArgument(f"INDICES needs support.indices of shape [{positions}, m], got {shape}")
        if bool(((idx < -1) | (idx >= vocab)).any()):
            raise InvalidArgument(f"support.indices must be -1 (padding) or in [0, {vocab})")
        if support.k == 0 and not bool((idx >= 0).any(-1).all()):
            raise InvalidArgument("INDICES with k=0 needs at least one index (not -1) per position")


class IncompatibleModels(ValueError):
    """A teacher and its reference whose signals cannot line up (another tokenizer)."""


def check_same_tokenizer(teacher: ModelFingerprint, reference: ModelFingerprint) -> None:
    """A teacher and its reference must share a tokenizer, or their log-probs don't line up.

    The tokenizer decides, not the output size: models that differ only in padding rows (a
    resized embedding matrix) share every real id, and signals live on those ids only.
    """
    if teacher.tokenizer_hash != reference.tokenizer_hash or reference.shared_vocab < teacher.shared_vocab:
        raise IncompatibleModels(
            f"teacher {teacher.model_name} (tokenizer {teacher.tokenizer_hash}, {teacher.tokenizer_size} tokens, "
            f"vocab {teacher.vocab_size}) and reference {reference.model_name} (tokenizer "
            f"{reference.tokenizer_hash}, {reference.tokenizer_size} tokens, vocab {reference.vocab_size}) do not "
            "share a tokenizer"
        )
