"""Fuzzing: hostile messages one after another, with a correctness probe every so often."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from benchmarks.soak.cases import Case, Hostile
from benchmarks.soak.reference import SERVICE, Reference
from benchmarks.soak.server import Server
from splitnet.v1 import inference_pb2 as pb

__all__ = ["FuzzReport", "fuzz", "send_case"]

C = grpc.StatusCode


def send_case(channel: grpc.Channel, case: Case) -> tuple[grpc.StatusCode, list[str]]:
    """Send one case; return the final status and any problems with the answer.

    A ``stream-cancel`` case is cancelled by the client once all its messages have been
    handed to gRPC (the server must just clean up). A stream that ends OK after answering
    a request with an in-band error reports that error's code (the request's refusal).
    """
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
    sent = threading.Event()
    hold = threading.Event()

    def requests() -> Iterator[bytes]:
        yield from msgs
        sent.set()
        if case.rpc == "stream-cancel":
            hold.wait(10)

    stream = channel.stream_stream(SERVICE + "InferStream")
    responses = stream(requests(), timeout=30)
    try:
        if case.rpc == "stream-cancel":
            sent.wait(10)
            responses.cancel()
        final = C.OK
        for data in responses:
            msg = pb.StreamResponse.FromString(data)
            if msg.WhichOneof("kind") == "response" and msg.response.HasField("error"):
                code = msg.response.error.code
                if code in (C.INTERNAL.value[0], C.UNKNOWN.value[0]):
                    problems.append(f"in-band {code}: {msg.response.error.message}")
                if final == C.OK:
                    final = next((c for c in C if c.value[0] == code), C.UNKNOWN)
        return final, problems
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
        """Resident memory after the run minus before it (after warm-up), MiB."""
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
            send_case(channel, next(source))
            if i % probe_every == 0:
                check_probe(i)
        report.rss_before_mib = report.rss_peak_mib = server.rss_mib()
        started = time.perf_counter()
        for i in range(messages):
            case = next(source)
            code, problems = send_case(channel, case)
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
