from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitnet import encode
from splitnet.errors import ProtocolError
from splitnet.v1 import inference_pb2 as pb
from splitnet.wire import (
    RawChunk,
    Reassembler,
    iter_chunks,
    parse_chunk,
    serialize_chunk,
    serialize_stream_message,
    stream_parser,
    strip_payloads,
)


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=4), chunk=st.integers(1, 128))
def test_chunks_round_trip(sizes: list[int], chunk: int) -> None:
    payloads = [bytes(range(256)) * 2 for _ in sizes]
    payloads = [p[:n] for p, n in zip(payloads, sizes, strict=True)]
    pieces = [bytes(p) for p in iter_chunks(payloads, chunk)]
    assert all(0 < len(p) <= chunk for p in pieces)
    assert b"".join(pieces) == b"".join(payloads)
    r = Reassembler(sizes, len(sizes), 10_000)
    for p in pieces:
        assert not r.done
        r.add(p)
    assert r.done
    assert [bytes(b) for b in r.payloads()] == payloads


def test_strip_only_when_large() -> None:
    small = [encode(torch.zeros(4))]
    assert strip_payloads(small, 1024) is None and small[0].payload
    big = [encode(torch.zeros(1000)), encode(torch.ones(10))]
    payloads = strip_payloads(big, 1024)
    assert payloads is not None and [len(p) for p in payloads] == [4000, 40]
    assert all(not t.payload for t in big)


@settings(max_examples=200, deadline=None)
@given(rid=st.integers(0, 2**64 - 1), data=st.binary(max_size=300))
def test_chunk_frames_match_protobuf(rid: int, data: bytes) -> None:
    frame = serialize_chunk(RawChunk(rid, memoryview(data)))
    assert frame == pb.StreamRequest(chunk=pb.Chunk(id=rid, data=data)).SerializeToString()
    parsed = parse_chunk(frame)
    assert parsed is not None and parsed.id == rid and bytes(parsed.data) == data
    response = stream_parser(pb.StreamResponse)(frame)
    assert isinstance(response, RawChunk)


def test_other_messages_go_through_protobuf() -> None:
    request = pb.StreamRequest(request=pb.InferRequest(id=3, model="m"))
    parsed = stream_parser(pb.StreamRequest)(request.SerializeToString())
    assert parsed == request
    assert serialize_stream_message(request) == request.SerializeToString()
    for junk in (b"", b"\x12", b"\x12\x05\x08\x01", b"\x12\x02\x08\x01\x00"):
        assert parse_chunk(junk) is None


def test_hostile_sizes_and_overruns() -> None:
    with pytest.raises(ProtocolError, match="exceed the limit"):
        Reassembler([1 << 40], 1, 1 << 30)
    with pytest.raises(ProtocolError, match="sizes for"):
        Reassembler([1, 2], 1, 100)
    r = Reassembler([3], 1, 100)
    with pytest.raises(ProtocolError, match="more bytes"):
        r.add(b"abcd")
    r = Reassembler([3], 1, 100)
    r.add(b"ab")
    with pytest.raises(ProtocolError, match="before all chunks"):
        r.payloads()
