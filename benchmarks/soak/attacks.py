"""Attacks: issue 13's items 1-9 and issue 11's stall, each with its figure.

Each attack runs against a real ``splitnet-cloud`` subprocess (``Server``) while a
legitimate client keeps sending a valid request and checks every answer against the
unsplit model. Each returns an ``AttackFigure``:

- the server's resident memory before the attack, its peak during it (the kernel's
  high-water mark ``VmHWM``, reset before the attack through ``/proc/PID/clear_refs``,
  and the sampled ``VmRSS``) and after it (once it stopped falling);
- how long the event loop was blocked: the slowest legitimate answer during the
  attack, beside the median one before it;
- the status codes the attack got, and whether the legitimate client was answered
  correctly during and after.

``tests/test_attacks.py`` runs them at test size; ``python -m benchmarks.soak --parts
attacks`` runs them at the issue's sizes (``SOAK_SIZES``).
"""

from __future__ import annotations

import socket
import ssl
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from benchmarks.soak.reference import MODEL, SERVICE, Reference
from benchmarks.soak.server import Server
from splitnet.codecs import decode
from splitnet.v1 import inference_pb2 as pb
from splitnet.wire import RawChunk, encode_varint, serialize_chunk

__all__ = [
    "ATTACKS",
    "SOAK_SIZES",
    "TEST_SIZES",
    "AttackFigure",
    "Legit",
    "proc_status",
]

MiB = 1 << 20
HEALTH = "/grpc.health.v1.Health/"
CODES = {c.value[0]: c.name for c in grpc.StatusCode}
BIG = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 256 * MiB)]


def proc_status(pid: int) -> dict[str, int]:
    """``VmRSS``/``VmHWM`` in KiB and ``Threads`` of a process (empty once it exited)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def _reset_peak(pid: int) -> bool:
    """Reset the process's ``VmHWM`` to its current RSS (Linux 4.0+); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class AttackFigure:
    """What one attack did to the server, and to a legitimate client meanwhile."""

    attack: str
    what: str = ""  # the attack in words, at the size it ran
    sent_bytes: int = 0  # bytes the attack sent (or tried to), all connections together
    rss_before_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_after_mib: float = 0.0
    threads_before: int = 0
    threads_peak: int = 0
    legit_before_ms: float = 0.0  # median legitimate latency before the attack
    blocked_ms: float = 0.0  # slowest legitimate answer during the attack
    legit_during: int = 0  # legitimate answers during the attack
    legit_wrong: int = 0  # wrong answers or errors, during and after
    legit_after_ok: bool = False  # a legitimate request answered correctly afterwards
    codes: dict[str, int] = field(default_factory=dict)  # what the attack was answered
    longest_message: int = 0  # the longest status message the attack got, characters
    seconds: float = 0.0  # the attack's own duration
    alive: bool = True
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_growth_mib(self) -> float:
        """Peak resident memory minus the baseline, MiB."""
        return self.rss_peak_mib - self.rss_before_mib

    @property
    def residual_mib(self) -> float:
        """Resident memory after the attack minus the baseline, MiB."""
        return self.rss_after_mib - self.rss_before_mib

    @property
    def sent_mib(self) -> float:
        """What the attack sent, MiB."""
        return self.sent_bytes / MiB

    def line(self) -> str:
        """The figure in one line."""
        codes = ", ".join(f"{k} {v}" for k, v in sorted(self.codes.items()))
        return (
            f"{self.attack}: sent {self.sent_mib:.1f} MiB; RSS {self.rss_before_mib:.0f} -> "
            f"peak {self.rss_peak_mib:.0f} (+{self.peak_growth_mib:.0f}) -> after "
            f"{self.rss_after_mib:.0f} ({self.residual_mib:+.0f}) MiB; threads "
            f"{self.threads_before}->{self.threads_peak}; legit {self.legit_before_ms:.1f} ms "
            f"before, slowest {self.blocked_ms:.0f} ms during ({self.legit_during} answers, "
            f"{self.legit_wrong} wrong), after {'ok' if self.legit_after_ok else 'FAILED'}; "
            f"codes: {codes}; {self.seconds:.1f} s"
        )

    def as_dict(self) -> dict[str, Any]:
        """For the JSON report, with the derived figures."""
        out = asdict(self)
        out.update(peak_growth_mib=self.peak_growth_mib, residual_mib=self.residual_mib)
        return out


class Legit:
    """A legitimate client: one valid unary request at a time, each answer checked."""

    def __init__(self, server: Server, ref: Reference, token: str | None = None) -> None:
        self.ref = ref
        self.channel = grpc.insecure_channel(server.address)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.call = self.channel.unary_unary(
            SERVICE + "Infer",
            request_serializer=pb.InferRequest.SerializeToString,
            response_deserializer=pb.InferResponse.FromString,
        )
        self.request = ref.requests["input"]
        self.latencies: list[float] = []
        self.wrong = 0
        self.errors: list[str] = []

    def once(self, timeout: float = 60.0) -> bool:
        """One request; True if answered correctly. Records its latency."""
        t0 = time.perf_counter()
        try:
            resp = self.call(self.request, timeout=timeout, metadata=self.metadata)
            out = decode(resp.outputs[0])
            ok = self.ref.check(out, 0, "raw")
        except grpc.RpcError as e:
            ok = False
            if len(self.errors) < 5:
                self.errors.append(f"{e.code().name}: {(e.details() or '')[:200]}")
        self.latencies.append((time.perf_counter() - t0) * 1e3)
        if not ok:
            self.wrong += 1
        return ok

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()


def run_attack(
    server: Server,
    ref: Reference,
    name: str,
    body: Callable[[AttackFigure], None],
    *,
    token: str | None = None,
    settle_s: float = 10.0,
    gap_s: float = 0.02,
) -> AttackFigure:
    """Measure ``body(figure)`` (which runs the attack and fills in what it sent and
    was answered) with the legitimate client running before, during and after.
    """
    fig = AttackFigure(attack=name)
    legit = Legit(server, ref, token)
    try:
        for _ in range(5):  # warm, and the baseline latency
            legit.once()
        fig.legit_before_ms = statistics.median(legit.latencies)
        legit.latencies.clear()
        legit.wrong = 0
        pid = server.proc.pid
        st = proc_status(pid)
        fig.rss_before_mib = st.get("VmRSS", 0) / 1024
        fig.threads_before = fig.threads_peak = st.get("Threads", 0)
        hwm_ok = _reset_peak(pid)
        peak = [fig.rss_before_mib]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                s = proc_status(pid)
                if s:
                    peak[0] = max(peak[0], s["VmRSS"] / 1024)
                    fig.threads_peak = max(fig.threads_peak, s["Threads"])
                stop.wait(0.02)

        def legitimate() -> None:
            while not stop.is_set():
                legit.once()
                fig.legit_during += 1
                stop.wait(gap_s)

        helpers = [threading.Thread(target=f, daemon=True) for f in (sample, legitimate)]
        for t in helpers:
            t.start()
        t0 = time.perf_counter()
        try:
            body(fig)
        finally:
            fig.seconds = time.perf_counter() - t0
            stop.set()
            for t in helpers:
                t.join(120)
        st = proc_status(pid)
        if hwm_ok and st:
            peak[0] = max(peak[0], st["VmHWM"] / 1024)
        fig.rss_peak_mib = peak[0]
        fig.blocked_ms = max(legit.latencies, default=0.0)
        during_wrong = legit.wrong
        fig.legit_after_ok = legit.once()
        fig.legit_wrong = during_wrong + (0 if fig.legit_after_ok else 1)
        fig.rss_after_mib = _settled(server, settle_s)
        fig.alive = server.alive
        if legit.errors:
            fig.notes["legit_errors"] = legit.errors
        if not hwm_ok:
            fig.notes["peak"] = "sampled VmRSS (clear_refs refused)"
    finally:
        legit.close()
    return fig


def _settled(server: Server, settle_s: float) -> float:
    """RSS once it has not fallen by 1 MiB for 2 s (the server trims every second), at
    most ``settle_s`` after the attack, MiB.
    """
    samples = [proc_status(server.proc.pid).get("VmRSS", 0) / 1024]
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        time.sleep(0.5)  # letting the server finish and free; nothing is ordered by it
        samples.append(proc_status(server.proc.pid).get("VmRSS", 0) / 1024)
        if len(samples) > 4 and samples[-5] - samples[-1] < 1.0:
            break
    return samples[-1]


def _count(fig: AttackFigure, code: grpc.StatusCode | int | str, message: str = "") -> None:
    if message:
        fig.notes.setdefault("messages", []).append(message[:300])
    if isinstance(code, grpc.StatusCode):
        name = code.name
    else:
        name = code if isinstance(code, str) else CODES.get(code, "?")
    fig.codes[name] = fig.codes.get(name, 0) + 1
    fig.longest_message = max(fig.longest_message, len(message))


def _parallel(n: int, fn: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=fn, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, built by hand (fast at any size)."""
    return encode_varint(number << 3 | 2) + encode_varint(len(payload)) + payload


def _stream_answers(
    channel: grpc.Channel,
    messages: Iterator[bytes],
    fig: AttackFigure,
    metadata: tuple[tuple[str, str], ...] = (),
) -> list[pb.StreamResponse]:
    """Send raw stream messages; count each in-band error and the final status."""
    call = channel.stream_stream(SERVICE + "InferStream")(messages, timeout=120, metadata=metadata)
    answers = []
    try:
        for data in call:
            msg = pb.StreamResponse.FromString(data)
            if msg.WhichOneof("kind") != "response":
                continue
            answers.append(msg)
            if msg.response.HasField("error"):
                _count(
                    fig,
                    "in-band " + CODES.get(msg.response.error.code, "?"),
                    msg.response.error.message,
                )
        _count(fig, "stream OK")
    except grpc.RpcError as e:
        _count(fig, "stream " + e.code().name, e.details() or "")
    return answers


def _good_answers(ref: Reference, answers: list[pb.StreamResponse]) -> int:
    good = 0
    for a in answers:
        if not a.response.HasField("error") and a.response.outputs:
            good += ref.check(decode(a.response.outputs[0]), 0, "raw")
    return good


def _unary(
    channel: grpc.Channel,
    data: bytes,
    fig: AttackFigure,
    method: str = "Infer",
    metadata: tuple[tuple[str, str], ...] = (),
) -> None:
    try:
        channel.unary_unary(SERVICE + method)(data, timeout=120, metadata=metadata)
        _count(fig, "OK")
    except grpc.RpcError as e:
        _count(fig, e.code().name, e.details() or "")


# --------------------------------------------------------------------- the attacks
def health_watch(
    server: Server,
    ref: Reference,
    *,
    streams: int,
    name_bytes: int,
    watches: int,
    token: str | None = None,
) -> AttackFigure:
    """Item 1: health ``Watch`` streams with huge service names, and more Watch streams
    than the cap, without a token.
    """

    def body(fig: AttackFigure) -> None:
        fig.what = (
            f"{streams} Watch streams with {name_bytes / MiB:g} MiB names, then "
            f"{watches} Watch streams on '' held open, no token"
        )
        data = _field(1, b"x" * name_bytes)
        fig.sent_bytes = streams * len(data)

        def huge(_: int) -> None:
            with grpc.insecure_channel(server.address, options=BIG) as ch:
                call = ch.unary_stream(HEALTH + "Watch")(data, timeout=120)
                try:
                    for _ in call:
                        _count(fig, "SERVING")
                        call.cancel()
                except grpc.RpcError as e:
                    _count(fig, e.code().name, e.details() or "")

        _parallel(streams, huge)
        with grpc.insecure_channel(server.address) as ch:
            calls = [ch.unary_stream(HEALTH + "Watch")(b"", timeout=120) for _ in range(watches)]
            served = 0
            for call in calls:
                try:
                    next(call)
                    served += 1
                except grpc.RpcError as e:
                    _count(fig, "held " + e.code().name, e.details() or "")
            fig.notes["watches_served"] = served
            for call in calls:
                call.cancel()

    return run_attack(server, ref, "1 health Watch", body, token=token)


def _header_without_sizes(ref: Reference, rid: int) -> bytes:
    req = pb.InferRequest()
    req.CopyFrom(ref.requests["input"])
    req.id = rid
    req.frontier[0].payload = b""
    return req.SerializeToString()


def repeated_fields(server: Server, ref: Reference, *, entries: int, dims: int) -> AttackFigure:
    """Item 2: a chunked header with ``entries`` payload sizes, then a tensor with
    ``dims`` dimensions (unary and on a stream); a valid request follows on the stream.
    """

    def body(fig: AttackFigure) -> None:
        fig.what = (
            f"stream header with {entries:,} chunked_payload_bytes entries; tensor "
            f"with {dims:,} shape dimensions (unary, then on a stream)"
        )
        sizes = bytes([0x7F]) * entries  # packed varints, field 7 of InferRequest
        header = _header_without_sizes(ref, 1) + _field(7, sizes)
        good = pb.StreamRequest(request=ref.requests["input"]).SerializeToString()
        wide = pb.InferRequest()
        wide.CopyFrom(ref.requests["input"])
        wide.id = 2
        del wide.frontier[0].shape[:]
        tensor = wide.frontier[0].SerializeToString() + _field(1, b"\x01" * dims)
        del wide.frontier[:]
        wide_data = wide.SerializeToString() + _field(5, tensor)
        fig.sent_bytes = len(header) + 2 * len(wide_data)
        with grpc.insecure_channel(server.address, options=BIG) as ch:
            answers = _stream_answers(ch, iter([_field(1, header), good]), fig)
            fig.notes["good_after_huge_sizes"] = _good_answers(ref, answers)
            _unary(ch, wide_data, fig)
            answers = _stream_answers(ch, iter([_field(1, wide_data), good]), fig)
            fig.notes["good_after_huge_shape"] = _good_answers(ref, answers)

    return run_attack(server, ref, "2 repeated fields", body)


def codec_specs(server: Server, ref: Reference, *, requests: int, spec_bytes: int) -> AttackFigure:
    """Item 3: requests whose output codec is ``raw`` followed by ``spec_bytes`` spaces."""

    def body(fig: AttackFigure) -> None:
        fig.what = (
            f"{requests} requests with output codec 'raw' + {spec_bytes / MiB:g} MiB of spaces"
        )
        req = pb.InferRequest()
        req.CopyFrom(ref.requests["input"])
        req.output_codec = "raw" + " " * spec_bytes
        data = req.SerializeToString()
        fig.sent_bytes = requests * len(data)

        def one(_: int) -> None:
            with grpc.insecure_channel(server.address, options=BIG) as ch:
                _unary(ch, data, fig)

        for k in range(0, requests, 4):  # 4 at a time
            _parallel(min(4, requests - k), one)

    return run_attack(server, ref, "3 codec-spec cache", body)


def zstd_level(server: Server, ref: Reference, *, digits: int) -> AttackFigure:
    """Item 4: output codec ``zstd:`` + ``digits`` digits, unary and as the second of
    four requests on one stream.
    """

    def body(fig: AttackFigure) -> None:
        fig.what = f"output codec 'zstd:' + {digits:,} digits, unary and 1 of 4 on a stream"
        bad = pb.InferRequest()
        bad.CopyFrom(ref.requests["input"])
        bad.output_codec = "zstd:" + "9" * digits
        fig.sent_bytes = 2 * bad.ByteSize()
        with grpc.insecure_channel(server.address) as ch:
            _unary(ch, bad.SerializeToString(), fig)
            msgs = []
            for rid in range(1, 5):
                r = pb.InferRequest()
                r.CopyFrom(bad if rid == 2 else ref.requests["input"])
                r.id = rid
                msgs.append(pb.StreamRequest(request=r).SerializeToString())
            answers = _stream_answers(ch, iter(msgs), fig)
            fig.notes["stream_answers"] = len(answers)
            fig.notes["stream_good"] = _good_answers(ref, answers)

    return run_attack(server, ref, "4 long zstd level", body)


def long_strings(
    server: Server, ref: Reference, *, text_bytes: int, wrong_rank_bytes: int
) -> AttackFigure:
    """Item 5: model, cut, codec, fingerprint and shape of ``text_bytes`` each; then a
    wrong-rank request of ``wrong_rank_bytes`` on a stream, followed by a valid one.
    """

    def body(fig: AttackFigure) -> None:
        fig.what = (
            f"model/cut/codec/fingerprint/shape of {text_bytes / MiB:g} MiB each; "
            f"a {wrong_rank_bytes / MiB:g} MiB wrong-rank request on a stream"
        )
        text = "m" * text_bytes
        cases = []
        for name in ("model", "cut", "output_codec", "fingerprint"):
            r = pb.InferRequest()
            r.CopyFrom(ref.requests["input"])
            setattr(r, name, text)
            cases.append(r.SerializeToString())
        r = pb.InferRequest()
        r.CopyFrom(ref.requests["input"])
        r.frontier[0].shape[:] = [1] * (text_bytes // 2)
        cases.append(r.SerializeToString())
        rank = pb.InferRequest()
        rank.CopyFrom(ref.requests["input"])
        rank.frontier[0].shape[:] = [1] * (wrong_rank_bytes // 2)  # 2 bytes per dimension
        good = pb.StreamRequest(request=ref.requests["input"]).SerializeToString()
        fig.sent_bytes = sum(len(c) for c in cases) + rank.ByteSize()
        with grpc.insecure_channel(server.address, options=BIG) as ch:
            for data in cases:
                _unary(ch, data, fig)
            answers = _stream_answers(
                ch, iter([pb.StreamRequest(request=rank).SerializeToString(), good]), fig
            )
            fig.notes["good_after_wrong_rank"] = _good_answers(ref, answers)

    return run_attack(server, ref, "5 long strings", body)


def unauthenticated(
    server: Server, ref: Reference, *, calls: int, body_bytes: int, token: str
) -> AttackFigure:
    """Item 6: ``calls`` concurrent ``Infer`` calls of ``body_bytes`` without a token."""

    def body(fig: AttackFigure) -> None:
        fig.what = f"{calls} concurrent {body_bytes / MiB:g} MiB Infer calls without a token"
        r = pb.InferRequest(model=MODEL, cut="input")
        r.frontier.add().payload = bytes(body_bytes)
        data = r.SerializeToString()
        fig.sent_bytes = calls * len(data)

        def one(_: int) -> None:
            with grpc.insecure_channel(server.address, options=BIG) as ch:
                _unary(ch, data, fig)

        _parallel(calls, one)

    return run_attack(server, ref, "6 unauthenticated bodies", body, token=token)


def tiny_chunks(
    server: Server, ref: Reference, *, payload_bytes: int, chunk: int = 1
) -> AttackFigure:
    """Item 7: valid chunked requests at cut ``fc1`` whose payloads come ``chunk`` bytes
    at a time, ``payload_bytes`` in all, on one stream; every answer is checked.
    """

    def body(fig: AttackFigure) -> None:
        req = ref.requests["fc1"]
        payload = req.frontier[0].payload
        n = max(1, payload_bytes // len(payload))
        fig.what = (
            f"{n} valid requests at cut fc1 ({len(payload)} B each, "
            f"{n * len(payload) / 1e3:.0f} kB) as {chunk}-byte chunks on one stream"
        )
        header = pb.InferRequest()
        header.CopyFrom(req)
        header.frontier[0].payload = b""
        header.chunked_payload_bytes.append(len(payload))

        def messages() -> Iterator[bytes]:
            for rid in range(1, n + 1):
                header.id = rid
                yield pb.StreamRequest(request=header).SerializeToString()
                for start in range(0, len(payload), chunk):
                    yield serialize_chunk(RawChunk(rid, payload[start : start + chunk]))

        fig.sent_bytes = n * len(payload)
        with grpc.insecure_channel(server.address) as ch:
            answers = _stream_answers(ch, messages(), fig)
        good = 0
        want = ref.expected[:1]
        for a in answers:
            if not a.response.HasField("error"):
                out = decode(a.response.outputs[0])
                good += bool((out - want).abs().max() <= 1e-5 * float(want.abs().max()))
        fig.notes["answers_correct"] = good
        fig.notes["requests"] = n

    return run_attack(server, ref, f"7 tiny chunks ({chunk} B)", body)


def metrics_endpoint(
    server: Server, ref: Reference, *, idle: int, token: str | None = None, ca: Path | None = None
) -> AttackFigure:
    """Item 8: ``idle`` idle TCP connections to the metrics port (a TLS one, if the
    endpoint is HTTPS, says nothing: no handshake); scrapes meanwhile, with and without
    credentials.
    """
    import urllib.error
    import urllib.request

    url = server.metrics_url
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)

    def scrape(with_token: bool) -> str:
        headers = {"Authorization": f"Bearer {token}"} if with_token and token else {}
        ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
        request = urllib.request.Request(
            url.replace("127.0.0.1", "localhost") if ca else url, headers=headers
        )
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=30, context=ctx) as resp:
                resp.read()
                code = str(resp.status)
        except urllib.error.HTTPError as e:
            code = str(e.code)
        except (urllib.error.URLError, OSError) as e:
            code = type(e).__name__
        scrape_ms.append((time.perf_counter() - t0) * 1e3)
        return code

    scrape_ms: list[float] = []

    def body(fig: AttackFigure) -> None:
        fig.what = f"{idle} idle TCP connections to {url}, scraping meanwhile"
        socks = []
        try:
            for _ in range(idle):
                socks.append(socket.create_connection((host.strip("[]"), int(port)), timeout=10))
            for _ in range(3):
                _count(fig, "scrape " + scrape(True))
            if token:
                _count(fig, "no-token scrape " + scrape(False))
            fig.notes["scrape_ms_max"] = max(scrape_ms)
            # Idle connections are closed by the server within its timeout (5 s).
            open_after = 0
            time.sleep(6.0)  # longer than the endpoint's read timeout: a duration
            for s in socks:
                s.settimeout(0.01)
                try:
                    open_after += 0 if s.recv(1) == b"" else 1
                except TimeoutError:
                    open_after += 1
                except OSError:
                    pass
            fig.notes["idle_still_open_after_6s"] = open_after
        finally:
            for s in socks:
                s.close()

    return run_attack(server, ref, "8 metrics endpoint", body, token=token)


def token_comment(server: Server, ref: Reference, *, comment: str, token: str) -> AttackFigure:
    """Item 9: the text of an indented comment in the token file, used as a token."""

    def body(fig: AttackFigure) -> None:
        fig.what = f"bearer token {comment.strip()!r} (an indented comment in the token file)"
        data = ref.requests["input"].SerializeToString()
        fig.sent_bytes = len(data) * 3
        with grpc.insecure_channel(server.address) as ch:
            for text in (comment, comment.strip(), comment.strip().lstrip("#").strip()):
                _unary(ch, data, fig, metadata=(("authorization", f"Bearer {text}"),))

    return run_attack(server, ref, "9 token-file comment", body, token=token)


def stalled_chunks(
    server: Server,
    ref: Reference,
    *,
    streams: int,
    announce_bytes: int,
    send_bytes: int,
    cut: str = "block.relu",
    stall_s: float,
) -> AttackFigure:
    """Issue 11: ``streams`` streams announce ``announce_bytes`` at cut ``input``
    (refused: more than the cut can need), then announce what cut ``cut`` can need at
    the largest batch, send ``send_bytes`` of it (at most all but one byte) and stall
    for ``stall_s`` (past the chunk idle limit, if it is shorter).
    """

    def body(fig: AttackFigure) -> None:
        req = ref.requests[cut]
        batch = 8  # the default max batch size
        sizes = [len(t.payload) * batch for t in req.frontier]
        most = sum(sizes)
        send = min(send_bytes, most - 1)
        fig.what = (
            f"{streams} streams announce {announce_bytes / MiB:g} MiB at input, then "
            f"{most} B at {cut} (batch {batch}), send {send} B, stall {stall_s:g} s"
        )
        big = pb.InferRequest()
        big.CopyFrom(ref.requests["input"])
        big.frontier[0].payload = b""
        big.chunked_payload_bytes.append(announce_bytes)
        legal = pb.InferRequest()
        legal.CopyFrom(req)
        legal.id = 2
        for t, size in zip(legal.frontier, sizes, strict=True):
            t.payload = b""
            t.shape[0] = batch
            t.raw_nbytes = size
        legal.chunked_payload_bytes.extend(sizes)
        release = threading.Event()
        fig.sent_bytes = streams * send
        chunk = bytes(min(send, 64 << 10))

        def attacker(_: int) -> None:
            def messages() -> Iterator[bytes]:
                yield pb.StreamRequest(request=big).SerializeToString()
                yield pb.StreamRequest(request=legal).SerializeToString()
                left = send
                while left > 0:
                    yield serialize_chunk(RawChunk(2, chunk[: min(len(chunk), left)]))
                    left -= len(chunk)
                release.wait(stall_s)

            with grpc.insecure_channel(server.address) as ch:
                _stream_answers(ch, messages(), fig)

        threads = [
            threading.Thread(target=attacker, args=(k,), daemon=True) for k in range(streams)
        ]
        for th in threads:
            th.start()
        time.sleep(stall_s)  # the stall: a duration, not an ordering
        release.set()
        for th in threads:
            th.join(120)

    return run_attack(server, ref, "11 stalled chunks", body)


def refused_then_stalled(
    server: Server, ref: Reference, *, streams: int, payload_bytes: int, stall_s: float
) -> AttackFigure:
    """Issue 11, the other way to pin: ``streams`` streams each send one request the
    server refuses (a ``payload_bytes`` payload for a 256-byte tensor, within the message
    limit) and then stall, holding the stream open. Nothing of the refused message may
    stay alive while the stream waits (``stalled_mib`` in ``notes``).
    """

    def body(fig: AttackFigure) -> None:
        fig.what = (
            f"{streams} streams send one refused {payload_bytes / MiB:g} MiB request each, "
            f"then stall {stall_s:g} s"
        )
        bad = pb.InferRequest()
        bad.CopyFrom(ref.requests["input"])
        bad.frontier[0].payload = bytes(payload_bytes)
        data = pb.StreamRequest(request=bad).SerializeToString()
        fig.sent_bytes = streams * len(data)
        release = threading.Event()

        def attacker(_: int) -> None:
            def messages() -> Iterator[bytes]:
                yield data
                release.wait(stall_s + 60)

            with grpc.insecure_channel(server.address, options=BIG) as ch:
                _stream_answers(ch, messages(), fig)

        threads = [
            threading.Thread(target=attacker, args=(k,), daemon=True) for k in range(streams)
        ]
        for th in threads:
            th.start()
        time.sleep(stall_s)  # the stall: a duration, not an ordering
        fig.notes["stalled_mib"] = _settled(server, 5.0)
        release.set()
        for th in threads:
            th.join(120)

    return run_attack(server, ref, "11b refused, then stalled", body)


TEST_SIZES: dict[str, dict[str, Any]] = {
    "health_watch": dict(streams=8, name_bytes=8 * MiB, watches=40),
    "repeated_fields": dict(entries=4_000_000, dims=2_000_000),
    "codec_specs": dict(requests=12, spec_bytes=8 * MiB),
    "zstd_level": dict(digits=4301),
    "long_strings": dict(text_bytes=MiB, wrong_rank_bytes=16 * MiB),
    "unauthenticated": dict(calls=12, body_bytes=48 * MiB),
    "tiny_chunks": dict(payload_bytes=16_000),
    "metrics_endpoint": dict(idle=64),
    "stalled_chunks": dict(streams=24, announce_bytes=255 * MiB, send_bytes=150 * MiB, stall_s=2.0),
    "refused_then_stalled": dict(streams=8, payload_bytes=32 * MiB, stall_s=2.0),
}
SOAK_SIZES: dict[str, dict[str, Any]] = {
    "health_watch": dict(streams=40, name_bytes=32 * MiB, watches=64),
    "repeated_fields": dict(entries=20_000_000, dims=12_000_000),
    "codec_specs": dict(requests=40, spec_bytes=40 * MiB),
    "zstd_level": dict(digits=4301),
    "long_strings": dict(text_bytes=MiB, wrong_rank_bytes=27 * MiB),
    "unauthenticated": dict(calls=24, body_bytes=60 * MiB),
    "tiny_chunks": dict(payload_bytes=500_000),
    "metrics_endpoint": dict(idle=300),
    "stalled_chunks": dict(
        streams=24, announce_bytes=255 * MiB, send_bytes=150 * MiB, stall_s=15.0
    ),
    "refused_then_stalled": dict(streams=24, payload_bytes=60 * MiB, stall_s=10.0),
}
ATTACKS: dict[str, Callable[..., AttackFigure]] = {
    "health_watch": health_watch,
    "repeated_fields": repeated_fields,
    "codec_specs": codec_specs,
    "zstd_level": zstd_level,
    "long_strings": long_strings,
    "unauthenticated": unauthenticated,
    "tiny_chunks": tiny_chunks,
    "metrics_endpoint": metrics_endpoint,
    "token_comment": token_comment,
    "stalled_chunks": stalled_chunks,
    "refused_then_stalled": refused_then_stalled,
}
