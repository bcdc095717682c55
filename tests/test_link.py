"""The link emulator: profiles, specs, and a relay whose timings match the link model."""

from __future__ import annotations

import json
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from benchmarks.link import Link, LinkProfile, LinkRelay, Wire, load_profiles, parse_link

EPS = 1e-4  # seconds: float rounding between the relay's clock and ours, nothing more
HEADER = struct.Struct("!I")  # the sink's framing: a 4-byte length, then that many bytes


class Sink:
    """A tiny upstream TCP server: for each message (length + payload) it replies 1 byte."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.threads: list[threading.Thread] = []
        self.accepting = threading.Thread(target=self._accept, daemon=True)
        self.accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self.threads.append(thread)

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                header = _recv_exactly(conn, HEADER.size)
                if header is None:
                    return
                if _recv_exactly(conn, HEADER.unpack(header)[0]) is None:
                    return
                conn.sendall(b"!")

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.accepting.join(5)
        for thread in self.threads:
            thread.join(5)


def _recv_exactly(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(60)  # a hang fails the test instead of stalling the suite
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _round_trip(sock: socket.socket, n: int) -> float:
    """Send an n-byte message, wait for the 1-byte reply; seconds from first byte to reply."""
    payload = HEADER.pack(n) + bytes(n)
    start = time.perf_counter()
    sock.sendall(payload)
    assert sock.recv(1) == b"!"
    return time.perf_counter() - start


def _expected(n: int, up: Link, down: Link) -> float:
    """The model: serialise the message up, propagate, serialise 1 byte down, propagate."""
    return up.bytes_time_s(HEADER.size + n) + up.delay_s + down.bytes_time_s(1) + down.delay_s


@pytest.fixture()
def sink() -> Iterator[Sink]:
    server = Sink()
    yield server
    server.close()


@pytest.fixture()
def no_leaks() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.name == "LinkRelay"]
    assert not leaked, leaked


# --- Link, profiles and specs ---------------------------------------------------------


def test_link_validation_and_text() -> None:
    link = Link(10, 40)
    assert str(link) == "10mbit/40ms"
    assert link.bytes_time_s(1_250_000) == pytest.approx(1.0)
    assert str(Link(0.13, 60)) == "0.13mbit/60ms"
    for mbit, delay in [(0, 10), (-1, 10), (float("inf"), 10), (10, -1), (10, float("nan"))]:
        with pytest.raises(ValueError):
            Link(mbit, delay)
    with pytest.raises(ValueError, match="rtt_ms"):
        LinkProfile("x", Link(1, 10), Link(1, 10), rtt_ms=30, source="")


def test_profiles_have_the_dads_uplinks_and_sources() -> None:
    profiles = load_profiles()
    dads = {"CAT1": 0.13, "3G": 1.1, "4G": 5.85, "WiFi": 18.88}
    for name, up in dads.items():
        assert profiles[name].up.mbit == up
        assert "DADS" in profiles[name].source
    assert {"5G", "fibre"} <= set(profiles)
    for profile in profiles.values():
        assert profile.down.mbit >= profile.up.mbit
        assert profile.up.delay_ms + profile.down.delay_ms == pytest.approx(profile.rtt_ms)
        assert profile.source
        assert parse_link(profile.spec).up == profile.up  # the spec round-trips


def test_parse_link_names_and_specs() -> None:
    assert parse_link("4g") == load_profiles()["4G"]
    assert parse_link(" wifi ").name == "WiFi"

    sym = parse_link("10mbit/40ms")
    assert (sym.up, sym.down, sym.rtt_ms) == (Link(10, 20), Link(10, 20), 40)
    assert sym.name == "10mbit/40ms"

    asym = parse_link("5.85mbit:20mbit/60ms")
    assert (asym.up, asym.down) == (Link(5.85, 30), Link(20, 30))

    units = parse_link("512kbit:1Gbit/100ms")
    assert units.up.mbit == pytest.approx(0.512)
    assert units.down.mbit == pytest.approx(1000)
    assert parse_link("1mbit/0ms").up.delay_ms == 0


@pytest.mark.parametrize(
    "text",
    ["", "5G-ish", "10mbps/40ms", "10mbit", "10mbit/40", "0mbit/40ms", "1mbit:2mbit:3mbit/4ms"],
)
def test_parse_link_rejects_bad_text(text: str) -> None:
    with pytest.raises(ValueError, match="kbit, mbit or gbit"):
        parse_link(text)


def test_load_profiles_rejects_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "links.json"
    path.write_text(json.dumps({"profiles": [{"name": "x", "up_mbit": 1}]}))
    with pytest.raises(ValueError, match="profile #0"):
        load_profiles(path)
    entry = {"name": "x", "up_mbit": 1, "down_mbit": 2, "rtt_ms": 10, "source": "s"}
    path.write_text(json.dumps({"profiles": [entry, {**entry, "name": "X"}]}))
    with pytest.raises(ValueError, match="duplicate"):
        load_profiles(path)
    path.write_text(json.dumps({"profiles": [entry]}))
    assert parse_link("x", load_profiles(path)).down == Link(2, 5)


# --- the timing model, on given times (no real clock) ---------------------------------


def test_wire_schedule_is_the_link_model() -> None:
    """Serialisation queues on the wire, propagation does not; a new link applies to
    bytes read after the change."""
    link = Link(8, 30)  # 1 MB/s: 1000 bytes take 1 ms
    wire = Wire(link)
    assert wire.send(1000, now=10.0) == pytest.approx(10.0 + 0.001 + 0.030)
    # read while the first is still on the wire: it waits for the wire, then propagates
    assert wire.send(1000, now=10.0005) == pytest.approx(10.0 + 0.002 + 0.030)
    # read after the wire went idle: no queueing
    assert wire.send(500, now=11.0) == pytest.approx(11.0 + 0.0005 + 0.030)
    # end of stream arrives after the queued bytes, one delay later
    assert wire.eof_time(now=11.0) == pytest.approx(11.0005 + 0.030)
    wire.link = Link(16, 0)
    assert wire.send(1000, now=12.0) == pytest.approx(12.0 + 0.0005)


def test_one_wire_carries_two_connections_in_read_order() -> None:
    """Chunks of two connections read alternately share the bandwidth: the last byte of
    both leaves after the serialisation time of all bytes, as on one access link."""
    wire = Wire(Link(8, 10))
    chunk, done = 16 * 1024, []
    for _ in range(20):  # connections A and B alternately, all read at t=0
        done.append(wire.send(chunk, now=0.0))
    assert max(done) == pytest.approx(Link(8, 10).bytes_time_s(20 * chunk) + 0.010)
    a, b = done[0::2], done[1::2]
    assert max(a) < max(b) and max(b) - max(a) == pytest.approx(Link(8, 0).bytes_time_s(chunk))


def test_wire_limits_follow_the_rate() -> None:
    slow, fast = Wire(Link(0.1, 10)), Wire(Link(1000, 10))
    assert slow.chunk() == 1024 and fast.chunk() == 16 * 1024
    assert slow.backlog_s() == pytest.approx(Link(0.1, 0).bytes_time_s(64 * 1024))
    assert fast.backlog_s() == pytest.approx(0.05)


# --- the relay in real time ----------------------------------------------------------
# A busy machine can only add time, never remove it, so these assert what must hold at
# any speed: the relay is never faster than its link. How close it comes on an idle
# machine is printed (and measured by the benchmarks), not asserted.


@pytest.mark.parametrize(
    ("n", "up", "down"),
    [
        (1_000_000, Link(8, 30), Link(100, 5)),  # bandwidth dominates: ~1.035 s
        (1_000, Link(8, 100), Link(100, 20)),  # delay dominates: ~0.121 s
    ],
    ids=["bandwidth", "delay"],
)
def test_transfer_is_never_faster_than_the_link(
    sink: Sink, no_leaks: None, n: int, up: Link, down: Link
) -> None:
    with LinkRelay(sink.address, up=up, down=down) as relay:
        with _connect(relay.address) as sock:
            times = [_round_trip(sock, n) for _ in range(2)]
        expected = _expected(n, up, down)
        print(f"n={n} up={up} down={down}: expected {expected:.4f} s, measured {times}")
        assert min(times) >= expected - EPS
        assert relay.bytes_up == 2 * (HEADER.size + n)
        assert relay.bytes_down == 2


def test_set_links_while_running(sink: Sink, no_leaks: None) -> None:
    n = 400_000
    fast, slow = Link(16, 10), Link(8, 10)
    down = Link(100, 10)
    with LinkRelay(sink.address, up=fast, down=down) as relay, _connect(relay.address) as sock:
        t_fast = _round_trip(sock, n)
        relay.set_links(up=slow)
        assert relay.up == slow and relay.down == down
        t_slow = _round_trip(sock, n)
        relay.set_links(down=Link(100, 90))
        t_far = _round_trip(sock, 1000)
    print(f"fast {t_fast:.4f} s, slow {t_slow:.4f} s, far {t_far:.4f} s")
    assert t_fast >= _expected(n, fast, down) - EPS
    # The slow link took effect: at 16 Mbit/s this would take 0.22 s, at 8 it must take 0.42.
    assert t_slow >= _expected(n, slow, down) - EPS
    assert t_far >= _expected(1000, slow, Link(100, 90)) - EPS


def test_connections_share_one_wire(sink: Sink, no_leaks: None) -> None:
    """Two senders at once on an 8 Mbit/s uplink: both messages cross one wire, so the
    pair takes at least the serialisation time of both (two wires would take half)."""
    n, up, down = 250_000, Link(8, 10), Link(100, 10)
    spans: list[tuple[float, float]] = []
    with LinkRelay(sink.address, up=up, down=down) as relay:
        socks = [_connect(relay.address) for _ in range(2)]
        barrier = threading.Barrier(2)

        def send(sock: socket.socket) -> None:
            barrier.wait()
            start = time.perf_counter()
            _round_trip(sock, n)
            spans.append((start, time.perf_counter()))

        threads = [threading.Thread(target=send, args=(s,)) for s in socks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for s in socks:
            s.close()
        assert relay.connections == 2 and len(spans) == 2
    expected = up.bytes_time_s(2 * (HEADER.size + n)) + up.delay_s + down.delay_s
    both = max(end for _, end in spans) - min(start for start, _ in spans)
    print(f"shared wire: expected {expected:.4f} s, measured {both:.4f} s for both")
    assert both >= expected - EPS


def test_backpressure_bounds_the_queue(sink: Sink, no_leaks: None) -> None:
    """A sender faster than the link is held back: the relay never queues much."""
    up = Link(2, 0)
    with LinkRelay(sink.address, up=up, down=Link(100, 0)) as relay:
        sock = _connect(relay.address)
        sock.setblocking(False)
        payload = HEADER.pack(50_000_000) + bytes(50_000_000)
        start = time.monotonic()
        sent, peak, deadline = 0, 0, start + 0.5
        while (left := deadline - time.monotonic()) > 0:
            select.select([], [sock], [], left)  # wait until the kernel takes more
            try:
                sent += sock.send(payload[sent : sent + 65536])
            except BlockingIOError:
                pass
            peak = max(peak, relay.queued_up)
        delivered, elapsed = relay.bytes_up, time.monotonic() - start
        print(f"sent {sent} bytes into the kernel, relay queue peak {peak}, delivered {delivered}")
        assert sent < 40_000_000  # the sender blocked long before 50 MB
        assert peak <= 64 * 1024 + 2 * 16 * 1024
        # never more than the link's rate since the first byte, plus one chunk
        assert delivered <= up.bytes_per_s * elapsed + 16 * 1024
        sock.close()  # mid-message: the relay must still stop cleanly


def test_upstream_down_closes_the_client(no_leaks: None) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    with LinkRelay(dead, up=Link(10, 1), down=Link(10, 1)) as relay, _connect(relay.address) as s:
        s.settimeout(5)
        assert s.recv(1) == b""


def test_relay_api_errors() -> None:
    with pytest.raises(ValueError, match="host:port"):
        LinkRelay("nowhere", up=Link(1, 1), down=Link(1, 1))
    relay = LinkRelay("127.0.0.1:9", up=Link(1, 1), down=Link(1, 1))
    with pytest.raises(RuntimeError, match="not started"):
        _ = relay.address
    relay.stop()  # stopping a relay never started is a no-op
    with pytest.raises(TypeError):
        relay.set_links(up=10)  # type: ignore[arg-type]


# --- gRPC through the relay ---------------------------------------------------------------


@pytest.fixture()
def echo_server() -> Iterator[str]:
    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None).wait()


def test_grpc_round_trip_through_the_relay(echo_server: str, no_leaks: None) -> None:
    profile = parse_link("100mbit/40ms")
    with LinkRelay(echo_server, up=profile.up, down=profile.down) as relay:
        options = [("grpc.enable_http_proxy", 0)]
        with grpc.insecure_channel(relay.address, options=options) as channel:
            echo = channel.unary_unary("/test.Echo/Echo")
            assert echo(b"warm-up", timeout=10) == b"warm-up"  # connection set-up
            start = time.perf_counter()
            assert echo(b"x" * 1000, timeout=10) == b"x" * 1000
            elapsed = time.perf_counter() - start
        print(f"gRPC unary call over {profile.spec}: {elapsed * 1000:.1f} ms")
        assert elapsed >= 0.040 - EPS  # one round trip of the link, at least
        assert relay.bytes_up > 1000 and relay.bytes_down > 1000
