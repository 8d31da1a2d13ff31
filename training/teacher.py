"""Where a student trainer gets teacher signals: a `Teacher` (adpa.client), two ways.

- `TeacherClient` (adpa.client): the teacher service over gRPC, for real runs.
- `LocalTeacher`: the same ScoringService in this process, for small runs and tests.

Both answer `score(sequences, ranges, signal=..., support=...)` with the same ScoreResult (the
local one rounds through the wire encoding too), so a run against either gives the same numbers.

    teacher = connect_teacher("grpc://10.0.0.5:50051,10.0.0.6:50051")
    teacher = connect_teacher("local:runs/dpo-teacher", reference="runs/sft-teacher", beta=0.1)
"""

from __future__ import annotations

import os

from adpa import codec
from adpa.client import Teacher, TeacherClient
from adpa.protocol import ModelInfo, ScoreQuery, ScoreResult
from adpa.services.engine import ScoringEngine
from adpa.services.reference import LocalReference
from adpa.services.scoring import ScoringService


class LocalTeacher(Teacher):
    """A teacher (and its reference) held in this process: the service's logic without transport."""

    where = " (in process)"

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

    def info(self, timeout: float | None = None, *, refresh: bool = False) -> ModelInfo:
        return self.service.info()

    def _answer(self, query: ScoreQuery, timeout: float | None) -> ScoreResult:
        # Through the wire encoding and back, so both implementations round every tensor alike.
        result = self.service.score(query)
        return codec.result_from_pb(codec.result_to_pb(result, query.request_id, query.value_dtype))


def connect_teacher(
    spec: str, *, reference: str | None = None, beta: float = 0.1, token: str | None = None, timeout: float = 300.0
) -> Teacher:
    """'local:PATH' (with `reference`), or comma-separated endpoints 'grpc://host:port,...'.

    `token` defaults to the ADPA_TEACHER_TOKEN environment variable (kept out of `ps`, unlike a flag).
    """
    if spec.startswith("local:"):
        return LocalTeacher.from_paths(spec.removeprefix("local:"), reference, beta=beta)
    token = token or os.environ.get("ADPA_TEACHER_TOKEN") or None
    return TeacherClient(spec.split(","), token=token, timeout=timeout)
