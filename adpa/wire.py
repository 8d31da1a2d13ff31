"""Tensors on the wire: torch tensors <-> `adpa.v1.Tensor` (raw little-endian bytes + dtype + shape).

Decoding validates before it touches the bytes, so a malformed tensor is a clear error, never a
crash or a silent reinterpretation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from adpa.v1 import scoring_pb2 as pb

# wire name -> (torch dtype, numpy dtype of the raw bytes). bf16 travels as its 16-bit pattern.
DATATYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "FP32": (torch.float32, np.dtype("<f4")),
    "FP16": (torch.float16, np.dtype("<f2")),
    "BF16": (torch.bfloat16, np.dtype("<i2")),
    "INT32": (torch.int32, np.dtype("<i4")),
    "INT64": (torch.int64, np.dtype("<i8")),
}
_NAME_OF = {torch_dtype: name for name, (torch_dtype, _) in DATATYPES.items()}

# ValueDtype enum of a request -> wire datatype of the values it asks for.
VALUE_DTYPES = {pb.VALUE_DTYPE_UNSPECIFIED: "FP32", pb.FP32: "FP32", pb.BF16: "BF16", pb.FP16: "FP16"}


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
        raise WireError(f"{field}: datatype {shown!r} not accepted here; expected one of {list(allowed)}")
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
    array = np.frombuffer(msg.raw, dtype=np_dtype).reshape(tuple(msg.shape))
    tensor = torch.from_numpy(array.copy())  # copy: protobuf bytes are read-only
    return tensor.view(torch_dtype) if msg.datatype == "BF16" else tensor


def is_set(msg: pb.Tensor) -> bool:
    """Whether an optional tensor field was filled in (an unset message field reads as empty)."""
    return bool(msg.datatype)
