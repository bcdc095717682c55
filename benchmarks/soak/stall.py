"""Stall: many streams announce a large chunked frontier, send part of it, and stall.

The attack of issue 11, with no token needed: each stream's header announces a
frontier of ``announce_bytes`` for digits-cnn at cut ``input`` (whose frontier is
256 bytes), sends ``send_bytes`` of chunks, then holds the stream open for
``stall_s`` without sending more. Meanwhile a legitimate ``EdgeClient`` keeps sending
requests, each checked against the local model. The server's resident memory is
sampled throughout: before, peak, at the end of the stall, and after the streams
leave (once it has settled).

A server that bounds what unfinished requests hold refuses the announcement at once
(INVALID_ARGUMENT: more than the cut can need) or the stream once its budget is spent
(RESOURCE_EXHAUSTED), or fails a stalled transfer after its idle limit; the report
records how each attacking stream ended. Where the server publishes its budget
(``ServerLimits.max_pending_bytes`` in GetModelInfo), the report carries it so a
caller can compare the peak with it.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from benchmarks.soak.load import edge_client
from benchmarks.soak.reference import MODEL, SERVICE, Reference
from benchmarks.soak.server import Server
from splitnet.errors import RemoteError
from splitnet.v1 import inference_pb2 as pb
from splitnet.v1 import tensor_pb2
from splitnet.wire import RawChunk, serialize_chunk

__all__ = ["AFTER_MARGIN_MIB", "PEAK_SLACK_MIB", "StallReport", "stall"]

MiB = 1 << 20
# With a published budget: the peak may exceed the baseline by the budget plus this
# (the streams' own gRPC buffers, the legitimate client's requests, allocator slack),
# and after the attack RSS must be back within AFTER_MARGIN_MIB of the baseline.
PEAK_SLACK_MIB = 128
AFTER_MARGIN_MIB = 64
CODES = {c.value[0]: c.name for c in grpc.StatusCode}


@dataclass
class StallReport:
    """What the stall attack did to the server, and to a legitimate client meanwhile."""

    streams: int = 0
    announce_bytes: int = 0  # announced per stream
    send_bytes: int = 0  # chunk bytes each stream tried to send before stalling
    sent_bytes: int = 0  # chunk bytes the server took, all streams together
    stall_s: float = 0.0
    budget_bytes: int | None = None  # the server's published pending budget, if any
    attacker_ends: dict[str, int] = field(default_factory=dict)  # how the streams ended
    rss_before_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_stalled_mib: float = 0.0  # at the end of the stall, streams still open
    rss_after_mib: float = 0.0  # after the streams left and memory settled
    legit_requests: int = 0  # answered while the attack ran
    legit_during_stall: int = 0  # of them, answered while every attacking stream stalled
    legit_correct: int = 0
    legit_errors: int = 0
    legit_p50_ms: float = 0.0
    legit_max_ms: float = 0.0
    alive: bool = True
    error_examples: list[str] = field(default_factory=list)

    @property
    def peak_growth_mib(self) -> float:
        """Peak resident memory minus the baseline, MiB."""
        return self.rss_peak_mib - self.rss_before_mib

    @property
    def residual_mib(self) -> float:
        """Resident memory after the attack minus the baseline, MiB."""
        return self.rss_after_mib - self.rss_before_mib

    def problems(self, legit_during: int = 1) -> list[str]:
        """What went wrong: a dead server, a legitimate request refused or wrong, too few
        answers during the stall, and (with a published budget) memory over its bounds.
        """
        out = []
        if not self.alive:
            out.append("the server died")
        if self.legit_errors or self.legit_correct != self.legit_requests:
            out.append(
                f"legitimate requests: {self.legit_correct} of {self.legit_requests} correct"
            )
        if self.legit_during_stall < legit_during:
            out.append(f"only {self.legit_during_stall} legitimate answers during the stall")
        if self.budget_bytes is not None:
            bound = self.budget_bytes / MiB + PEAK_SLACK_MIB
            if self.peak_growth_mib > bound:
                out.append(f"peak +{self.peak_growth_mib:.0f} MiB over the bound {bound:.0f}")
            if self.residual_mib > AFTER_MARGIN_MIB:
                out.append(f"after the attack still +{self.residual_mib:.0f} MiB")
        return out


def _header(ref: Reference, ident: int, announce: int) -> bytes:
    good = ref.requests["input"]
    t = tensor_pb2.Tensor()
    t.CopyFrom(good.frontier[0])
    t.payload = b""
    req = pb.InferRequest(
        id=ident,
        model=MODEL,
        cut="input",
        fingerprint=ref.fingerprint,
        frontier=[t],
        chunked_payload_bytes=[announce],
    )
    return pb.StreamRequest(request=req).SerializeToString()


def _budget(server: Server) -> int | None:
    with grpc.insecure_channel(server.address) as channel:
        info = channel.unary_unary(
            SERVICE + "GetModelInfo",
            request_serializer=pb.ModelInfoRequest.SerializeToString,
            response_deserializer=pb.ModelInfoResponse.FromString,
        )(pb.ModelInfoRequest(), timeout=30)
    limits = info.limits
    if "max_pending_bytes" not in type(limits).DESCRIPTOR.fields_by_name:
        return None
    return int(getattr(limits, "max_pending_bytes")) or None  # noqa: B009 - newer protos only


def stall(
    server: Server,
    ref: Reference,
    weights: Path,
    *,
    streams: int = 16,
    announce_bytes: int = 255 * MiB,
    send_bytes: int = 64 * MiB,
    stall_s: float = 10.0,
    chunk_bytes: int = MiB,
    settle_s: float = 5.0,
    legit_during: int = 5,
    max_stall_s: float = 120.0,
) -> StallReport:
    """Run the attack against ``server`` (see the module docstring); returns the report.

    The stall lasts ``stall_s``, and longer if need be (up to ``max_stall_s``) until the
    legitimate client has had ``legit_during`` answers in it: whether it is served
    while the streams stall is then decided by answers, not by how fast the machine is.
    """
    torch.set_num_threads(1)
    report = StallReport(
        streams=streams, announce_bytes=announce_bytes, send_bytes=send_bytes, stall_s=stall_s
    )
    report.budget_bytes = _budget(server)
    chunk = bytes(chunk_bytes)
    release = threading.Event()  # set when the stall is over: the attackers leave
    ready = [threading.Event() for _ in range(streams)]  # sent its bytes, or was stopped
    done = threading.Event()  # legitimate traffic stops
    sent = [0] * streams
    ends: Counter[str] = Counter()
    lock = threading.Lock()

    client = edge_client(server, weights, "pool1", "raw", deadline_s=30, retries=2)
    client.connect()
    rss = [server.rss_mib()]
    report.rss_before_mib = rss[0]

    def attacker(k: int) -> None:
        channel = grpc.insecure_channel(server.address)

        def messages() -> Iterator[bytes]:
            yield _header(ref, k + 1, announce_bytes)
            while sent[k] < send_bytes and not ready[k].is_set():
                data = chunk[: min(chunk_bytes, send_bytes - sent[k])]
                yield serialize_chunk(RawChunk(k + 1, data))
                sent[k] += len(data)
            ready[k].set()
            release.wait(stall_s + 600)  # stall: the stream stays open, nothing more comes

        call = channel.stream_stream(SERVICE + "InferStream")(messages(), timeout=stall_s + 600)
        end = "OK"
        try:
            for data in call:
                msg = pb.StreamResponse.FromString(data)
                if msg.WhichOneof("kind") == "response" and msg.response.HasField("error"):
                    end = f"in-band {CODES.get(msg.response.error.code, 'code?')}"
        except grpc.RpcError as e:
            end = e.code().name
        finally:
            ready[k].set()  # also when the server ended the call before all was sent
            with lock:
                ends[
                    ("after the stall: " if release.is_set() else "during the attack: ") + end
                ] += 1
            channel.close()

    attackers = [threading.Thread(target=attacker, args=(k,), daemon=True) for k in range(streams)]
    latencies: list[float] = []
    answered = [0]  # legitimate answers so far, right or wrong or refused
    enough = threading.Event()  # legit_during answers arrived within the stall
    stall_from = [-1]  # answers when the stall began; -1 before

    def legitimate() -> None:
        i = 0
        while not done.is_set():
            index = i % len(ref.xs)
            t0 = time.perf_counter()
            try:
                out = client.infer(ref.xs[index : index + 1]).output
                latencies.append((time.perf_counter() - t0) * 1e3)
                if ref.check(out, index, "raw"):
                    report.legit_correct += 1
                else:
                    report.error_examples.append(f"wrong output for input {index}")
            except RemoteError as e:
                report.legit_errors += 1
                if len(report.error_examples) < 5:
                    report.error_examples.append(str(e)[:200])
            i += 1
            answered[0] += 1
            if stall_from[0] >= 0 and answered[0] - stall_from[0] >= legit_during:
                enough.set()

    def sample() -> None:
        while not done.is_set():
            if server.alive:
                rss.append(server.rss_mib())
            done.wait(0.1)  # a sampling period, not an ordering

    helpers = [threading.Thread(target=f, daemon=True) for f in (legitimate, sample)]
    for t in helpers + attackers:
        t.start()
    for event in ready:  # every attacker has sent what it could, or was stopped
        event.wait(600)
    stall_from[0] = answered[0]
    stall_end = time.monotonic() + max_stall_s
    done.wait(stall_s)  # the stall itself: a duration
    enough.wait(max(0.0, stall_end - time.monotonic()))
    report.legit_during_stall = answered[0] - stall_from[0]
    report.rss_stalled_mib = server.rss_mib()
    release.set()
    calls_end = time.monotonic() + 60
    for t in attackers:
        t.join(max(0.0, calls_end - time.monotonic()))
    done.set()
    for t in helpers:
        t.join(60)
    client.close()
    report.sent_bytes = sum(sent)
    report.attacker_ends = dict(ends)
    report.alive = server.alive
    report.rss_peak_mib = max(r for r in rss if r == r)  # NaN once the server died
    # Settled: until RSS stops falling (by less than 1 MiB in a second), at most settle_s.
    last, deadline = server.rss_mib(), time.monotonic() + settle_s
    while time.monotonic() < deadline:
        time.sleep(1.0)  # letting the allocator return memory; nothing is ordered by it
        now = server.rss_mib()
        if last - now < 1.0:
            break
        last = now
    report.rss_after_mib = server.rss_mib()
    report.legit_requests = len(latencies) + report.legit_errors
    if latencies:
        report.legit_p50_ms = statistics.median(latencies)
        report.legit_max_ms = max(latencies)
    return report
