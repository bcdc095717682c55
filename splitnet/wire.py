"""Wire helpers shared by the edge and the cloud: chunked payloads and timings.

A request or response whose tensor payloads exceed the chunk size travels as a
header (the message with empty payloads and ``chunked_payload_bytes`` set) followed
by ``Chunk`` messages carrying the payload bytes in order (see inference.proto).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from splitnet.codecs.registry import MAX_SPEC_CHARS
from splitnet.errors import ProtocolError
from splitnet.v1 import tensor_pb2

__all__ = [
    "BOUNDS",
    "CHUNK_BYTES",
    "ChunkReader",
    "OutOfBounds",
    "RawChunk",
    "Reassembler",
    "iter_chunks",
    "scan_bounds",
    "parse_chunk",
    "serialize_chunk",
    "serialize_stream_message",
    "stream_parser",
    "strip_payloads",
]

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


def iter_chunks(payloads: Sequence[bytes | memoryview], chunk_bytes: int) -> Iterator[memoryview]:
    """Views of the payloads in order, each at most ``chunk_bytes`` long (no copies).

    A chunk never spans two payloads; the receiver only needs their order and sizes.
    """
    for p in payloads:
        view = memoryview(p).cast("B") if isinstance(p, memoryview) else memoryview(p)
        for start in range(0, len(view), chunk_bytes):
            yield view[start : start + chunk_bytes]


def serialize_stream_message(msg: Any) -> bytes:
    """Serializer for both stream directions: raw chunks fast, the rest by protobuf."""
    if isinstance(msg, RawChunk):
        return serialize_chunk(msg)
    return bytes(msg.SerializeToString())


class Unparsable:
    """What a safe parser returns for bytes that are not the expected message.

    gRPC answers a deserializer's exception with UNKNOWN; the server wants to answer
    INVALID_ARGUMENT, so its parsers never raise and the handler checks for this.
    """

    def __init__(self, message_type: Any, error: Exception) -> None:
        self.message = (
            f"the message is not a valid {message_type.DESCRIPTOR.full_name} "
            f"({type(error).__name__}: {error})"
        )

    def WhichOneof(self, _: str) -> None:  # noqa: N802 - mirrors the protobuf message
        return None


def safe_parser(message_type: Any) -> Any:
    """Deserializer returning ``Unparsable`` instead of raising on malformed bytes.

    Inference messages are first scanned against ``BOUNDS`` (``scan_bounds``), so a
    repeated field with far more entries than any valid message has is refused before
    protobuf builds it (a packed int64 takes 1 byte on the wire and 8 once parsed).
    """
    bounds = BOUNDS.get(message_type.DESCRIPTOR.full_name)

    def parse(data: bytes) -> Any:
        if bounds is not None and len(data) > SCAN_FROM_BYTES:
            problem = scan_bounds(data, bounds)
            if problem is not None:
                return OutOfBounds(message_type, problem, _request_id(data, message_type))
        try:
            return message_type.FromString(data)
        except Exception as e:  # protobuf's DecodeError, RuntimeWarning-free
            return Unparsable(message_type, e)

    return parse


class OutOfBounds(Unparsable):
    """A message refused by ``scan_bounds`` before it was parsed."""

    def __init__(self, message_type: Any, problem: str, request_id: int | None = None) -> None:
        self.message = f"{message_type.DESCRIPTOR.full_name} refused before parsing: {problem}"
        self.request_id = request_id  # a stream request's id, so it can be answered in-band


def _request_id(data: bytes, message_type: Any) -> int | None:
    """The id of the request a ``StreamRequest``'s bytes carry (None if there is none)."""
    if message_type.DESCRIPTOR.full_name != "splitnet.v1.StreamRequest":
        return None
    try:
        buf, pos = memoryview(data), 0
        tag, pos = _read_varint(buf, pos)
        if tag != 0x0A:  # field 1, length-delimited: the request
            return None
        length, pos = _read_varint(buf, pos)
        end = min(pos + length, len(buf))
        for _ in range(MAX_SCAN_FIELDS):  # the id is usually the first field
            if pos >= end:
                return 0
            tag, pos = _read_varint(buf, pos)
            if tag == 0x08:
                return _read_varint(buf, pos)[0]
            kind = tag & 7
            if kind == 0:
                pos = _read_varint(buf, pos)[1]
            elif kind == 2:
                n, pos = _read_varint(buf, pos)
                pos += n
            elif kind in (1, 5):
                pos += 8 if kind == 1 else 4
            else:
                return None
    except ValueError:
        return None
    return None


# ------------------------------------------------------- bounds before parsing
#
# What a valid message can hold, per field: at most ``count`` entries of a repeated
# field (packed or not), and for a message field the bounds of its own fields. The
# scan reads tags and lengths only (O(fields), never O(bytes)), skips payloads, and
# stops at MAX_SCAN_FIELDS fields in all.

SCAN_FROM_BYTES = 64 << 10  # smaller messages parse to little whatever they hold
MAX_SCAN_FIELDS = 1 << 16  # fields one message may have, at every depth together
MAX_TENSORS = 1024  # tensors in one request or response (a frontier holds a few)
MAX_WIRE_RANK = 32  # dimensions of one wire tensor (decode's own limit is lower)
MAX_STEPS = 4  # codec steps of one wire tensor (decode accepts two)


class Field:
    """Bounds of one field: most entries; for a message field its fields' bounds; for a
    string field the most bytes it may hold.
    """

    __slots__ = ("count", "fields", "name", "size")

    def __init__(
        self,
        name: str,
        count: int,
        fields: dict[int, Field] | None = None,
        *,
        size: int | None = None,
    ) -> None:
        self.name = name
        self.count = count
        self.fields = fields  # None: a scalar or string field
        self.size = size  # a string field's most bytes; None: not a string field


MAX_NAME_BYTES = 1024  # a model or cut name ("pkg.module:callable" names included)


_TENSOR = {1: Field("shape", MAX_WIRE_RANK), 3: Field("steps", MAX_STEPS, {})}
_REQUEST = {
    2: Field("model", 1, size=MAX_NAME_BYTES),
    3: Field("cut", 1, size=MAX_NAME_BYTES),
    4: Field("fingerprint", 1, size=MAX_NAME_BYTES),
    5: Field("frontier", MAX_TENSORS, _TENSOR),
    6: Field("output_codec", 1, size=MAX_SPEC_CHARS),
    7: Field("chunked_payload_bytes", MAX_TENSORS),
}
_RESPONSE = {
    2: Field("outputs", MAX_TENSORS, _TENSOR),
    5: Field("chunked_payload_bytes", MAX_TENSORS),
}
BOUNDS: dict[str, dict[int, Field]] = {
    "splitnet.v1.InferRequest": _REQUEST,
    "splitnet.v1.StreamRequest": {1: Field("request", 8, _REQUEST)},
    "splitnet.v1.InferResponse": _RESPONSE,
    "splitnet.v1.StreamResponse": {1: Field("response", 8, _RESPONSE)},
}


def scan_bounds(data: bytes | memoryview, fields: dict[int, Field]) -> str | None:
    """Why ``data`` exceeds ``fields``' bounds, or None (also for malformed bytes:
    protobuf then says what is wrong with them).
    """
    budget = [MAX_SCAN_FIELDS]
    try:
        return _scan(memoryview(data), fields, budget)
    except ValueError:
        return None


def _scan(buf: memoryview, fields: dict[int, Field], budget: list[int]) -> str | None:
    counts: dict[int, int] = {}
    pos, end = 0, len(buf)
    while pos < end:
        budget[0] -= 1
        if budget[0] < 0:
            return f"more than {MAX_SCAN_FIELDS} fields"
        tag, pos = _read_varint(buf, pos)
        number, kind = tag >> 3, tag & 7
        if kind == 0:
            _, pos = _read_varint(buf, pos)
            n, sub = 1, None
        elif kind == 1 or kind == 5:
            pos += 8 if kind == 1 else 4
            n, sub = 1, None
        elif kind == 2:
            length, pos = _read_varint(buf, pos)
            sub = buf[pos : pos + length]
            pos += length
            bound = fields.get(number)
            if bound is not None and bound.size is not None:
                if length > bound.size:
                    return (
                        f"field {bound.name!r} of {length} bytes; a valid message has at "
                        f"most {bound.size}"
                    )
                continue  # a string: proto3 keeps the last one, so any count is fine
            # Packed varints take 1 to 10 bytes each: the length gives a lower bound.
            n = 1 if bound is None or bound.fields is not None else -(-length // 10)
        else:
            return None  # groups or junk: protobuf will refuse it
        bound = fields.get(number)
        if bound is None:
            continue
        seen = counts.get(number, 0) + n
        if seen > bound.count:
            return (
                f"field {bound.name!r} has {seen} entries or more; a valid message has at "
                f"most {bound.count}"
            )
        counts[number] = seen
        if sub is not None and bound.fields:
            problem = _scan(sub, bound.fields, budget)
            if problem is not None:
                return f"{bound.name}: {problem}"
    return None


def stream_parser(message_type: Any) -> Any:
    """Deserializer for a stream direction: chunk frames as ``RawChunk`` views, the rest
    parsed by protobuf as ``message_type`` (``Unparsable`` if it is not one).
    """
    safe = safe_parser(message_type)

    def parse(data: bytes) -> Any:
        return parse_chunk(data) or safe(data)

    return parse


class Reassembler:
    """Collects chunk bytes for each tensor, checking sizes as they arrive.

    The declared sizes are checked against ``max_total`` before anything is kept; memory
    grows only with bytes that really arrived: each chunk is copied once into its
    payload's writable buffer (which decoding then uses without another copy), so a
    stream of tiny chunks costs its bytes, not an object per chunk. With ``keep=False``
    the bytes are counted and dropped.
    """

    def __init__(
        self, sizes: Sequence[int], n_tensors: int, max_total: int, *, keep: bool = True
    ) -> None:
        if len(sizes) != n_tensors:  # O(1): before any per-entry work
            raise ProtocolError(f"{len(sizes)} chunked payload sizes for {n_tensors} tensors")
        self.sizes = list(sizes)
        total = sum(self.sizes)
        if total > max_total:
            raise ProtocolError(
                f"chunked payloads of {total} bytes exceed the limit of {max_total}"
            )
        self.total = total
        self.keep = keep
        self.received = 0
        self._parts = [bytearray() for _ in self.sizes]
        self._have = [0] * len(self.sizes)
        self._index = 0
        self._skip_full()

    def _skip_full(self) -> None:
        while self._index < len(self.sizes) and self._have[self._index] == self.sizes[self._index]:
            self._index += 1

    @property
    def done(self) -> bool:
        """True once every declared byte has arrived."""
        return self._index >= len(self.sizes)

    def add(self, data: bytes | memoryview) -> None:
        """Take the next chunk; raise ``ProtocolError`` if it overruns the declared sizes."""
        view = memoryview(data)
        self.received += len(view)
        while len(view):
            if self.done:
                raise ProtocolError("chunk carries more bytes than the message declared")
            i = self._index
            take = min(self.sizes[i] - self._have[i], len(view))
            if self.keep:
                self._parts[i] += view[:take]
            self._have[i] += take
            view = view[take:]
            self._skip_full()

    def payloads(self) -> list[bytearray]:
        """The collected payloads, in tensor order (call when ``done``)."""
        if not self.done:
            raise ProtocolError("stream ended before all chunks arrived")
        out, self._parts = self._parts, []
        return out


class ChunkReader:
    """The receiving end of chunked transfer, one per stream, the same on both sides.

    A message announcing ``chunked_payload_bytes`` starts a transfer; its chunks must
    follow, with its id, before any other message of the stream (inference.proto)::

        reader.start(msg.id, msg.chunked_payload_bytes, len(msg.frontier), max_total=...)
        ... for each chunk:  if reader.add(chunk.id, chunk.data): payloads = reader.take()
        ... at the end:      reader.finish()

    Every violation raises ``ProtocolError``.
    """

    def __init__(self, what: str = "message") -> None:
        self.what = what  # "request" or "response", for messages
        self._id = 0
        self._assembler: Reassembler | None = None

    @property
    def busy(self) -> bool:
        """True while a transfer waits for chunks."""
        return self._assembler is not None

    @property
    def pending_bytes(self) -> int:
        """Bytes received and held for the transfer in progress."""
        a = self._assembler
        return a.received if a is not None and a.keep else 0

    def check_idle(self, ident: int) -> None:
        """``ProtocolError`` if message ``ident`` arrives while a transfer is incomplete."""
        if self._assembler is not None:
            raise ProtocolError(
                f"{self.what} {ident} began before {self.what} {self._id}'s chunks were complete"
            )

    def start(
        self,
        ident: int,
        sizes: Sequence[int],
        n_tensors: int,
        *,
        max_total: int,
        keep: bool = True,
    ) -> bool:
        """Begin a transfer for message ``ident``; True if it is already complete (no
        bytes declared). ``keep=False`` drops the chunks (a refused message).
        """
        self.check_idle(ident)
        self._assembler = Reassembler(sizes, n_tensors, max_total, keep=keep)
        self._id = ident
        return self._assembler.done

    def add(self, ident: int, data: bytes | memoryview) -> bool:
        """Take one chunk; True when it completes the transfer (then call ``take``)."""
        a = self._assembler
        if a is None or ident != self._id:
            raise ProtocolError(f"chunk for {self.what} {ident} that was not announced")
        a.add(data)
        return a.done

    def take(self) -> list[bytearray] | None:
        """The completed transfer's payloads (None if it was dropped); the reader is free."""
        a = self._assembler
        if a is None:
            raise ProtocolError("no transfer in progress")
        self._assembler = None
        return a.payloads() if a.keep else None

    def abandon(self) -> None:
        """Drop a transfer in progress (its bytes are released)."""
        self._assembler = None

    def finish(self) -> None:
        """At the end of the stream: ``ProtocolError`` if a transfer is incomplete."""
        if self._assembler is not None:
            ident, self._assembler = self._id, None
            raise ProtocolError(f"stream ended before {self.what} {ident}'s chunks were complete")


# ---------------------------------------------------------------- fast chunk frames
#
# Chunk messages carry nearly all the bytes of a large request. Serialising them
# through protobuf copies the data three times (join, set field, serialise) and
# parsing twice (parse, read field). These functions write and read exactly the bytes
# protobuf would - StreamRequest/StreamResponse field 2 = Chunk{1: id, 2: data} - with
# one copy on each side. Anything else goes through protobuf as usual.

_TAG_CHUNK = 0x12  # field 2, length-delimited (same number in StreamRequest and StreamResponse)
_TAG_ID = 0x08  # Chunk.id: field 1, varint
_TAG_DATA = 0x12  # Chunk.data: field 2, length-delimited


class RawChunk:
    """A chunk frame outside protobuf: ``id`` and a view of its ``data``."""

    __slots__ = ("data", "id")

    def __init__(self, id: int, data: bytes | memoryview) -> None:  # noqa: A002
        self.id = id
        self.data = data

    def WhichOneof(self, _: str) -> str:  # noqa: N802 - mirrors the protobuf message
        """Answers like a ``StreamRequest`` holding a chunk."""
        return "raw_chunk"


def encode_varint(n: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative integer."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("bad varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def serialize_chunk(chunk: RawChunk) -> bytes:
    """The protobuf bytes of ``StreamRequest(chunk=Chunk(id, data))``, one copy."""
    n = len(chunk.data)
    inner_head = bytes((_TAG_ID,)) + encode_varint(chunk.id) if chunk.id else b""
    if n:  # proto3 leaves out empty fields, and so do we
        inner_head += bytes((_TAG_DATA,)) + encode_varint(n)
    return b"".join(
        (bytes((_TAG_CHUNK,)), encode_varint(len(inner_head) + n), inner_head, chunk.data)
    )


def parse_chunk(data: bytes) -> RawChunk | None:
    """A zero-copy view of a chunk frame, or None if ``data`` is anything else."""
    buf = memoryview(data)
    try:
        if not buf or buf[0] != _TAG_CHUNK:
            return None
        length, pos = _read_varint(buf, 1)
        if pos + length != len(buf):
            return None
        rid = 0
        if pos < len(buf) and buf[pos] == _TAG_ID:
            rid, pos = _read_varint(buf, pos + 1)
        if pos == len(buf):
            return RawChunk(rid, b"")
        if buf[pos] != _TAG_DATA:
            return None
        n, pos = _read_varint(buf, pos + 1)
        if pos + n != len(buf):
            return None
        return RawChunk(rid, buf[pos:])
    except ValueError:
        return None
