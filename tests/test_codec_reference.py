"""Every codec the server can send decodes from the proto alone.

``reference_decode`` below is written from the comments in ``proto/splitnet/v1/tensor.proto``
and nothing else: numpy, the generated message class, and a zstd library for the
``Zstd`` step (RFC 8878 frames). It never calls splitnet's decoder. For every
accepted codec and a spread of tensors (ordinary activations, tiny and huge values
that need fp16 exponents beyond +-126, NaN and infinities, 16-bit and 64-bit
floats, language-model hidden states with outlier channels), it must return the
same bits as ``splitnet.codecs.decode``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import zstandard

from splitnet.codecs import accepted_codecs, decode, encode
from splitnet.errors import CodecError
from splitnet.v1 import tensor_pb2

# ---------------------------------------------------------------- the reference decoder

# DType value -> (numpy dtype of the bytes, name). BFLOAT16 has no numpy dtype: its
# 2-byte values are "the high 16 bits of an IEEE float32".
_HOLD = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DTYPE_BFLOAT16: np.dtype("<u2"),
    tensor_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DTYPE_INT8: np.dtype("i1"),
    tensor_pb2.DTYPE_UINT8: np.dtype("u1"),
    tensor_pb2.DTYPE_INT16: np.dtype("<i2"),
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DTYPE_BOOL: np.dtype("u1"),
}
_LARGEST = {  # largest finite value of each floating dtype
    tensor_pb2.DTYPE_FLOAT16: 65504.0,
    tensor_pb2.DTYPE_BFLOAT16: float(np.uint32(0x7F7F0000).view(np.float32)),
    tensor_pb2.DTYPE_FLOAT32: float(np.finfo(np.float32).max),
    tensor_pb2.DTYPE_FLOAT64: math.inf,
}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bits, to nearest even (NaN stays NaN)."""
    u = x.astype(np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def cast_to(x: np.ndarray, dtype: int) -> np.ndarray:
    """'Cast to Tensor.dtype' (IEEE round to nearest even); bf16 as its bits."""
    if dtype == tensor_pb2.DTYPE_BFLOAT16:
        return f32_to_bf16(x.astype(np.float32))
    return x.astype(_HOLD[dtype])


def reference_decode(data: bytes) -> np.ndarray:
    t = tensor_pb2.Tensor.FromString(data)
    shape = tuple(t.shape)
    n = math.prod(shape)
    steps = list(t.steps)
    payload = t.payload
    if steps and steps[-1].WhichOneof("kind") == "zstd":
        payload = zstandard.ZstdDecompressor().decompress(payload)
        steps = steps[:-1]
    if not steps:
        return np.frombuffer(payload, dtype=_HOLD[t.dtype]).reshape(shape)
    (step,) = steps
    kind = step.WhichOneof("kind")
    # "in float32 arithmetic (float64 when Tensor.dtype is FLOAT64)"
    wide = np.float64 if t.dtype == tensor_pb2.DTYPE_FLOAT64 else np.float32
    if kind == "cast":
        c = step.cast
        if c.to == tensor_pb2.DTYPE_FLOAT16:
            values = np.frombuffer(payload, dtype="<f2").astype(np.float64)
        else:
            values = bf16_to_f32(np.frombuffer(payload, dtype="<u2")).astype(np.float64)
        # "widen each value to float64, multiply by 2^exponent, cast to Tensor.dtype"
        return cast_to(values * 2.0**c.exponent, t.dtype).reshape(shape)
    if kind == "quantize":
        q = step.quantize
        codes = np.frombuffer(payload, dtype=np.int8).astype(wide).reshape(shape)
        scale = np.array(q.scale, dtype=np.float32).astype(wide)
        zero = np.array(q.zero_point, dtype=wide)
        if q.per_channel:
            view = [1] * len(shape)
            view[q.axis] = shape[q.axis]
            scale, zero = scale.reshape(view), zero.reshape(view)
        else:
            scale, zero = scale[0], zero[0]
        with np.errstate(over="ignore"):
            real = (codes - zero) * scale
        limit = _LARGEST[t.dtype]
        return cast_to(np.clip(real, -limit, limit), t.dtype)
    assert kind == "outlier_int8", kind
    o = step.outlier_int8
    h = shape[-1]
    r = n // h
    k = len(o.channels)
    odt = np.dtype("<f2") if o.outlier_dtype == tensor_pb2.DTYPE_FLOAT16 else np.dtype("<f4")
    assert len(payload) == 4 * r + r * k * odt.itemsize + r * h
    scales = np.frombuffer(payload, dtype="<f4", count=r)
    outliers = np.frombuffer(payload, dtype=odt, count=r * k, offset=4 * r)
    codes = np.frombuffer(payload, dtype=np.int8, count=r * h, offset=4 * r + r * k * odt.itemsize)
    with np.errstate(over="ignore"):
        out = codes.reshape(r, h).astype(wide) * scales.astype(wide).reshape(r, 1)
    out[:, list(o.channels)] = outliers.reshape(r, k).astype(wide)
    limit = _LARGEST[t.dtype]
    return cast_to(np.clip(out, -limit, limit), t.dtype).reshape(shape)


# ---------------------------------------------------------------- what to compare


def splitnet_bits(y: torch.Tensor) -> np.ndarray:
    if y.dtype == torch.bfloat16:
        return y.view(torch.int16).numpy().view(np.uint16)
    if y.dtype == torch.bool:
        return y.numpy().view(np.uint8)
    return y.numpy()


def assert_same(ref: np.ndarray, got: np.ndarray, bf16: bool) -> None:
    assert ref.shape == got.shape and ref.dtype == got.dtype
    if got.dtype.kind != "f" and not bf16:
        assert np.array_equal(ref, got)
        return
    fr = bf16_to_f32(ref) if bf16 else ref
    fg = bf16_to_f32(got) if bf16 else got
    nan = np.isnan(fr)
    assert np.array_equal(nan, np.isnan(fg)), "NaN positions differ"
    # bit for bit everywhere else (so -0.0 and subnormals count)
    width = {2: np.uint16, 4: np.uint32, 8: np.uint64}[ref.dtype.itemsize]
    assert np.array_equal(ref[~nan].view(width), got[~nan].view(width))


def hidden_states(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 96, generator=g) * 2
    x[..., [5, 60]] *= 1e4  # outlier channels, as in language models
    return x.to(dtype)


def activations() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.relu(torch.randn(2, 8, 6, 6, generator=g)) * 3


TENSORS = {
    "activations": activations,
    "hidden states": hidden_states,
    "hidden states fp16": lambda: hidden_states(torch.float16),
    "hidden states bf16": lambda: hidden_states(torch.bfloat16),
    "hidden states f64": lambda: hidden_states(torch.float64),
    "large outliers beyond fp16": lambda: hidden_states() * 10,  # float32 outliers
    # fp16 exponent -154: 2^-154 is not a float32 at all (it underflows to 0)
    "float32 subnormals": lambda: torch.tensor([[1e-42, -3e-43, 0.0, 7e-45]]),
    # fp16 exponent -131 for float32, +135 for float64: beyond float32's 2^+-126
    "float32 tiny": lambda: torch.tensor([[1.5e-35, -2e-36, 3e-37, 0.0]]),
    "float64 huge": lambda: torch.tensor([[1e45, -3e44, 2.5e40, 1.0]], dtype=torch.float64),
    "float64 tiny": lambda: torch.tensor([[1e-60, -3e-61, 0.0, 5e-59]], dtype=torch.float64),
    "nan and inf": lambda: torch.tensor([[1.0, math.nan, -math.inf, math.inf, -2.5, 0.0]]),
    "near float32 max": lambda: torch.tensor([[3.0e38, -2.0e38, 1.0, 0.0]]),
    "int64": lambda: torch.arange(-6, 6).reshape(3, 4),
    "bool": lambda: torch.tensor([[True, False, True]]),
    "scalar": lambda: torch.tensor(2.5),
    "empty": lambda: torch.zeros(0, 4),
}
SERVER_CODECS = sorted(set(accepted_codecs()) | {"zstd:1", "int8+zstd:1", "int8o:1", "int8o:8"})


def test_server_codecs_cover_every_wire_step() -> None:
    kinds = {
        s.WhichOneof("kind")
        for codec in SERVER_CODECS
        for make in TENSORS.values()
        for s in _encoded(make(), codec).steps
    }
    oneof = tensor_pb2.Step.DESCRIPTOR.oneofs_by_name["kind"]
    assert kinds == {f.name for f in oneof.fields}


def _encoded(x: torch.Tensor, codec: str) -> tensor_pb2.Tensor:
    try:
        return encode(x, codec)
    except CodecError:  # e.g. int8 refusing NaN: nothing is sent
        return tensor_pb2.Tensor()


@pytest.mark.parametrize("codec", SERVER_CODECS)
@pytest.mark.parametrize("name", TENSORS)
def test_reference_decoder_from_the_proto_matches_decode(name: str, codec: str) -> None:
    x = TENSORS[name]()
    try:
        msg = encode(x, codec)
    except CodecError:
        assert not torch.isfinite(x).all() or name in ("near float32 max", "float64 huge")
        return
    data = msg.SerializeToString()
    ref = reference_decode(data)
    got = splitnet_bits(decode(tensor_pb2.Tensor.FromString(data)))
    assert_same(ref, got, bf16=x.dtype == torch.bfloat16)


@pytest.mark.parametrize("name", ["float32 subnormals", "float64 huge"])
def test_the_float64_rule_matters(name: str) -> None:
    """A decoder that widens to float32 (the old comment) gets these wrong."""
    x = TENSORS[name]()
    msg = encode(x, "fp16")
    exponent = msg.steps[0].cast.exponent
    assert abs(exponent) > 126
    halves = np.frombuffer(msg.payload, dtype="<f2").astype(np.float32)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        naive = (halves * np.float32(2.0**exponent)).astype(_HOLD[msg.dtype])
    assert not np.array_equal(naive, reference_decode(msg.SerializeToString()).reshape(-1))
    big = x.abs().argmax()
    assert math.isclose(float(decode(msg).flatten()[big]), float(x.flatten()[big]), rel_tol=2**-10)
