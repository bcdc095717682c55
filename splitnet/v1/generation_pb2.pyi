from splitnet.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerationInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GenerationModel(_message.Message):
    __slots__ = ("name", "num_layers", "hidden_size", "vocab_size", "kv_bytes_per_token_per_layer", "tied_embeddings", "eos_token_ids", "fingerprint", "profile")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    TIED_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    kv_bytes_per_token_per_layer: int
    tied_embeddings: bool
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    fingerprint: str
    profile: GenerationProfile
    def __init__(self, name: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., kv_bytes_per_token_per_layer: _Optional[int] = ..., tied_embeddings: _Optional[bool] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., fingerprint: _Optional[str] = ..., profile: _Optional[_Union[GenerationProfile, _Mapping]] = ...) -> None: ...

class GenerationProfile(_message.Message):
    __slots__ = ("decode_ms", "prefill_ms", "lm_head_ms", "embed_ms", "method")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    LM_HEAD_MS_FIELD_NUMBER: _ClassVar[int]
    EMBED_MS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    decode_ms: _containers.RepeatedScalarFieldContainer[float]
    prefill_ms: _containers.RepeatedScalarFieldContainer[float]
    lm_head_ms: float
    embed_ms: float
    method: str
    def __init__(self, decode_ms: _Optional[_Iterable[float]] = ..., prefill_ms: _Optional[_Iterable[float]] = ..., lm_head_ms: _Optional[float] = ..., embed_ms: _Optional[float] = ..., method: _Optional[str] = ...) -> None: ...

class GenerationLimits(_message.Message):
    __slots__ = ("max_sessions", "max_tokens_per_session", "kv_budget_bytes", "idle_timeout_s", "max_batch_size")
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_SESSION_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    max_sessions: int
    max_tokens_per_session: int
    kv_budget_bytes: int
    idle_timeout_s: float
    max_batch_size: int
    def __init__(self, max_sessions: _Optional[int] = ..., max_tokens_per_session: _Optional[int] = ..., kv_budget_bytes: _Optional[int] = ..., idle_timeout_s: _Optional[float] = ..., max_batch_size: _Optional[int] = ...) -> None: ...

class Capacity(_message.Message):
    __slots__ = ("sessions_open", "sessions_free", "kv_reserved_bytes", "kv_free_bytes", "kv_used_bytes")
    SESSIONS_OPEN_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FREE_FIELD_NUMBER: _ClassVar[int]
    KV_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    sessions_open: int
    sessions_free: int
    kv_reserved_bytes: int
    kv_free_bytes: int
    kv_used_bytes: int
    def __init__(self, sessions_open: _Optional[int] = ..., sessions_free: _Optional[int] = ..., kv_reserved_bytes: _Optional[int] = ..., kv_free_bytes: _Optional[int] = ..., kv_used_bytes: _Optional[int] = ...) -> None: ...

class GenerationInfo(_message.Message):
    __slots__ = ("models", "codecs", "limits", "capacity")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[GenerationModel]
    codecs: _containers.RepeatedScalarFieldContainer[str]
    limits: GenerationLimits
    capacity: Capacity
    def __init__(self, models: _Optional[_Iterable[_Union[GenerationModel, _Mapping]]] = ..., codecs: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[GenerationLimits, _Mapping]] = ..., capacity: _Optional[_Union[Capacity, _Mapping]] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("model", "cut", "codec", "max_tokens", "temperature", "top_p", "seed", "fingerprint")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    model: str
    cut: str
    codec: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    fingerprint: str
    def __init__(self, model: _Optional[str] = ..., cut: _Optional[str] = ..., codec: _Optional[str] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class Prefill(_message.Message):
    __slots__ = ("position", "hidden", "last", "token_ids")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    position: int
    hidden: _tensor_pb2.Tensor
    last: bool
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, position: _Optional[int] = ..., hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., last: _Optional[bool] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DecodeStep(_message.Message):
    __slots__ = ("position", "hidden", "token_ids")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    position: int
    hidden: _tensor_pb2.Tensor
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, position: _Optional[int] = ..., hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class CloseSession(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("open", "prefill", "step", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    prefill: Prefill
    step: DecodeStep
    close: CloseSession
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., prefill: _Optional[_Union[Prefill, _Mapping]] = ..., step: _Optional[_Union[DecodeStep, _Mapping]] = ..., close: _Optional[_Union[CloseSession, _Mapping]] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("session_id", "max_tokens", "max_chunk_tokens", "returns_tokens", "model", "limits", "capacity")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RETURNS_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_tokens: int
    max_chunk_tokens: int
    returns_tokens: bool
    model: GenerationModel
    limits: GenerationLimits
    capacity: Capacity
    def __init__(self, session_id: _Optional[str] = ..., max_tokens: _Optional[int] = ..., max_chunk_tokens: _Optional[int] = ..., returns_tokens: _Optional[bool] = ..., model: _Optional[_Union[GenerationModel, _Mapping]] = ..., limits: _Optional[_Union[GenerationLimits, _Mapping]] = ..., capacity: _Optional[_Union[Capacity, _Mapping]] = ...) -> None: ...

class StepTiming(_message.Message):
    __slots__ = ("queue_ms", "decode_ms", "compute_ms", "encode_ms", "batch_size", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    decode_ms: float
    compute_ms: float
    encode_ms: float
    batch_size: int
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., total_ms: _Optional[float] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("position", "length", "token", "hidden", "timing")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    position: int
    length: int
    token: int
    hidden: _tensor_pb2.Tensor
    timing: StepTiming
    def __init__(self, position: _Optional[int] = ..., length: _Optional[int] = ..., token: _Optional[int] = ..., hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., timing: _Optional[_Union[StepTiming, _Mapping]] = ...) -> None: ...

class Closed(_message.Message):
    __slots__ = ("length",)
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    length: int
    def __init__(self, length: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("opened", "result", "closed")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    opened: Opened
    result: StepResult
    closed: Closed
    def __init__(self, opened: _Optional[_Union[Opened, _Mapping]] = ..., result: _Optional[_Union[StepResult, _Mapping]] = ..., closed: _Optional[_Union[Closed, _Mapping]] = ...) -> None: ...
