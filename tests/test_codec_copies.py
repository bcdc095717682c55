"""Decoding copies nothing it does not have to, and large zstd frames are checked as hard
as small ones (they take another path: decompressed straight into the result's memory).
"""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
import torch
import zstandard

from splitnet.codecs import decode, encode, encode_parts
from splitnet.errors import CodecError
from splitnet.v1 import tensor_pb2 as pb

MiB = 1 << 20
N = MiB  # float32 values: 4 MiB raw


def peak(fn: Callable[[], object]) -> int:
    """Bytes Python and numpy allocated at the peak of ``fn()`` (its result included)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def activations() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.relu(torch.randn(N, generator=g))


def test_a_bytearray_payload_becomes_the_result() -> None:
    x = activations()
    header, view = encode_parts(x, "raw")
    payload = bytearray(view)
    address = np.frombuffer(payload, dtype=np.uint8).ctypes.data
    y = decode(header, payload=payload)
    assert y.data_ptr() == address  # handed over: no copy at all
    assert torch.equal(y, x)
    assert peak(lambda: decode(header, payload=bytearray(4 * N))) < 4 * N * 1.1  # the bytearray


def test_a_bytes_payload_is_copied_once() -> None:
    x = activations()
    header, view = encode_parts(x, "raw")
    payload = bytes(view)
    assert peak(lambda: decode(header, payload=payload)) < 4 * N * 1.1


@pytest.mark.parametrize("codec", ["zstd:1", "zstd:3"])
def test_a_large_zstd_frame_decompresses_into_the_result(codec: str) -> None:
    x = activations()
    header, payload = encode_parts(x, codec)
    assert isinstance(payload, bytes) and len(payload) < 4 * N
    y = decode(header, payload=payload)
    assert torch.equal(y, x)
    # one buffer of the decoded size (it becomes the tensor), not decompress-then-copy
    assert peak(lambda: decode(header, payload=payload)) < 4 * N * 1.1


@pytest.mark.parametrize(
    ("codec", "out_bytes"),
    [("bf16", 4), ("int8", 4), ("int8+zstd:1", 4), ("int8o", 4), ("int8o+zstd:1", 4)],
)
def test_lossy_decodes_read_the_payload_in_place(codec: str, out_bytes: int) -> None:
    """The result is the one large allocation; the payload is read where it lies."""
    x = activations().reshape(1024, 1024)
    header, payload = encode_parts(x, codec)
    payload = bytes(payload)
    stage = 2 * N if codec == "bf16" else N + 4 * 1024 + 2 * 4 * 1024 * codec.startswith("int8o")
    extra = stage if "zstd" in codec else 0  # zstd's output: the stage bytes
    assert peak(lambda: decode(header, payload=payload)) < out_bytes * N * 1.1 + extra


# ------------------------------------------------------------- hostile large frames

BIG = 1 << 17  # float32 values: 512 KiB, past the in-place threshold


def big_frame(checksum: bool = False) -> tuple[pb.Tensor, bytes]:
    data = np.arange(BIG, dtype=np.float32).tobytes()
    c = zstandard.ZstdCompressor(level=1, write_content_size=True, write_checksum=checksum)
    frame = c.compress(data)
    msg = pb.Tensor(
        shape=[BIG], dtype=pb.DTYPE_FLOAT32, raw_nbytes=4 * BIG, steps=[pb.Step(zstd=pb.Zstd())]
    )
    return msg, frame


def flip(frame: bytes, at: int) -> bytes:
    b = bytearray(frame)
    b[at] ^= 0xFF
    return bytes(b)


def short_frame() -> bytes:
    """A frame declaring 4 * BIG bytes that holds one raw block of 16."""
    descriptor = 0b1110_0000  # 8-byte content size, single segment
    return (
        struct.pack("<IBQ", 0xFD2FB528, descriptor, 4 * BIG)
        + ((16 << 3) | 1).to_bytes(3, "little")
        + bytes(16)
    )


def reserved_block() -> bytes:
    descriptor = 0b1110_0000
    block = (16 << 3) | (3 << 1) | 1  # block type 3 is reserved
    return struct.pack("<IBQ", 0xFD2FB528, descriptor, 4 * BIG) + block.to_bytes(3, "little")


HOSTILE: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "trailing bytes": (lambda f: f + b"junk", "4 bytes after the frame"),
    "two frames": (lambda f: f + f, "after the frame"),
    "truncated": (lambda f: f[: len(f) // 2], "corrupt"),
    "last byte cut": (lambda f: f[:-1], "corrupt"),
    "less content than declared": (lambda f: short_frame(), "corrupt"),
    "reserved block type": (lambda f: reserved_block(), "corrupt"),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_large_frames_are_checked_like_small_ones(case: str) -> None:
    msg, frame = big_frame()
    make, match = HOSTILE[case]
    with pytest.raises(CodecError, match=match):
        decode(msg, payload=make(frame))


def test_a_large_frame_with_a_bad_checksum_is_refused() -> None:
    msg, frame = big_frame(checksum=True)
    assert torch.equal(decode(msg, payload=frame), torch.arange(BIG, dtype=torch.float32))
    with pytest.raises(CodecError, match="corrupt"):
        decode(msg, payload=flip(frame, len(frame) - 1))


@pytest.mark.parametrize("data", ["zeros", "random", "mixed"])
@pytest.mark.parametrize("level", [1, 19])
def test_large_frames_of_every_block_kind_decode(data: str, level: int) -> None:
    """Zeros make RLE blocks, random bytes raw blocks, the rest compressed blocks."""
    g = torch.Generator().manual_seed(level)
    x = {
        "zeros": torch.zeros(BIG),
        "random": torch.rand(BIG, generator=g),
        "mixed": torch.cat([torch.zeros(BIG // 2), torch.rand(BIG // 2, generator=g)]),
    }[data]
    assert torch.equal(decode(encode(x, f"zstd:{level}")), x)
