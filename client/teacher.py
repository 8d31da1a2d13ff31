"""`Teacher`: what a student trainer asks for signals, whatever answers (a service or this process).

`score()` is written once, here: it checks the arguments, splits a large batch into queries that
fit the answering side's limits, checks every answer's fingerprints against the handshake, and
joins the answers back. Subclasses only say how one query is answered (`_answer`) and what the
handshake says (`info`): `TeacherClient` over gRPC, `adpa.training.teacher.LocalTeacher` in
process.
"""

from __future__ import annotations

import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch
from transformers import PreTrainedTokenizerBase

from adpa.fingerprint import tokenizer_fingerprint
from adpa.protocol import ModelInfo, ScoreQuery, ScoreResult, SignalName, SupportSpec, answer_bytes_per_position


logger = logging.getLogger(__name__)


class IncompatibleTeacher(RuntimeError):
    """The teacher's tokenizer or vocabulary differs from the student's."""


class TeacherChanged(RuntimeError):
    """An answer came from other model weights than the handshake's (a service restarted with another
    model): signals of two model versions must never be mixed, so the caller has to stop."""


def check_compatible(
    info: ModelInfo, tokenizer: PreTrainedTokenizerBase, vocab_size: int | None = None, where: str = ""
) -> ModelInfo:
    """Raise IncompatibleTeacher unless the student's tokenizer is the teacher's.

    The tokenizer decides, not the output sizes: the teacher's signals live on the shared real ids
    [0, `info.model.shared_vocab`), and a student whose logits are wider (padding rows) or
    narrower than the teacher's trains on that range. `vocab_size` is the student model's output
    size (default len(tokenizer)); it must cover the shared range.
    """
    ours = tokenizer_fingerprint(tokenizer)
    vocab = vocab_size if vocab_size is not None else len(tokenizer)
    model = info.model
    if ours != model.tokenizer_hash or vocab < model.shared_vocab:
        raise IncompatibleTeacher(
            f"teacher {model.model_name}{where} has tokenizer {model.tokenizer_hash} ({model.tokenizer_size} tokens, "
            f"vocab size {model.vocab_size}); the student has tokenizer {ours} ({len(tokenizer)} tokens, vocab size "
            f"{vocab}). Signals are per token id, so both must use the same tokenizer."
        )
    logger.info("teacher %s%s: tokenizer %s, teacher vocab %d, student vocab %d, signals on the shared %d ids",
                model.model_name, where, ours, model.vocab_size, vocab, model.shared_vocab)
    return info


class Teacher(ABC):
    """Teacher (or reference) signals at the scored positions of token sequences."""

    #: Where the answers come from, for messages (" at grpc://...", " (in process)").
    where: str = ""
    #: The largest message the caller side accepts (an answer is split to fit it).
    max_message_bytes: int = 64 << 20
    #: Seconds a `score()` call may take when it gives no `timeout` (None: no deadline).
    timeout: float | None = None

    @abstractmethod
    def info(self, timeout: float | None = None, *, refresh: bool = False) -> ModelInfo:
        """The handshake: fingerprints and limits (cached after the first call unless `refresh`)."""

    @abstractmethod
    def _answer(self, query: ScoreQuery, timeout: float | None) -> ScoreResult:
        """Answer one query that fits the limits of the handshake."""

    def _answered_where(self) -> str:
        """Where the last answer on this thread came from, for messages (one endpoint of several)."""
        return self.where

    def close(self) -> None:
        pass

    def __enter__(self) -> Teacher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_compatible(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int | None = None) -> ModelInfo:
        """Refuse a teacher whose tokenizer or vocabulary differs from the student's.

        `vocab_size` is the student model's output size (defaults to len(tokenizer)).
        """
        return check_compatible(self.info(), tokenizer, vocab_size, where=self.where)

    def score(
        self,
        sequences: Sequence[torch.Tensor | Sequence[int]],
        ranges: Sequence[tuple[int, int]],
        *,
        signal: SignalName = "logprobs",
        support: SupportSpec = SupportSpec("topk", k=32),
        value_dtype: str = "FP32",
        include_logprobs: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> ScoreResult:
        """Signals at the scored positions of each sequence; rows in request order.

        Position i of a sequence is the distribution of the token after ids[i] (logits[i]), so a
        response in tokens [p, L) is scored with the range (p - 1, L - 1).

        `timeout` (default `self.timeout`) covers the whole call: the handshake when it is not
        cached yet, every part of a split batch and every retry.
        """
        sequences = [torch.as_tensor(s, dtype=torch.long).cpu() for s in sequences]
        ranges = [(int(a), int(b)) for a, b in ranges]
        if len(ranges) != len(sequences):
            raise ValueError(f"{len(sequences)} sequences but {len(ranges)} ranges")
        request_id = request_id or uuid.uuid4().hex[:16]
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout

        def remaining() -> float | None:
            return None if deadline is None else deadline - time.monotonic()

        info = self.info(remaining())
        results = []
        row = 0
        for part, (lo, hi) in enumerate(self._split(info, sequences, ranges, support, value_dtype, include_logprobs)):
            rows = sum(e - s for s, e in ranges[lo:hi])
            spec = support
            if support.indices is not None:
                spec = replace(support, indices=support.indices[row : row + rows])
            if part > 0 and support.kind == "sampled":  # fresh draws for each part of a split batch
                spec = replace(spec, seed=(support.seed * 1_000_003 + part) % 2**63)
            row += rows
            query = ScoreQuery(
                sequences=sequences[lo:hi],
                ranges=ranges[lo:hi],
                signal=signal,
                support=spec,
                value_dtype=value_dtype,
                include_logprobs=include_logprobs,
                request_id=f"{request_id}.{part}",
            )
            answer = self._answer(query, remaining())
            if answer.model != info.model or (signal == "advantage" and answer.reference != info.reference):
                raise TeacherChanged(_changed_message(answer, info, signal, self._answered_where()))
            results.append(answer)
        return results[0] if len(results) == 1 else _concat(results)

    def _split(
        self, info: ModelInfo, sequences, ranges, support: SupportSpec, value_dtype: str, include_logprobs: bool
    ) -> Iterator[tuple[int, int]]:
        """Yield [lo, hi) slices of the batch whose requests and answers fit the limits."""
        limits = info.limits
        per_position = answer_bytes_per_position(support, value_dtype, info.model.shared_vocab, include_logprobs)
        per_position += 4 * (support.indices.shape[1] if support.indices is not None else 0) + 16  # request + framing
        budget = int(0.8 * min(limits.max_message_bytes, self.max_message_bytes))
        max_positions = limits.max_dense_positions if support.kind == "dense" else limits.max_positions
        lo, positions, size = 0, 0, 0
        for b, (seq, (start, end)) in enumerate(zip(sequences, ranges)):
            p = end - start
            cost = p * per_position + 4 * len(seq)
            if b > lo and (positions + p > max_positions or size + cost > budget):
                yield lo, b
                lo, positions, size = b, 0, 0
            positions += p
            size += cost
        yield lo, len(sequences)


def _changed_message(answer: ScoreResult, info: ModelInfo, signal: SignalName, where: str) -> str:
    def models(model, reference) -> str:
        ref = f", reference {reference.model_name} ({reference.model_hash})" if reference is not None else ""
        return f"model {model.model_name} ({model.model_hash}){ref}"

    reference = info.reference if signal == "advantage" else None
    return (
        f"the teacher{where} (replica {answer.replica or '?'}) now serves {models(answer.model, answer.reference)}, "
        f"not the {models(info.model, reference)} of the handshake; signals from two model versions must not "
        "be mixed, so this run stops here. Restore that model on the service, or start a new run (a new "
        "handshake) against the new one."
    )


def _pad_cat(parts: list[torch.Tensor | None], fill: float) -> torch.Tensor | None:
    if parts[0] is None:
        return None
    if parts[0].dim() == 1:
        return torch.cat(parts)
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=fill) for p in parts])


def _concat(results: list[ScoreResult]) -> ScoreResult:
    """Join the answers of a split batch back into one, padding supports to a common width."""
    first = results[0]
    return ScoreResult(
        signal=first.signal,
        support=first.support,
        model=first.model,
        reference=first.reference,
        indices=_pad_cat([r.indices for r in results], -1),
        values=_pad_cat([r.values for r in results], 0.0),
        tail=_pad_cat([r.tail for r in results], 0.0),
        weights=_pad_cat([r.weights for r in results], 0.0),
        extras={k: _pad_cat([r.extras[k] for r in results], 0.0) for k in first.extras},
        replica=",".join(sorted({r.replica for r in results})),
    )
