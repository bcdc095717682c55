"""Codecs: turn a tensor into the wire ``Tensor`` message and back, safely.

A codec spec is a string: an optional precision step, then an optional entropy step,
joined by ``+``::

    raw            the bytes as they are
    zstd[:LEVEL]   zstd, level 1..22 (default 3)
    fp16, bf16     cast floats to 16 bits (fp16 after scaling by a power of two
                   when the values are tiny or large, so they keep 11 bits)
    int8           affine int8, one scale per tensor
    int8c          affine int8, one scale per channel (axis 1); per tensor where channels
                   hold fewer than 16 values each (their parameters would outweigh them)
    int8+zstd:1    chains: precision first, then zstd

Precision steps apply to floating tensors only; other dtypes travel losslessly.
Lossy codecs never return silently wrong values: ``fp16`` and ``bf16`` keep NaN and
infinities but refuse finite values they cannot carry (beyond bf16's range, or beyond
what fp16 reaches with its largest scaling), and ``int8``/``int8c`` refuse NaN and
infinities, each with a ``CodecError``.

The message says everything needed to decode it (see ``proto/splitnet/v1/tensor.proto``).
``decode`` treats the message as hostile: it checks dtype, rank, dimensions, declared
sizes and the zstd frame header *before* it allocates anything, and raises
``CodecError`` saying what was wrong.
"""

from __future__ import annotations

import functools
import math
import re
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from splitnet.errors import CodecError
from splitnet.v1 import tensor_pb2 as pb

__all__ = [
    "CodecSpec",
    "DecodeLimits",
    "decode",
    "encode",
    "encode_parts",
    "parse_codec",
    "torch_dtype",
    "wire_dtype",
]

if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("splitnet's wire format is little-endian; this host is big-endian")

PRECISIONS = ("none", "fp16", "bf16", "int8", "int8c")
DEFAULT_ZSTD_LEVEL = 3

# torch dtype <-> wire enum <-> numpy dtype used to hold the bytes.
_TORCH_TO_WIRE: dict[torch.dtype, pb.DType] = {
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
_WIRE_TO_TORCH = {v: k for k, v in _TORCH_TO_WIRE.items()}
# bfloat16 has no numpy dtype: its bytes travel through numpy as int16.
_NUMPY_HOLDER: dict[torch.dtype, np.dtype] = {
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
_CODES = np.dtype("i1")  # int8 quantization codes
_MIN_PER_CHANNEL = 16  # int8c: fewest values per channel worth a scale of their own
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_WIDE = (torch.float32, torch.float64)  # the dtypes a cast step narrows
# Largest finite value of each cast target: a finite input beyond it (for fp16, beyond
# it times 2^exponent) is refused.
_CAST_MAX = {"fp16": 65504.0, "bf16": 3.3895313892515355e38}
_CAST_TO = {"fp16": (torch.float16, pb.DTYPE_FLOAT16), "bf16": (torch.bfloat16, pb.DTYPE_BFLOAT16)}
# fp16 sends x * 2^-exponent. Within this window of largest magnitudes the exponent is
# 0 (no extra pass): the values keep full precision down to 1/64 of the largest, and
# any value below that errs by at most 2^-25, under 2^-17 of the largest.
_FP16_PLAIN = (2.0**-8, 65504.0)
_MAX_EXPONENT = 160  # |Cast.exponent| allowed on the wire
_F32 = struct.Struct("<f")  # rounds a Python float to float32 (OverflowError past its range)
_F32_MAX = float(np.finfo(np.float32).max)
_FINITE_MAX = {
    torch.float16: _CAST_MAX["fp16"],
    torch.bfloat16: _CAST_MAX["bf16"],
    torch.float32: _F32_MAX,
    torch.float64: math.inf,
}
_F32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32: the least int8 scale

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # little-endian 0xFD2FB528, first in every zstd frame

_SPEC_RE = re.compile(r"^(?:(fp16|bf16|int8c|int8|raw)(?:\+zstd(?::(\d+))?)?|zstd(?::(\d+))?)$")


@dataclass(frozen=True, kw_only=True)
class CodecSpec:
    """A parsed codec spec such as ``int8+zstd:1``."""

    precision: str = "none"  # one of PRECISIONS
    zstd_level: int | None = None  # None: no entropy step

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise CodecError(f"unknown precision {self.precision!r}; expected one of {PRECISIONS}")
        if self.zstd_level is not None and not 1 <= self.zstd_level <= 22:
            raise CodecError(f"zstd level must be 1..22, got {self.zstd_level}")

    @property
    def lossless(self) -> bool:
        """True when decoding returns the exact input."""
        return self.precision == "none"

    def __str__(self) -> str:
        parts = [] if self.precision == "none" else [self.precision]
        if self.zstd_level is not None:
            parts.append(f"zstd:{self.zstd_level}")
        return "+".join(parts) or "raw"


def parse_codec(spec: str | CodecSpec) -> CodecSpec:
    """Parse ``"int8+zstd:1"`` and friends; raise ``CodecError`` listing the grammar."""
    if isinstance(spec, CodecSpec):
        return spec
    if not isinstance(spec, str):
        raise CodecError(f"a codec spec is a string such as 'int8+zstd:1', not {type(spec)}")
    return _parse(spec)


@functools.lru_cache(maxsize=64)
def _parse(spec: str) -> CodecSpec:
    m = _SPEC_RE.match(spec.strip().lower())
    if not m:
        raise CodecError(
            f"invalid codec spec {spec!r}: expected raw, zstd[:LEVEL], fp16, bf16, int8 or "
            "int8c, optionally followed by +zstd[:LEVEL] (for example int8+zstd:1)"
        )
    precision, level_after, level_alone = m.groups()
    if precision is None:  # "zstd[:N]"
        return CodecSpec(zstd_level=int(level_alone) if level_alone else DEFAULT_ZSTD_LEVEL)
    has_zstd = "+zstd" in spec.lower()
    level = (int(level_after) if level_after else DEFAULT_ZSTD_LEVEL) if has_zstd else None
    return CodecSpec(precision="none" if precision == "raw" else precision, zstd_level=level)


@dataclass(frozen=True, kw_only=True)
class DecodeLimits:
    """What ``decode`` accepts from the network."""

    max_rank: int = 8  # most dimensions a tensor may have
    max_dim: int = 1 << 31  # largest single dimension
    max_raw_bytes: int = 1 << 30  # largest decoded tensor, in bytes

    def __post_init__(self) -> None:
        if self.max_rank < 0 or self.max_dim < 0 or self.max_raw_bytes < 0:
            raise ValueError("decode limits must be non-negative")


DEFAULT_LIMITS = DecodeLimits()

# zstd contexts are not thread-safe (and release the GIL), so each thread has its own.
_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def wire_dtype(dtype: torch.dtype) -> int:
    """The wire ``DType`` value of a torch dtype; ``CodecError`` if it cannot travel."""
    value = _TORCH_TO_WIRE.get(dtype)
    if value is None:
        raise CodecError(f"dtype {dtype} cannot go on the wire")
    return value


def torch_dtype(value: int) -> torch.dtype:
    """The torch dtype of a wire ``DType`` value; ``CodecError`` if unknown."""
    dtype = _WIRE_TO_TORCH.get(value)  # type: ignore[call-overload]
    if dtype is None:
        raise CodecError(f"unknown or unsupported dtype value {value}")
    return dtype


# ---------------------------------------------------------------------------- encode


def encode(tensor: torch.Tensor, codec: str | CodecSpec = "raw") -> pb.Tensor:
    """Encode ``tensor`` as a self-describing wire ``Tensor`` message.

    Raises ``CodecError`` for an unsupported dtype or layout, and where the lossy
    codec cannot represent the values (see the module docstring).
    """
    msg, payload = encode_parts(tensor, codec)
    msg.payload = payload if isinstance(payload, bytes) else payload.tobytes()
    return msg


def encode_parts(
    tensor: torch.Tensor, codec: str | CodecSpec = "raw"
) -> tuple[pb.Tensor, bytes | memoryview]:
    """Like ``encode``, but the payload comes back beside the message (left empty).

    Without a precision or zstd step the payload is a read-only view of the tensor's
    own memory, not a copy: a sender that streams it in chunks copies each byte once.
    Do not change the tensor until the payload has been sent.
    """
    spec = parse_codec(codec)
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
        raise CodecError(f"only dense torch tensors can go on the wire, not {type(tensor)}")
    wire_dtype = _TORCH_TO_WIRE.get(tensor.dtype)
    if wire_dtype is None:
        raise CodecError(
            f"dtype {tensor.dtype} cannot go on the wire; supported: "
            + ", ".join(str(d) for d in _TORCH_TO_WIRE)
        )
    t = tensor.detach()
    if not t.is_cpu:
        t = t.cpu()
    t = t.contiguous()
    msg = pb.Tensor(dtype=wire_dtype, raw_nbytes=t.numel() * t.element_size(), shape=t.shape)

    data: np.ndarray
    if spec.precision != "none" and t.dtype in _FLOATS and t.numel() > 0:
        data = _apply_precision(t, spec.precision, msg)
    else:
        data = _as_numpy(t)

    flat = data.reshape(-1).view(np.uint8).data  # a memoryview of the bytes, no copy
    if spec.zstd_level is not None:
        msg.steps.add().zstd.level = spec.zstd_level
        return msg, _compressor(spec.zstd_level).compress(flat)
    return msg, flat.toreadonly()


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


def _range(t: torch.Tensor) -> tuple[float, float]:
    """``(min, max)`` of a float32/float64 CPU tensor; NaN if it holds any NaN.

    numpy's SIMD reductions beat ``torch.aminmax`` by about 2x here and do not depend
    on torch's thread pool.
    """
    a = t.numpy()
    return float(a.min()), float(a.max())


def _finite_absmax(t: torch.Tensor) -> float:
    """Largest magnitude among the finite values of ``t`` (0 when there are none)."""
    lo, hi = _range(t)
    if math.isfinite(lo) and math.isfinite(hi):
        return max(-lo, hi)
    finite = t[torch.isfinite(t)]  # rare path: NaN or infinities present
    return float(finite.abs().max()) if finite.numel() else 0.0


def _fp16_exponent(big: float, dtype: torch.dtype) -> int:
    """The power of two fp16 divides by: 0 in the plain window, else one that puts the
    largest magnitude ``big`` in [2^14, 2^15), clamped to what the wire allows.
    """
    if big == 0.0 or _FP16_PLAIN[0] <= big <= _FP16_PLAIN[1]:
        return 0
    if dtype == torch.float32 and big > _F32_MAX * (1 - 2.0**-11):
        # Rounding to 11 bits could carry it past float32's largest value.
        raise CodecError(f"fp16 cannot carry {big:.6g}, this close to float32's limit")
    exponent = math.frexp(big)[1] - 15  # big in [2^(k-1), 2^k) -> [2^14, 2^15)
    return min(max(exponent, -_MAX_EXPONENT), _MAX_EXPONENT)


def _not_finite(codec: str) -> CodecError:
    return CodecError(
        f"{codec} cannot represent NaN or infinite values (the tensor has some); "
        "use raw, zstd, fp16 or bf16 for this cut"
    )


def _too_wide(codec: str) -> CodecError:
    return CodecError(
        f"{codec}: the tensor's range is too wide for a float32 scale; use raw or zstd"
    )


def _apply_precision(t: torch.Tensor, precision: str, msg: pb.Tensor) -> np.ndarray:
    if precision in _CAST_TO:
        if t.dtype not in _WIDE:
            return _as_numpy(t)  # already 16 bits: nothing to gain
        big = _finite_absmax(t)
        exponent = _fp16_exponent(big, t.dtype) if precision == "fp16" else 0
        if big > _CAST_MAX[precision] * 2.0**exponent:
            raise CodecError(
                f"{precision} cannot carry {big:.6g} (its largest finite value is "
                f"{_CAST_MAX[precision]:.6g}); use raw or zstd"
            )
        target, wire = _CAST_TO[precision]
        cast = msg.steps.add().cast
        cast.to = wire
        if exponent == 0:
            return _as_numpy(t.to(target))
        cast.exponent = exponent
        # Scaling by a power of two is exact; float64 holds every factor we use.
        wide = t.double() if abs(exponent) > 126 else t
        return _as_numpy(wide.mul(2.0**-exponent).to(target))

    # Affine int8: code = round(x / scale + zero_point), real = (code - zero_point) * scale.
    # The scale is rounded to the float32 that travels before quantizing, so the
    # decoder inverts exactly what the encoder did; |error| <= scale / 2 + rounding.
    x = t if t.dtype in _WIDE else t.float()
    q = msg.steps.add().quantize
    # Per channel only where each channel has enough values to pay for its own scale
    # and zero point (8 bytes); elsewhere (e.g. a 1 x 128 feature vector) per tensor.
    if precision == "int8c" and x.dim() >= 2 and x.numel() >= _MIN_PER_CHANNEL * x.shape[1] > 0:
        codes = _quantize_per_channel(x, q)
    else:
        codes = _quantize_per_tensor(x, q, precision)
    return codes.numpy()


def _quantize_per_tensor(x: torch.Tensor, q: pb.Quantize, codec: str) -> torch.Tensor:
    lo, hi = _range(x)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise _not_finite(codec)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    wide_scale = (hi - lo) / 255.0
    if wide_scale > _F32_MAX:
        raise _too_wide(codec)
    scale = max(_F32.unpack(_F32.pack(wide_scale))[0], _F32_TINY)  # the float32 that travels
    zero_point = min(max(round(-128.0 - lo / scale), -128), 127)
    q.scale.append(scale)
    q.zero_point.append(zero_point)
    # One fused pass for zero_point + x / scale, then round, clamp, narrow in place.
    v = torch.add(_zero_tensor(zero_point, x.dtype), x, alpha=1.0 / scale)
    return v.round_().clamp_(-128, 127).to(torch.int8)


@functools.lru_cache(maxsize=512)
def _zero_tensor(zero_point: int, dtype: torch.dtype) -> torch.Tensor:
    """A cached 0-d tensor holding ``zero_point`` (only ever read)."""
    return torch.tensor(float(zero_point), dtype=dtype)


def _quantize_per_channel(x: torch.Tensor, q: pb.Quantize) -> torch.Tensor:
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
    if not wide_scale.max() <= _F32_MAX:  # NaN, infinite, or beyond float32
        raise _not_finite("int8c") if not np.isfinite(wide_scale).all() else _too_wide("int8c")
    scale32 = wide_scale.astype(np.float32)  # the float32s that travel
    np.maximum(scale32, np.float32(_F32_TINY), out=scale32)
    scale = scale32.astype(np.float64)
    zero_point = lo / scale  # in [-255, 0], so -128 - lo / scale rounds into [-128, 127]
    np.subtract(-128.0, zero_point, out=zero_point)
    np.round(zero_point, out=zero_point)
    np.minimum(zero_point, 127.0, out=zero_point)  # float rounding guard
    q.per_channel = True
    q.axis = 1
    q.scale.extend(scale32.tolist())
    q.zero_point.extend(zero_point.astype(np.int64).tolist())
    view = [1] * x.dim()
    view[1] = channels
    np_dtype = np.float64 if x.dtype == torch.float64 else np.float32
    inv = np.divide(1.0, scale, dtype=np_dtype).reshape(view)
    zero = zero_point.astype(np_dtype).reshape(view)
    v = torch.addcmul(torch.from_numpy(zero), x, torch.from_numpy(inv))
    return v.round_().clamp_(-128, 127).to(torch.int8)


# ---------------------------------------------------------------------------- decode


def decode(
    msg: pb.Tensor,
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    payload: bytes | bytearray | None = None,
) -> torch.Tensor:
    """Decode a wire ``Tensor``; validate everything before allocating.

    ``payload`` replaces ``msg.payload`` (for payloads that arrived in chunks). A
    ``bytearray`` is handed over: a lossless result may use its memory without a copy.
    The result is writable and never aliases ``msg``.
    """
    dtype = _WIRE_TO_TORCH.get(msg.dtype)
    if dtype is None:
        raise CodecError(f"unknown or unsupported dtype value {msg.dtype} in wire tensor")
    shape = tuple(msg.shape)
    if len(shape) > limits.max_rank:
        raise CodecError(f"rank {len(shape)} exceeds the limit of {limits.max_rank}")
    if shape and (min(shape) < 0 or max(shape) > limits.max_dim):
        bad = next(d for d in shape if d < 0 or d > limits.max_dim)
        raise CodecError(f"dimension {bad} in shape {list(shape)} is negative or too large")
    numel = math.prod(shape)
    holder = _NUMPY_HOLDER[dtype]
    raw = numel * holder.itemsize
    if raw != msg.raw_nbytes:
        raise CodecError(
            f"declared raw size {msg.raw_nbytes} != prod(shape) x itemsize = "
            f"{numel} x {holder.itemsize}"
        )
    if raw > limits.max_raw_bytes:
        raise CodecError(f"tensor of {raw} bytes exceeds the limit of {limits.max_raw_bytes} bytes")

    first, kind, zstd_step = _step_kinds(msg.steps)
    if kind == "quantize":
        quant = _quantize_params(first.quantize, dtype, shape)
        stage: np.dtype = _CODES
    elif kind == "cast":
        narrow, exponent = _check_cast(first.cast, dtype)
        stage = _NUMPY_HOLDER[narrow]
    else:
        stage = holder
    stage_nbytes = numel * stage.itemsize
    if payload is None:
        payload = msg.payload
    if zstd_step:
        payload = _decompress(payload, stage_nbytes)
    elif len(payload) != stage_nbytes:
        raise CodecError(f"payload holds {len(payload)} bytes; the header implies {stage_nbytes}")

    if kind == "quantize":
        # numpy reads the (immutable) payload in place and writes a fresh result.
        return _dequantize(np.frombuffer(payload, dtype=np.int8), *quant, dtype, shape)
    arr = np.frombuffer(payload, dtype=stage)
    if not arr.flags.writeable:  # one copy: the payload is immutable, the result must not be
        arr = arr.copy()
    if kind == "cast":  # widen with torch: far faster than numpy for halves
        halves = torch.from_numpy(arr).view(narrow)
        if exponent == 0:
            return halves.to(dtype).reshape(shape)
        # Exact power-of-two scaling; float64 where float32 cannot hold the factor.
        wide = halves.to(torch.float64 if abs(exponent) > 126 else dtype)
        return wide.mul_(2.0**exponent).to(dtype).reshape(shape)
    if dtype == torch.bool and arr.size and arr.view(np.uint8).max() > 1:
        raise CodecError("bool tensor holds bytes other than 0 and 1")
    out = torch.from_numpy(arr)
    if dtype == torch.bfloat16:
        out = out.view(torch.bfloat16)
    return out.reshape(shape)


def _step_kinds(steps: Sequence[pb.Step]) -> tuple[pb.Step, str | None, bool]:
    """``(first step, its kind if a cast or quantize else None, whether zstd ends the chain)``."""
    n = len(steps)
    if n > 2:
        raise CodecError(f"{n} steps; a wire tensor has at most two")
    if n == 0:
        return _NO_STEP, None, False
    first = steps[0]
    kinds = [first.WhichOneof("kind")] + [s.WhichOneof("kind") for s in steps[1:]]
    zstd_step = kinds[-1] == "zstd"
    if n == 1 and zstd_step:
        return first, None, True
    if n - zstd_step == 1 and kinds[0] in ("cast", "quantize"):
        return first, kinds[0], zstd_step
    raise CodecError(
        f"unsupported step chain {kinds}; expected at most one cast or quantize step, "
        "then at most one zstd step"
    )


_NO_STEP = pb.Step()


def _check_cast(cast: pb.Cast, dtype: torch.dtype) -> tuple[torch.dtype, int]:
    """``(the narrow dtype, the power-of-two exponent)`` of a valid cast step."""
    if cast.to not in (pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16):
        raise CodecError(f"cast target {cast.to} is not FLOAT16 or BFLOAT16")
    if dtype not in _WIDE:
        raise CodecError(f"cast step on a {dtype} tensor; only float32/float64 are cast")
    exponent = cast.exponent
    if not -_MAX_EXPONENT <= exponent <= _MAX_EXPONENT:
        raise CodecError(f"cast exponent {exponent} is outside [-160, 160]")
    return (torch.float16 if cast.to == pb.DTYPE_FLOAT16 else torch.bfloat16), exponent


_Params = float | np.ndarray


def _quantize_params(
    q: pb.Quantize, dtype: torch.dtype, shape: tuple[int, ...]
) -> tuple[_Params, _Params, float]:
    """Validated ``(scale, zero_point, reach)``: Python floats per tensor, arrays shaped
    to broadcast per channel; ``reach`` is the largest magnitude a code can decode to.
    """
    if dtype not in _FLOATS:
        raise CodecError(f"quantize step on a non-floating {dtype} tensor")
    per_channel = q.per_channel
    axis = q.axis if per_channel else 0
    if axis >= len(shape) and per_channel:
        raise CodecError(f"quantize axis {axis} out of range for rank {len(shape)}")
    channels = shape[axis] if per_channel else 1
    q_scale, q_zero = q.scale, q.zero_point
    if len(q_scale) != channels or len(q_zero) != channels:
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
    wide = np.float64 if dtype == torch.float64 else np.float32
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


def _decompress(payload: bytes | bytearray, expected: int) -> bytes:
    """Decompress exactly one zstd frame that declares exactly ``expected`` bytes."""
    if payload[:4] != _ZSTD_MAGIC:  # not zstd, or a skippable frame
        raise CodecError("payload is not a standard zstd frame")
    try:
        declared = zstandard.frame_content_size(payload)  # -1: not declared
    except zstandard.ZstdError as e:
        raise CodecError(f"payload is not a zstd frame: {e}") from e
    if declared < 0:
        raise CodecError("zstd frame does not declare its content size")
    if declared != expected:
        raise CodecError(f"zstd frame declares {declared} bytes; the header implies {expected}")
    # Safe now: zstandard allocates the declared content size, which we just bounded.
    # It also checks the frame decodes to exactly that size with nothing after it.
    try:
        return _decompressor().decompress(payload, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise CodecError(f"corrupt zstd payload: {e}") from e


def _dequantize(
    codes: np.ndarray,
    scale: _Params,
    zero: _Params,
    reach: float,
    dtype: torch.dtype,
    shape: tuple[int, ...],
) -> torch.Tensor:
    wide = codes.reshape(shape).astype(np.float64 if dtype == torch.float64 else np.float32)
    np.subtract(wide, zero, out=wide)
    # The extreme codes reach half a step past the range the encoder saw; where that
    # passes the dtype's largest finite value, clip so the result stays finite.
    limit = _FINITE_MAX[dtype]
    if reach > limit:
        with np.errstate(over="ignore"):
            np.multiply(wide, scale, out=wide)
        np.clip(wide, -limit, limit, out=wide)
    else:
        np.multiply(wide, scale, out=wide)
    out = torch.from_numpy(wide)
    return out if dtype in _WIDE else out.to(dtype)
