"""Wire helpers shared by the edge and the cloud: chunked payloads and timings.

A request or response whose tensor payloads exceed the chunk size travels as a
header (the message with empty payloads and ``chunked_payload_bytes`` set) followed
by ``Chunk`` messages carrying the payload bytes in order (see inference.proto).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from splitnet.errors import CodecError
from splitnet.v1 import tensor_pb2

__all__ = ["CHUNK_BYTES", "Reassembler", "iter_chunks", "strip_payloads"]

CHUNK_BYTES = 1 << 20  # 1 MiB: gRPC Python streams messages of this size fastest


def strip_payloads(tensors: Sequence[tensor_pb2.Tensor], chunk_bytes: int) -> list[bytes] | None:
    """If the payloads together exceed ``chunk_bytes``, remove them from ``tensors`` and
    return them (to send as chunks); otherwise leave the tensors as they are and return None.
    """
    if sum(len(t.payload) for t in tensors) <= chunk_bytes:
        return None
    payloads = [t.payload for t in tensors]
    for t in tensors:
        t.payload = b""
    return payloads


def iter_chunks(payloads: Sequence[bytes], chunk_bytes: int) -> Iterator[bytes]:
    """The payloads, concatenated, in pieces of ``chunk_bytes`` (the last may be shorter)."""
    pending: list[memoryview] = []
    size = 0
    for p in payloads:
        view = memoryview(p)
        while len(view):
            take = min(chunk_bytes - size, len(view))
            pending.append(view[:take])
            size += take
            view = view[take:]
            if size == chunk_bytes:
                yield b"".join(pending)
                pending, size = [], 0
    if pending:
        yield b"".join(pending)


class Reassembler:
    """Collects chunk bytes into one buffer per tensor, checking sizes as it goes.

    The declared sizes are checked against ``max_total`` before anything is allocated,
    and buffers grow only as real bytes arrive.
    """

    def __init__(self, sizes: Sequence[int], n_tensors: int, max_total: int) -> None:
        if len(sizes) != n_tensors:
            raise CodecError(f"{len(sizes)} chunked payload sizes for {n_tensors} tensors")
        total = sum(sizes)
        if total > max_total:
            raise CodecError(f"chunked payloads of {total} bytes exceed the limit of {max_total}")
        self.sizes = list(sizes)
        self.buffers = [bytearray() for _ in sizes]
        self._index = 0
        self._skip_full()

    def _skip_full(self) -> None:
        while (
            self._index < len(self.sizes)
            and len(self.buffers[self._index]) == self.sizes[self._index]
        ):
            self._index += 1

    @property
    def done(self) -> bool:
        """True once every declared byte has arrived."""
        return self._index >= len(self.sizes)

    def add(self, data: bytes) -> None:
        """Append the next chunk; raise ``CodecError`` if it overruns the declared sizes."""
        view = memoryview(data)
        while len(view):
            if self.done:
                raise CodecError("chunk carries more bytes than the request declared")
            buf = self.buffers[self._index]
            take = min(self.sizes[self._index] - len(buf), len(view))
            buf += view[:take]
            view = view[take:]
            self._skip_full()

    def payloads(self) -> list[bytearray]:
        """The collected payloads, in tensor order (call when ``done``)."""
        if not self.done:
            raise CodecError("stream ended before all chunks arrived")
        return self.buffers
