"""``fp16`` and ``bf16``: cast float32/float64 values to 16 bits (wire step ``Cast``).

fp16 first scales by a power of two when the values are tiny or large, so that they
keep 11 bits; bf16 has float32's range and never scales. Both keep NaN and
infinities and refuse finite values they cannot carry.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch

from splitnet.codecs.base import Buffer, Decoding, PrecisionStep, Shape
from splitnet.codecs.dtypes import BF16_MAX, F32_MAX, FP16_MAX, WIDE, as_numpy
from splitnet.errors import CodecError
from splitnet.v1 import tensor_pb2 as pb

__all__ = ["Bf16", "Cast", "Fp16", "finite_absmax"]

# fp16 sends x * 2^-exponent. Within this window of largest magnitudes the exponent is
# 0 (no extra pass): the values keep full precision down to 1/64 of the largest, and
# any value below that errs by at most 2^-25, under 2^-17 of the largest.
_FP16_PLAIN = (2.0**-8, FP16_MAX)
MAX_EXPONENT = 160  # |Cast.exponent| allowed on the wire
# Beyond this |exponent| 2^exponent may not be a normal float32: scale in float64.
_F32_EXPONENT = 126
_NARROW = {pb.DTYPE_FLOAT16: torch.float16, pb.DTYPE_BFLOAT16: torch.bfloat16}


def value_range(t: torch.Tensor) -> tuple[float, float]:
    """``(min, max)`` of a float32/float64 CPU tensor; NaN if it holds any NaN.

    numpy's SIMD reductions beat ``torch.aminmax`` by about 2x here and do not depend
    on torch's thread pool.
    """
    a = t.numpy()
    return float(a.min()), float(a.max())


def finite_absmax(t: torch.Tensor) -> float:
    """Largest magnitude among the finite values of ``t`` (0 when there are none)."""
    lo, hi = value_range(t)
    if math.isfinite(lo) and math.isfinite(hi):
        return max(-lo, hi)
    finite = t[torch.isfinite(t)]  # rare path: NaN or infinities present
    return float(finite.abs().max()) if finite.numel() else 0.0


class Cast(PrecisionStep):
    """Cast to a 16-bit float; ``Fp16`` and ``Bf16`` are its two targets."""

    wire_kind = "cast"
    llm_safe = True
    target: ClassVar[torch.dtype]
    wire_target: ClassVar[pb.DType]
    largest: ClassVar[float]  # the target's largest finite value

    def applies(self, dtype: torch.dtype, shape: Shape) -> bool:
        """float32/float64 only: 16-bit floats travel as they are."""
        return dtype in WIDE and 0 not in shape

    def exponent(self, big: float, dtype: torch.dtype) -> int:
        """The power of two the values are divided by, given their largest magnitude."""
        return 0

    def plan(self, t: torch.Tensor, step: pb.Step) -> Any:
        """The exponent, from the largest finite magnitude; refuse what cannot fit."""
        big = finite_absmax(t)
        exponent = self.exponent(big, t.dtype)
        if big > self.largest * 2.0**exponent:
            raise CodecError(
                f"{self.name} cannot carry {big:.6g} (its largest finite value is "
                f"{self.largest:.6g}); use raw or zstd"
            )
        cast = step.cast
        cast.to = self.wire_target
        if exponent:
            cast.exponent = exponent
        return exponent

    def apply(self, t: torch.Tensor, plan: Any) -> np.ndarray:
        """The 16-bit values of ``t * 2^-exponent`` (scaling by a power of two is exact)."""
        exponent: int = plan
        if exponent == 0:
            return as_numpy(t.to(self.target))
        wide = t.double() if abs(exponent) > _F32_EXPONENT else t
        return as_numpy(wide.mul(2.0**-exponent).to(self.target))

    def extremes(self, dtype: torch.dtype, shape: Shape) -> tuple[pb.Step, pb.Step]:
        """Exponent 0 (omitted) at the least, +-160 (two varint bytes) at the most."""
        small = pb.Step(cast=pb.Cast(to=self.wire_target))
        if type(self).exponent is Cast.exponent:  # this target never scales
            return small, small
        return small, pb.Step(cast=pb.Cast(to=self.wire_target, exponent=-MAX_EXPONENT))

    @classmethod
    def validate(cls, step: pb.Step, dtype: torch.dtype, shape: Shape, numel: int) -> Decoding:
        """``to`` is FLOAT16 or BFLOAT16, the tensor float32/float64, |exponent| <= 160."""
        cast = step.cast
        narrow = _NARROW.get(cast.to)
        if narrow is None:
            raise CodecError(f"cast target {int(cast.to)} is not FLOAT16 or BFLOAT16")
        if dtype not in WIDE:
            raise CodecError(f"cast step on a {dtype} tensor; only float32/float64 are cast")
        exponent = cast.exponent
        if not -MAX_EXPONENT <= exponent <= MAX_EXPONENT:
            raise CodecError(
                f"cast exponent {exponent} is outside [-{MAX_EXPONENT}, {MAX_EXPONENT}]"
            )
        # float64 where a float32 multiply by 2^exponent could lose bits (see tensor.proto)
        wide = torch.float64 if exponent and abs(exponent) > _F32_EXPONENT else dtype

        def finish(buf: Buffer) -> torch.Tensor:
            if narrow == torch.bfloat16:
                # bfloat16 is float32's high half: one shift widens it, reading the
                # payload in place (torch would need a writable copy first).
                bits = np.frombuffer(buf, dtype="<u2")
                f32 = np.empty(bits.shape, dtype=np.uint32)
                np.left_shift(bits, 16, out=f32, dtype=np.uint32)
                values = torch.from_numpy(f32.view(np.float32))
            else:
                arr = np.frombuffer(buf, dtype=np.int16)
                if not arr.flags.writeable:  # torch refuses read-only memory
                    arr = arr.copy()
                values = torch.from_numpy(arr).view(narrow)
            if exponent == 0:
                return values.to(dtype).reshape(shape)
            return values.to(wide).mul_(2.0**exponent).to(dtype).reshape(shape)

        return Decoding(numel * 2, finish)


class Fp16(Cast):
    """IEEE half precision, scaled by a power of two for tiny or large values."""

    name = "fp16"
    summary = "cast floats to IEEE half (scaled by a power of two when tiny or large)"
    target = torch.float16
    wire_target = pb.DTYPE_FLOAT16
    largest = FP16_MAX

    def exponent(self, big: float, dtype: torch.dtype) -> int:
        """0 in the plain window, else one that puts ``big`` in [2^14, 2^15), clamped."""
        if big == 0.0 or _FP16_PLAIN[0] <= big <= _FP16_PLAIN[1]:
            return 0
        if dtype == torch.float32 and big > F32_MAX * (1 - 2.0**-11):
            # Rounding to 11 bits could carry it past float32's largest value.
            raise CodecError(f"fp16 cannot carry {big:.6g}, this close to float32's limit")
        exponent = math.frexp(big)[1] - 15  # big in [2^(k-1), 2^k) -> [2^14, 2^15)
        return min(max(exponent, -MAX_EXPONENT), MAX_EXPONENT)


class Bf16(Cast):
    """bfloat16: float32's range, 8 bits of precision; never scaled."""

    name = "bf16"
    summary = "cast floats to bfloat16 (float32's range, 8 bits of precision)"
    target = torch.bfloat16
    wire_target = pb.DTYPE_BFLOAT16
    largest = BF16_MAX
