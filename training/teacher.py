"""Where a student trainer gets teacher signals: one interface, two implementations.

- `TeacherClient` (adpa.client): the teacher service over gRPC, for real runs.
- `LocalTeacher`: the same ScoringService in this process, for small runs and tests.

Both answer `score(sequences, ranges, signal=..., support=...)` with the same ScoreResult, so a
run against either gives the same numbers.

    teacher = connect_teacher("grpc://10.0.0.5:50051,10.0.0.6:50051")
    teacher = connect_teacher("local:runs/dpo-teacher", reference="runs/sft-teacher", beta=0.1)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from adpa.client import TeacherClient, check_compatible
from adpa.services import convert
from adpa.services.engine import ScoringEngine
from adpa.services.protocol import ModelInfo, ScoreQuery, ScoreResult, SignalName, SupportSpec
from adpa.services.scoring import LocalReference, ScoringService


class Teacher(Protocol):
    def info(self) -> ModelInfo: ...

    def check_compatible(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int | None = None) -> ModelInfo: ...

    def score(
        self,
        sequences: Sequence[torch.Tensor],
        ranges: Sequence[tuple[int, int]],
        *,
        signal: SignalName = "logprobs",
        support: SupportSpec = SupportSpec("topk", k=32),
        value_dtype: str = "FP32",
        include_logprobs: bool = False,
    ) -> ScoreResult: ...


class LocalTeacher:
    """A teacher (and its reference) held in this process: the service's logic without transport."""

    def __init__(self, service: ScoringService):
        self.service = service

    @classmethod
    def from_paths(
        cls, teacher: str, reference: str | None = None, *, beta: float = 0.1, device: str = "cpu",
        dtype: str = "float32",
    ) -> LocalTeacher:
        engine = ScoringEngine.from_pretrained(teacher, device=device, dtype=dtype)
        ref = LocalReference(ScoringEngine.from_pretrained(reference, device=device, dtype=dtype)) if reference else None
        return cls(ScoringService(engine, role="teacher" if ref else "reference", reference=ref, beta=beta))

    def info(self) -> ModelInfo:
        return self.service.info()

    def check_compatible(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int | None = None) -> ModelInfo:
        return check_compatible(self.info(), tokenizer, vocab_size, where=" (in process)")

    def score(self, sequences, ranges, *, signal="logprobs", support=SupportSpec("topk", k=32), value_dtype="FP32",
              include_logprobs=False) -> ScoreResult:
        query = ScoreQuery(
            sequences=[torch.as_tensor(s, dtype=torch.long).cpu() for s in sequences],
            ranges=list(ranges), signal=signal, support=support, value_dtype=value_dtype,
            include_logprobs=include_logprobs,
        )
        # Through the wire encoding and back, so both implementations round every tensor alike.
        return convert.result_from_pb(convert.result_to_pb(self.service.score(query), "", value_dtype))


def connect_teacher(
    spec: str, *, reference: str | None = None, beta: float = 0.1, token: str | None = None, timeout: float = 300.0
) -> Teacher:
    """'local:PATH' (with `reference`), or comma-separated endpoints 'grpc://host:port,...'."""
    if spec.startswith("local:"):
        return LocalTeacher.from_paths(spec.removeprefix("local:"), reference, beta=beta)
    return TeacherClient(spec.split(","), token=token, timeout=timeout)
