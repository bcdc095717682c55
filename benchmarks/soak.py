"""The reliability suite: hostile input, load, faults and auth against a real server.

Every part runs ``splitnet-cloud`` as a subprocess on 127.0.0.1 (so a crash is a dead
process, resident memory is the server's own, and SIGKILL is real) and talks to it
with real gRPC clients:

- **fuzz**: hostile ``InferRequest``s and streams (random bytes, wrong wire types,
  mutated and truncated messages, absurd shapes, lying sizes, unknown dtypes, zstd
  bombs, broken codec steps, NaN payloads, unknown names, oversized messages, chunked
  streams that lie, stop half-way or are abandoned). Each message has the set of
  status codes a correct server may answer; anything else (INTERNAL, UNKNOWN, a code
  outside the set, a dead process) is counted. Every ``probe_every`` messages a valid
  request must come back correct, so "still serving" means "still right".
- **load**: concurrent ``EdgeClient``s on mixed cuts and codecs, unary and streamed;
  every output is compared with the unsplit model (tolerance per codec), none may be
  lost.
- **faults**: the server is SIGKILLed under load and restarted on the same port; each
  request must end correct, or with a clear error, or in a marked local fallback.
- **auth**: no token, a wrong token, a client certificate from another CA and an
  expired one are each refused by a token + mTLS server; the right ones pass.

``python -m benchmarks.soak`` (``make soak``) runs the long version and prints a table;
``tests/test_reliability.py`` runs short versions of the same functions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
import zstandard

from edge.client import EdgeClient
from splitnet.codecs import encode
from splitnet.errors import RemoteError
from splitnet.models import fingerprint, load_model
from splitnet.partition import trace
from splitnet.v1 import inference_pb2 as pb
from splitnet.v1 import tensor_pb2
from splitnet.wire import encode_varint

MODEL = "digits-cnn"
SERVICE = "/splitnet.v1.SplitInference/"
C = grpc.StatusCode
# Tolerance on the model output, relative to the output's largest magnitude. Lossless
# codecs still differ by float rounding when the server batches requests together.
TOLERANCE = {"raw": 1e-5, "zstd": 1e-5, "fp16": 2e-3, "bf16": 1e-2, "int8": 3e-2, "int8c": 3e-2}
MIX = (  # (cut, codec) pairs the load and fault runs rotate through
    ("input", "raw"),
    ("pool1", "int8+zstd:1"),
    ("stem.2", "fp16"),
    ("block.relu", "zstd:1"),
    ("conv.2", "int8c+zstd"),
    ("fc1", "bf16"),
)


def tolerance(codec: str) -> float:
    """The output tolerance for a codec spec such as ``int8+zstd:1``."""
    first = codec.split("+")[0].split(":")[0]
    return TOLERANCE.get(first, 1e-5)


# ------------------------------------------------------------------ the server


class Server:
    """``splitnet-cloud`` serving digits-cnn in a subprocess (metrics on)."""

    def __init__(self, weights: Path, *extra: str, port: int = 0) -> None:
        self.weights = weights
        self.extra = extra
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cloud.cli",
                "--model",
                f"{MODEL}={weights}",
                "--port",
                str(port),
                "--profile-runs",
                "0",
                "--metrics-port",
                "0",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if "listening on" in line or not line:
                break
        if "listening on" not in line:
            self.kill()
            raise RuntimeError(f"splitnet-cloud did not start: {line!r}")
        self.banner = line.strip()
        self.address = line.split("listening on ")[1].split()[0]
        self.port = int(self.address.rsplit(":", 1)[1])
        self.metrics_url = line.split("metrics ")[1].split()[0] if "metrics " in line else ""
        # Drain the log so the server never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:
            pass

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mib(self) -> float:
        """Resident memory of the server process, MiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus samples, ``name{labels}`` -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def restart(self) -> Server:
        """A new process on the same port (the old one must be dead)."""
        return Server(self.weights, *self.extra, port=self.port)


# ----------------------------------------------------------- valid requests


@dataclass
class Reference:
    """The local model, valid frontiers at a few cuts, and the outputs they must give."""

    model: torch.nn.Module
    fingerprint: str
    xs: torch.Tensor  # inputs, one per row
    expected: torch.Tensor  # model(xs), row by row
    requests: dict[str, pb.InferRequest]  # a valid raw request per cut (batch 1, row 0)

    @classmethod
    def build(cls, weights: Path, n: int = 64) -> Reference:
        from splitnet.data import load_digits

        model = load_model(MODEL, weights)
        xs = load_digits()["test"].x[:n]
        with torch.no_grad():
            expected = torch.cat([model(xs[i : i + 1]) for i in range(len(xs))])
        graph = trace(model, (xs[:1],))
        fp = fingerprint(model)
        requests = {}
        for cut in ("input", "pool1", "block.relu", "fc1"):
            head, _ = graph.split(cut)
            with torch.no_grad():
                out = head(xs[:1])
            frontier = list(out) if isinstance(out, (tuple, list)) else [out]
            requests[cut] = pb.InferRequest(
                id=1,
                model=MODEL,
                cut=cut,
                fingerprint=fp,
                frontier=[encode(t, "raw") for t in frontier],
            )
        return cls(model, fp, xs, expected, requests)

    def check(self, output: torch.Tensor, index: int, codec: str) -> bool:
        """Is ``output`` the model's output for input ``index`` within the codec's tolerance?"""
        want = self.expected[index : index + 1]
        if output.shape != want.shape:
            return False
        scale = max(float(want.abs().max()), 1e-6)
        return bool(((output - want).abs().max() <= tolerance(codec) * scale).item())


# ------------------------------------------------------------------- fuzzing

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


def _stream_msg(msg: pb.StreamRequest) -> bytes:
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
        return _stream_msg(pb.StreamRequest(chunk=pb.Chunk(id=id_, data=data)))

    def stream_garbage(self) -> Case:
        msgs = [self._bytes(self.rng.randrange(0, 512)) for _ in range(self.rng.randrange(1, 6))]
        return Case("stream-garbage", "stream", msgs, PROPER)

    def stream_truncated(self) -> Case:
        req, payload = self._chunked()
        cut = self.rng.randrange(len(payload))
        msgs = [_stream_msg(pb.StreamRequest(request=req)), self._chunk(req.id, payload[:cut])]
        return Case("stream-truncated", "stream", msgs, frozenset({C.INVALID_ARGUMENT}))

    def stream_overflow(self) -> Case:
        req, payload = self._chunked()
        msgs = [_stream_msg(pb.StreamRequest(request=req)), self._chunk(req.id, payload + b"xx")]
        return Case("stream-overflow", "stream", msgs, frozenset({C.INVALID_ARGUMENT}))

    def stream_unannounced(self) -> Case:
        msgs = [self._chunk(self.rng.randrange(2**63), self._bytes(64))]
        return Case("stream-unannounced", "stream", msgs, frozenset({C.INVALID_ARGUMENT}))

    def stream_interleaved(self) -> Case:
        req, payload = self._chunked()
        other = self._good("input")
        msgs = [
            _stream_msg(pb.StreamRequest(request=req)),
            self._chunk(req.id, payload[:10]),
            _stream_msg(pb.StreamRequest(request=other)),
        ]
        return Case("stream-interleaved", "stream", msgs, frozenset({C.INVALID_ARGUMENT}))

    def stream_huge_announce(self) -> Case:
        req, _ = self._chunked()
        req.chunked_payload_bytes[0] = self.rng.choice([2**40, 2**63, 2**64 - 1])
        msgs = [_stream_msg(pb.StreamRequest(request=req)), self._chunk(req.id, self._bytes(64))]
        return Case("stream-huge-announce", "stream", msgs, REFUSED)

    def stream_half(self) -> Case:
        req, payload = self._chunked()
        msgs = [_stream_msg(pb.StreamRequest(request=req)), self._chunk(req.id, payload[:100])]
        # The client gives up half-way: it sees CANCELLED; the server must just clean up.
        return Case("stream-half", "stream-cancel", msgs, frozenset({C.CANCELLED}))


def _send(channel: grpc.Channel, case: Case) -> tuple[grpc.StatusCode, list[str]]:
    """Send one case; return the final status and any problems with the answer."""
    problems: list[str] = []
    if case.rpc == "infer":
        call = channel.unary_unary(SERVICE + "Infer")
        try:
            data = call(case.data, timeout=30)
        except grpc.RpcError as e:
            return e.code(), problems
        pb.InferResponse.FromString(data)
        return C.OK, problems
    msgs = [case.data] if isinstance(case.data, bytes) else list(case.data)
    hold = threading.Event()

    def requests() -> Iterator[bytes]:
        yield from msgs
        if case.rpc == "stream-cancel":
            hold.wait(10)

    stream = channel.stream_stream(SERVICE + "InferStream")
    responses = stream(requests(), timeout=30)
    try:
        if case.rpc == "stream-cancel":
            time.sleep(0.002)
            responses.cancel()
        for data in responses:
            msg = pb.StreamResponse.FromString(data)
            if msg.WhichOneof("kind") == "response" and msg.response.HasField("error"):
                code = msg.response.error.code
                if code in (C.INTERNAL.value[0], C.UNKNOWN.value[0]):
                    problems.append(f"in-band {code}: {msg.response.error.message}")
        return C.OK, problems
    except grpc.RpcError as e:
        return e.code(), problems
    finally:
        hold.set()


@dataclass
class FuzzReport:
    """What fuzzing did to the server."""

    messages: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)
    improper: list[str] = field(default_factory=list)  # (kind, code) pairs not allowed
    probes: int = 0
    probes_wrong: int = 0
    crashes: int = 0
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0
    rss_peak_mib: float = 0.0
    seconds: float = 0.0
    server_failures: dict[str, float] = field(default_factory=dict)  # from /metrics

    @property
    def rss_growth_mib(self) -> float:
        return self.rss_after_mib - self.rss_before_mib


def fuzz(
    server: Server,
    ref: Reference,
    messages: int,
    *,
    seed: int = 0,
    probe_every: int = 100,
    max_message_bytes: int,
    warmup: int = 200,
) -> FuzzReport:
    """Send ``messages`` hostile messages (after ``warmup`` more, before RSS is read)."""
    report = FuzzReport()
    codes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    options = [("grpc.max_send_message_length", max_message_bytes * 2)]
    source = iter(Hostile(ref, seed, max_message_bytes))
    with grpc.insecure_channel(server.address, options=options) as channel:
        probe = channel.unary_unary(
            SERVICE + "Infer",
            request_serializer=pb.InferRequest.SerializeToString,
            response_deserializer=pb.InferResponse.FromString,
        )

        def check_probe(i: int) -> None:
            from splitnet.codecs import decode

            report.probes += 1
            cut = list(ref.requests)[i % len(ref.requests)]
            resp = probe(ref.requests[cut], timeout=30)
            out = decode(resp.outputs[0])
            if resp.HasField("error") or not ref.check(out, 0, "raw"):
                report.probes_wrong += 1

        for i in range(warmup):  # the allocator's first growth is not a leak
            _send(channel, next(source))
            if i % probe_every == 0:
                check_probe(i)
        report.rss_before_mib = report.rss_peak_mib = server.rss_mib()
        started = time.perf_counter()
        for i in range(messages):
            case = next(source)
            code, problems = _send(channel, case)
            codes[code.name] += 1
            kinds[case.kind] += 1
            if code not in case.allowed or problems:
                report.improper.append(f"{case.kind}: {code.name} {'; '.join(problems)}")
            if (i + 1) % probe_every == 0:
                if not server.alive:
                    report.crashes += 1
                    break
                check_probe(i)
                report.rss_peak_mib = max(report.rss_peak_mib, server.rss_mib())
        report.seconds = time.perf_counter() - started
        report.messages = sum(codes.values())
        if server.alive:
            check_probe(0)
            report.rss_after_mib = server.rss_mib()
            report.rss_peak_mib = max(report.rss_peak_mib, report.rss_after_mib)
        else:
            report.crashes += 1
    report.codes = dict(codes.most_common())
    report.kinds = dict(sorted(kinds.items()))
    if server.alive and server.metrics_url:
        report.server_failures = {
            k: v
            for k, v in server.metrics().items()
            if k.startswith("splitnet_inference_request_failure_total")
        }
    return report


# ---------------------------------------------------------------------- load


@dataclass
class LoadReport:
    """Concurrent clients on mixed cuts and codecs."""

    clients: int = 0
    requests: int = 0  # asked for
    correct: int = 0
    wrong: int = 0
    errors: int = 0
    lost: int = 0
    fallbacks: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    throughput_rps: float = 0.0
    seconds: float = 0.0
    error_examples: list[str] = field(default_factory=list)
    wrong_examples: list[str] = field(default_factory=list)


def _client(server: Server, weights: Path, cut: str, codec: str, **kwargs: Any) -> EdgeClient:
    return EdgeClient(server.address, MODEL, weights=weights, cut=cut, codec=codec, **kwargs)


def load(
    server: Server,
    ref: Reference,
    weights: Path,
    *,
    clients: int = 32,
    requests: int = 200,
    stream_window: int = 10,
) -> LoadReport:
    """``clients`` threads with an ``EdgeClient`` each send ``requests`` requests each.

    Even clients call ``infer`` per input; odd ones stream ``stream_window`` inputs at a
    time with ``infer_many``. Clients rotate through ``MIX``.
    """
    torch.set_num_threads(1)
    report = LoadReport(clients=clients, requests=clients * requests)
    edge = [
        _client(server, weights, *MIX[k % len(MIX)], deadline_s=60, retries=3)
        for k in range(clients)
    ]  # built before the threads: tracing patches torch globally
    for c in edge:
        c.connect()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    outcomes: list[Counter[str]] = [Counter() for _ in range(clients)]
    examples: list[list[str]] = [[] for _ in range(clients)]
    n_inputs = len(ref.xs)

    def record(k: int, index: int, output: torch.Tensor, codec: str, ms: float) -> None:
        latencies[k].append(ms)
        if ref.check(output, index, codec):
            outcomes[k]["correct"] += 1
        else:
            outcomes[k]["wrong"] += 1
            examples[k].append(f"client {k} input {index} {codec}")

    def worker(k: int) -> None:
        c = edge[k]
        done = 0
        while done < requests:
            try:
                if k % 2 == 0:
                    index = (k * 7 + done) % n_inputs
                    t0 = time.perf_counter()
                    r = c.infer(ref.xs[index : index + 1])
                    record(k, index, r.output, c.codec, (time.perf_counter() - t0) * 1e3)
                    done += 1
                else:
                    m = min(stream_window, requests - done)
                    idx = [(k * 7 + done + j) % n_inputs for j in range(m)]
                    t0 = time.perf_counter()
                    results = list(c.infer_many([ref.xs[i : i + 1] for i in idx]))
                    each = (time.perf_counter() - t0) * 1e3
                    for i, r in zip(idx, results, strict=True):
                        record(k, i, r.output, c.codec, r.timing.total_ms or each)
                    done += m
            except RemoteError as e:
                outcomes[k]["errors"] += 1
                examples[k].append(f"client {k}: {e}")
                done += 1

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    report.seconds = time.perf_counter() - started
    for c in edge:
        c.close()
    total: Counter[str] = Counter()
    for o in outcomes:
        total.update(o)
    report.correct, report.wrong, report.errors = total["correct"], total["wrong"], total["errors"]
    report.lost = report.requests - report.correct - report.wrong - report.errors
    all_ms = sorted(ms for lat in latencies for ms in lat)
    if all_ms:
        report.p50_ms = statistics.median(all_ms)
        report.p99_ms = all_ms[min(len(all_ms) - 1, int(0.99 * len(all_ms)))]
    report.throughput_rps = (report.correct + report.wrong) / report.seconds
    flat = [e for ex in examples for e in ex]
    report.error_examples = [e for e in flat if ":" in e][:5]
    report.wrong_examples = [e for e in flat if ":" not in e][:5]
    return report


# -------------------------------------------------------------------- faults


@dataclass
class FaultReport:
    """SIGKILL under load, then a restart on the same port."""

    clients: int = 0
    requests: int = 0
    correct: int = 0  # answered by the cloud and right
    fallback: int = 0  # computed on the device, marked, and right
    errors: int = 0  # a clear RemoteError
    wrong: int = 0  # must be 0
    lost: int = 0  # must be 0
    after_restart_correct: int = 0  # cloud answers after the restart
    kills: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)


def faults(
    server: Server,
    ref: Reference,
    weights: Path,
    *,
    clients: int = 8,
    requests: int = 60,
    kill_at: float = 0.3,
    down_s: float = 1.0,
) -> tuple[FaultReport, Server]:
    """Clients send ``requests`` each; the server is SIGKILLed once ``kill_at`` of them
    are done, and restarted on the same port ``down_s`` later.

    Half the clients fall back to local inference, half raise. Returns the report and
    the restarted server (the caller stops it).
    """
    torch.set_num_threads(1)
    report = FaultReport(clients=clients, requests=clients * requests)
    edge = [
        _client(
            server,
            weights,
            *MIX[k % len(MIX)],
            deadline_s=3,
            retries=2,
            reconnect_wait_s=0.3,
            fallback="local" if k % 2 == 0 else "error",
        )
        for k in range(clients)
    ]
    for c in edge:
        c.connect()
    outcomes: list[Counter[str]] = [Counter() for _ in range(clients)]
    restarted = threading.Event()
    n_inputs = len(ref.xs)
    progress = [0] * clients

    def worker(k: int) -> None:
        c = edge[k]
        for j in range(requests):
            progress[k] = j
            index = (k * 11 + j) % n_inputs
            after = restarted.is_set()
            try:
                r = c.infer(ref.xs[index : index + 1])
            except RemoteError as e:
                outcomes[k]["errors"] += 1
                outcomes[k][f"error {e.code}"] += 1
                time.sleep(0.05)
                continue
            if r.fallback:
                ok = torch.equal(r.output, ref.expected[index : index + 1])
                outcomes[k]["fallback" if ok else "wrong"] += 1
            elif ref.check(r.output, index, c.codec):
                outcomes[k]["correct"] += 1
                outcomes[k]["after"] += after
            else:
                outcomes[k]["wrong"] += 1
            time.sleep(0.01)  # a steady load, so the kill lands mid-run

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while sum(progress) < kill_at * report.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()
    report.kills = 1
    time.sleep(down_s)
    server = server.restart()
    restarted.set()
    for t in threads:
        t.join(timeout=300)
    for c in edge:
        c.close()
    total: Counter[str] = Counter()
    for o in outcomes:
        total.update(o)
    report.correct, report.fallback = total["correct"], total["fallback"]
    report.errors, report.wrong = total["errors"], total["wrong"]
    report.after_restart_correct = total["after"]
    report.lost = report.requests - report.correct - report.fallback - report.errors - report.wrong
    report.error_kinds = {k[6:]: v for k, v in total.items() if k.startswith("error ")}
    return report, server


# ---------------------------------------------------------------------- auth


@dataclass
class AuthReport:
    """Each way in without credentials, and whether it was refused."""

    refused: dict[str, str] = field(default_factory=dict)  # attempt -> code seen
    accepted_with_credentials: bool = False

    @property
    def all_refused(self) -> bool:
        return bool(self.refused) and all(c != "OK" for c in self.refused.values())


def auth(weights: Path, ref: Reference, workdir: Path) -> AuthReport:
    """A token + mutual-TLS server refuses each bad credential and accepts good ones."""
    from splitnet.certs import make_certs

    good = make_certs(workdir / "good")
    other = make_certs(workdir / "other", prefix="other ")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    expired = make_certs(workdir / "expired", ca=good, days=-1, not_before=past)
    token = "t" * 8 + os.urandom(16).hex()
    token_file = workdir / "tokens"
    token_file.write_text(token + "\n")
    server = Server(
        weights,
        "--token-file",
        str(token_file),
        "--tls-cert",
        str(good.server_cert),
        "--tls-key",
        str(good.server_key),
        "--tls-client-ca",
        str(good.ca),
    )
    report = AuthReport()
    x = ref.xs[:1]
    attempts: dict[str, dict[str, Any]] = {
        "no token": {"tls_cert": good.client_cert, "tls_key": good.client_key},
        "wrong token": {
            "tls_cert": good.client_cert,
            "tls_key": good.client_key,
            "token": "w" * 40,
        },
        "client cert from another CA": {
            "tls_cert": other.client_cert,
            "tls_key": other.client_key,
            "token": token,
        },
        "expired client cert": {
            "tls_cert": expired.client_cert,
            "tls_key": expired.client_key,
            "token": token,
        },
    }
    try:
        for name, kwargs in attempts.items():
            c = _client(
                server, weights, "pool1", "raw", deadline_s=3, retries=0, tls_ca=good.ca, **kwargs
            )
            try:
                c.connect()
                c.infer(x)
                report.refused[name] = "OK"
            except RemoteError as e:
                report.refused[name] = e.code
            finally:
                c.close()
        c = _client(
            server,
            weights,
            "pool1",
            "raw",
            deadline_s=5,
            retries=0,
            token=token,
            tls_ca=good.ca,
            tls_cert=good.client_cert,
            tls_key=good.client_key,
        )
        try:
            c.connect()
            report.accepted_with_credentials = ref.check(c.infer(x).output, 0, "raw")
        finally:
            c.close()
    finally:
        server.kill()
    return report


# ---------------------------------------------------------------------- main


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n")[0]
    )
    p.add_argument("--weights", type=Path, default=Path(".cache/digits-cnn.safetensors"))
    p.add_argument("--fuzz", type=int, default=10_000, help="hostile messages")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=200, help="per load client")
    p.add_argument("--fault-clients", type=int, default=8)
    p.add_argument("--fault-requests", type=int, default=100, help="per fault client")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-message-mb", type=int, default=4, help="server limit during fuzzing")
    p.add_argument("--out", type=Path, default=Path("out/soak.json"))
    args = p.parse_args(argv)
    if not args.weights.exists():
        print(
            f"soak: no weights at {args.weights}: run `make demo` or `splitnet train`",
            file=sys.stderr,
        )
        return 2
    import logging

    logging.getLogger("edge").setLevel(logging.ERROR)  # fallbacks are counted, not logged
    ref = Reference.build(args.weights)
    limit = args.max_message_mb << 20
    results: dict[str, Any] = {}

    print(f"fuzz: {args.fuzz} hostile messages ...", file=sys.stderr, flush=True)
    server = Server(
        args.weights,
        "--max-message-mb",
        str(args.max_message_mb),
        "--max-decoded-mb",
        str(args.max_message_mb),
    )
    try:
        fz = fuzz(server, ref, args.fuzz, seed=args.seed, max_message_bytes=limit)
    finally:
        server.kill()
    results["fuzz"] = asdict(fz)

    print(
        f"load: {args.clients} clients x {args.requests} requests ...", file=sys.stderr, flush=True
    )
    server = Server(args.weights)
    try:
        ld = load(server, ref, args.weights, clients=args.clients, requests=args.requests)
    finally:
        server.kill()
    results["load"] = asdict(ld)

    print("faults: SIGKILL under load, restart ...", file=sys.stderr, flush=True)
    server = Server(args.weights)
    try:
        ft, server = faults(
            server, ref, args.weights, clients=args.fault_clients, requests=args.fault_requests
        )
    finally:
        server.kill()
    results["faults"] = asdict(ft)

    print("auth: token + mTLS refusals ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        au = auth(args.weights, ref, Path(tmp))
    results["auth"] = asdict(au)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    codes = ", ".join(f"{k} {v}" for k, v in fz.codes.items())
    rows = [
        ("fuzz: messages tried", f"{fz.messages} ({len(fz.kinds)} kinds, {fz.seconds:.1f} s)"),
        ("fuzz: status codes", codes),
        ("fuzz: improper answers", f"{len(fz.improper)} (must be 0)"),
        ("fuzz: server crashes", f"{fz.crashes} (must be 0)"),
        ("fuzz: probes correct", f"{fz.probes - fz.probes_wrong}/{fz.probes}"),
        (
            "fuzz: server RSS",
            f"{fz.rss_before_mib:.0f} MiB before, {fz.rss_after_mib:.0f} "
            f"after, peak {fz.rss_peak_mib:.0f} "
            f"(growth {fz.rss_growth_mib:+.1f} MiB)",
        ),
        (
            "load: requests",
            f"{ld.clients} clients x {ld.requests // max(ld.clients, 1)} = "
            f"{ld.requests}, mixed cuts/codecs, unary + streams",
        ),
        ("load: wrong results", f"{ld.wrong} (must be 0)"),
        ("load: lost requests", f"{ld.lost} (must be 0); errors {ld.errors}"),
        ("load: latency p50 / p99", f"{ld.p50_ms:.1f} / {ld.p99_ms:.1f} ms"),
        ("load: throughput", f"{ld.throughput_rps:.0f} req/s over {ld.seconds:.1f} s"),
        (
            "faults: requests",
            f"{ft.requests} by {ft.clients} clients, {ft.kills} SIGKILL + restart",
        ),
        (
            "faults: outcomes",
            f"correct {ft.correct} (after restart {ft.after_restart_correct}), "
            f"marked fallback {ft.fallback}, clear errors {ft.errors} "
            f"{ft.error_kinds or ''}",
        ),
        ("faults: wrong / lost", f"{ft.wrong} / {ft.lost} (must be 0 / 0)"),
        ("auth: refused", ", ".join(f"{k}: {v}" for k, v in au.refused.items())),
        ("auth: right credentials", "accepted" if au.accepted_with_credentials else "REFUSED"),
    ]
    print(_table(rows))
    print(f"(full results: {args.out})")
    bad = (
        fz.improper
        or fz.crashes
        or fz.probes_wrong
        or ld.wrong
        or ld.lost
        or ft.wrong
        or ft.lost
        or not au.all_refused
        or not au.accepted_with_credentials
    )
    if fz.improper:
        print("improper answers, first 10:", *fz.improper[:10], sep="\n  ")
    return 1 if bad else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
