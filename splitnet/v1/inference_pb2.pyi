from splitnet.v1 import generation_pb2 as _generation_pb2
from splitnet.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: _tensor_pb2.DType
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ...) -> None: ...

class CutInfo(_message.Message):
    __slots__ = ("name", "frontier", "float32_bytes", "head_params", "tail_params", "tail_latency_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FRONTIER_FIELD_NUMBER: _ClassVar[int]
    FLOAT32_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEAD_PARAMS_FIELD_NUMBER: _ClassVar[int]
    TAIL_PARAMS_FIELD_NUMBER: _ClassVar[int]
    TAIL_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    frontier: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    float32_bytes: int
    head_params: int
    tail_params: int
    tail_latency_ms: float
    def __init__(self, name: _Optional[str] = ..., frontier: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., float32_bytes: _Optional[int] = ..., head_params: _Optional[int] = ..., tail_params: _Optional[int] = ..., tail_latency_ms: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "fingerprint", "input_shape", "cuts", "outputs", "tail_latency_method")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    CUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TAIL_LATENCY_METHOD_FIELD_NUMBER: _ClassVar[int]
    name: str
    fingerprint: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    cuts: _containers.RepeatedCompositeFieldContainer[CutInfo]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    tail_latency_method: str
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., cuts: _Optional[_Iterable[_Union[CutInfo, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., tail_latency_method: _Optional[str] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_message_bytes", "max_decoded_bytes", "max_batch_size", "chunk_bytes", "max_in_flight", "max_pending_bytes", "chunk_idle_s", "max_streams_per_connection")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_DECODED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_PENDING_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_IDLE_S_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_PER_CONNECTION_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_decoded_bytes: int
    max_batch_size: int
    chunk_bytes: int
    max_in_flight: int
    max_pending_bytes: int
    chunk_idle_s: float
    max_streams_per_connection: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_decoded_bytes: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., max_in_flight: _Optional[int] = ..., max_pending_bytes: _Optional[int] = ..., chunk_idle_s: _Optional[float] = ..., max_streams_per_connection: _Optional[int] = ...) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("models", "codecs", "limits", "server_version", "generation")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    codecs: _containers.RepeatedScalarFieldContainer[str]
    limits: ServerLimits
    server_version: str
    generation: _generation_pb2.GenerationInfo
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., codecs: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., server_version: _Optional[str] = ..., generation: _Optional[_Union[_generation_pb2.GenerationInfo, _Mapping]] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("id", "model", "cut", "fingerprint", "frontier", "output_codec", "chunked_payload_bytes")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    FRONTIER_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_CODEC_FIELD_NUMBER: _ClassVar[int]
    CHUNKED_PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: int
    model: str
    cut: str
    fingerprint: str
    frontier: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    output_codec: str
    chunked_payload_bytes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, id: _Optional[int] = ..., model: _Optional[str] = ..., cut: _Optional[str] = ..., fingerprint: _Optional[str] = ..., frontier: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., output_codec: _Optional[str] = ..., chunked_payload_bytes: _Optional[_Iterable[int]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("id", "data")
    ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    id: int
    data: bytes
    def __init__(self, id: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("request", "chunk")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    request: InferRequest
    chunk: Chunk
    def __init__(self, request: _Optional[_Union[InferRequest, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class ServerTiming(_message.Message):
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

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("id", "outputs", "timing", "error", "chunked_payload_bytes")
    ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CHUNKED_PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: int
    outputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    timing: ServerTiming
    error: Error
    chunked_payload_bytes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, id: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., timing: _Optional[_Union[ServerTiming, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., chunked_payload_bytes: _Optional[_Iterable[int]] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("response", "chunk")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    response: InferResponse
    chunk: Chunk
    def __init__(self, response: _Optional[_Union[InferResponse, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...
