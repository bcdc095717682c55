"""A route: the cut, codec and head in use, and the request bytes they produce.

A request is written straight to its wire bytes, exactly as protobuf would write
``InferRequest`` (a test parses them back and compares): the fields that never change
for a route (model, cut, fingerprint, output codec) are serialised once, and each
payload is copied once, from the tensor's memory into the message. Building the
message through protobuf would copy every payload three times (into the ``Tensor``,
into the request, out again when serialising).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from splitnet.codecs import encode_parts
from splitnet.v1 import inference_pb2 as pb
from splitnet.wire import encode_varint

__all__ = ["Encoded", "Route", "as_stream_request"]

_TAG_ID = b"\x08"  # InferRequest.id: field 1, varint
_TAG_FRONTIER = b"\x2a"  # InferRequest.frontier: field 5, length-delimited
_TAG_PAYLOAD = b"\x2a"  # Tensor.payload: field 5, length-delimited
_TAG_REQUEST = b"\x0a"  # StreamRequest.request: field 1, length-delimited
_TAG_CHUNKED = b"\x3a"  # InferRequest.chunked_payload_bytes: field 7, packed varints
_SMALL = [bytes((i,)) for i in range(128)]  # one-byte varints


def _varint(n: int) -> bytes:
    return _SMALL[n] if n < 128 else encode_varint(n)


# One encoded frontier: each tensor's header (serialised, payload left out) and payload.
Encoded = list[tuple[bytes, bytes | memoryview]]


@dataclass(frozen=True, slots=True)
class Route:
    """Where requests go now: one assignment, read once per request, so a pipelined
    stream never mixes the cut of one choice with the codec of another.
    """

    cut: str
    codec: str
    head: nn.Module
    prefix: bytes  # model, cut, fingerprint, output_codec, serialised once

    @classmethod
    def build(
        cls,
        *,
        model: str,
        cut: str,
        fingerprint: str,
        output_codec: str,
        codec: str,
        head: nn.Module,
    ) -> Route:
        """The route for ``cut`` and ``codec``."""
        fixed = pb.InferRequest(
            model=model, cut=cut, fingerprint=fingerprint, output_codec=output_codec
        )
        return cls(cut=cut, codec=codec, head=head, prefix=fixed.SerializeToString())

    def encode(self, frontier: Sequence[torch.Tensor]) -> Encoded:
        """Each frontier tensor's serialised header and its payload (a view where it can)."""
        codec = self.codec
        out: Encoded = []
        for t in frontier:
            header, payload = encode_parts(t, codec)
            out.append((header.SerializeToString(), payload))
        return out

    def request(self, rid: int, parts: Encoded) -> bytes:
        """The serialised ``InferRequest`` with id ``rid`` and the payloads inline."""
        pieces: list[bytes | memoryview] = [self.prefix, _TAG_ID, _varint(rid)]
        for header, payload in parts:
            n = len(payload) if isinstance(payload, bytes) else payload.nbytes
            if n:
                size = _varint(n)
                pieces += [_TAG_FRONTIER, _varint(len(header) + 1 + len(size) + n), header]
                pieces += [_TAG_PAYLOAD, size, payload]
            else:
                pieces += [_TAG_FRONTIER, _varint(len(header)), header]
        return b"".join(pieces)

    def stream_request(self, rid: int, parts: Encoded) -> bytes:
        """The serialised ``StreamRequest`` wrapping ``request(rid, parts)``."""
        return as_stream_request(self.request(rid, parts))

    def chunked_header(self, rid: int, parts: Encoded) -> bytes:
        """The serialised ``StreamRequest`` announcing the payloads as chunks (left out)."""
        pieces: list[bytes] = [self.prefix, _TAG_ID, _varint(rid)]
        sizes = b""
        for header, payload in parts:
            pieces += [_TAG_FRONTIER, _varint(len(header)), header]
            n = len(payload) if isinstance(payload, bytes) else payload.nbytes
            sizes += _varint(n)
        pieces += [_TAG_CHUNKED, _varint(len(sizes)), sizes]
        inner = b"".join(pieces)
        return b"".join((_TAG_REQUEST, _varint(len(inner)), inner))


def payload_bytes(parts: Encoded) -> int:
    """Total payload bytes of an encoded frontier."""
    return sum(len(p) if isinstance(p, bytes) else p.nbytes for _, p in parts)


def as_stream_request(request: bytes) -> bytes:
    """A serialised ``InferRequest`` as the ``StreamRequest`` that carries it."""
    return b"".join((_TAG_REQUEST, _varint(len(request)), request))
