"""adpa.v1 protobuf messages <-> domain records, for the servicer and the client alike.

Decoding a request checks everything the wire can get wrong (datatypes, shapes, byte counts,
lengths that don't add up) and raises InvalidArgument; model-dependent checks (vocabulary,
ranges, limits) belong to `ScoringService.validate`.
"""

from __future__ import annotations

import torch

from adpa import wire
from adpa.services.errors import InvalidArgument
from adpa.services.protocol import Limits, ModelFingerprint, ModelInfo, ScoreQuery, ScoreResult, SupportSpec
from adpa.v1 import scoring_pb2 as pb

SIGNALS = {pb.LOGPROBS: "logprobs", pb.ADVANTAGE: "advantage"}
SIGNAL_ENUM = {name: enum for enum, name in SIGNALS.items()}
SUPPORTS = {pb.TOPK: "topk", pb.INDICES: "indices", pb.SAMPLED: "sampled", pb.DENSE: "dense"}
SUPPORT_ENUM = {name: enum for enum, name in SUPPORTS.items()}
VALUE_DTYPE_ENUM = {"FP32": pb.FP32, "BF16": pb.BF16, "FP16": pb.FP16}
_INTS = ("INT32", "INT64")
_EXTRAS = ("logprobs", "reference_logprobs", "tail_logprobs", "reference_tail_logprobs")


# -- fingerprints and model info ------------------------------------------------------------------


def fingerprint_to_pb(fp: ModelFingerprint) -> pb.ModelFingerprint:
    return pb.ModelFingerprint(**vars(fp))


def fingerprint_from_pb(msg: pb.ModelFingerprint) -> ModelFingerprint:
    return ModelFingerprint(
        model_name=msg.model_name,
        model_hash=msg.model_hash,
        tokenizer_hash=msg.tokenizer_hash,
        vocab_size=msg.vocab_size,
        dtype=msg.dtype,
        max_seq_len=msg.max_seq_len,
    )


def info_to_pb(info: ModelInfo) -> pb.ModelInfoResponse:
    limits = info.limits
    return pb.ModelInfoResponse(
        role=info.role,
        model=fingerprint_to_pb(info.model),
        reference=fingerprint_to_pb(info.reference) if info.reference else None,
        beta=info.beta,
        server_version=info.server_version,
        max_k=limits.max_k,
        max_samples=limits.max_samples,
        max_indices=limits.max_indices,
        max_positions=limits.max_positions,
        max_message_bytes=limits.max_message_bytes,
        max_dense_positions=limits.max_dense_positions,
    )


def info_from_pb(msg: pb.ModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        role=msg.role,
        model=fingerprint_from_pb(msg.model),
        reference=fingerprint_from_pb(msg.reference) if msg.HasField("reference") else None,
        beta=msg.beta,
        server_version=msg.server_version,
        limits=Limits(
            max_k=msg.max_k,
            max_samples=msg.max_samples,
            max_indices=msg.max_indices,
            max_positions=msg.max_positions,
            max_message_bytes=msg.max_message_bytes,
            max_dense_positions=msg.max_dense_positions,
        ),
    )


# -- requests -------------------------------------------------------------------------------------


def query_to_pb(query: ScoreQuery) -> pb.ScoreRequest:
    spec = query.support
    lengths = torch.tensor([len(s) for s in query.sequences], dtype=torch.int32)
    ids = torch.cat([s.to(torch.int32) for s in query.sequences]) if query.sequences else torch.zeros(0, dtype=torch.int32)
    support = pb.Support(
        kind=SUPPORT_ENUM[spec.kind], k=spec.k, n=spec.n, seed=spec.seed, temperature=spec.temperature
    )
    if spec.indices is not None:
        support.indices.CopyFrom(wire.encode(spec.indices, "INT32"))
    return pb.ScoreRequest(
        request_id=query.request_id,
        signal=SIGNAL_ENUM[query.signal],
        support=support,
        input_ids=wire.encode(ids),
        lengths=wire.encode(lengths),
        score_ranges=wire.encode(torch.tensor(query.ranges, dtype=torch.int32).reshape(-1, 2)),
        value_dtype=VALUE_DTYPE_ENUM[query.value_dtype],
        include_logprobs=query.include_logprobs,
    )


def query_from_pb(msg: pb.ScoreRequest) -> ScoreQuery:
    """Decode and check the wire-level shape of a request; raises InvalidArgument."""
    try:
        ids = wire.decode(msg.input_ids, "input_ids", allowed=_INTS, ndim=1).long()
        lengths = wire.decode(msg.lengths, "lengths", allowed=_INTS, ndim=1).long()
        ranges = wire.decode(msg.score_ranges, "score_ranges", allowed=_INTS, ndim=2).long()
        indices = None
        if msg.support.kind == pb.INDICES and wire.is_set(msg.support.indices):
            indices = wire.decode(msg.support.indices, "support.indices", allowed=_INTS, ndim=2).long()
    except wire.WireError as exc:
        raise InvalidArgument(str(exc)) from exc
    if msg.signal not in SIGNALS:
        raise InvalidArgument(f"signal must be LOGPROBS or ADVANTAGE, got enum value {msg.signal}")
    if msg.support.kind not in SUPPORTS:
        raise InvalidArgument(f"support.kind must be TOPK, INDICES, SAMPLED or DENSE, got enum value {msg.support.kind}")
    if msg.value_dtype not in wire.VALUE_DTYPES:
        raise InvalidArgument(f"value_dtype must be FP32, BF16 or FP16, got enum value {msg.value_dtype}")
    # Summed in Python: int64 sums of huge lengths can wrap around to the right total.
    if bool((lengths < 0).any()) or bool((lengths > len(ids)).any()) or sum(lengths.tolist()) != len(ids):
        raise InvalidArgument(f"lengths must be >= 0 and sum to len(input_ids)={len(ids)}, got {lengths.tolist()[:16]}")
    if ranges.shape != (len(lengths), 2):
        raise InvalidArgument(f"score_ranges must have shape [{len(lengths)}, 2], got {list(ranges.shape)}")
    sequences = list(torch.split(ids, lengths.tolist()))
    spec = msg.support
    return ScoreQuery(
        sequences=sequences,
        ranges=[(int(s), int(e)) for s, e in ranges.tolist()],
        signal=SIGNALS[msg.signal],
        support=SupportSpec(
            kind=SUPPORTS[spec.kind],
            k=spec.k,
            n=spec.n,
            seed=spec.seed,
            temperature=spec.temperature or 1.0,
            indices=indices,
        ),
        value_dtype=wire.VALUE_DTYPES[msg.value_dtype],
        include_logprobs=msg.include_logprobs,
        request_id=msg.request_id,
    )


# -- answers --------------------------------------------------------------------------------------


def result_to_pb(result: ScoreResult, request_id: str, value_dtype: str) -> pb.ScoreResponse:
    msg = pb.ScoreResponse(
        request_id=request_id,
        model=fingerprint_to_pb(result.model),
        signal=SIGNAL_ENUM[result.signal],
        support_kind=SUPPORT_ENUM[result.support],
        values=wire.encode(result.values, value_dtype),
    )
    if result.reference is not None:
        msg.reference.CopyFrom(fingerprint_to_pb(result.reference))
    if result.indices is not None:
        msg.indices.CopyFrom(wire.encode(result.indices, "INT32"))
    if result.tail is not None:
        msg.tail.CopyFrom(wire.encode(result.tail, "FP32"))
    if result.weights is not None:
        msg.weights.CopyFrom(wire.encode(result.weights, "FP32"))
    for name, tensor in result.extras.items():
        getattr(msg, name).CopyFrom(wire.encode(tensor, value_dtype if tensor.dim() == 2 else "FP32"))
    return msg


def result_from_pb(msg: pb.ScoreResponse) -> ScoreResult:
    """Decode an answer; values come back as fp32 whatever dtype they travelled in."""

    def optional(name: str, dtype: torch.dtype) -> torch.Tensor | None:
        field = getattr(msg, name)
        return wire.decode(field, name).to(dtype) if wire.is_set(field) else None

    return ScoreResult(
        signal=SIGNALS[msg.signal],
        support=SUPPORTS[msg.support_kind],
        model=fingerprint_from_pb(msg.model),
        reference=fingerprint_from_pb(msg.reference) if msg.HasField("reference") else None,
        indices=optional("indices", torch.long),
        values=wire.decode(msg.values, "values").float(),
        tail=optional("tail", torch.float32),
        weights=optional("weights", torch.float32),
        extras={name: t for name in _EXTRAS if (t := optional(name, torch.float32)) is not None},
    )
