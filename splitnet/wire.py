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
    """Collects chunk bytes for each tensor, checking sizes as they arrive.

    The declared sizes are checked against ``max_total`` before anything is kept; memory
    grows only with bytes that really arrived, and each payload is joined once at the
    end into a writable buffer that decoding can use without another copy.
    """

    def __init__(self, sizes: Sequence[int], n_tensors: int, max_total: int) -> None:
        if len(sizes) != n_tensors:
            raise CodecError(f"{len(sizes)} chunked payload sizes for {n_tensors} tensors")
        total = sum(sizes)
        if total > max_total:
            raise CodecError(f"chunked payloads of {total} bytes exceed the limit of {max_total}")
        self.sizes = list(sizes)
        self._parts: list[list[memoryview]] = [[] for _ in sizes]
        self._have = [0] * len(sizes)
        self._index = 0
        self._skip_full()

    def _skip_full(self) -> None:
        while self._index < len(self.sizes) and self._have[self._index] == self.sizes[self._index]:
            self._index += 1

    @property
    def done(self) -> bool:
        """True once every declared byte has arrived."""
        return self._index >= len(self.sizes)

    def add(self, data: bytes) -> None:
        """Take the next chunk; raise ``CodecError`` if it overruns the declared sizes."""
        view = memoryview(data)
        while len(view):
            if self.done:
                raise CodecError("chunk carries more bytes than the request declared")
            i = self._index
            take = min(self.sizes[i] - self._have[i], len(view))
            self._parts[i].append(view[:take])
            self._have[i] += take
            view = view[take:]
            self._skip_full()

    def payloads(self) -> list[bytearray]:
        """The collected payloads, in tensor order (call when ``done``)."""
        if not self.done:
            raise CodecError("stream ended before all chunks arrived")
        out = [bytearray().join(parts) for parts in self._parts]
        self._parts = [[] for _ in self.sizes]
        return out
