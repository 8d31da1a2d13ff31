"""The JSON side of the adpa.v1 contract: pydantic models that map 1:1 to the records.

FastAPI builds the OpenAPI schema served at /docs from these, so the schema and the records
cannot drift apart: each model has a `to_record` or `from_record`, and nothing else converts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field

from adpa.errors import InvalidArgument
from adpa.protocol import (
    Limits,
    ModelFingerprint,
    ModelInfo,
    QuerySize,
    Role,
    ScoreQuery,
    ScoreResult,
    SignalName,
    SupportName,
    SupportSpec,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Integers as the gRPC wire holds them (JSON integers are unbounded): an id or range of 2^63 is a 422,
# not an overflow deep inside the server.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
UInt64 = Annotated[int, Field(ge=0, le=2**64 - 1)]


class SupportJSON(_Strict):
    """Which tokens an answer covers at each scored position."""

    kind: SupportName = Field("topk", description="topk, indices, sampled or dense")
    k: Int32 = Field(8, description="TOPK: the teacher's k most probable tokens; INDICES: added to the caller's ids")
    n: Int32 = Field(0, description="SAMPLED: draws per position")
    seed: UInt64 = Field(0, description="SAMPLED: seed of the draws")
    temperature: float = Field(1.0, description="SAMPLED: proposal temperature, >= 0.01")
    indices: list[list[Int64]] | None = Field(None, description="INDICES: [P, m] ids per scored position, -1 pads")

    def to_record(self) -> SupportSpec:
        indices = None
        if self.indices is not None:
            width = max((len(r) for r in self.indices), default=0)
            padded = [r + [-1] * (width - len(r)) for r in self.indices]
            indices = torch.tensor(padded, dtype=torch.long).reshape(len(padded), width)
        return SupportSpec(self.kind, k=self.k, n=self.n, seed=self.seed, temperature=self.temperature,
                           indices=indices)


class ScoreRequestJSON(_Strict):
    """A scoring request (`ScoreQuery`); answers are FP32 JSON numbers."""

    sequences: list[list[Int64]] = Field(description="token ids of each sequence")
    ranges: list[tuple[Int64, Int64]] | None = Field(
        None, description="[start, end) positions to score per sequence (default: all positions)"
    )
    signal: SignalName = "logprobs"
    support: SupportJSON = SupportJSON()
    include_logprobs: bool = Field(False, description="ADVANTAGE: also return both models' log-probs")
    request_id: str = ""

    def to_record(self, check_size: Callable[[QuerySize], None] | None = None) -> ScoreQuery:
        """The record; `check_size` (the server's) sees the sizes before any per-sequence tensor is made."""
        ranges = self.ranges or [(0, len(s)) for s in self.sequences]
        if len(ranges) != len(self.sequences):
            raise InvalidArgument(f"{len(self.sequences)} sequences but {len(ranges)} score ranges")
        support = self.support.to_record()
        if check_size is not None:
            lengths = torch.tensor([len(s) for s in self.sequences], dtype=torch.long)
            check_size(QuerySize(lengths, torch.tensor(ranges, dtype=torch.long).reshape(-1, 2), support,
                                 include_logprobs=self.include_logprobs))
        return ScoreQuery(
            sequences=[torch.tensor(s, dtype=torch.long) for s in self.sequences],
            ranges=[(int(a), int(b)) for a, b in ranges],
            signal=self.signal,
            support=support,
            include_logprobs=self.include_logprobs,
            request_id=self.request_id,
        )


class ModelInfoJSON(_Strict):
    """The handshake: fingerprints, beta and limits (`ModelInfo`)."""

    role: Role
    model: ModelFingerprint  # the records themselves (dataclasses): one definition of their fields
    reference: ModelFingerprint | None
    beta: float
    server_version: str
    limits: Limits

    @classmethod
    def from_record(cls, info: ModelInfo) -> ModelInfoJSON:
        return cls(role=info.role, model=info.model, reference=info.reference, beta=info.beta,
                   server_version=info.server_version, limits=info.limits)


Rows = list[list[float | None]]


class ScoreResponseJSON(_Strict):
    """An answer (`ScoreResult`): per-position rows in request order; -inf and NaN become null."""

    request_id: str
    signal: SignalName
    support: SupportName
    model: ModelFingerprint
    reference: ModelFingerprint | None
    indices: list[list[int]] | None = Field(description="[P, m] token ids, -1 pads; null for dense")
    values: Rows = Field(description="[P, m] (or [P, V]) log-probs or advantages")
    tail: list[float | None] | None = Field(description="[P] log tail mass, or the tail bucket's advantage")
    weights: Rows | None = Field(None, description="SAMPLED: [P, n] importance weights")
    logprobs: Rows | None = None
    reference_logprobs: Rows | None = None
    tail_logprobs: list[float | None] | None = None
    reference_tail_logprobs: list[float | None] | None = None
    replica: str = Field("", description="which server replica answered")

    @classmethod
    def from_record(cls, result: ScoreResult, request_id: str) -> ScoreResponseJSON:
        return cls(
            request_id=request_id, signal=result.signal, support=result.support,
            model=result.model, reference=result.reference,
            indices=None if result.indices is None else result.indices.tolist(),
            values=_floats(result.values), tail=_floats(result.tail), weights=_floats(result.weights),
            **{name: _floats(t) for name, t in result.extras.items()}, replica=result.replica,
        )


def _floats(tensor: torch.Tensor | None) -> list | None:
    """fp32 tensor -> nested lists, non-finite values as None (JSON has no infinity)."""
    if tensor is None:
        return None

    def clean(x):
        return [clean(v) for v in x] if isinstance(x, list) else (x if math.isfinite(x) else None)

    return clean(tensor.float().tolist())
