"""Codecs: turn a tensor into the wire ``Tensor`` message and back, safely.

A codec spec is a string: an optional precision step, then an optional entropy step,
joined by ``+``::

    raw            the bytes as they are
    zstd[:LEVEL]   zstd, level 1..22 (default 3)
    fp16, bf16     cast floats to 16 bits
    int8           affine int8, one scale per tensor
    int8c          affine int8, one scale per channel (axis 1)
    int8+zstd:1    chains: precision first, then zstd

The message says everything needed to decode it (see ``proto/splitnet/v1/tensor.proto``).
``decode`` treats the message as hostile: it checks dtype, rank, dimensions, declared
sizes and the zstd frame header *before* it allocates anything, and raises
``CodecError`` saying what was wrong.
"""

from __future__ import annotations

import math
import re
import sys
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
    "parse_codec",
]

if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("splitnet's wire format is little-endian; this host is big-endian")

PRECISIONS = ("none", "fp16", "bf16", "int8", "int8c")
DEFAULT_ZSTD_LEVEL = 3

# torch dtype <-> wire enum <-> numpy dtype used to hold the bytes.
_TORCH_TO_WIRE: dict[torch.dtype, int] = {
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
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FP16_MAX = 65504.0

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

_compressors: dict[int, zstandard.ZstdCompressor] = {}
_decompressor = zstandard.ZstdDecompressor()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    c = _compressors.get(level)
    if c is None:
        c = _compressors[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c


# ---------------------------------------------------------------------------- encode


def encode(tensor: torch.Tensor, codec: str | CodecSpec = "raw") -> pb.Tensor:
    """Encode ``tensor`` as a self-describing wire ``Tensor`` message."""
    spec = parse_codec(codec)
    if tensor.dtype not in _TORCH_TO_WIRE:
        raise CodecError(
            f"dtype {tensor.dtype} cannot go on the wire; supported: "
            + ", ".join(str(d) for d in _TORCH_TO_WIRE)
        )
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    msg = pb.Tensor(dtype=_TORCH_TO_WIRE[t.dtype], raw_nbytes=t.numel() * t.element_size())
    msg.shape.extend(t.shape)

    data: np.ndarray
    if spec.precision != "none" and t.dtype in _FLOATS and t.numel() > 0:
        data = _apply_precision(t, spec.precision, msg)
    else:
        data = _as_numpy(t)

    if spec.zstd_level is not None:
        msg.steps.add().zstd.level = spec.zstd_level
        msg.payload = _compressor(spec.zstd_level).compress(data)
    else:
        msg.payload = data.tobytes()
    return msg


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


def _finite_range(t: torch.Tensor, codec: str) -> tuple[float, float]:
    lo, hi = (float(v) for v in torch.aminmax(t))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise CodecError(
            f"{codec} cannot represent NaN or infinite values (the tensor has some); "
            "use raw, zstd, fp16 or bf16 for this cut"
        )
    return lo, hi


def _apply_precision(t: torch.Tensor, precision: str, msg: pb.Tensor) -> np.ndarray:
    if precision in ("fp16", "bf16"):
        if t.dtype not in (torch.float32, torch.float64):
            return _as_numpy(t)  # already 16 bits or narrower: nothing to gain
        if precision == "fp16":
            lo, hi = torch.aminmax(t)
            big = max(-float(lo), float(hi))
            if math.isnan(big):
                finite = t[torch.isfinite(t)]
                big = float(finite.abs().max()) if finite.numel() else 0.0
            if big > _FP16_MAX:
                raise CodecError(
                    f"fp16 cannot hold {big:.4g} (largest is {_FP16_MAX}); use bf16 or int8"
                )
            msg.steps.add().cast.to = pb.DTYPE_FLOAT16
            return t.to(torch.float16).numpy()
        msg.steps.add().cast.to = pb.DTYPE_BFLOAT16
        return t.to(torch.bfloat16).view(torch.int16).numpy()

    x = t if t.dtype == torch.float32 else t.float()
    per_channel = precision == "int8c" and x.dim() >= 2 and x.shape[1] > 0
    if per_channel:
        _finite_range(x, precision)
        dims = [d for d in range(x.dim()) if d != 1]
        lo_t = x.amin(dim=dims).clamp_(max=0.0)
        hi_t = x.amax(dim=dims).clamp_(min=0.0)
    else:
        lo, hi = _finite_range(x, precision)
        lo_t = torch.tensor([min(lo, 0.0)])
        hi_t = torch.tensor([max(hi, 0.0)])
    scale = ((hi_t - lo_t) / 255.0).clamp_(min=1e-30)
    zero_point = torch.round(-128.0 - lo_t / scale).clamp_(-128, 127)
    q = msg.steps.add().quantize
    q.per_channel = per_channel
    q.axis = 1 if per_channel else 0
    q.scale.extend(scale.tolist())
    q.zero_point.extend(int(z) for z in zero_point.tolist())
    # Quantize with the float32 scale that travels, so decode inverts it exactly.
    scale = torch.tensor(q.scale, dtype=torch.float32)
    if per_channel:
        view = [1] * x.dim()
        view[1] = -1
        scale, zero_point = scale.view(view), zero_point.view(view)
    codes = torch.div(x, scale).add_(zero_point).round_().clamp_(-128, 127).to(torch.int8)
    return codes.numpy()


# ---------------------------------------------------------------------------- decode


def decode(msg: pb.Tensor, *, limits: DecodeLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """Decode a wire ``Tensor``; validate everything before allocating.

    The result owns its memory and is writable. Where no copy is needed it is made
    without one: zstd decompresses straight into the result, and the dequantize or
    widen step reads the payload in place.
    """
    dtype = _WIRE_TO_TORCH.get(msg.dtype)
    if dtype is None:
        raise CodecError(f"unknown or unsupported dtype value {msg.dtype} in wire tensor")
    shape = tuple(msg.shape)
    if len(shape) > limits.max_rank:
        raise CodecError(f"rank {len(shape)} exceeds the limit of {limits.max_rank}")
    for d in shape:
        if d < 0 or d > limits.max_dim:
            raise CodecError(f"dimension {d} in shape {list(shape)} is negative or too large")
    numel = math.prod(shape)
    itemsize = _NUMPY_HOLDER[dtype].itemsize
    raw = numel * itemsize
    if raw != msg.raw_nbytes:
        raise CodecError(
            f"declared raw size {msg.raw_nbytes} != prod(shape) x itemsize = {numel} x {itemsize}"
        )
    if raw > limits.max_raw_bytes:
        raise CodecError(f"tensor of {raw} bytes exceeds the limit of {limits.max_raw_bytes} bytes")

    precision, zstd_step = _check_steps(msg, dtype, shape)
    stage_dtype = _stage_dtype(precision, dtype)
    stage_nbytes = numel * stage_dtype.itemsize
    payload = msg.payload

    if zstd_step:
        stage = _decompress(payload, stage_nbytes)
    else:
        if len(payload) != stage_nbytes:
            raise CodecError(f"payload holds {len(payload)} bytes; the header implies {stage_nbytes}")
        stage = np.frombuffer(payload, dtype=stage_dtype)
        if precision is None:
            stage = stage.copy()  # the only copy on this path: the payload is immutable

    if precision is None:
        arr = stage if stage.dtype == stage_dtype else stage.view(stage_dtype)
        if dtype == torch.bool and arr.size and arr.view(np.uint8).max() > 1:
            raise CodecError("bool tensor holds bytes other than 0 and 1")
        out = torch.from_numpy(arr)
        if dtype == torch.bfloat16:
            out = out.view(torch.bfloat16)
        return out.reshape(shape)
    return _undo_precision(np.frombuffer(stage, dtype=stage_dtype), precision, dtype, shape)


def _check_steps(
    msg: pb.Tensor, dtype: torch.dtype, shape: tuple[int, ...]
) -> tuple[pb.Step | None, bool]:
    steps = list(msg.steps)
    zstd_step = bool(steps) and steps[-1].WhichOneof("kind") == "zstd"
    if zstd_step:
        steps.pop()
    if len(steps) > 1:
        raise CodecError(f"unsupported step chain {[s.WhichOneof('kind') for s in msg.steps]}")
    if not steps:
        return None, zstd_step
    step = steps[0]
    kind = step.WhichOneof("kind")
    if kind == "cast":
        if step.cast.to not in (pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16):
            raise CodecError(f"cast target {step.cast.to} is not FLOAT16 or BFLOAT16")
        if dtype not in (torch.float32, torch.float64):
            raise CodecError(f"cast step on a {dtype} tensor; only float32/float64 are cast")
    elif kind == "quantize":
        if dtype not in _FLOATS:
            raise CodecError(f"quantize step on a non-floating {dtype} tensor")
        q = step.quantize
        channels = 1
        if q.per_channel:
            if q.axis >= len(shape):
                raise CodecError(f"quantize axis {q.axis} out of range for rank {len(shape)}")
            channels = shape[q.axis]
        if len(q.scale) != channels or len(q.zero_point) != channels:
            raise CodecError(
                f"quantize step needs {channels} scales and zero points, "
                f"got {len(q.scale)} and {len(q.zero_point)}"
            )
        scales = np.asarray(q.scale, dtype=np.float32)
        if scales.size and not (np.all(np.isfinite(scales)) and np.all(scales > 0)):
            raise CodecError("quantize scales must be finite and positive")
        zps = np.asarray(q.zero_point, dtype=np.int64)
        if zps.size and (zps.min() < -128 or zps.max() > 127):
            raise CodecError("quantize zero points must lie in [-128, 127]")
    else:
        raise CodecError(f"unsupported step {kind!r} (zstd must be the last step)")
    return step, zstd_step


def _stage_dtype(precision: pb.Step | None, dtype: torch.dtype) -> np.dtype:
    if precision is None:
        return _NUMPY_HOLDER[dtype]
    if precision.WhichOneof("kind") == "quantize":
        return np.dtype("i1")
    return np.dtype("<f2") if precision.cast.to == pb.DTYPE_FLOAT16 else np.dtype("<i2")


def _decompress(payload: bytes, expected: int) -> np.ndarray:
    try:
        params = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError as e:
        raise CodecError(f"payload is not a zstd frame: {e}") from e
    if params.content_size == zstandard.CONTENTSIZE_UNKNOWN:
        raise CodecError("zstd frame does not declare its content size")
    if params.content_size != expected:
        raise CodecError(
            f"zstd frame declares {params.content_size} bytes; the header implies {expected}"
        )
    out = np.empty(expected, dtype=np.uint8)
    if expected == 0:
        return out
    filled = 0
    try:
        with _decompressor.stream_reader(payload, read_across_frames=False) as reader:
            view = memoryview(out)
            while filled < expected:
                n = reader.readinto(view[filled:])
                if n == 0:
                    break
                filled += n
    except zstandard.ZstdError as e:
        raise CodecError(f"corrupt zstd payload: {e}") from e
    if filled != expected:
        raise CodecError(f"zstd payload is truncated: got {filled} of {expected} bytes")
    return out


def _undo_precision(
    stage: np.ndarray, step: pb.Step, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    if step.WhichOneof("kind") == "cast":
        if step.cast.to == pb.DTYPE_FLOAT16:
            wide = stage.astype(np.float32)
        else:  # bfloat16: the high half of a float32
            wide = (stage.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        q = step.quantize
        scale = np.asarray(q.scale, dtype=np.float32)
        zero = np.asarray(q.zero_point, dtype=np.float32)
        codes = stage.reshape(shape)
        if q.per_channel:
            view = [1] * len(shape)
            view[q.axis] = -1
            scale, zero = scale.reshape(view), zero.reshape(view)
        else:
            scale, zero = scale.reshape(()), zero.reshape(())
        wide = np.empty(shape, dtype=np.float32)
        np.subtract(codes, zero, out=wide, dtype=np.float32)
        wide *= scale
    out = torch.from_numpy(wide).reshape(shape)
    return out if dtype == torch.float32 else out.to(dtype)
