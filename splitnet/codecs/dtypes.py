"""The dtypes that travel: torch dtype <-> wire ``DType`` <-> the numpy dtype holding the bytes."""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import torch

from splitnet.errors import CodecError
from splitnet.v1 import tensor_pb2 as pb

__all__ = ["torch_dtype", "wire_dtype"]

TORCH_TO_WIRE: Final[dict[torch.dtype, pb.DType]] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float64: pb.DTYPE_FLOAT64,
    torch.int8: pb.DTYPE_INT8,
    torch.uint8: pb.DTYPE_UINT8,
    torch.int16: pb.DTYPE_INT16,
    torch.int32: pb.DTYPE_INT32,
    torch.int64: pb.DTYPE_INT64,
    torch.bool: pb.DTYPE_BOOL,
}
WIRE_TO_TORCH: Final[dict[int, torch.dtype]] = {int(v): k for k, v in TORCH_TO_WIRE.items()}
# bfloat16 has no numpy dtype: its bytes travel through numpy as int16.
NUMPY_HOLDER: Final[dict[torch.dtype, np.dtype]] = {
    torch.float32: np.dtype("<f4"),
    torch.float16: np.dtype("<f2"),
    torch.bfloat16: np.dtype("<i2"),
    torch.float64: np.dtype("<f8"),
    torch.int8: np.dtype("i1"),
    torch.uint8: np.dtype("u1"),
    torch.int16: np.dtype("<i2"),
    torch.int32: np.dtype("<i4"),
    torch.int64: np.dtype("<i8"),
    torch.bool: np.dtype("?"),
}
FLOATS: Final = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
WIDE: Final = (torch.float32, torch.float64)  # the dtypes a cast step narrows
F32_MAX: Final = float(np.finfo(np.float32).max)
F32_TINY: Final = float(np.finfo(np.float32).tiny)  # smallest normal float32: the least scale
FP16_MAX: Final = 65504.0
BF16_MAX: Final = 3.3895313892515355e38
# Largest finite value of each floating dtype: decoders clamp to it.
FINITE_MAX: Final[dict[torch.dtype, float]] = {
    torch.float16: FP16_MAX,
    torch.bfloat16: BF16_MAX,
    torch.float32: F32_MAX,
    torch.float64: math.inf,
}


def wire_dtype(dtype: torch.dtype) -> pb.DType:
    """The wire ``DType`` value of a torch dtype; ``CodecError`` if it cannot travel."""
    value = TORCH_TO_WIRE.get(dtype)
    if value is None:
        raise CodecError(
            f"dtype {dtype} cannot go on the wire; supported: "
            + ", ".join(str(d) for d in TORCH_TO_WIRE)
        )
    return value


def torch_dtype(value: int) -> torch.dtype:
    """The torch dtype of a wire ``DType`` value; ``CodecError`` if unknown."""
    dtype = WIRE_TO_TORCH.get(value)
    if dtype is None:
        raise CodecError(f"unknown or unsupported dtype value {int(value)}")
    return dtype


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor (bfloat16 as int16)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


def wide_numpy(dtype: torch.dtype) -> type[np.floating]:
    """The numpy type decoders compute in: float64 for float64 tensors, else float32."""
    return np.float64 if dtype == torch.float64 else np.float32
