"""``encode`` and ``decode``: a torch tensor to the wire ``Tensor`` message and back."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from splitnet.codecs.base import Buffer, EntropyStep, PrecisionStep
from splitnet.codecs.dtypes import NUMPY_HOLDER, TORCH_TO_WIRE, WIRE_TO_TORCH, as_numpy
from splitnet.codecs.raw import Raw, raw_tensor
from splitnet.codecs.registry import WIRE_ENTROPY, WIRE_PRECISION, CodecSpec, parse_codec
from splitnet.errors import CodecError, ConfigError
from splitnet.v1 import tensor_pb2 as pb

__all__ = ["DEFAULT_LIMITS", "DecodeLimits", "decode", "encode", "encode_parts"]

if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("splitnet's wire format is little-endian; this host is big-endian")


@dataclass(frozen=True, kw_only=True)
class DecodeLimits:
    """What ``decode`` accepts from the network."""

    max_rank: int = 8  # most dimensions a tensor may have
    max_dim: int = 1 << 31  # largest single dimension
    max_raw_bytes: int = 1 << 30  # largest decoded tensor, in bytes

    def __post_init__(self) -> None:
        if self.max_rank < 0 or self.max_dim < 0 or self.max_raw_bytes < 0:
            raise ConfigError("decode limits must be non-negative")


DEFAULT_LIMITS = DecodeLimits()


def encode(tensor: torch.Tensor, codec: str | CodecSpec = "raw") -> pb.Tensor:
    """Encode ``tensor`` as a self-describing wire ``Tensor`` message.

    Raises ``CodecError`` for an unsupported dtype or layout, and where the lossy
    codec cannot represent the values (see ``splitnet.codecs``).
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
    wire = TORCH_TO_WIRE.get(tensor.dtype)
    if wire is None:
        raise CodecError(
            f"dtype {tensor.dtype} cannot go on the wire; supported: "
            + ", ".join(str(d) for d in TORCH_TO_WIRE)
        )
    t = tensor.detach()
    if not t.is_cpu:
        t = t.cpu()
    t = t.contiguous()
    msg = pb.Tensor(dtype=wire, raw_nbytes=t.numel() * t.element_size(), shape=t.shape)
    step = spec.precision_step
    if step.applies(t.dtype, t.shape):
        data = step.encode(t, msg.steps.add())
    else:
        data = as_numpy(t)
    flat = data.reshape(-1).view(np.uint8).data  # a memoryview of the bytes, no copy
    entropy = spec.entropy_step
    if entropy is not None:
        return msg, entropy.encode(flat, msg.steps.add())
    return msg, flat.toreadonly()


def _shape_text(shape: Sequence[int], limit: int = 8) -> str:
    """A shape for an error message, at most ``limit`` dimensions of it."""
    if len(shape) <= limit:
        return str(list(shape))
    return f"[{', '.join(str(d) for d in shape[:limit])}, ...] (rank {len(shape)})"


def decode(
    msg: pb.Tensor,
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    payload: bytes | bytearray | memoryview | None = None,
) -> torch.Tensor:
    """Decode a wire ``Tensor``; validate everything before allocating.

    ``payload`` replaces ``msg.payload`` (for payloads that arrived in chunks). A
    ``bytearray`` (or writable memoryview) is handed over: a lossless result may use
    its memory without a copy; a ``bytes`` payload is copied at most once. The result
    is writable and never aliases ``msg``.
    """
    dims = msg.shape
    rank = len(dims)  # O(1): before any dimension is read
    if rank > limits.max_rank:
        raise CodecError(f"rank {rank} exceeds the limit of {limits.max_rank}")
    dtype = WIRE_TO_TORCH.get(msg.dtype)
    if dtype is None:
        raise CodecError(f"unknown or unsupported dtype value {int(msg.dtype)} in wire tensor")
    shape = tuple(dims)
    if shape and (min(shape) < 0 or max(shape) > limits.max_dim):
        bad = next(d for d in shape if d < 0 or d > limits.max_dim)
        raise CodecError(
            f"dimension {bad} in shape {_shape_text(shape)} is negative or too large (the "
            f"limit is {limits.max_dim})"
        )
    numel = math.prod(shape)
    itemsize = NUMPY_HOLDER[dtype].itemsize
    raw = numel * itemsize
    if raw != msg.raw_nbytes:
        raise CodecError(
            f"declared raw size {msg.raw_nbytes} != prod(shape) x itemsize = {numel} x {itemsize}"
        )
    if raw > limits.max_raw_bytes:
        raise CodecError(f"tensor of {raw} bytes exceeds the limit of {limits.max_raw_bytes} bytes")

    buf: Buffer = msg.payload if payload is None else payload
    steps = msg.steps
    if not steps:  # raw, the common case: no step to dispatch on
        if len(buf) != raw:
            raise CodecError(f"payload holds {len(buf)} bytes; the header implies {raw}")
        return raw_tensor(dtype, shape, buf)
    precision, first, entropy, last = _chain(steps)
    if precision is Raw:  # zstd alone
        stage, finish = raw, None
    else:
        stage, finish = precision.validate(first, dtype, shape, numel)
    if entropy is not None:
        buf = entropy.decode(last, buf, stage)
    elif len(buf) != stage:
        raise CodecError(f"payload holds {len(buf)} bytes; the header implies {stage}")
    return raw_tensor(dtype, shape, buf) if finish is None else finish(buf)


_NO_STEP = pb.Step()
_CHAIN_HELP = (
    f"expected at most one {', '.join(WIRE_PRECISION)} step, then at most one "
    f"{' or '.join(WIRE_ENTROPY)} step"
)


def _chain(
    steps: Sequence[pb.Step],
) -> tuple[type[PrecisionStep], pb.Step, type[EntropyStep] | None, pb.Step]:
    """``(precision class, its step, entropy class or None, its step)`` of a step list."""
    n = len(steps)  # O(1): before any step is looked at
    if n > 2:
        raise CodecError(f"{n} steps; a wire tensor has at most two")
    last = steps[n - 1]
    last_kind = last.WhichOneof("kind")
    entropy = WIRE_ENTROPY.get(last_kind) if last_kind else None
    if entropy is not None:
        if n == 1:
            return Raw, _NO_STEP, entropy, last
        first = steps[0]
        first_kind = first.WhichOneof("kind")
    elif n == 1:
        first, first_kind = last, last_kind
    else:
        first_kind = None  # a precision step last: not a valid chain
    precision = WIRE_PRECISION.get(first_kind) if first_kind else None
    if precision is None:
        kinds = [s.WhichOneof("kind") for s in steps]
        raise CodecError(f"unsupported step chain {kinds}; {_CHAIN_HELP}")
    return precision, first, entropy, last
