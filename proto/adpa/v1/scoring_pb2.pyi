from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Signal(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIGNAL_UNSPECIFIED: _ClassVar[Signal]
    LOGPROBS: _ClassVar[Signal]
    ADVANTAGE: _ClassVar[Signal]

class SupportKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SUPPORT_UNSPECIFIED: _ClassVar[SupportKind]
    TOPK: _ClassVar[SupportKind]
    INDICES: _ClassVar[SupportKind]
    SAMPLED: _ClassVar[SupportKind]
    DENSE: _ClassVar[SupportKind]

class ValueDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VALUE_DTYPE_UNSPECIFIED: _ClassVar[ValueDtype]
    FP32: _ClassVar[ValueDtype]
    BF16: _ClassVar[ValueDtype]
    FP16: _ClassVar[ValueDtype]
SIGNAL_UNSPECIFIED: Signal
LOGPROBS: Signal
ADVANTAGE: Signal
SUPPORT_UNSPECIFIED: SupportKind
TOPK: SupportKind
INDICES: SupportKind
SAMPLED: SupportKind
DENSE: SupportKind
VALUE_DTYPE_UNSPECIFIED: ValueDtype
FP32: ValueDtype
BF16: ValueDtype
FP16: ValueDtype

class Tensor(_message.Message):
    __slots__ = ("datatype", "shape", "raw")
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    raw: bytes
    def __init__(self, datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., raw: _Optional[bytes] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelFingerprint(_message.Message):
    __slots__ = ("model_name", "model_hash", "tokenizer_hash", "vocab_size", "dtype", "max_seq_len", "tokenizer_size")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_HASH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_SIZE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_hash: str
    tokenizer_hash: str
    vocab_size: int
    dtype: str
    max_seq_len: int
    tokenizer_size: int
    def __init__(self, model_name: _Optional[str] = ..., model_hash: _Optional[str] = ..., tokenizer_hash: _Optional[str] = ..., vocab_size: _Optional[int] = ..., dtype: _Optional[str] = ..., max_seq_len: _Optional[int] = ..., tokenizer_size: _Optional[int] = ...) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("role", "model", "reference", "beta", "server_version", "max_k", "max_samples", "max_indices", "max_positions", "max_message_bytes", "max_dense_positions")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_INDICES_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_DENSE_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    role: str
    model: ModelFingerprint
    reference: ModelFingerprint
    beta: float
    server_version: str
    max_k: int
    max_samples: int
    max_indices: int
    max_positions: int
    max_message_bytes: int
    max_dense_positions: int
    def __init__(self, role: _Optional[str] = ..., model: _Optional[_Union[ModelFingerprint, _Mapping]] = ..., reference: _Optional[_Union[ModelFingerprint, _Mapping]] = ..., beta: _Optional[float] = ..., server_version: _Optional[str] = ..., max_k: _Optional[int] = ..., max_samples: _Optional[int] = ..., max_indices: _Optional[int] = ..., max_positions: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_dense_positions: _Optional[int] = ...) -> None: ...

class Support(_message.Message):
    __slots__ = ("kind", "k", "n", "seed", "temperature", "indices")
    KIND_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    kind: SupportKind
    k: int
    n: int
    seed: int
    temperature: float
    indices: Tensor
    def __init__(self, kind: _Optional[_Union[SupportKind, str]] = ..., k: _Optional[int] = ..., n: _Optional[int] = ..., seed: _Optional[int] = ..., temperature: _Optional[float] = ..., indices: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "signal", "support", "input_ids", "lengths", "score_ranges", "value_dtype", "include_logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    SCORE_RANGES_FIELD_NUMBER: _ClassVar[int]
    VALUE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    signal: Signal
    support: Support
    input_ids: Tensor
    lengths: Tensor
    score_ranges: Tensor
    value_dtype: ValueDtype
    include_logprobs: bool
    def __init__(self, request_id: _Optional[str] = ..., signal: _Optional[_Union[Signal, str]] = ..., support: _Optional[_Union[Support, _Mapping]] = ..., input_ids: _Optional[_Union[Tensor, _Mapping]] = ..., lengths: _Optional[_Union[Tensor, _Mapping]] = ..., score_ranges: _Optional[_Union[Tensor, _Mapping]] = ..., value_dtype: _Optional[_Union[ValueDtype, str]] = ..., include_logprobs: _Optional[bool] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "model", "reference", "signal", "support_kind", "indices", "values", "tail", "weights", "logprobs", "reference_logprobs", "tail_logprobs", "reference_tail_logprobs", "replica")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_KIND_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TAIL_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_TAIL_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: ModelFingerprint
    reference: ModelFingerprint
    signal: Signal
    support_kind: SupportKind
    indices: Tensor
    values: Tensor
    tail: Tensor
    weights: Tensor
    logprobs: Tensor
    reference_logprobs: Tensor
    tail_logprobs: Tensor
    reference_tail_logprobs: Tensor
    replica: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[_Union[ModelFingerprint, _Mapping]] = ..., reference: _Optional[_Union[ModelFingerprint, _Mapping]] = ..., signal: _Optional[_Union[Signal, str]] = ..., support_kind: _Optional[_Union[SupportKind, str]] = ..., indices: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., tail: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., reference_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., tail_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., reference_tail_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., replica: _Optional[str] = ...) -> None: ...
