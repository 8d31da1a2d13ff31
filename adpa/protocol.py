"""The records of the adpa.v1 contract, independent of any transport (gRPC, HTTP, Ray Serve).

Servers, the client and the trainers all speak in these; `adpa.codec` turns them into protobuf
messages and back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

SignalName = Literal["logprobs", "advantage"]
SupportName = Literal["topk", "indices", "sampled", "dense"]
Role = Literal["teacher", "reference"]


@dataclass(frozen=True)
class ModelFingerprint:
    """What identifies a served model and its tokenizer (see `adpa.fingerprint`)."""

    model_name: str
    model_hash: str
    tokenizer_hash: str
    vocab_size: int
    dtype: str
    max_seq_len: int
    tokenizer_size: int = 0  # len(tokenizer); 0 = not reported (read as vocab_size)

    @property
    def shared_vocab(self) -> int:
        """The ids signals live on: [0, min(tokenizer length, output rows)).

        A padded embedding matrix (Qwen2.5-7B: 152,064 rows for a 151,665-token tokenizer) has rows
        no token id points to; they are scored (their mass is in every log-softmax's normaliser
        and in the tail) but never returned as support ids, so models that differ only in padding
        exchange signals on the same ids.
        """
        return min(self.tokenizer_size, self.vocab_size) if self.tokenizer_size else self.vocab_size


@dataclass(frozen=True)
class Limits:
    """Per-request limits a service enforces and announces in its model info."""

    max_k: int = 256
    max_samples: int = 256
    max_indices: int = 1024
    max_positions: int = 65536
    max_dense_positions: int = 4096
    max_message_bytes: int = 64 << 20


@dataclass(frozen=True)
class ModelInfo:
    role: Role
    model: ModelFingerprint
    reference: ModelFingerprint | None
    beta: float
    server_version: str
    limits: Limits


@dataclass(frozen=True)
class SupportSpec:
    """Which tokens an answer covers at each scored position (see docs/wire-protocol.md)."""

    kind: SupportName
    k: int = 0
    n: int = 0
    seed: int = 0
    temperature: float = 1.0
    indices: torch.Tensor | None = None  # (P, m) int64, -1 pads; kind == "indices" only


@dataclass
class SupportValues:
    """One model's log-probs on a support, for P scored positions."""

    indices: torch.Tensor | None  # (P, m) int64, -1 pads; None for dense
    logprobs: torch.Tensor  # (P, m), or (P, V) for dense; fp32, 0 at pads
    log_tail: torch.Tensor | None  # (P,) log of the mass outside the support; topk/indices only
    weights: torch.Tensor | None = None  # (P, n) importance weights; sampled only


@dataclass
class ScoreQuery:
    """A validated scoring request: token sequences and the half-open range of positions to score.

    Position i of a sequence is the distribution of the token after input_ids[i] (logits[i]).
    """

    sequences: list[torch.Tensor]  # each (L,) int64
    ranges: list[tuple[int, int]]
    signal: SignalName
    support: SupportSpec
    value_dtype: str = "FP32"
    include_logprobs: bool = False
    request_id: str = ""

    @property
    def num_positions(self) -> int:
        return sum(end - start for start, end in self.ranges)


@dataclass
class ScoreResult:
    """The answer to a ScoreQuery; per-position tensors have P rows in request order."""

    signal: SignalName
    support: SupportName
    model: ModelFingerprint
    reference: ModelFingerprint | None
    indices: torch.Tensor | None  # (P, m) int64, -1 pads; None for dense
    values: torch.Tensor  # (P, m) or (P, V) fp32: log-probs or advantages
    tail: torch.Tensor | None  # (P,) fp32: log tail mass, or the tail bucket's advantage
    weights: torch.Tensor | None = None  # (P, n): sampled only
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # include_logprobs tensors
    replica: str = ""  # which server replica answered (set by the front end)


# The dtypes values may travel in, and their sizes: the one table of value dtypes.
VALUE_BYTES = {"FP32": 4, "BF16": 2, "FP16": 2}

# The smallest SAMPLED proposal temperature (vLLM's floor too). Below it pi^(1/T) leaves fp32: at
# T = 1e-45 every log-prob divided by T is -inf and the draws are NaN.
MIN_TEMPERATURE = 0.01


@dataclass(frozen=True)
class QuerySize:
    """How big a scoring request is, known from its tensors before it is split into sequences.

    A server checks this first (`ScoringService.check_size`), so a request whose counts are over
    the limits is refused before any per-sequence work or memory is spent on it.
    """

    lengths: torch.Tensor  # (B,) int64: tokens of each sequence
    ranges: torch.Tensor  # (B, 2) int64: score ranges as sent (not checked yet)
    support: SupportSpec
    value_dtype: str = "FP32"
    include_logprobs: bool = False

    @classmethod
    def of(cls, query: ScoreQuery) -> QuerySize:
        return cls(
            lengths=torch.tensor([len(s) for s in query.sequences], dtype=torch.long),
            ranges=torch.tensor(query.ranges, dtype=torch.long).reshape(-1, 2),
            support=query.support, value_dtype=query.value_dtype, include_logprobs=query.include_logprobs,
        )

    @property
    def sequences(self) -> int:
        return len(self.lengths)

    @property
    def positions(self) -> int:
        """Scored positions, counting only the part of each range inside its sequence (no overflow
        whatever the ranges hold; equal to `ScoreQuery.num_positions` once the ranges are valid)."""
        if not len(self.lengths):
            return 0
        start = self.ranges[:, 0].clamp(min=0)
        end = torch.minimum(self.ranges[:, 1], self.lengths).clamp(min=0)
        return int((end - start).clamp(min=0).sum())


def answer_bytes_per_position(
    support: SupportSpec, value_dtype: str, vocab_size: int, include_logprobs: bool = False
) -> int:
    """Upper bound on the answer's payload bytes per scored position (protobuf framing aside)."""
    value = VALUE_BYTES[value_dtype]
    if support.kind == "dense":
        return vocab_size * value * (3 if include_logprobs else 1)
    if support.kind == "sampled":  # int32 id + value + fp32 weight per draw
        return support.n * (4 + value * (3 if include_logprobs else 1) + 4)
    requested = support.indices.shape[1] if support.indices is not None else 0
    width = min(vocab_size, requested + support.k)
    values = width * value * (3 if include_logprobs else 1)
    return width * 4 + values + 4 * (3 if include_logprobs else 1)  # ids + values + fp32 tails
