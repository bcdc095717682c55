"""``int8`` and ``int8c``: affine int8, one scale per tensor or per channel (wire ``Quantize``).

code = round(x / scale + zero_point), real = (code - zero_point) * scale. The scale is
rounded to the float32 that travels before quantizing, so the decoder inverts exactly
what the encoder did; |error| <= scale / 2 + float32 rounding. NaN and infinities are
refused. Neither is safe for language-model hidden states: a few outlier channels set
the scale and every other value collapses to a handful of codes.
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import numpy as np
import torch

from splitnet.codecs.base import Buffer, Decoding, PrecisionStep, Shape
from splitnet.codecs.cast import value_range
from splitnet.codecs.dtypes import F32_MAX, F32_TINY, FINITE_MAX, FLOATS, WIDE, wide_numpy
from splitnet.errors import CodecError
from splitnet.v1 import tensor_pb2 as pb

__all__ = ["Int8", "Int8PerChannel", "Quantize", "not_finite", "too_wide"]

MIN_PER_CHANNEL = 16  # int8c: fewest values per channel worth a scale of their own


def not_finite(codec: str) -> CodecError:
    """The error for NaN or infinities given to a quantizing codec."""
    return CodecError(
        f"{codec} cannot represent NaN or infinite values (the tensor has some); "
        "use raw, zstd, fp16 or bf16 for this cut"
    )


def too_wide(codec: str) -> CodecError:
    """The error for a range no float32 scale can cover."""
    return CodecError(
        f"{codec}: the tensor's range is too wide for a float32 scale; use raw or zstd"
    )


def per_channel_fits(shape: Shape) -> bool:
    """Whether int8c quantizes a tensor of ``shape`` per channel (axis 1): only where each
    channel holds enough values to pay for its own scale and zero point (8 bytes).
    """
    return len(shape) >= 2 and shape[1] > 0 and math.prod(shape) >= MIN_PER_CHANNEL * shape[1]


@functools.lru_cache(maxsize=512)
def _zero_tensor(zero_point: int, dtype: torch.dtype) -> torch.Tensor:
    """A cached 0-d tensor holding ``zero_point`` (only ever read)."""
    return torch.tensor(float(zero_point), dtype=dtype)


class Quantize(PrecisionStep):
    """Affine int8; ``Int8`` (per tensor) and ``Int8PerChannel`` are its two variants."""

    wire_kind = "quantize"
    per_channel: ClassVar[bool]

    def plan(self, t: torch.Tensor, step: pb.Step) -> Any:
        """Scale(s) and zero point(s) from the range of ``t`` (per channel where it pays)."""
        x = t if t.dtype in WIDE else t.float()
        q = step.quantize
        if self.per_channel and per_channel_fits(tuple(x.shape)):
            return x, self._plan_per_channel(x, q)
        return x, self._plan_per_tensor(x, q)

    def _plan_per_tensor(self, x: torch.Tensor, q: pb.Quantize) -> tuple[float, int]:
        lo, hi = value_range(x)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise not_finite(self.name)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        wide_scale = (hi - lo) / 255.0
        if wide_scale > F32_MAX:
            raise too_wide(self.name)
        scale = max(float(np.float32(wide_scale)), F32_TINY)  # the float32 that travels
        zero_point = min(max(round(-128.0 - lo / scale), -128), 127)
        q.scale.append(scale)
        q.zero_point.append(zero_point)
        return scale, zero_point

    def _plan_per_channel(self, x: torch.Tensor, q: pb.Quantize) -> tuple[np.ndarray, np.ndarray]:
        channels = x.shape[1]
        # amin and amax propagate NaN; both are several times faster than aminmax(dim=...).
        rows = x.reshape(x.shape[0], channels, -1)
        # The parameters are one number per channel: numpy, float64, in place.
        lo = rows.amin(dim=(0, 2)).numpy().astype(np.float64)
        hi = rows.amax(dim=(0, 2)).numpy().astype(np.float64)
        np.minimum(lo, 0.0, out=lo)
        np.maximum(hi, 0.0, out=hi)
        wide_scale = hi - lo
        wide_scale /= 255.0
        if not wide_scale.max() <= F32_MAX:  # NaN, infinite, or beyond float32
            if not np.isfinite(wide_scale).all():
                raise not_finite(self.name)
            raise too_wide(self.name)
        scale32 = wide_scale.astype(np.float32)  # the float32s that travel
        np.maximum(scale32, np.float32(F32_TINY), out=scale32)
        scale = scale32.astype(np.float64)
        zero_point = lo / scale  # in [-255, 0], so -128 - lo / scale rounds into [-128, 127]
        np.subtract(-128.0, zero_point, out=zero_point)
        np.round(zero_point, out=zero_point)
        np.minimum(zero_point, 127.0, out=zero_point)  # float rounding guard
        q.per_channel = True
        q.axis = 1
        q.scale.extend(scale32.tolist())
        q.zero_point.extend(zero_point.astype(np.int64).tolist())
        return scale, zero_point

    def apply(self, t: torch.Tensor, plan: Any) -> np.ndarray:
        """The int8 codes: one fused pass for zero_point + x / scale, then round, clamp."""
        x, (scale, zero_point) = plan
        if isinstance(scale, float):
            v = torch.add(_zero_tensor(zero_point, x.dtype), x, alpha=1.0 / scale)
        else:
            view = [1] * x.dim()
            view[1] = x.shape[1]
            np_dtype = np.float64 if x.dtype == torch.float64 else np.float32
            inv = np.divide(1.0, scale, dtype=np_dtype).reshape(view)
            zero = zero_point.astype(np_dtype).reshape(view)
            v = torch.addcmul(torch.from_numpy(zero), x, torch.from_numpy(inv))
        return v.round_().clamp_(-128, 127).to(torch.int8).numpy()

    def extremes(self, dtype: torch.dtype, shape: Shape) -> tuple[pb.Step, pb.Step]:
        """Zero points 0 (one varint byte each) at the least, -128 (two) at the most."""
        per_channel = self.per_channel and per_channel_fits(shape)
        n = shape[1] if per_channel else 1
        axis = 1 if per_channel else 0
        small = pb.Quantize(per_channel=per_channel, axis=axis, scale=[1.0] * n, zero_point=[0] * n)
        big = pb.Quantize(
            per_channel=per_channel, axis=axis, scale=[1.0] * n, zero_point=[-128] * n
        )
        return pb.Step(quantize=small), pb.Step(quantize=big)

    @classmethod
    def validate(cls, step: pb.Step, dtype: torch.dtype, shape: Shape, numel: int) -> Decoding:
        """Counts first (O(1)), then each scale and zero point; the payload is int8 codes."""
        scale, zero, reach = _params(step.quantize, dtype, shape)

        def finish(buf: Buffer) -> torch.Tensor:
            # numpy reads the (possibly immutable) payload in place, writes a fresh result.
            return _dequantize(np.frombuffer(buf, dtype=np.int8), scale, zero, reach, dtype, shape)

        return Decoding(numel, finish)


class Int8(Quantize):
    """One scale and zero point for the whole tensor."""

    name = "int8"
    summary = "affine int8, one scale per tensor"
    per_channel = False


class Int8PerChannel(Quantize):
    """One scale and zero point per channel (axis 1), where channels hold 16+ values."""

    name = "int8c"
    summary = "affine int8, one scale per channel (axis 1)"
    per_channel = True


_Params = float | np.ndarray


def _params(q: pb.Quantize, dtype: torch.dtype, shape: Shape) -> tuple[_Params, _Params, float]:
    """Validated ``(scale, zero_point, reach)``: Python floats per tensor, arrays shaped
    to broadcast per channel; ``reach`` is the largest magnitude a code can decode to.
    """
    if dtype not in FLOATS:
        raise CodecError(f"quantize step on a non-floating {dtype} tensor")
    per_channel = q.per_channel
    axis = q.axis if per_channel else 0
    if per_channel and axis >= len(shape):
        raise CodecError(f"quantize axis {axis} out of range for rank {len(shape)}")
    channels = shape[axis] if per_channel else 1
    q_scale, q_zero = q.scale, q.zero_point
    if len(q_scale) != channels or len(q_zero) != channels:  # counts before any entry
        raise CodecError(
            f"quantize step needs {channels} scales and zero points, "
            f"got {len(q_scale)} and {len(q_zero)}"
        )
    if not per_channel:
        scale, zero = q_scale[0], q_zero[0]
        if not 0.0 < scale < math.inf:
            raise CodecError("quantize scales must be finite and positive")
        if not -128 <= zero <= 127:
            raise CodecError("quantize zero points must lie in [-128, 127]")
        return scale, float(zero), max(128 + zero, 127 - zero) * scale
    if channels == 0:
        return 1.0, 0.0, 0.0
    wide = wide_numpy(dtype)
    scales = np.asarray(q_scale, dtype=wide)
    zeros = np.asarray(q_zero, dtype=wide)
    largest = float(scales.max())
    if not (scales.min() > 0.0 and largest < math.inf):  # NaN fails both
        raise CodecError("quantize scales must be finite and positive")
    if not (zeros.min() >= -128 and zeros.max() <= 127):
        raise CodecError("quantize zero points must lie in [-128, 127]")
    view = [1] * len(shape)
    view[axis] = channels
    # |code - zero_point| <= 255, so no value decodes beyond 255 x the largest scale.
    return scales.reshape(view), zeros.reshape(view), 255.0 * largest


def _dequantize(
    codes: np.ndarray,
    scale: _Params,
    zero: _Params,
    reach: float,
    dtype: torch.dtype,
    shape: Shape,
) -> torch.Tensor:
    wide = codes.reshape(shape).astype(wide_numpy(dtype))
    np.subtract(wide, zero, out=wide)
    # The extreme codes reach half a step past the range the encoder saw; where that
    # passes the dtype's largest finite value, clamp so the result stays finite.
    limit = FINITE_MAX[dtype]
    if reach > limit:
        with np.errstate(over="ignore"):
            np.multiply(wide, scale, out=wide)
        np.clip(wide, -limit, limit, out=wide)
    else:
        np.multiply(wide, scale, out=wide)
    out = torch.from_numpy(wide)
    return out if dtype in WIDE else out.to(dtype)
