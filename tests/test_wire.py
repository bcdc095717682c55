from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitnet import CodecError, encode
from splitnet.wire import Reassembler, iter_chunks, strip_payloads


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=4), chunk=st.integers(1, 128))
def test_chunks_round_trip(sizes: list[int], chunk: int) -> None:
    payloads = [bytes(range(256)) * 2 for _ in sizes]
    payloads = [p[:n] for p, n in zip(payloads, sizes, strict=True)]
    pieces = list(iter_chunks(payloads, chunk))
    assert all(len(p) == chunk for p in pieces[:-1]) and all(pieces)
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


def test_hostile_sizes_and_overruns() -> None:
    with pytest.raises(CodecError, match="exceed the limit"):
        Reassembler([1 << 40], 1, 1 << 30)
    with pytest.raises(CodecError, match="sizes for"):
        Reassembler([1, 2], 1, 100)
    r = Reassembler([3], 1, 100)
    with pytest.raises(CodecError, match="more bytes"):
        r.add(b"abcd")
    r = Reassembler([3], 1, 100)
    r.add(b"ab")
    with pytest.raises(CodecError, match="before all chunks"):
        r.payloads()
