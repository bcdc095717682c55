from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT64: DType
DTYPE_INT8: DType
DTYPE_UINT8: DType
DTYPE_INT16: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_BOOL: DType

class Cast(_message.Message):
    __slots__ = ("to", "exponent")
    TO_FIELD_NUMBER: _ClassVar[int]
    EXPONENT_FIELD_NUMBER: _ClassVar[int]
    to: DType
    exponent: int
    def __init__(self, to: _Optional[_Union[DType, str]] = ..., exponent: _Optional[int] = ...) -> None: ...

class Quantize(_message.Message):
    __slots__ = ("per_channel", "axis", "scale", "zero_point")
    PER_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    AXIS_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    ZERO_POINT_FIELD_NUMBER: _ClassVar[int]
    per_channel: bool
    axis: int
    scale: _containers.RepeatedScalarFieldContainer[float]
    zero_point: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, per_channel: _Optional[bool] = ..., axis: _Optional[int] = ..., scale: _Optional[_Iterable[float]] = ..., zero_point: _Optional[_Iterable[int]] = ...) -> None: ...

class OutlierInt8(_message.Message):
    __slots__ = ("channels", "outlier_dtype")
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    OUTLIER_DTYPE_FIELD_NUMBER: _ClassVar[int]
    channels: _containers.RepeatedScalarFieldContainer[int]
    outlier_dtype: DType
    def __init__(self, channels: _Optional[_Iterable[int]] = ..., outlier_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class Zstd(_message.Message):
    __slots__ = ("level",)
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    level: int
    def __init__(self, level: _Optional[int] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("cast", "quantize", "zstd", "outlier_int8")
    CAST_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    ZSTD_FIELD_NUMBER: _ClassVar[int]
    OUTLIER_INT8_FIELD_NUMBER: _ClassVar[int]
    cast: Cast
    quantize: Quantize
    zstd: Zstd
    outlier_int8: OutlierInt8
    def __init__(self, cast: _Optional[_Union[Cast, _Mapping]] = ..., quantize: _Optional[_Union[Quantize, _Mapping]] = ..., zstd: _Optional[_Union[Zstd, _Mapping]] = ..., outlier_int8: _Optional[_Union[OutlierInt8, _Mapping]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "steps", "raw_nbytes", "payload")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    RAW_NBYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    steps: _containers.RepeatedCompositeFieldContainer[Step]
    raw_nbytes: int
    payload: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., steps: _Optional[_Iterable[_Union[Step, _Mapping]]] = ..., raw_nbytes: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...
