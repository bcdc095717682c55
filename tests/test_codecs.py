"""Codecs: round trips, stated tolerances, the spec grammar, and hostile wire tensors."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import tracemalloc
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitnet.codecs import CodecSpec, DecodeLimits, decode, encode, parse_codec
from splitnet.errors import CodecError
from splitnet.v1 import tensor_pb2 as pb

# ------------------------------------------------------------------ stated tolerances
# fp16 rounds to nearest: relative error <= 2^-11 (half an ulp, 10 stored mantissa bits).
# Below fp16's normal range (|x| < 2^-14) the spacing is fixed at 2^-24, so the error
# is at most half of it: 2^-25 absolute. fp16 sends x * 2^-e (Cast.exponent e, 0 for
# ordinary activations), so that floor is 2^(e-25): tiny next to the largest value.
FP16_REL_TOL = 2.0**-11
FP16_ABS_TOL = 2.0**-25
F32_SUBNORMAL_TOL = 2.0**-150  # a float32 result below 2^-126 rounds to a multiple of 2^-149
# bf16 rounds to nearest: relative error <= 2^-8 (7 stored mantissa bits); below its
# normal range the spacing is 2^-133, and float64 inputs may flush through float32.
BF16_REL_TOL = 2.0**-8
BF16_ABS_TOL = 2.0**-133
# torch casts float64 to fp16/bf16 through float32, so a float64 input can be off by
# one more float32 rounding (2^-24 relative) than the above.
DOUBLE_ROUNDING = 2.0**-24
# int8 / int8c: |error| <= scale / 2 per element, where scale = range / 255 per tensor
# (int8) or per channel (int8c), range = max(hi, 0) - min(lo, 0); so about range / 510.
# The slack 2^-10 · scale covers float32 rounding in x / scale and (code - zp) * scale.
INT8_STEP_FRACTION = 0.5 + 2.0**-10
F32_TINY = float(np.finfo(np.float32).tiny)  # the least scale int8 uses for a zero range

ALL_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
]
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LOSSLESS = ["raw", "zstd:1", "zstd", "zstd:19"]
LOSSY = ["fp16", "bf16", "int8", "int8c", "fp16+zstd:1", "bf16+zstd", "int8+zstd:1", "int8c+zstd"]
# Same-width integer dtype, to compare floats bit for bit (NaN payloads included).
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.dtype == torch.bool else t.view(_BITS[t.element_size()])


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


# ---------------------------------------------------------------------- strategies

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded", "narrowed"]


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A non-contiguous view of ``t`` (its shape may change); ``t`` itself if impossible."""
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(0, -1)
    if layout == "sliced" and t.dim() >= 1:
        return t[::2]
    if layout == "expanded":
        return t.unsqueeze(0).expand(2, *t.shape)  # stride 0
    if layout == "narrowed" and t.dim() >= 1 and t.shape[-1] > 1:
        return t[..., 1:]
    return t


SPECIALS = [math.nan, -math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-45, -3e38]


@st.composite
def any_tensors(draw: st.DrawFn, dtypes: list[torch.dtype] = ALL_DTYPES) -> torch.Tensor:
    """Arbitrary bit patterns (every NaN payload, subnormal, ...) in arbitrary layouts."""
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(shapes)
    n = math.prod(shape)
    if dtype == torch.bool:
        t = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool)
    else:
        size = torch.empty((), dtype=dtype).element_size()
        data = draw(st.binary(min_size=n * size, max_size=n * size))
        t = torch.empty(n, dtype=dtype)
        t.view(torch.uint8).copy_(torch.tensor(list(data), dtype=torch.uint8))
        if dtype.is_floating_point and n:
            for i, v in draw(st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from(SPECIALS)))):
                t[i] = v
    return relayout(t.reshape(shape), draw(st.sampled_from(LAYOUTS)))


BF16_MAX = 3.3895313892515355e38  # largest finite bfloat16 (exact in float32)


def float_values(dtype: torch.dtype, *, bound: float, nonfinite: bool) -> st.SearchStrategy[float]:
    if dtype == torch.float64:
        finite = st.floats(-bound, bound, width=64)
    else:  # hypothesis wants float32 bounds it can represent exactly
        b32 = np.float32(bound)
        bound = float(b32 if b32 <= bound else np.nextafter(b32, np.float32(0)))
        finite = st.floats(-bound, bound, width=32)
    if not nonfinite:
        return finite
    return st.one_of(finite, st.sampled_from([math.nan, math.inf, -math.inf]))


@st.composite
def float_tensors(
    draw: st.DrawFn,
    dtypes: list[torch.dtype],
    *,
    bound: float | None = None,
    nonfinite: bool = False,
) -> torch.Tensor:
    dtype = draw(st.sampled_from(dtypes))
    default = {torch.float16: 65504.0, torch.bfloat16: 1e38, torch.float32: 3.4e38}
    limit = bound if bound is not None else default.get(dtype, 1e40)
    shape = draw(shapes)
    values = draw(
        st.lists(
            float_values(dtype, bound=limit, nonfinite=nonfinite),
            min_size=math.prod(shape),
            max_size=math.prod(shape),
        )
    )
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.tensor(values, dtype=wide).to(dtype).reshape(shape)
    return relayout(t, draw(st.sampled_from(LAYOUTS)))


# ---------------------------------------------------------------------- round trips


@SETTINGS
@given(t=any_tensors(), codec=st.sampled_from(LOSSLESS))
def test_lossless_round_trip_is_bit_exact(t: torch.Tensor, codec: str) -> None:
    assert_bit_equal(decode(encode(t, codec)), t)


@SETTINGS
@given(t=any_tensors([torch.int8, torch.uint8, torch.int16, torch.int32, torch.bool]))
def test_lossy_codecs_leave_non_floats_exact(t: torch.Tensor) -> None:
    for codec in LOSSY:
        msg = encode(t, codec)
        assert all(s.WhichOneof("kind") == "zstd" for s in msg.steps)
        assert_bit_equal(decode(msg), t)


def assert_cast_close(x: torch.Tensor, y: torch.Tensor, rel: float, abs_: float) -> None:
    assert y.dtype == x.dtype and y.shape == x.shape
    xd, yd = x.double(), y.double()
    nan = torch.isnan(xd)
    assert torch.equal(torch.isnan(yd), nan), "NaN positions changed"
    inf = torch.isinf(xd)
    assert torch.equal(yd[inf], xd[inf]), "infinities changed"
    finite = ~(nan | inf)
    err = (yd[finite] - xd[finite]).abs()
    tol = torch.clamp(xd[finite].abs() * rel, min=abs_)
    assert bool((err <= tol).all()), f"max error {float(err.max())} beyond tolerance"


F32_FP16_MAX = 3.4e38  # fp16 refuses float32 values within 2^-11 of float32's largest


@SETTINGS
@given(
    x=float_tensors([torch.float32, torch.float64], bound=F32_FP16_MAX, nonfinite=True)
    | float_tensors([torch.float32, torch.float64], bound=65504.0, nonfinite=True)
    | float_tensors([torch.float32, torch.float64], bound=1e-6, nonfinite=True),
    zstd=st.booleans(),
)
def test_fp16_within_tolerance_and_keeps_nan_inf(x: torch.Tensor, zstd: bool) -> None:
    msg = encode(x, "fp16+zstd:1" if zstd else "fp16")
    exponent = msg.steps[0].cast.exponent if msg.steps and msg.steps[0].HasField("cast") else 0
    rel = FP16_REL_TOL + (DOUBLE_ROUNDING if x.dtype == torch.float64 else 0.0)
    floor = max(FP16_ABS_TOL * 2.0**exponent, F32_SUBNORMAL_TOL)
    assert_cast_close(x, decode(msg), rel, floor)
    if x.numel() and not zstd:
        assert len(msg.payload) == 2 * x.numel()  # two bytes a value


def test_fp16_scales_only_tiny_or_large_activations() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5)
    for factor, scaled in [(1.0, False), (1e3, False), (1e-8, True), (1e-30, True), (1e9, True)]:
        msg = encode(x * factor, "fp16")
        assert (msg.steps[0].cast.exponent != 0) == scaled, factor
        y = decode(msg)
        big = float((x * factor).abs().max())
        err = ((y - x * factor).abs() - (x * factor).abs() * FP16_REL_TOL).max()
        # Beyond 11-bit rounding, no error exceeds 2^-17 of the largest value (the
        # plain window's worst case; scaled tensors do far better).
        assert float(err) <= big * 2.0**-17, factor


@SETTINGS
@given(x=float_tensors([torch.float32, torch.float64], bound=BF16_MAX, nonfinite=True))
def test_bf16_within_tolerance_and_keeps_nan_inf(x: torch.Tensor) -> None:
    rel = BF16_REL_TOL + (DOUBLE_ROUNDING if x.dtype == torch.float64 else 0.0)
    assert_cast_close(x, decode(encode(x, "bf16")), rel, BF16_ABS_TOL)


@pytest.mark.parametrize("codec", ["fp16", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_casts_leave_16_bit_floats_exact(codec: str, dtype: torch.dtype) -> None:
    x = torch.tensor([1.0, -2.5, math.nan, math.inf, 1e-3], dtype=dtype)
    msg = encode(x, codec)
    assert not msg.steps
    assert_bit_equal(decode(msg), x)


@pytest.mark.parametrize(
    ("codec", "value", "dtype", "match"),
    [
        ("fp16", 1e60, torch.float64, "cannot carry"),  # beyond 65504 x 2^160
        ("fp16", -3.402e38, torch.float32, "float32's limit"),  # rounding would overflow
        ("bf16", 3.4e38, torch.float32, "cannot carry"),
        ("bf16", -1e300, torch.float64, "cannot carry"),
    ],
)
def test_casts_refuse_finite_values_they_cannot_carry(
    codec: str, value: float, dtype: torch.dtype, match: str
) -> None:
    x = torch.tensor([0.0, math.nan, value], dtype=dtype)
    with pytest.raises(CodecError, match=match):
        encode(x, codec)


def test_decode_applies_the_cast_exponent_for_either_target() -> None:
    for to, narrow in ((pb.DTYPE_FLOAT16, torch.float16), (pb.DTYPE_BFLOAT16, torch.bfloat16)):
        for dtype, wire_dtype, size in (
            (torch.float32, pb.DTYPE_FLOAT32, 4),
            (torch.float64, pb.DTYPE_FLOAT64, 8),
        ):
            for exponent in (3, -150, 140):
                halves = torch.tensor([1.0, -2.0, math.inf, 0.0], dtype=narrow)
                msg = pb.Tensor(
                    shape=[4],
                    dtype=wire_dtype,
                    raw_nbytes=4 * size,
                    steps=[pb.Step(cast=pb.Cast(to=to, exponent=exponent))],
                    payload=halves.view(torch.int16).numpy().tobytes(),
                )
                want = (halves.double() * 2.0**exponent).to(dtype)
                assert_bit_equal(decode(msg), want)


def per_channel_ranges(x: torch.Tensor) -> torch.Tensor:
    rows = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return rows.amax(dim=1).clamp(min=0) - rows.amin(dim=1).clamp(max=0)


@SETTINGS
@given(
    x=float_tensors(FLOATS), codec=st.sampled_from(["int8", "int8c", "int8+zstd:1", "int8c+zstd:1"])
)
def test_int8_within_half_a_step(x: torch.Tensor, codec: str) -> None:
    msg = encode(x, codec)
    y = decode(msg)
    assert y.dtype == x.dtype and y.shape == x.shape
    if x.numel() == 0:
        return
    q = msg.steps[0].quantize
    scale = torch.tensor(list(q.scale), dtype=torch.float64)
    xd = x.double()
    if q.per_channel:
        assert codec.startswith("int8c") and q.axis == 1
        rng = per_channel_ranges(x)
        step = scale.view([1, -1] + [1] * (x.dim() - 2))
    else:
        rng = (xd.max().clamp(min=0) - xd.min().clamp(max=0)).reshape(1)
        step = scale.reshape(())
    # The scale is honest: range / 255, rounded to float32 (or the least scale if zero).
    assert bool((scale <= torch.clamp(rng / 255 * (1 + 2**-23), min=F32_TINY)).all())
    if codec.startswith("int8c") and x.dim() >= 2:
        # per channel exactly where channels hold at least 16 values each
        assert q.per_channel == (x.shape[1] > 0 and x.numel() >= 16 * x.shape[1])
    # A 16-bit output rounds the dequantized float32 once more.
    out_rel, out_abs = {
        torch.float16: (FP16_REL_TOL, FP16_ABS_TOL),
        torch.bfloat16: (BF16_REL_TOL, BF16_ABS_TOL),
    }.get(x.dtype, (0.0, 0.0))
    tol = step * INT8_STEP_FRACTION + out_rel * (xd.abs() + step) + out_abs
    err = (y.double() - xd).abs()
    assert bool((err <= tol).all()), f"max error {float(err.max())}"


def test_int8c_falls_back_to_per_tensor_on_small_channels() -> None:
    features = torch.randn(1, 128)  # 1 value per channel: 128 scales would outweigh it
    msg = encode(features, "int8c")
    assert not msg.steps[0].quantize.per_channel
    assert msg.ByteSize() < encode(features, "raw").ByteSize() / 3


def test_int8c_is_tighter_than_int8_on_channels_of_different_scale() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 5) * torch.logspace(-3, 3, 8).view(1, 8, 1, 1)
    err = {c: (decode(encode(x, c)) - x).abs() for c in ("int8", "int8c")}
    assert float(err["int8c"][:, 0].max()) < float(err["int8"][:, 0].max()) / 100


@pytest.mark.parametrize("codec", ["int8", "int8c", "int8+zstd:1", "int8c+zstd:1"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", FLOATS)
def test_int8_refuses_non_finite_input(codec: str, bad: float, dtype: torch.dtype) -> None:
    x = torch.zeros(2, 3, 4, dtype=dtype)
    x[1, 2, 3] = bad
    with pytest.raises(CodecError, match="NaN or infinite"):
        encode(x, codec)


@pytest.mark.parametrize("codec", ["int8", "int8c"])
def test_int8_refuses_a_range_too_wide_for_a_float32_scale(codec: str) -> None:
    x = torch.tensor([[-1e300, 1e300]], dtype=torch.float64)
    with pytest.raises(CodecError, match="too wide"):
        encode(x, codec)


@pytest.mark.parametrize("codec", LOSSLESS + LOSSY)
def test_realistic_activation_round_trip(codec: str) -> None:
    torch.manual_seed(0)
    x = torch.relu(torch.randn(2, 16, 12, 12)) * 3
    y = decode(encode(x, codec))
    if parse_codec(codec).lossless:
        assert_bit_equal(y, x)
    else:
        torch.testing.assert_close(y, x, atol=float(x.max()) / 255, rtol=2**-8)


# ---------------------------------------------------------------------- encode facts


@SETTINGS
@given(t=any_tensors())
def test_raw_payload_is_the_plain_little_endian_bytes(t: torch.Tensor) -> None:
    """No pickle anywhere: the payload is exactly the tensor's bytes, C order."""
    c = t.contiguous()
    expected = (c.view(torch.int16) if c.dtype == torch.bfloat16 else c).numpy().tobytes()
    raw = encode(t, "raw")
    assert raw.payload == expected
    assert list(raw.shape) == list(t.shape) and raw.raw_nbytes == len(expected)
    zstd = encode(t, "zstd:1")
    assert zstandard.ZstdDecompressor().decompress(zstd.payload) == expected
    assert zstandard.get_frame_parameters(zstd.payload).content_size == len(expected)


def test_steps_describe_the_chain() -> None:
    x = torch.ones(2, 3)
    kinds = {c: [s.WhichOneof("kind") for s in encode(x, c).steps] for c in LOSSLESS + LOSSY}
    assert kinds["raw"] == [] and kinds["zstd:1"] == ["zstd"]
    assert kinds["fp16+zstd:1"] == ["cast", "zstd"] and kinds["int8c"] == ["quantize"]
    assert encode(x, "zstd:19").steps[0].zstd.level == 19


@pytest.mark.parametrize(
    "t",
    [
        torch.zeros(2, dtype=torch.complex64),
        torch.zeros(2, 2).to_sparse(),
        torch.zeros(2, dtype=torch.uint16),
    ],
)
def test_encode_refuses_what_the_wire_cannot_carry(t: torch.Tensor) -> None:
    with pytest.raises(CodecError, match="wire"):
        encode(t, "raw")


def test_decoded_tensor_is_writable_and_owns_its_memory() -> None:
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    for codec in LOSSLESS + LOSSY + ["bf16"]:
        msg = encode(x, codec)
        before = msg.SerializeToString()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. torch's "buffer is not writable"
            first = decode(msg)
            second = decode(msg)
        first.add_(1000)
        assert torch.equal(decode(msg), second), codec
        assert msg.SerializeToString() == before, codec
    for dtype in (torch.bool, torch.bfloat16, torch.int64):
        msg = encode(torch.ones(3, dtype=dtype), "raw")
        out = decode(msg)
        out.zero_()
        assert torch.equal(decode(msg), torch.ones(3, dtype=dtype))


def test_zstd_codecs_are_safe_across_threads() -> None:
    torch.manual_seed(0)
    xs = [torch.randn(64, 256) * i for i in range(1, 9)]

    def work(i: int) -> bool:
        x = xs[i % len(xs)]
        return torch.equal(decode(encode(x, "zstd:3")), x)

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(64)))


# ---------------------------------------------------------------------- the spec grammar


@pytest.mark.parametrize(
    ("spec", "canonical", "precision", "level"),
    [
        ("raw", "raw", "none", None),
        ("zstd", "zstd:3", "none", 3),
        ("zstd:1", "zstd:1", "none", 1),
        ("fp16", "fp16", "fp16", None),
        ("bf16", "bf16", "bf16", None),
        ("int8", "int8", "int8", None),
        ("int8c", "int8c", "int8c", None),
        ("int8+zstd:1", "int8+zstd:1", "int8", 1),
        ("int8c+zstd", "int8c+zstd:3", "int8c", 3),
        ("fp16+zstd:19", "fp16+zstd:19", "fp16", 19),
        ("raw+zstd:2", "zstd:2", "none", 2),
        (" Int8+ZSTD:22 ", "int8+zstd:22", "int8", 22),
    ],
)
def test_parse_valid_specs(spec: str, canonical: str, precision: str, level: int | None) -> None:
    parsed = parse_codec(spec)
    assert parsed == CodecSpec(precision=precision, zstd_level=level)
    assert str(parsed) == canonical
    assert parse_codec(str(parsed)) == parsed
    assert parse_codec(parsed) is parsed
    assert parsed.lossless == (precision == "none")


@pytest.mark.parametrize(
    ("spec", "hint"),
    [
        ("", "int8+zstd:1"),
        ("gzip", "int8+zstd:1"),
        ("zstd:", "int8+zstd:1"),
        ("zstd:-1", "int8+zstd:1"),
        ("zstd:x", "int8+zstd:1"),
        ("int8+", "int8+zstd:1"),
        ("zstd+int8", "int8+zstd:1"),
        ("fp16+bf16", "int8+zstd:1"),
        ("int4", "int8+zstd:1"),
        ("int8 + zstd", "int8+zstd:1"),
        ("zstd:0", "1..22"),
        ("zstd:23", "1..22"),
        ("int8+zstd:99", "1..22"),
    ],
)
def test_parse_invalid_specs_explain_the_grammar(spec: str, hint: str) -> None:
    with pytest.raises(CodecError, match=r"(?i)" + hint.replace("+", r"\+").replace(".", r"\.")):
        parse_codec(spec)


def test_parse_rejects_non_strings_and_bad_specs() -> None:
    with pytest.raises(CodecError, match="string"):
        parse_codec(3)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="precision"):
        CodecSpec(precision="int4")


# ---------------------------------------------------------------------- hostile wire tensors

MiB = 1 << 20


def assert_rejected_cheaply(msg: pb.Tensor, match: str, limits: DecodeLimits | None = None) -> None:
    """decode raises CodecError, and Python/numpy allocate well under 1 MiB doing so."""
    kwargs = {} if limits is None else {"limits": limits}
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match=match):
            decode(msg, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MiB, f"decode allocated {peak} bytes before rejecting"


def test_tracemalloc_sees_what_decode_allocates() -> None:
    """The control for the test below: a genuine 4 MiB decode shows up in the peak."""
    msg = encode(torch.ones(1 << 20), "zstd:1")
    tracemalloc.start()
    try:
        decode(msg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak >= 4 * MiB


def wire(
    shape: list[int],
    dtype: int = pb.DTYPE_FLOAT32,
    payload: bytes = b"",
    raw_nbytes: int | None = None,
    steps: list[pb.Step] | None = None,
) -> pb.Tensor:
    """A wire tensor built by hand; raw_nbytes defaults to the honest value."""
    itemsize = 1 if dtype == pb.DTYPE_BOOL else 4
    if raw_nbytes is None:
        raw_nbytes = max(math.prod(shape), 0) * itemsize
    return pb.Tensor(
        shape=shape,
        dtype=cast(pb.DType, dtype),  # any int: the enum is open on the wire
        payload=payload,
        raw_nbytes=raw_nbytes,
        steps=steps or [],
    )


def zstd_step() -> pb.Step:
    return pb.Step(zstd=pb.Zstd(level=1))


def cast_step(to: int = pb.DTYPE_FLOAT16) -> pb.Step:
    return pb.Step(cast=pb.Cast(to=cast(pb.DType, to)))


def quant_step(
    scale: list[float], zero_point: list[int], per_channel: bool = False, axis: int = 0
) -> pb.Step:
    return pb.Step(
        quantize=pb.Quantize(per_channel=per_channel, axis=axis, scale=scale, zero_point=zero_point)
    )


def bomb_frame(content_size: int, body: bytes = b"\0" * 16) -> bytes:
    """A well-formed zstd frame header declaring ``content_size`` bytes, one small raw block."""
    descriptor = 0b1110_0000  # 8-byte content size, single segment, no checksum, no dict
    block = (len(body) << 3) | 1  # last block, raw, len(body) bytes
    return (
        struct.pack("<IB", 0xFD2FB528, descriptor)
        + struct.pack("<Q", content_size)
        + block.to_bytes(3, "little")
        + body
    )


def test_bomb_frame_is_well_formed() -> None:
    assert zstandard.get_frame_parameters(bomb_frame(1 << 34)).content_size == 1 << 34
    assert zstandard.ZstdDecompressor().decompress(bomb_frame(16)) == b"\0" * 16


def _compressed(data: bytes, write_content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=1, write_content_size=write_content_size).compress(data)


def _streamed(data: bytes) -> bytes:
    cobj = zstandard.ZstdCompressor(level=1).compressobj()
    return cobj.compress(data) + cobj.flush()


GOOD_ZSTD = _compressed(np.arange(256, dtype=np.float32).tobytes())
GOOD_QUANT = quant_step([0.5], [0])

HOSTILE: dict[str, tuple[Callable[[], pb.Tensor], str, DecodeLimits | None]] = {
    "zstd frame declaring 16 GiB for a 64-byte tensor": (
        lambda: wire([16], payload=bomb_frame(1 << 34), steps=[zstd_step()]),
        "declares 17179869184 bytes",
        None,
    ),
    "zstd frame declaring 16 GiB, shape agreeing": (
        lambda: wire([1 << 16, 1 << 16], payload=bomb_frame(1 << 34), steps=[zstd_step()]),
        "exceeds the limit",
        None,
    ),
    "zstd frame declaring 4 MiB, limit 1 MiB": (
        lambda: wire([1 << 20], payload=bomb_frame(1 << 22), steps=[zstd_step()]),
        "exceeds the limit",
        DecodeLimits(max_raw_bytes=MiB),
    ),
    "zstd frame without a content size": (
        lambda: wire(
            [1 << 16],
            payload=_compressed(bytes(1 << 18), write_content_size=False),
            steps=[zstd_step()],
        ),
        "does not declare its content size",
        None,
    ),
    "zstd frame streamed without a content size": (
        lambda: wire(
            [256],
            payload=_streamed(bytes(1024)),
            steps=[zstd_step()],
        ),
        "does not declare its content size",
        None,
    ),
    "zstd frame holding less than it declares": (
        lambda: wire([1024], payload=bomb_frame(4096, b"\1" * 64), steps=[zstd_step()]),
        "corrupt",
        None,
    ),
    "zstd frame then trailing bytes": (
        lambda: wire([256], payload=GOOD_ZSTD + b"junk", steps=[zstd_step()]),
        "corrupt",
        None,
    ),
    "two zstd frames": (
        lambda: wire([256], payload=GOOD_ZSTD + GOOD_ZSTD, steps=[zstd_step()]),
        "corrupt",
        None,
    ),
    "skippable zstd frame": (
        lambda: wire(
            [4], payload=struct.pack("<II", 0x184D2A50, 16) + bytes(16), steps=[zstd_step()]
        ),
        "not a standard zstd frame",
        None,
    ),
    "truncated zstd payload": (
        lambda: wire([256], payload=GOOD_ZSTD[: len(GOOD_ZSTD) // 2], steps=[zstd_step()]),
        "corrupt",
        None,
    ),
    "garbage zstd payload": (
        lambda: wire([256], payload=bomb_frame(1024)[:13] + b"\xff" * 40, steps=[zstd_step()]),
        "corrupt",
        None,
    ),
    "not zstd at all": (
        lambda: wire([4], payload=b"hello, world", steps=[zstd_step()]),
        "not a standard zstd frame",
        None,
    ),
    "empty zstd payload": (
        lambda: wire([4], payload=b"", steps=[zstd_step()]),
        "not a standard zstd frame",
        None,
    ),
    "raw_nbytes disagreeing with the shape": (
        lambda: wire([4, 4], payload=bytes(64), raw_nbytes=1 << 40),
        "declared raw size",
        None,
    ),
    "raw_nbytes small, shape huge": (
        lambda: wire([1 << 30, 1 << 30], payload=bytes(64), raw_nbytes=64),
        "declared raw size",
        None,
    ),
    "unknown dtype 99": (lambda: wire([4], dtype=99, payload=bytes(16)), "dtype value 99", None),
    "DTYPE_UNSPECIFIED": (
        lambda: wire([4], dtype=pb.DTYPE_UNSPECIFIED, payload=bytes(16)),
        "dtype value 0",
        None,
    ),
    "negative dimension": (
        lambda: wire([-1, 4], payload=bytes(16), raw_nbytes=16),
        "negative or too large",
        None,
    ),
    "negative dimensions multiplying to a positive size": (
        lambda: wire([-2, -2], payload=bytes(16), raw_nbytes=16),
        "negative or too large",
        None,
    ),
    "dimension over max_dim": (
        lambda: wire([(1 << 31) + 1], raw_nbytes=((1 << 31) + 1) * 4),
        "negative or too large",
        None,
    ),
    "dimensions within max_dim, size over max_raw_bytes": (
        lambda: wire([1 << 20, 1 << 20]),
        "exceeds the limit",
        None,
    ),
    "size just over a server's limit": (
        lambda: wire([257], payload=bytes(1028)),
        "exceeds the limit of 1024",
        DecodeLimits(max_raw_bytes=1024),
    ),
    "rank over the default limit": (lambda: wire([1] * 9, payload=bytes(4)), "rank 9", None),
    "rank over a server's limit": (
        lambda: wire([1, 1, 1], payload=bytes(4)),
        "rank 3 exceeds the limit of 2",
        DecodeLimits(max_rank=2),
    ),
    "truncated raw payload": (lambda: wire([4, 4], payload=bytes(63)), "payload holds 63", None),
    "raw payload too long": (lambda: wire([4], payload=bytes(17)), "payload holds 17", None),
    "garbage raw payload for a huge declared tensor": (
        lambda: wire([1 << 28], payload=b"garbage"),
        "payload holds 7",
        None,
    ),
    "quantize with two scales for a per-tensor step": (
        lambda: wire([4], payload=bytes(4), steps=[quant_step([1.0, 1.0], [0, 0])]),
        "needs 1 scales",
        None,
    ),
    "quantize per channel, scale count not the channel count": (
        lambda: wire([2, 3], payload=bytes(6), steps=[quant_step([1.0] * 2, [0] * 2, True, 1)]),
        "needs 3 scales",
        None,
    ),
    "quantize per channel, huge scale list": (
        lambda: wire(
            [2, 3], payload=bytes(6), steps=[quant_step([1.0] * 100000, [0] * 100000, True, 1)]
        ),
        "needs 3 scales",
        None,
    ),
    "quantize axis out of range": (
        lambda: wire([2, 3], payload=bytes(6), steps=[quant_step([1.0], [0], True, 7)]),
        "axis 7 out of range",
        None,
    ),
    "quantize with a zero scale": (
        lambda: wire([4], payload=bytes(4), steps=[quant_step([0.0], [0])]),
        "finite and positive",
        None,
    ),
    "quantize with a negative scale": (
        lambda: wire([4], payload=bytes(4), steps=[quant_step([-1.0], [0])]),
        "finite and positive",
        None,
    ),
    "quantize with a NaN scale": (
        lambda: wire([4], payload=bytes(4), steps=[quant_step([math.nan], [0])]),
        "finite and positive",
        None,
    ),
    "quantize with an infinite scale": (
        lambda: wire([4], payload=bytes(4), steps=[quant_step([math.inf], [0])]),
        "finite and positive",
        None,
    ),
    "quantize zero point above 127": (
        lambda: wire([4], payload=bytes(4), steps=[quant_step([1.0], [128])]),
        "zero points",
        None,
    ),
    "quantize zero point below -128": (
        lambda: wire([4], payload=bytes(4), steps=[quant_step([1.0], [-129])]),
        "zero points",
        None,
    ),
    "quantize payload of the float size, not the code size": (
        lambda: wire([4], payload=bytes(16), steps=[GOOD_QUANT]),
        "payload holds 16 bytes; the header implies 4",
        None,
    ),
    "quantize on an int tensor": (
        lambda: wire([4], dtype=pb.DTYPE_INT32, payload=bytes(4), steps=[GOOD_QUANT]),
        "non-floating",
        None,
    ),
    "zstd first, then cast": (
        lambda: wire([4], payload=bytes(8), steps=[zstd_step(), cast_step()]),
        "step chain",
        None,
    ),
    "zstd first, then quantize": (
        lambda: wire([4], payload=bytes(4), steps=[zstd_step(), GOOD_QUANT]),
        "step chain",
        None,
    ),
    "zstd twice": (
        lambda: wire([4], payload=GOOD_ZSTD, steps=[zstd_step(), zstd_step()]),
        "step chain",
        None,
    ),
    "cast twice": (
        lambda: wire([4], payload=bytes(8), steps=[cast_step(), cast_step()]),
        "step chain",
        None,
    ),
    "cast then quantize": (
        lambda: wire([4], payload=bytes(4), steps=[cast_step(), GOOD_QUANT]),
        "step chain",
        None,
    ),
    "three steps": (
        lambda: wire([4], steps=[cast_step(), zstd_step(), zstd_step()]),
        "at most two",
        None,
    ),
    "an empty step": (lambda: wire([4], payload=bytes(16), steps=[pb.Step()]), "step chain", None),
    "cast on an int tensor": (
        lambda: wire([4], dtype=pb.DTYPE_INT32, payload=bytes(8), steps=[cast_step()]),
        "cast step on a torch.int32",
        None,
    ),
    "cast on a float16 tensor": (
        lambda: wire(
            [4], dtype=pb.DTYPE_FLOAT16, raw_nbytes=8, payload=bytes(8), steps=[cast_step()]
        ),
        "cast step on a torch.float16",
        None,
    ),
    "cast to float32": (
        lambda: wire([4], payload=bytes(16), steps=[cast_step(pb.DTYPE_FLOAT32)]),
        "cast target",
        None,
    ),
    "cast exponent above 160": (
        lambda: wire(
            [4], payload=bytes(8), steps=[pb.Step(cast=pb.Cast(to=pb.DTYPE_FLOAT16, exponent=161))]
        ),
        "exponent 161 is outside",
        None,
    ),
    "cast exponent below -160": (
        lambda: wire(
            [4],
            payload=bytes(8),
            steps=[pb.Step(cast=pb.Cast(to=pb.DTYPE_FLOAT16, exponent=-1 << 30))],
        ),
        "outside",
        None,
    ),
    "cast payload of the wrong size": (
        lambda: wire([4], payload=bytes(16), steps=[cast_step()]),
        "payload holds 16",
        None,
    ),
    "bool holding byte 2": (
        lambda: wire([4], dtype=pb.DTYPE_BOOL, payload=b"\0\1\2\1"),
        "bool tensor holds bytes other than 0 and 1",
        None,
    ),
    "bool holding byte 255, zstd": (
        lambda: wire(
            [4], dtype=pb.DTYPE_BOOL, payload=_compressed(b"\0\1\xff\1"), steps=[zstd_step()]
        ),
        "bool tensor holds bytes other than 0 and 1",
        None,
    ),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_wire_tensor_rejected_without_large_allocation(case: str) -> None:
    build, match, limits = HOSTILE[case]
    msg = build()
    msg = pb.Tensor.FromString(msg.SerializeToString())  # exactly what the server would parse
    assert_rejected_cheaply(msg, match, limits)


def test_decode_limits_validate_themselves() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        DecodeLimits(max_raw_bytes=-1)


def test_limits_admit_what_they_name() -> None:
    x = torch.zeros(16, 16)
    assert decode(
        encode(x, "zstd:1"), limits=DecodeLimits(max_raw_bytes=1024, max_rank=2)
    ).shape == (
        16,
        16,
    )
    empty = wire([0, 1 << 31], payload=b"")
    assert decode(empty).shape == (0, 1 << 31)


# ---------------------------------------------------------------------- the benchmark runs


def test_codec_benchmark_smoke_run(tmp_path: Path) -> None:
    """``python -m benchmarks.codecs`` runs and writes its CSV and JSON (timings unchecked)."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "benchmarks.codecs", "--quick", "--repeat", "1"]
    cmd += ["--codecs", "raw,int8+zstd:1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "intra-op thread" in done.stdout and "int8+zstd:1" in done.stdout
    report = json.loads((tmp_path / "codecs.json").read_text())
    assert {r["codec"] for r in report["rows"]} == {"raw", "int8+zstd:1"}
    assert all(r["ratio"] > 0 and r["enc_mbps"] > 0 for r in report["rows"])
    assert (tmp_path / "codecs.csv").read_text().startswith("model,cut,")
