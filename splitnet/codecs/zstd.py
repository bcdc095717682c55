"""``zstd[:LEVEL]``: one zstd frame that declares its content size (wire step ``Zstd``).

zstandard allocates whatever a frame header declares, so the decoder checks the
declared size against what the tensor's header implies *before* decompressing.
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard

from splitnet.codecs.base import Buffer, EntropyStep, Param
from splitnet.errors import CodecError
from splitnet.v1 import tensor_pb2 as pb

__all__ = ["SAMPLE_BLOCK", "SAMPLE_BLOCKS", "Zstd"]

DEFAULT_LEVEL = 3
_MAGIC = b"\x28\xb5\x2f\xfd"  # little-endian 0xFD2FB528, first in every zstd frame
_BLOCK = 128 << 10  # zstd's largest block (decompressed bytes)
# sample_ratio compresses this many evenly spaced blocks of this many bytes, joined.
SAMPLE_BLOCKS = 32
SAMPLE_BLOCK = 4 << 10

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


class Zstd(EntropyStep):
    """zstd at a level from 1 to 22."""

    name = "zstd"
    wire_kind = "zstd"
    param = Param("LEVEL", 1, 22, DEFAULT_LEVEL)
    summary = "zstd, lossless"

    @property
    def level(self) -> int:
        """The compression level."""
        return DEFAULT_LEVEL if self.value is None else self.value

    def encode(self, data: memoryview, step: pb.Step) -> bytes:
        """One frame with its content size in the header."""
        step.zstd.level = self.level
        return _compressor(self.level).compress(data)

    def bounds(self, nbytes: int) -> tuple[int, int]:
        """At least a frame header (6 bytes) and a 4-byte block per 128 KiB; at most zstd's
        ``ZSTD_COMPRESSBOUND`` (incompressible input plus its framing).
        """
        blocks = max(1, -(-nbytes // _BLOCK))
        low = 6 + (4 if nbytes else 3) * blocks  # an empty frame has one empty block
        high = nbytes + (nbytes >> 8) + ((_BLOCK - nbytes) >> 11 if nbytes < _BLOCK else 0)
        return low, max(high, low)

    def sample_nbytes(self, data: memoryview) -> int:
        """The compressed size of ``data``: exact up to 128 KiB; past that, extrapolated
        from 32 evenly spaced 4 KiB blocks of it compressed together.
        """
        n = len(data)
        compressor = _compressor(self.level)
        if n <= SAMPLE_BLOCKS * SAMPLE_BLOCK:
            return len(compressor.compress(data))
        stride = (n - SAMPLE_BLOCK) // (SAMPLE_BLOCKS - 1)
        sample = b"".join(
            data[i * stride : i * stride + SAMPLE_BLOCK] for i in range(SAMPLE_BLOCKS)
        )
        return round(len(compressor.compress(sample)) * n / len(sample))

    @classmethod
    def decode(cls, step: pb.Step, payload: Buffer, expected: int) -> Buffer:
        """Decompress exactly one standard frame that declares exactly ``expected`` bytes."""
        if payload[:4] != _MAGIC:  # not zstd, or a skippable frame
            raise CodecError("payload is not a standard zstd frame")
        try:
            declared = zstandard.frame_content_size(payload)  # -1: not declared
        except zstandard.ZstdError as e:
            raise CodecError(f"payload is not a zstd frame: {e}") from e
        if declared < 0:
            raise CodecError("zstd frame does not declare its content size")
        if declared != expected:
            raise CodecError(f"zstd frame declares {declared} bytes; the header implies {expected}")
        if expected < _INTO_MIN:
            # Safe now: zstandard allocates the declared content size, which we just
            # bounded. It also checks the frame decodes to exactly that size with nothing
            # after it. (Small payloads: one more copy for writability costs nothing.)
            try:
                out: bytes = _decompressor().decompress(payload, allow_extra_data=False)
            except zstandard.ZstdError as e:
                raise CodecError(f"corrupt zstd payload: {e}") from e
            return out
        return _decompress_into(payload, expected)


_INTO_MIN = 64 << 10  # from this size on, decompress into a writable buffer (no copy)


def _frame_end(payload: Buffer) -> int:
    """Where the one frame starting ``payload`` ends (RFC 8878: header, blocks, optional
    checksum), walking its block headers; -1 if the blocks run past the end.
    """
    pos = zstandard.frame_header_size(payload)
    has_checksum = payload[4] & 0b100
    n = len(payload)
    while True:
        if pos + 3 > n:
            return -1
        header = int.from_bytes(payload[pos : pos + 3], "little")
        pos += 3
        kind, size = (header >> 1) & 3, header >> 3
        if kind == 3:  # reserved block type
            return -1
        pos += 1 if kind == 1 else size  # an RLE block holds one byte
        if header & 1:  # the last block
            return pos + (4 if has_checksum else 0)


def _decompress_into(payload: Buffer, expected: int) -> memoryview:
    """Decompress a frame declaring ``expected`` bytes straight into a writable buffer,
    so a lossless result uses it without another copy.
    """
    try:
        end = _frame_end(payload)
    except zstandard.ZstdError as e:
        raise CodecError(f"payload is not a zstd frame: {e}") from e
    if end < 0:
        raise CodecError("corrupt zstd payload: its blocks run past its end")
    if end != len(payload):
        raise CodecError(f"corrupt zstd payload: {len(payload) - end} bytes after the frame")
    out = memoryview(np.empty(expected, dtype=np.uint8).data)
    got = 0
    try:
        with _decompressor().stream_reader(payload, read_size=len(payload)) as reader:
            while got < expected:
                n = reader.readinto(out[got:])
                if not n:
                    break
                got += n
            extra = reader.read(1)  # drives the frame to its end (and its checksum)
    except zstandard.ZstdError as e:
        raise CodecError(f"corrupt zstd payload: {e}") from e
    if got != expected or extra:
        raise CodecError("corrupt zstd payload: its content is not the size it declares")
    return out
