"""int8o: per-row int8 with outlier channels kept in float, for language-model hidden states."""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
import torch

from splitnet.codecs import decode, encode, parse_codec
from splitnet.errors import CodecError
from splitnet.v1 import tensor_pb2 as pb

MiB = 1 << 20
HIDDEN = 576  # SmolLM2-135M's hidden size
OUTLIERS = [7, 100, 400]
FP16_REL = 2.0**-11


def hidden_states(batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    """Like a language model's residual stream: ~N(0, 2) with three channels ~10^4x the
    median, one of them near 22,000 (what SmolLM2 shows).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, HIDDEN, generator=g) * 2
    x[..., OUTLIERS] *= 1e4
    x[..., 100] = 22000.0 + torch.randn(batch, seq, generator=g) * 50
    return x


def normal_channels() -> torch.Tensor:
    mask = torch.ones(HIDDEN, dtype=torch.bool)
    mask[OUTLIERS] = False
    return mask


def rel_error(y: torch.Tensor, x: torch.Tensor) -> float:
    return float((y - x).double().norm() / x.double().norm())


def test_int8o_keeps_hidden_states_where_int8_collapses() -> None:
    x = hidden_states()
    normal = normal_channels()
    err = {
        c: rel_error(decode(encode(x, c))[..., normal], x[..., normal])
        for c in ("int8", "int8c", "int8o", "int8o:1", "fp16")
    }
    # Per tensor, the outliers set the scale: every ordinary value rounds to zero.
    assert err["int8"] > 0.9 and err["int8c"] > 0.9
    # Per row, but keeping fewer channels than there are outliers, is as bad.
    assert err["int8o:1"] > 0.5
    # With the outliers kept aside, each row's scale fits its ordinary values.
    assert err["int8o"] < 0.01
    assert err["fp16"] < err["int8o"]


def test_int8o_error_is_half_a_step_per_row_and_outliers_are_fp16_exact() -> None:
    x = hidden_states()
    assert set(OUTLIERS) < set(encode(x, "int8o").steps[0].outlier_int8.channels)
    msg = encode(x, "int8o:3")
    y = decode(msg)
    o = msg.steps[0].outlier_int8
    assert list(o.channels) == OUTLIERS and o.outlier_dtype == pb.DTYPE_FLOAT16
    rows = x.reshape(-1, HIDDEN)
    err = (y.reshape(-1, HIDDEN) - rows).abs()
    normal = normal_channels()
    scale = rows[:, normal].abs().amax(dim=1, keepdim=True) / 127
    assert bool((err[:, normal] <= scale * (0.5 + 2**-10)).all())
    out = rows[:, OUTLIERS]
    assert bool((err[:, OUTLIERS] <= out.abs() * FP16_REL).all())
    torch.testing.assert_close(y[..., OUTLIERS], x[..., OUTLIERS].half().float(), rtol=0, atol=0)


def test_int8o_costs_about_half_of_fp16() -> None:
    x = hidden_states(batch=1, seq=1)  # one decode step: one token
    sizes = {c: len(encode(x, c).payload) for c in ("fp16", "int8o", "int8o:8")}
    assert sizes["fp16"] == 2 * HIDDEN
    assert sizes["int8o"] == HIDDEN + 4 + 2 * 4  # codes, the row's scale, 4 fp16 values
    assert sizes["int8o:8"] == HIDDEN + 4 + 2 * 8
    assert 0.5 < sizes["int8o"] / sizes["fp16"] < 0.52


def test_int8o_chains_with_zstd() -> None:
    x = hidden_states()
    plain, packed = encode(x, "int8o"), encode(x, "int8o+zstd:1")
    assert [s.WhichOneof("kind") for s in packed.steps] == ["outlier_int8", "zstd"]
    assert len(packed.payload) < len(plain.payload)
    assert torch.equal(decode(plain), decode(packed))


def test_int8o_carries_outliers_past_fp16_as_float32() -> None:
    x = hidden_states()
    x[..., 9] = 1e6
    msg = encode(x, "int8o:4")
    o = msg.steps[0].outlier_int8
    assert o.outlier_dtype == pb.DTYPE_FLOAT32 and 9 in o.channels
    y = decode(msg)
    assert torch.equal(y[..., list(o.channels)], x[..., list(o.channels)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_int8o_other_float_dtypes(dtype: torch.dtype) -> None:
    x = hidden_states().to(dtype)
    y = decode(encode(x, "int8o"))
    assert y.dtype == dtype and y.shape == x.shape
    normal = normal_channels()
    assert rel_error(y[..., normal].float(), x[..., normal].float()) < 0.01


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(HIDDEN),  # rank 1: one row
        torch.randn(3, 5),  # fewer channels than... K=4 of 5
        torch.randn(2, 2),  # K > H: every channel is an outlier
        torch.zeros(4, 8),  # all zero rows
        torch.randn(2, 3, 4, 6),
    ],
    ids=["rank1", "k-of-5", "k-over-h", "zeros", "rank4"],
)
def test_int8o_shapes(x: torch.Tensor) -> None:
    msg = encode(x, "int8o")
    assert msg.steps[0].WhichOneof("kind") == "outlier_int8"
    assert len(msg.steps[0].outlier_int8.channels) == min(4, x.shape[-1])
    y = decode(msg)
    assert y.shape == x.shape
    scale = x.abs().max() / 127
    assert float((y - x).abs().max()) <= float(scale) * 0.51 + 1e-30


@pytest.mark.parametrize(
    "x",
    [torch.tensor(3.0), torch.zeros(0, 8), torch.zeros(4, 0), torch.arange(12).reshape(3, 4)],
    ids=["scalar", "no-rows", "no-channels", "int64"],
)
def test_int8o_leaves_scalars_empty_and_integer_tensors_raw(x: torch.Tensor) -> None:
    msg = encode(x, "int8o")
    assert not msg.steps
    assert torch.equal(decode(msg), x)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_int8o_refuses_non_finite(bad: float) -> None:
    x = hidden_states()
    x[0, 3, 11] = bad
    with pytest.raises(CodecError, match="NaN or infinite"):
        encode(x, "int8o")


def test_int8o_refuses_what_float32_cannot_carry() -> None:
    x = torch.ones(2, 8, dtype=torch.float64)
    x[:, 3] = 1e300
    with pytest.raises(CodecError, match="cannot carry"):
        encode(x, "int8o")


def test_int8o_chooses_the_same_channels_every_time() -> None:
    x = torch.ones(3, 16)  # every channel ties
    x[:, [2, 11]] = 50.0
    chosen = [list(encode(x, "int8o:2").steps[0].outlier_int8.channels) for _ in range(5)]
    assert chosen == [[2, 11]] * 5


def test_spec_grammar_and_flags() -> None:
    assert str(parse_codec("int8o")) == "int8o:4"
    assert str(parse_codec("INT8O:16+zstd")) == "int8o:16+zstd:3"
    assert parse_codec("int8o").llm_safe and not parse_codec("int8o").lossless
    for bad in ("int8o:0", "int8o:257"):
        with pytest.raises(CodecError, match=r"1\.\.256"):
            parse_codec(bad)


# ---------------------------------------------------------------- hostile OutlierInt8 steps


def outlier_msg(
    shape: list[int],
    channels: list[int],
    payload: bytes,
    outlier_dtype: int = pb.DTYPE_FLOAT16,
    dtype: int = pb.DTYPE_FLOAT32,
) -> pb.Tensor:
    itemsize = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_INT32: 4, pb.DTYPE_FLOAT16: 2}[dtype]
    step = pb.Step(
        outlier_int8=pb.OutlierInt8(channels=channels, outlier_dtype=outlier_dtype)  # type: ignore[arg-type]
    )
    return pb.Tensor(
        shape=shape,
        dtype=dtype,  # type: ignore[arg-type]
        raw_nbytes=math.prod(shape) * itemsize,
        steps=[step],
        payload=payload,
    )


def good_payload(rows: int, h: int, k: int, scale: float = 0.5, outlier: float = 1.0) -> bytes:
    return (
        np.full(rows, scale, dtype="<f4").tobytes()
        + np.full(rows * k, outlier, dtype="<f2").tobytes()
        + bytes(rows * h)
    )


HOSTILE: dict[str, tuple[Callable[[], pb.Tensor], str]] = {
    "no channels": (lambda: outlier_msg([2, 8], [], good_payload(2, 8, 0)), "0 channels"),
    "more channels than the last axis": (
        lambda: outlier_msg([2, 4], [0, 1, 2, 3, 3], good_payload(2, 4, 5)),
        "5 channels; expected 1..4",
    ),
    "a million channels": (
        lambda: outlier_msg([2, 1 << 20], list(range(1 << 20)), b""),
        "expected 1..256",
    ),
    "channels out of order": (
        lambda: outlier_msg([2, 8], [3, 1], good_payload(2, 8, 2)),
        "increasing",
    ),
    "a repeated channel": (
        lambda: outlier_msg([2, 8], [3, 3], good_payload(2, 8, 2)),
        "increasing",
    ),
    "a channel past the last axis": (
        lambda: outlier_msg([2, 8], [1, 8], good_payload(2, 8, 2)),
        "below 8",
    ),
    "unknown outlier dtype": (
        lambda: outlier_msg([2, 8], [1], good_payload(2, 8, 1), outlier_dtype=pb.DTYPE_INT8),
        "not FLOAT16 or FLOAT32",
    ),
    "rank 0": (lambda: outlier_msg([], [0], good_payload(1, 1, 1)), "rank >= 1"),
    "integer tensor": (
        lambda: outlier_msg([2, 8], [1], good_payload(2, 8, 1), dtype=pb.DTYPE_INT32),
        "non-floating",
    ),
    "payload one byte short": (
        lambda: outlier_msg([2, 8], [1], good_payload(2, 8, 1)[:-1]),
        "payload holds",
    ),
    "payload sized for float32 outliers": (
        lambda: outlier_msg([2, 8], [1], good_payload(2, 8, 1) + bytes(4)),
        "payload holds",
    ),
    "a huge tensor with a tiny payload": (
        lambda: outlier_msg([1 << 14, 1 << 14], [1], b"\0" * 64),
        "payload holds 64",
    ),
    "a zero row scale": (
        lambda: outlier_msg([2, 8], [1], good_payload(2, 8, 1, scale=0.0)),
        "finite and positive",
    ),
    "a NaN row scale": (
        lambda: outlier_msg([2, 8], [1], good_payload(2, 8, 1, scale=math.nan)),
        "finite and positive",
    ),
    "an infinite outlier": (
        lambda: outlier_msg([2, 8], [1], good_payload(2, 8, 1, outlier=math.inf)),
        "outlier values must be finite",
    ),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_outlier_step_rejected_without_large_allocation(case: str) -> None:
    build, match = HOSTILE[case]
    msg = pb.Tensor.FromString(build().SerializeToString())
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match=match):
            decode(msg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MiB, f"decode allocated {peak} bytes before rejecting"


def test_decoded_values_stay_finite_for_extreme_scales() -> None:
    """A legal but extreme message (scale near float32's limit, code -128) clamps to the
    dtype's largest value rather than overflowing to infinity.
    """
    payload = np.array([3e38], dtype="<f4").tobytes() + np.ones(1, "<f2").tobytes()
    payload += np.array([-128, 0, 127], dtype=np.int8).tobytes()
    for dtype, largest in ((pb.DTYPE_FLOAT32, 3.4028234663852886e38), (pb.DTYPE_FLOAT16, 65504.0)):
        y = decode(outlier_msg([1, 3], [1], payload, dtype=dtype))
        assert bool(torch.isfinite(y).all())
        assert float(y[0, 0]) == -largest and float(y[0, 1]) == 1.0
