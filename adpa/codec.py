"""The adpa.v1 codec: torch tensors <-> `adpa.v1.Tensor`, and records <-> protobuf messages.

Both sides use it: servers decode requests and encode answers, the client does the reverse.
A tensor travels as raw row-major little-endian bytes with its datatype and shape (KServe v2
style); decoding validates datatype, rank and byte count before it touches the bytes, so a
malformed message is a clear `InvalidArgument`, never a crash or a silent reinterpretation.
Model-dependent checks (vocabulary, ranges, limits) belong to `ScoringService.validate`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch

from adpa.errors import InvalidArgument
from adpa.protocol import (
    VALUE_BYTES,
    Limits,
    ModelFingerprint,
    ModelInfo,
    QuerySize,
    ScoreQuery,
    ScoreResult,
    SupportSpec,
)
from adpa.v1 import scoring_pb2 as pb

# -- tensors --------------------------------------------------------------------------------------
# wire name -> (torch dtype, numpy dtype of the raw bytes). bf16 travels as its 16-bit pattern.
DATATYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "FP32": (torch.float32, np.dtype("<f4")),
    "FP16": (torch.float16, np.dtype("<f2")),
    "BF16": (torch.bfloat16, np.dtype("<i2")),
    "INT32": (torch.int32, np.dtype("<i4")),
    "INT64": (torch.int64, np.dtype("<i8")),
}
_NAME_OF = {torch_dtype: name for name, (torch_dtype, _) in DATATYPES.items()}
# No tensor of this protocol can hold more elements: a protobuf message is under 2 GiB. The bound also
# applies to the non-zero dimensions of an empty tensor ([0, 2^62] holds nothing, but numpy refuses it).
MAX_ELEMENTS = 2**31 - 1


class WireError(ValueError):
    """A tensor on the wire is malformed (unknown datatype, bytes that don't match the shape...)."""


def encode(tensor: torch.Tensor, datatype: str | None = None) -> pb.Tensor:
    """Encode `tensor` (cast to `datatype` when given) as raw row-major little-endian bytes."""
    if datatype is not None:
        tensor = tensor.to(DATATYPES[datatype][0])
    name = _NAME_OF.get(tensor.dtype)
    if name is None:
        raise WireError(f"dtype {tensor.dtype} has no wire datatype; use one of {sorted(DATATYPES)}")
    tensor = tensor.detach().contiguous().cpu()
    if name == "BF16":
        tensor = tensor.view(torch.int16)
    raw = tensor.numpy().astype(DATATYPES[name][1], copy=False).tobytes()  # no copy on little-endian hosts
    return pb.Tensor(datatype=name, shape=list(tensor.shape), raw=raw)


def decode(
    msg: pb.Tensor,
    field: str,
    *,
    allowed: Iterable[str] | None = None,
    ndim: int | None = None,
) -> torch.Tensor:
    """Decode a wire tensor, checking its datatype, rank and byte count; `field` names it in errors."""
    allowed = tuple(allowed) if allowed is not None else tuple(DATATYPES)
    if msg.datatype not in allowed:
        shown = msg.datatype or "<empty>"
        hint = " (datatype names are upper case)" if msg.datatype.upper() in allowed else ""
        raise WireError(f"{field}: datatype {shown!r} not accepted here; expected one of {list(allowed)}{hint}")
    if ndim is not None and len(msg.shape) != ndim:
        raise WireError(f"{field}: expected {ndim} dimensions, got shape {list(msg.shape)}")
    if any(d < 0 for d in msg.shape):
        raise WireError(f"{field}: negative dimension in shape {list(msg.shape)}")
    torch_dtype, np_dtype = DATATYPES[msg.datatype]
    expected = math.prod(msg.shape) * np_dtype.itemsize
    if expected != len(msg.raw):
        raise WireError(
            f"{field}: shape {list(msg.shape)} of {msg.datatype} needs {expected} bytes, got {len(msg.raw)}"
        )
    if any(d > MAX_ELEMENTS for d in msg.shape) or math.prod(d for d in msg.shape if d) > MAX_ELEMENTS:
        raise WireError(f"{field}: shape {list(msg.shape)} is over {MAX_ELEMENTS} elements (zero dimensions aside)")
    array = np.frombuffer(msg.raw, dtype=np_dtype).reshape(tuple(msg.shape))
    tensor = torch.from_numpy(array.copy())  # copy: protobuf bytes are read-only
    return tensor.view(torch_dtype) if msg.datatype == "BF16" else tensor


def is_set(msg: pb.Tensor) -> bool:
    """Whether an optional tensor field was filled in (an unset message field reads as empty)."""
    return bool(msg.datatype)


# -- enums ----------------------------------------------------------------------------------------

SIGNALS = {pb.LOGPROBS: "logprobs", pb.ADVANTAGE: "advantage"}
SIGNAL_ENUM = {name: enum for enum, name in SIGNALS.items()}
SUPPORTS = {pb.TOPK: "topk", pb.INDICES: "indices", pb.SAMPLED: "sampled", pb.DENSE: "dense"}
SUPPORT_ENUM = {name: enum for enum, name in SUPPORTS.items()}
VALUE_DTYPE_ENUM = {name: pb.ValueDtype.Value(name) for name in VALUE_BYTES}
# An unset value_dtype means FP32.
VALUE_DTYPES = {pb.VALUE_DTYPE_UNSPECIFIED: "FP32", **{enum: name for name, enum in VALUE_DTYPE_ENUM.items()}}
_INTS = ("INT32", "INT64")
_EXTRAS = ("logprobs", "reference_logprobs", "tail_logprobs", "reference_tail_logprobs")


# -- fingerprints and model info ------------------------------------------------------------------


def fingerprint_to_pb(fp: ModelFingerprint) -> pb.ModelFingerprint:
    return pb.ModelFingerprint(**dataclasses.asdict(fp))


def fingerprint_from_pb(msg: pb.ModelFingerprint) -> ModelFingerprint:
    return ModelFingerprint(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(ModelFingerprint)})


def info_to_pb(info: ModelInfo) -> pb.ModelInfoResponse:
    # The limits travel as top-level fields of the message, under the same names.
    return pb.ModelInfoResponse(
        role=info.role,
        model=fingerprint_to_pb(info.model),
        reference=fingerprint_to_pb(info.reference) if info.reference else None,
        beta=info.beta,
        server_version=info.server_version,
        **dataclasses.asdict(info.limits),
    )


def info_from_pb(msg: pb.ModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        role=msg.role,
        model=fingerprint_from_pb(msg.model),
        reference=fingerprint_from_pb(msg.reference) if msg.HasField("reference") else None,
        beta=msg.beta,
        server_version=msg.server_version,
        limits=Limits(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(Limits)}),
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
        support.indices.CopyFrom(encode(spec.indices, "INT32"))
    return pb.ScoreRequest(
        request_id=query.request_id,
        signal=SIGNAL_ENUM[query.signal],
        support=support,
        input_ids=encode(ids),
        lengths=encode(lengths),
        score_ranges=encode(torch.tensor(query.ranges, dtype=torch.int32).reshape(-1, 2)),
        value_dtype=VALUE_DTYPE_ENUM[query.value_dtype],
        include_logprobs=query.include_logprobs,
    )


def query_from_pb(msg: pb.ScoreRequest, check_size: Callable[[QuerySize], None] | None = None) -> ScoreQuery:
    """Decode and check the wire-level shape of a request; raises InvalidArgument.

    `check_size` (a server's `ScoringService.check_size`) sees the request's counts before it is
    split into sequences: a request over the limits costs no per-sequence work.
    """
    try:
        ids = decode(msg.input_ids, "input_ids", allowed=_INTS, ndim=1).long()
        lengths = decode(msg.lengths, "lengths", allowed=_INTS, ndim=1).long()
        ranges = decode(msg.score_ranges, "score_ranges", allowed=_INTS, ndim=2).long()
        indices = None
        if msg.support.kind == pb.INDICES and is_set(msg.support.indices):
            indices = decode(msg.support.indices, "support.indices", allowed=_INTS, ndim=2).long()
    except WireError as exc:
        raise InvalidArgument(str(exc)) from exc
    if msg.signal not in SIGNALS:
        raise InvalidArgument(f"signal must be LOGPROBS or ADVANTAGE, got enum value {msg.signal}")
    if msg.support.kind not in SUPPORTS:
        raise InvalidArgument(f"support.kind must be TOPK, INDICES, SAMPLED or DENSE, got enum value {msg.support.kind}")
    if msg.value_dtype not in VALUE_DTYPES:
        raise InvalidArgument(f"value_dtype must be FP32, BF16 or FP16, got enum value {msg.value_dtype}")
    # Each length is in [0, len(ids)] and there are fewer than 2^31 of them: the int64 sum cannot wrap.
    if bool((lengths < 0).any()) or bool((lengths > len(ids)).any()) or int(lengths.sum()) != len(ids):
        raise InvalidArgument(f"lengths must be >= 0 and sum to len(input_ids)={len(ids)}, got {lengths[:16].tolist()}")
    if ranges.shape != (len(lengths), 2):
        raise InvalidArgument(f"score_ranges must have shape [{len(lengths)}, 2], got {list(ranges.shape)}")
    spec = msg.support
    support = SupportSpec(
        kind=SUPPORTS[spec.kind],
        k=spec.k,
        n=spec.n,
        seed=spec.seed,
        temperature=spec.temperature or 1.0,
        indices=indices,
    )
    value_dtype = VALUE_DTYPES[msg.value_dtype]
    if check_size is not None:
        check_size(QuerySize(lengths, ranges, support, value_dtype, msg.include_logprobs))
    return ScoreQuery(
        sequences=list(torch.split(ids, lengths.tolist())),
        ranges=[(int(s), int(e)) for s, e in ranges.tolist()],
        signal=SIGNALS[msg.signal],
        support=support,
        value_dtype=value_dtype,
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
        values=encode(result.values, value_dtype),
        replica=result.replica,
    )
    if result.reference is not None:
        msg.reference.CopyFrom(fingerprint_to_pb(result.reference))
    if result.indices is not None:
        msg.indices.CopyFrom(encode(result.indices, "INT32"))
    if result.tail is not None:
        msg.tail.CopyFrom(encode(result.tail, "FP32"))
    if result.weights is not None:
        msg.weights.CopyFrom(encode(result.weights, "FP32"))
    for name, tensor in result.extras.items():
        getattr(msg, name).CopyFrom(encode(tensor, value_dtype if tensor.dim() == 2 else "FP32"))
    return msg


def result_from_pb(msg: pb.ScoreResponse) -> ScoreResult:
    """Decode an answer; values come back as fp32 whatever dtype they travelled in."""

    def optional(name: str, dtype: torch.dtype) -> torch.Tensor | None:
        field = getattr(msg, name)
        return decode(field, name).to(dtype) if is_set(field) else None

    return ScoreResult(
        signal=SIGNALS[msg.signal],
        support=SUPPORTS[msg.support_kind],
        model=fingerprint_from_pb(msg.model),
        reference=fingerprint_from_pb(msg.reference) if msg.HasField("reference") else None,
        indices=optional("indices", torch.long),
        values=decode(msg.values, "values").float(),
        tail=optional("tail", torch.float32),
        weights=optional("weights", torch.float32),
        extras={name: t for name in _EXTRAS if (t := optional(name, torch.float32)) is not None},
        replica=msg.replica,
    )
