"""``estimate_nbytes``: the wire size of an encoded tensor, without encoding it.

The size of the serialized ``Tensor`` message (what ``encode(t, codec).ByteSize()``
returns) is its header, its steps and its payload. The header and the payload of
every precision step follow from the shape and dtype alone; what does not is
(a) the few varint bytes of step parameters (fp16's exponent, int8 zero points,
int8o's channel indices and outlier dtype) and (b) what zstd makes of the bytes.

* Without ``sample``: ``low`` and ``high`` bound every tensor of that shape and
  dtype; ``nbytes`` is ``high``. Without zstd they differ by a few bytes (by one
  byte per channel for int8c, by 2 bytes per outlier value for int8o, whose
  outliers travel as float16 unless they pass 65504). With zstd ``high`` is zstd's
  worst case (incompressible input), so pass a sample for zstd codecs.
* With ``sample`` (the tensor, or one of the same shape and dtype): the parameters
  come from the same reductions ``encode`` runs, so a codec without zstd is exact
  (``exact=True``). With zstd, stages up to 128 KiB are compressed whole (exact);
  larger ones by 32 evenly spaced 4 KiB blocks compressed together, and ``nbytes``
  extrapolates that ratio (within a few percent on real activations; see the README).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from splitnet.codecs.dtypes import as_numpy, wire_dtype
from splitnet.codecs.registry import WIRE_PRECISION, CodecSpec, parse_codec
from splitnet.codecs.zstd import SAMPLE_BLOCK, SAMPLE_BLOCKS
from splitnet.errors import CodecError
from splitnet.v1 import tensor_pb2 as pb

__all__ = ["SizeEstimate", "estimate_nbytes"]


@dataclass(frozen=True, kw_only=True)
class SizeEstimate:
    """The estimated wire size of one encoded tensor (the whole ``Tensor`` message)."""

    nbytes: int  # best estimate, in bytes
    low: int  # no encoding of such a tensor is smaller
    high: int  # no encoding of such a tensor is larger
    exact: bool  # nbytes is what encode() would produce, to the byte


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _field_len(n: int) -> int:
    """Bytes of a length-delimited field (tag < 16) holding ``n`` bytes."""
    return 1 + _varint_len(n) + n


def _payload_len(n: int) -> int:
    return _field_len(n) if n else 0  # proto3 leaves an empty bytes field out


def estimate_nbytes(
    codec: str | CodecSpec,
    shape: Sequence[int],
    dtype: torch.dtype,
    *,
    sample: torch.Tensor | None = None,
) -> SizeEstimate:
    """Estimate ``encode(t, codec).ByteSize()`` for a tensor ``t`` of ``shape`` and ``dtype``.

    ``sample``, if given, must have that shape and dtype; it makes the estimate exact
    for codecs without zstd and close for zstd (module docstring). Raises
    ``CodecError`` for a bad spec, a dtype that cannot travel, or a mismatched sample,
    and whatever ``encode`` would raise on the sample.
    """
    spec = parse_codec(codec)
    dims = tuple(int(d) for d in shape)
    wire = wire_dtype(dtype)
    numel = math.prod(dims)
    itemsize = torch.empty((), dtype=dtype).element_size()
    header = pb.Tensor(shape=dims, dtype=wire, raw_nbytes=numel * itemsize).ByteSize()
    t = None
    if sample is not None:
        if tuple(sample.shape) != dims or sample.dtype != dtype:
            raise CodecError(
                f"sample of shape {list(sample.shape)[:8]} and {sample.dtype} for an "
                f"estimate of {list(dims)[:8]} and {dtype}"
            )
        t = sample.detach().cpu().contiguous()

    step = spec.precision_step
    stage = None  # the stage bytes of the sample, when zstd needs them
    if step.applies(dtype, dims):
        cls = WIRE_PRECISION[step.wire_kind or ""]
        if t is not None:
            planned = pb.Step()
            plan = step.plan(t, planned)
            if spec.entropy_step is not None:
                stage = step.apply(t, plan)
            low_step = high_step = planned
        else:
            low_step, high_step = step.extremes(dtype, dims)
        sizes = [
            (_field_len(s.ByteSize()), cls.validate(s, dtype, dims, numel).stage_nbytes)
            for s in (low_step, high_step)
        ]
    else:
        sizes = [(0, numel * itemsize)] * 2
        if t is not None and spec.entropy_step is not None:
            stage = as_numpy(t)
    (low_head, low_stage), (high_head, high_stage) = sizes
    base = header
    entropy = spec.entropy_step
    if entropy is None:
        low = base + low_head + _payload_len(low_stage)
        high = base + high_head + _payload_len(high_stage)
        return SizeEstimate(nbytes=high, low=low, high=high, exact=low == high)

    base += _field_len(pb.Step(zstd=pb.Zstd(level=spec.zstd_level or 0)).ByteSize())
    c_low = entropy.bounds(low_stage)[0]
    c_high = entropy.bounds(high_stage)[1]
    low = base + low_head + _payload_len(c_low)
    high = base + high_head + _payload_len(c_high)
    if stage is None:
        return SizeEstimate(nbytes=high, low=low, high=high, exact=False)
    data = stage.reshape(-1).view(np.uint8).data
    exact = len(data) <= SAMPLE_BLOCKS * SAMPLE_BLOCK
    compressed = entropy.sample_nbytes(data)
    compressed = min(max(compressed, c_low), c_high)
    nbytes = base + low_head + _payload_len(compressed)  # low_head == high_head: sampled
    return SizeEstimate(nbytes=nbytes, low=low, high=high, exact=exact)
