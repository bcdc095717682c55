"""estimate_nbytes: bounds that hold, exact sizes where the codec is fixed-size."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitnet.codecs import accepted_codecs, encode, estimate_nbytes
from splitnet.errors import CodecError

CODECS = sorted(set(accepted_codecs()) | {"zstd:1", "int8+zstd:1", "int8o:1", "int8o:16+zstd:1"})
FIXED = [c for c in CODECS if "zstd" not in c]


def hidden_states() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 200, generator=g)
    x[..., [3, 150]] *= 1e4
    return x


TENSORS = {
    "activations": lambda: torch.relu(torch.randn(2, 16, 9, 9)) * 3,
    "hidden states": hidden_states,
    "big outliers": lambda: hidden_states() * 100,  # float32 outliers in int8o
    "tiny": lambda: torch.randn(3, 40) * 1e-30,  # fp16 exponent
    "symmetric": lambda: torch.randn(4, 300),
    "channels 200": lambda: torch.randn(1, 200, 4, 4) - 5,  # int8c, 2-byte zero points
    "fp16": lambda: torch.randn(5, 7).half(),
    "bf16": lambda: torch.randn(5, 7).bfloat16(),
    "float64": lambda: torch.randn(3, 129, dtype=torch.float64),
    "int64": lambda: torch.arange(1000).reshape(10, 100),
    "bool": lambda: torch.rand(50) > 0.5,
    "scalar": lambda: torch.tensor(1.5),
    "empty": lambda: torch.zeros(0, 3),
    "nan": lambda: torch.tensor([1.0, math.nan, 2.0]),
}


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("name", TENSORS)
def test_bounds_hold_and_a_sample_makes_fixed_size_codecs_exact(name: str, codec: str) -> None:
    x = TENSORS[name]()
    blind = estimate_nbytes(codec, x.shape, x.dtype)
    try:
        actual = encode(x, codec).ByteSize()
    except CodecError:
        with pytest.raises(CodecError):
            estimate_nbytes(codec, x.shape, x.dtype, sample=x)
        return
    assert blind.low <= actual <= blind.high and blind.nbytes == blind.high
    seen = estimate_nbytes(codec, x.shape, x.dtype, sample=x)
    assert seen.low <= actual <= seen.high
    if codec in FIXED or x.numel() * 4 <= 128 << 10:
        assert seen.exact and seen.nbytes == actual
    if codec in FIXED:
        # Without a sample, off by a few varint bytes at most (int8o: float16 vs 32).
        slack = {"int8c": 2 * 200 + 4}.get(codec, 8)
        if codec.startswith("int8o"):
            slack = x.numel() // x.shape[-1] * 2 * 16 + 8 if x.dim() else 8
        assert blind.high - blind.low <= slack


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=4),
    codec=st.sampled_from(CODECS),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int32]),
    scale=st.sampled_from([1e-20, 1.0, 3e4]),
)
def test_bounds_hold_for_any_shape(
    shape: list[int], codec: str, dtype: torch.dtype, scale: float
) -> None:
    g = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(shape, dtype=torch.float64, generator=g) * scale).to(dtype)
    est = estimate_nbytes(codec, shape, dtype)
    try:
        actual = encode(x, codec).ByteSize()
    except CodecError:  # beyond what the codec carries: the estimate says so too
        with pytest.raises(CodecError):
            estimate_nbytes(codec, shape, dtype, sample=x)
        return
    assert est.low <= actual <= est.high
    assert estimate_nbytes(codec, shape, dtype, sample=x).nbytes == actual or "zstd" in codec


@pytest.mark.parametrize("n", [0, 1, 100, 1 << 17, 3 << 17])
def test_zstd_lower_bound_holds_for_zeros(n: int) -> None:
    x = torch.zeros(n, dtype=torch.uint8)
    assert estimate_nbytes("zstd:19", [n], torch.uint8).low <= encode(x, "zstd:19").ByteSize()


@pytest.mark.parametrize("codec", ["zstd:1", "zstd:3", "int8+zstd:1", "fp16+zstd:1", "int8o+zstd"])
def test_zstd_estimate_from_a_sample_is_close(codec: str) -> None:
    """Past 128 KiB the estimate extrapolates from 32 blocks of 4 KiB. Here channels
    differ in sparsity (as in real networks), the hard case for a block sample. On every
    cut of digits-cnn and resnet18 the error had median 0.4%, p90 2.9%, max 13%.
    """
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 64, 1, 1, generator=g) + torch.randn(1, 64, 48, 48, generator=g) * 0.3
    x = torch.relu(base) * 2
    actual = encode(x, codec).ByteSize()
    est = estimate_nbytes(codec, x.shape, x.dtype, sample=x)
    assert not est.exact and est.low <= actual <= est.high
    assert abs(est.nbytes / actual - 1) < 0.15, (est.nbytes, actual)


def test_a_sample_must_match() -> None:
    with pytest.raises(CodecError, match="sample"):
        estimate_nbytes("int8", [2, 3], torch.float32, sample=torch.zeros(3, 2))
    with pytest.raises(CodecError, match="cannot go on the wire"):
        estimate_nbytes("raw", [2], torch.complex64)
