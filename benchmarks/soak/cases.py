"""Hostile messages: a seeded source of broken requests and streams built from valid ones.

Each ``Case`` carries the set of status codes a correct server may answer; anything else
(INTERNAL, UNKNOWN, a code outside the set, a dead process) is a finding.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import zstandard

from benchmarks.soak.reference import Reference
from splitnet.v1 import inference_pb2 as pb
from splitnet.v1 import tensor_pb2
from splitnet.wire import encode_varint

__all__ = ["PROPER", "REFUSED", "Case", "Hostile", "stream_message"]

C = grpc.StatusCode

PROPER = frozenset(
    {
        C.OK,
        C.INVALID_ARGUMENT,
        C.NOT_FOUND,
        C.FAILED_PRECONDITION,
        C.RESOURCE_EXHAUSTED,
        C.OUT_OF_RANGE,
    }
)
REFUSED = PROPER - {C.OK}


@dataclass
class Case:
    """One hostile message (or stream) and the codes a correct server may answer."""

    kind: str
    rpc: str  # "infer", "stream" or "stream-cancel"
    data: bytes | list[bytes]
    allowed: frozenset[grpc.StatusCode]


def stream_message(msg: pb.StreamRequest) -> bytes:
    """The wire bytes of one stream message."""
    return msg.SerializeToString()


class Hostile:
    """A seeded source of hostile messages built around valid ones."""

    def __init__(self, ref: Reference, seed: int, max_message_bytes: int) -> None:
        self.ref = ref
        self.rng = random.Random(seed)
        self.max_message_bytes = max_message_bytes
        good = ref.requests["input"]
        raw = bytes(good.frontier[0].payload)
        zeros = zstandard.ZstdCompressor(level=3)
        # A bomb: ~16 MiB of zeros in a few hundred bytes, declared as the small input.
        self.bomb = zeros.compress(bytes(16 << 20))
        # A frame that does not declare its content size.
        self.no_size = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
        self.kinds: list[tuple[str, Callable[[], Case]]] = [
            ("random-bytes", self.random_bytes),
            ("bit-flips", self.bit_flips),
            ("truncated", self.truncated),
            ("wrong-wire-types", self.wrong_wire_types),
            ("absurd-shape", self.absurd_shape),
            ("lying-size", self.lying_size),
            ("unknown-dtype", self.unknown_dtype),
            ("zstd-bomb", self.zstd_bomb),
            ("bad-steps", self.bad_steps),
            ("nan-payload", self.nan_payload),
            ("unknown-names", self.unknown_names),
            ("big-batch", self.big_batch),
            ("chunked-unary", self.chunked_unary),
            ("stream-garbage", self.stream_garbage),
            ("stream-truncated", self.stream_truncated),
            ("stream-overflow", self.stream_overflow),
            ("stream-unannounced", self.stream_unannounced),
            ("stream-interleaved", self.stream_interleaved),
            ("stream-huge-announce", self.stream_huge_announce),
            ("stream-half", self.stream_half),
        ]

    def __iter__(self) -> Iterator[Case]:
        n = 0
        while True:
            n += 1
            if n % 997 == 0:  # rare: each costs megabytes on the wire
                yield self.oversized()
            _, make = self.rng.choice(self.kinds)
            yield make()

    # -- helpers
    def _good(self, cut: str | None = None) -> pb.InferRequest:
        req = pb.InferRequest()
        req.CopyFrom(self.ref.requests[cut or self.rng.choice(list(self.ref.requests))])
        req.id = self.rng.randrange(1, 2**63)
        return req

    def _bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def _case(self, kind: str, req: pb.InferRequest, allowed: frozenset[grpc.StatusCode]) -> Case:
        return Case(kind, "infer", req.SerializeToString(), allowed)

    # -- unary
    def random_bytes(self) -> Case:
        return Case("random-bytes", "infer", self._bytes(self.rng.randrange(0, 4096)), PROPER)

    def bit_flips(self) -> Case:
        data = bytearray(self._good().SerializeToString())
        for _ in range(self.rng.randrange(1, 8)):
            data[self.rng.randrange(len(data))] = self.rng.randrange(256)
        return Case("bit-flips", "infer", bytes(data), PROPER)

    def truncated(self) -> Case:
        data = self._good().SerializeToString()
        return Case("truncated", "infer", data[: self.rng.randrange(len(data))], PROPER)

    def wrong_wire_types(self) -> Case:
        out = bytearray()
        for _ in range(self.rng.randrange(1, 12)):
            field_no = self.rng.choice([1, 2, 3, 4, 5, 6, 7, self.rng.randrange(1, 1 << 20)])
            wire = self.rng.choice([0, 1, 2, 5])
            out += encode_varint(field_no << 3 | wire)
            if wire == 0:
                out += encode_varint(self.rng.randrange(0, 2**64))
            elif wire == 1:
                out += self._bytes(8)
            elif wire == 5:
                out += self._bytes(4)
            else:
                body = self._bytes(self.rng.randrange(0, 64))
                out += encode_varint(len(body)) + body
        return Case("wrong-wire-types", "infer", bytes(out), PROPER)

    def absurd_shape(self) -> Case:
        req = self._good()
        t = req.frontier[0]
        choice = self.rng.randrange(5)
        del t.shape[:]
        if choice == 0:
            t.shape.extend([2**62, 1, 8, 8])
        elif choice == 1:
            t.shape.extend([1] * self.rng.randrange(9, 2000))
        elif choice == 2:
            t.shape.extend([-1, 1, 8, 8])
        elif choice == 3:
            t.shape.extend([0, 1, 8, 8])
        else:
            t.shape.extend([1, 2**31, 2**31, 2**31])
        return self._case("absurd-shape", req, REFUSED)

    def lying_size(self) -> Case:
        req = self._good()
        t = req.frontier[0]
        if self.rng.random() < 0.5:
            t.raw_nbytes = self.rng.choice([0, 1, t.raw_nbytes + 4, 2**63, 2**64 - 1])
        else:
            t.payload = t.payload[: self.rng.randrange(len(t.payload))]
        return self._case("lying-size", req, REFUSED)

    def unknown_dtype(self) -> Case:
        req = self._good()
        req.frontier[0].dtype = self.rng.choice([0, 11, 99, 2**31 - 1, -5])  # type: ignore[assignment]
        return self._case("unknown-dtype", req, REFUSED)

    def zstd_bomb(self) -> Case:
        req = self._good("input")
        t = req.frontier[0]
        t.steps.add().zstd.level = 3
        choice = self.rng.randrange(3)
        if choice == 0:  # declares 16 MiB where 256 bytes are expected
            t.payload = self.bomb
        elif choice == 1:  # no content size in the frame header
            t.payload = self.no_size
        else:  # claims the bomb's true size: far over this cut's shape and the limits
            t.payload = self.bomb
            t.raw_nbytes = 16 << 20
        return self._case("zstd-bomb", req, REFUSED)

    def bad_steps(self) -> Case:
        req = self._good()
        t = req.frontier[0]
        choice = self.rng.randrange(8)
        if choice == 0:
            t.steps.add().cast.to = tensor_pb2.DTYPE_INT8
        elif choice == 1:
            s = t.steps.add().cast
            s.to, s.exponent = tensor_pb2.DTYPE_FLOAT16, self.rng.choice([161, -(10**6), 2**31 - 1])
        elif choice == 2:
            q = t.steps.add().quantize
            q.scale.append(self.rng.choice([math.nan, math.inf, 0.0, -1.0]))
            q.zero_point.append(0)
        elif choice == 3:
            q = t.steps.add().quantize
            q.scale.append(0.1)
            q.zero_point.append(self.rng.choice([1000, -129, 2**31 - 1]))
        elif choice == 4:
            q = t.steps.add().quantize
            q.per_channel, q.axis = True, self.rng.choice([7, 99, 2**32 - 1])
            q.scale.extend([0.1] * 3)
            q.zero_point.extend([0] * 3)
        elif choice == 5:
            t.steps.add().zstd.level = 1
            t.steps.add().zstd.level = 1
        elif choice == 6:
            t.steps.add().zstd.level = 1
            t.steps.add().cast.to = tensor_pb2.DTYPE_FLOAT16
        else:
            t.steps.add()  # a step with nothing set
        return self._case("bad-steps", req, REFUSED)

    def nan_payload(self) -> Case:
        req = self._good("input")
        t = req.frontier[0]
        values = np.frombuffer(t.payload, dtype=np.float32).copy()
        idx = self.rng.sample(range(values.size), self.rng.randrange(1, values.size))
        values[idx] = self.rng.choice([np.nan, np.inf, -np.inf])
        t.payload = values.tobytes()
        # NaN is a float like any other: the tail computes (NaN out), nothing breaks.
        return self._case("nan-payload", req, frozenset({C.OK}))

    def unknown_names(self) -> Case:
        req = self._good()
        choice = self.rng.randrange(4)
        name = "".join(chr(self.rng.randrange(1, 0x2FFF)) for _ in range(self.rng.randrange(200)))
        if choice == 0:
            req.model = name
            return self._case("unknown-names", req, frozenset({C.NOT_FOUND}))
        if choice == 1:
            req.cut = name + "x"
            return self._case("unknown-names", req, frozenset({C.NOT_FOUND}))
        if choice == 2:
            req.fingerprint = "0" * 64
            return self._case("unknown-names", req, frozenset({C.FAILED_PRECONDITION}))
        req.output_codec = name + "!"
        return self._case("unknown-names", req, frozenset({C.INVALID_ARGUMENT}))

    def big_batch(self) -> Case:
        req = self._good("input")
        t = req.frontier[0]
        n = self.rng.choice([9, 64, 1000])
        t.shape[0] = n
        t.raw_nbytes = t.raw_nbytes * n
        t.payload = bytes(t.payload) * n
        return self._case("big-batch", req, REFUSED)

    def chunked_unary(self) -> Case:
        req = self._good()
        req.chunked_payload_bytes.append(len(req.frontier[0].payload))
        return self._case("chunked-unary", req, frozenset({C.INVALID_ARGUMENT}))

    def oversized(self) -> Case:
        req = self._good("input")
        req.frontier[0].payload = self._bytes(self.max_message_bytes + 1024)
        return self._case("oversized", req, frozenset({C.RESOURCE_EXHAUSTED}))

    # -- streams
    def _chunked(self) -> tuple[pb.InferRequest, bytes]:
        req = self._good("pool1")
        payload = bytes(req.frontier[0].payload)
        req.frontier[0].payload = b""
        req.chunked_payload_bytes.append(len(payload))
        return req, payload

    def _chunk(self, id_: int, data: bytes) -> bytes:
        return stream_message(pb.StreamRequest(chunk=pb.Chunk(id=id_, data=data)))

    def stream_garbage(self) -> Case:
        msgs = [self._bytes(self.rng.randrange(0, 512)) for _ in range(self.rng.randrange(1, 6))]
        return Case("stream-garbage", "stream", msgs, PROPER)

    def stream_truncated(self) -> Case:
        req, payload = self._chunked()
        cut = self.rng.randrange(len(payload))
        msgs = [stream_message(pb.StreamRequest(request=req)), self._chunk(req.id, payload[:cut])]
        return Case("stream-truncated", "stream", msgs, frozenset({C.INVALID_ARGUMENT}))

    def stream_overflow(self) -> Case:
        req, payload = self._chunked()
        msgs = [stream_message(pb.StreamRequest(request=req)), self._chunk(req.id, payload + b"xx")]
        return Case("stream-overflow", "stream", msgs, frozenset({C.INVALID_ARGUMENT}))

    def stream_unannounced(self) -> Case:
        msgs = [self._chunk(self.rng.randrange(2**63), self._bytes(64))]
        return Case("stream-unannounced", "stream", msgs, frozenset({C.INVALID_ARGUMENT}))

    def stream_interleaved(self) -> Case:
        req, payload = self._chunked()
        other = self._good("input")
        msgs = [
            stream_message(pb.StreamRequest(request=req)),
            self._chunk(req.id, payload[:10]),
            stream_message(pb.StreamRequest(request=other)),
        ]
        return Case("stream-interleaved", "stream", msgs, frozenset({C.INVALID_ARGUMENT}))

    def stream_huge_announce(self) -> Case:
        req, _ = self._chunked()
        req.chunked_payload_bytes[0] = self.rng.choice([2**40, 2**63, 2**64 - 1])
        msgs = [stream_message(pb.StreamRequest(request=req)), self._chunk(req.id, self._bytes(64))]
        return Case("stream-huge-announce", "stream", msgs, REFUSED)

    def stream_half(self) -> Case:
        req, payload = self._chunked()
        msgs = [stream_message(pb.StreamRequest(request=req)), self._chunk(req.id, payload[:100])]
        # The client gives up half-way: it sees CANCELLED; the server must just clean up.
        return Case("stream-half", "stream-cancel", msgs, frozenset({C.CANCELLED}))
