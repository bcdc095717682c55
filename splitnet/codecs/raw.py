"""``raw``: the values as they are (the precision step that writes no ``Step``)."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch

from splitnet.codecs.base import Buffer, Decoding, PrecisionStep, Shape
from splitnet.codecs.dtypes import NUMPY_HOLDER, as_numpy
from splitnet.errors import CodecError
from splitnet.v1 import tensor_pb2 as pb

__all__ = ["Raw", "raw_tensor"]

_NO_STEP = pb.Step()


class Raw(PrecisionStep):
    """No precision step: the payload is the tensor's little-endian bytes, C order."""

    name = "raw"
    wire_kind = None
    lossless = True
    llm_safe = True
    summary = "the bytes as they are"

    def applies(self, dtype: torch.dtype, shape: Shape) -> bool:
        """Never writes a step: every tensor travels as its bytes."""
        return False

    def plan(self, t: torch.Tensor, step: pb.Step) -> Any:
        """Nothing to plan."""
        return None

    def apply(self, t: torch.Tensor, plan: Any) -> np.ndarray:
        """The tensor's own memory, as numpy."""
        return as_numpy(t)

    def extremes(self, dtype: torch.dtype, shape: Shape) -> tuple[pb.Step, pb.Step]:
        """No step message at all (callers check ``applies`` first)."""
        return _NO_STEP, _NO_STEP

    @classmethod
    def validate(cls, step: pb.Step, dtype: torch.dtype, shape: Shape, numel: int) -> Decoding:
        """The payload is ``numel`` values of ``dtype``."""
        return Decoding(numel * NUMPY_HOLDER[dtype].itemsize, partial(raw_tensor, dtype, shape))


def raw_tensor(dtype: torch.dtype, shape: Shape, buf: Buffer) -> torch.Tensor:
    """The tensor whose little-endian bytes are ``buf``: ``buf``'s own memory when it is
    writable (a bytearray handed over), else one copy.
    """
    arr = np.frombuffer(buf, dtype=NUMPY_HOLDER[dtype])
    if dtype == torch.bool and arr.size and arr.view(np.uint8).max() > 1:
        raise CodecError("bool tensor holds bytes other than 0 and 1")
    if not arr.flags.writeable:  # one copy: the payload is immutable, the result not
        arr = arr.copy()
    out = torch.from_numpy(arr)
    if dtype == torch.bfloat16:
        out = out.view(torch.bfloat16)
    return out.reshape(shape)
