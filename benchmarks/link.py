"""Link emulation in user space: a TCP relay on loopback that imposes bandwidth and delay.

``tc netem`` is not available here, so benchmarks and tests put a :class:`LinkRelay`
between the edge client and the cloud server::

    relay = LinkRelay(upstream="127.0.0.1:50051", up=Link(5.85, 30), down=Link(20, 30))
    relay.start()
    channel = grpc.insecure_channel(relay.address)   # the client dials the relay
    ...
    relay.stop()

Model. Each direction is one FIFO *wire* shared by every connection through the relay
(like one access link): a chunk of ``n`` bytes read at time ``t`` leaves the sender side
at ``depart = max(t, wire_free) + n * 8 / B`` (serialisation) and is written to the other
socket at ``depart + delay`` (propagation). A direction stops reading while more than
``max(64 KiB, B * 50 ms)`` bytes are queued and not yet departed, so a fast sender is
held back by TCP flow control as on a real link, and memory stays bounded.

Profiles. :func:`load_profiles` reads ``benchmarks/links.json`` (named profiles with
their sources); :func:`parse_link` accepts a profile name or a custom spec such as
``10mbit/40ms`` (symmetric; the ms figure is the round-trip time) or
``5.85mbit:20mbit/60ms`` (up:down/RTT).

Limits. Timers come from the asyncio loop, whose epoll wait rounds up to whole
milliseconds, so each delivery can be up to ~1 ms late (lateness does not accumulate:
times are absolute). The relay is one Python thread: beyond a few hundred Mbit/s it
becomes the bottleneck itself. Connection set-up (the TCP handshake) is not delayed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import numbers
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["Link", "LinkProfile", "LinkRelay", "Wire", "load_profiles", "parse_link"]

logger = logging.getLogger(__name__)

PROFILES_PATH = Path(__file__).with_name("links.json")
CHUNK_MAX = 16 * 1024  # largest read, so serialisation stays smooth
CHUNK_MIN = 1024  # smallest read cap, for very slow links
BACKLOG_MIN = 64 * 1024  # queued-but-not-departed bytes allowed before reading stops
BACKLOG_S = 0.05  # ... or this many seconds of the link's rate, whichever is larger
_UNITS = {"kbit": 1e-3, "mbit": 1.0, "gbit": 1e3}


@dataclass(frozen=True)
class Link:
    """One direction of a link: bandwidth and one-way propagation delay.

    ``str(Link(10, 40))`` is ``"10mbit/40ms"``; note that the delay here is one way, while
    in :func:`parse_link` specs the ms figure is the round-trip time.
    """

    mbit: float  # bandwidth in Mbit/s (10^6 bit/s)
    delay_ms: float  # one-way propagation delay in milliseconds

    def __post_init__(self) -> None:
        if not (_is_real(self.mbit) and math.isfinite(self.mbit) and self.mbit > 0):
            raise ValueError(f"Link.mbit must be a finite number > 0, got {self.mbit!r}")
        if not (_is_real(self.delay_ms) and math.isfinite(self.delay_ms) and self.delay_ms >= 0):
            raise ValueError(f"Link.delay_ms must be a finite number >= 0, got {self.delay_ms!r}")

    def __str__(self) -> str:
        return f"{self.mbit:g}mbit/{self.delay_ms:g}ms"

    @property
    def bytes_per_s(self) -> float:
        """Bandwidth in bytes per second."""
        return self.mbit * 1e6 / 8

    @property
    def delay_s(self) -> float:
        """One-way delay in seconds."""
        return self.delay_ms / 1000

    def bytes_time_s(self, n: int) -> float:
        """Serialisation time of ``n`` bytes on this link, in seconds."""
        return n * 8 / (self.mbit * 1e6)


@dataclass(frozen=True)
class LinkProfile:
    """A named pair of links (edge->cloud ``up``, cloud->edge ``down``) with its source."""

    name: str  # e.g. "4G"; custom specs are named by their spec
    up: Link  # edge -> cloud
    down: Link  # cloud -> edge
    rtt_ms: float  # round-trip propagation time: up.delay_ms + down.delay_ms
    source: str  # where the figures come from, or the assumptions behind them

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("LinkProfile.name must not be empty")
        total = self.up.delay_ms + self.down.delay_ms
        if not math.isclose(self.rtt_ms, total, rel_tol=1e-9, abs_tol=1e-9):
            raise ValueError(
                f"LinkProfile {self.name!r}: rtt_ms={self.rtt_ms:g} but up.delay_ms + "
                f"down.delay_ms = {total:g}"
            )

    @classmethod
    def of(
        cls, name: str, up_mbit: float, down_mbit: float, rtt_ms: float, source: str
    ) -> LinkProfile:
        """A profile from rates and an RTT, the RTT split evenly between the directions."""
        return cls(
            name=name,
            up=Link(up_mbit, rtt_ms / 2),
            down=Link(down_mbit, rtt_ms / 2),
            rtt_ms=rtt_ms,
            source=source,
        )

    @property
    def spec(self) -> str:
        """The custom-spec form that :func:`parse_link` reads back (rates and RTT)."""
        if self.up.mbit == self.down.mbit:
            return f"{self.up.mbit:g}mbit/{self.rtt_ms:g}ms"
        return f"{self.up.mbit:g}mbit:{self.down.mbit:g}mbit/{self.rtt_ms:g}ms"

    def __str__(self) -> str:
        return self.spec if self.name == self.spec else f"{self.name} ({self.spec})"


def load_profiles(path: str | Path | None = None) -> dict[str, LinkProfile]:
    """Read link profiles (default ``benchmarks/links.json``), keyed by name in file order.

    The format is ``{"profiles": [{"name", "up_mbit", "down_mbit", "rtt_ms", "source"}]}``;
    the RTT is split evenly between the two directions.
    """
    path = Path(path) if path is not None else PROFILES_PATH
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("profiles"), list):
        raise ValueError(f"{path}: expected an object with a 'profiles' list")
    profiles: dict[str, LinkProfile] = {}
    seen: set[str] = set()
    for i, entry in enumerate(data["profiles"]):
        try:
            profile = LinkProfile.of(
                name=str(entry["name"]),
                up_mbit=float(entry["up_mbit"]),
                down_mbit=float(entry["down_mbit"]),
                rtt_ms=float(entry["rtt_ms"]),
                source=str(entry["source"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{path}: profile #{i} is invalid ({e!r}); each needs name, up_mbit, "
                "down_mbit, rtt_ms and source"
            ) from e
        key = profile.name.casefold()
        if key in seen:
            raise ValueError(f"{path}: duplicate profile name {profile.name!r}")
        seen.add(key)
        profiles[profile.name] = profile
    return profiles


_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_RATE = _NUM + r"\s*([kmg]bit)"
_SPEC = re.compile(
    r"^\s*" + _RATE + r"(?:\s*:\s*" + _RATE + r")?\s*/\s*" + _NUM + r"\s*ms\s*$", re.IGNORECASE
)
_ACCEPTED = (
    "a custom spec is 'RATE/RTTms' (symmetric, e.g. '10mbit/40ms') or 'UP:DOWN/RTTms' "
    "(e.g. '5.85mbit:20mbit/60ms'), rates > 0 in kbit, mbit or gbit"
)


def parse_link(text: str, profiles: Mapping[str, LinkProfile] | None = None) -> LinkProfile:
    """A profile name (case-insensitive) or a custom spec, as a :class:`LinkProfile`.

    Specs: ``"10mbit/40ms"`` (10 Mbit/s both ways, 40 ms round trip, 20 ms each way) or
    ``"5.85mbit:20mbit/60ms"`` (up:down/RTT); units ``kbit``, ``mbit``, ``gbit``.
    ``profiles`` defaults to :func:`load_profiles`. Anything else raises ``ValueError``.
    """
    if profiles is None:
        profiles = load_profiles()
    wanted = text.strip().casefold()
    for name, profile in profiles.items():
        if name.casefold() == wanted:
            return profile
    match = _SPEC.match(text)
    if match is not None:
        up_num, up_unit, down_num, down_unit, rtt = match.groups()
        up_mbit = float(up_num) * _UNITS[up_unit.lower()]
        down_mbit = float(down_num) * _UNITS[down_unit.lower()] if down_num else up_mbit
        try:
            profile = LinkProfile.of(
                name="custom",
                up_mbit=up_mbit,
                down_mbit=down_mbit,
                rtt_ms=float(rtt),
                source="custom spec",
            )
        except ValueError as e:
            raise ValueError(f"bad link spec {text!r} ({e}); {_ACCEPTED}") from e
        return LinkProfile(
            name=profile.spec,
            up=profile.up,
            down=profile.down,
            rtt_ms=profile.rtt_ms,
            source=f"custom spec {text.strip()!r}",
        )
    names = ", ".join(profiles) or "none loaded"
    raise ValueError(f"unknown link {text!r}: expected a profile name ({names}); {_ACCEPTED}")


class Wire:
    """One direction's shared FIFO wire: when it is next free, and its current link.

    The whole timing model of the relay lives here, as arithmetic on the times it is
    given (the relay passes its loop's clock), so it can be checked without real time.
    """

    def __init__(self, link: Link) -> None:
        self.link = link
        self.free_at = 0.0  # loop time at which the last scheduled byte departs

    def send(self, n: int, now: float) -> float:
        """Schedule ``n`` bytes read at ``now``; returns their delivery time."""
        link = self.link  # read once: set_links may swap it from another thread
        depart = max(now, self.free_at) + link.bytes_time_s(n)
        self.free_at = depart
        return depart + link.delay_s

    def eof_time(self, now: float) -> float:
        """Delivery time of an end-of-stream sent at ``now`` (after all queued bytes)."""
        return max(now, self.free_at) + self.link.delay_s

    def backlog_s(self) -> float:
        """How much queued-but-not-departed data may wait, in seconds of wire time."""
        link = self.link
        return max(link.bytes_time_s(BACKLOG_MIN), BACKLOG_S)

    def chunk(self) -> int:
        """Largest read: ~5 ms of the link's rate, clamped to [1 KiB, 16 KiB]."""
        return int(min(CHUNK_MAX, max(CHUNK_MIN, self.link.bytes_per_s * 0.005)))

    def pending_cap(self) -> int:
        """Most bytes one connection may hold undelivered (backlog + in flight + slack)."""
        link = self.link
        return int(link.bytes_per_s * (2 * self.backlog_s() + link.delay_s)) + 2 * CHUNK_MAX


class _Channel:
    """Chunks of one connection's direction between reading and delivery."""

    def __init__(self) -> None:
        self.items: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.pending = 0  # bytes read and not yet written
        self.ready = asyncio.Event()  # items is non-empty
        self.room = asyncio.Event()  # pending dropped (writer made progress)


class LinkRelay:
    """A TCP relay on 127.0.0.1 imposing an up and a down :class:`Link` on the bytes.

    Clients connect to :attr:`address`; each connection is relayed to ``upstream``
    (``"host:port"``). Bytes client->upstream cross the ``up`` wire, upstream->client the
    ``down`` wire; each wire is shared by all connections. The relay runs its own asyncio
    loop in a daemon thread; use :meth:`start`/:meth:`stop` or ``with LinkRelay(...)``.
    A relay is started once; after :meth:`stop`, make a new one.
    """

    def __init__(self, upstream: str, up: Link, down: Link) -> None:
        host, sep, port = upstream.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"upstream must be 'host:port', got {upstream!r}")
        self._upstream = (host.strip("[]"), int(port))
        self._up = Wire(up)
        self._down = Wire(down)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._port = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._channels: dict[_Channel, Wire] = {}
        self.bytes_up = 0  # bytes handed to the upstream socket (client -> upstream)
        self.bytes_down = 0  # bytes handed to the client socket (upstream -> client)
        self.connections = 0  # connections accepted so far

    # -- public API ---------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"`` to dial instead of the upstream (after :meth:`start`)."""
        if not self._port:
            raise RuntimeError("LinkRelay is not started")
        return f"127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        """The listening port (after :meth:`start`)."""
        if not self._port:
            raise RuntimeError("LinkRelay is not started")
        return self._port

    @property
    def up(self) -> Link:
        """The current client -> upstream link."""
        return self._up.link

    @property
    def down(self) -> Link:
        """The current upstream -> client link."""
        return self._down.link

    @property
    def queued_up(self) -> int:
        """Bytes read from clients and not yet delivered upstream (all connections)."""
        return sum(c.pending for c, w in list(self._channels.items()) if w is self._up)

    @property
    def queued_down(self) -> int:
        """Bytes read from upstream and not yet delivered to clients (all connections)."""
        return sum(c.pending for c, w in list(self._channels.items()) if w is self._down)

    def set_links(self, up: Link | None = None, down: Link | None = None) -> None:
        """Change the emulated links; applies to bytes read after the call."""
        for link in (up, down):
            if link is not None and not isinstance(link, Link):
                raise TypeError(f"expected a Link, got {type(link).__name__}")
        if up is not None:
            self._up.link = up  # a single attribute store: atomic for the loop thread
        if down is not None:
            self._down.link = down
        logger.debug("links now up=%s down=%s", self._up.link, self._down.link)

    def start(self, timeout: float = 10.0) -> LinkRelay:
        """Start the loop thread; returns once the relay is listening."""
        if self._thread is not None:
            raise RuntimeError("LinkRelay already started")
        self._thread = threading.Thread(target=self._run, name="LinkRelay", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("LinkRelay did not start listening in time")
        if self._error is not None:
            self._thread.join(timeout)
            raise RuntimeError(f"LinkRelay failed to start: {self._error!r}") from self._error
        logger.info(
            "link relay %s -> %s:%d up=%s down=%s",
            self.address,
            *self._upstream,
            self._up.link,
            self._down.link,
        )
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listener and every connection, and join the thread (idempotent)."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("LinkRelay thread did not stop in time")

    def __enter__(self) -> LinkRelay:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- loop thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported to start(); the thread must not die silently
            if not self._ready.is_set():
                self._error = e
            else:
                logger.exception("link relay loop failed")
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0, limit=CHUNK_MAX)
        self._port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()
            logger.debug("link relay on port %d stopped", self._port)

    def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        # A plain callback that starts our own task: Python 3.11's asyncio.streams logs a
        # spurious error when a coroutine handler task ends cancelled (as on stop()).
        task = asyncio.get_running_loop().create_task(self._connection(creader, cwriter))
        self._tasks.add(task)
        task.add_done_callback(self._connection_done)

    def _connection_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("link relay: connection failed", exc_info=exc)

    async def _connection(
        self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        peer = cwriter.get_extra_info("peername")
        writers = [cwriter]
        clean = False
        try:
            _nodelay(cwriter)
            try:
                ureader, uwriter = await asyncio.open_connection(*self._upstream, limit=CHUNK_MAX)
            except OSError as e:
                logger.warning("link relay: cannot reach upstream %s:%d: %s", *self._upstream, e)
                return
            writers.append(uwriter)
            _nodelay(uwriter)
            logger.debug("link relay: %s connected", peer)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._pipe(creader, uwriter, self._up, up=True))
                    tg.create_task(self._pipe(ureader, cwriter, self._down, up=False))
                clean = True
            except* OSError as group:  # resets and broken pipes end the connection
                logger.debug("link relay: %s closed by error %r", peer, group.exceptions[0])
        finally:
            for writer in writers:
                if clean:
                    writer.close()
                else:  # errors and stop(): drop unsent bytes rather than wait on a peer
                    writer.transport.abort()
            for writer in writers:
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            logger.debug("link relay: %s done", peer)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, wire: Wire, up: bool
    ) -> None:
        channel = _Channel()
        self._channels[channel] = wire
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read(reader, channel, wire))
                tg.create_task(self._deliver(writer, channel, up))
        finally:
            del self._channels[channel]

    async def _read(self, reader: asyncio.StreamReader, channel: _Channel, wire: Wire) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Backpressure 1: the shared wire holds too much not-yet-departed data.
            while (wait := wire.free_at - wire.backlog_s() - loop.time()) > 0:
                await asyncio.sleep(wait)
            # Backpressure 2: this connection's receiver is not keeping up.
            while channel.pending > wire.pending_cap():
                channel.room.clear()
                await channel.room.wait()
            data = await reader.read(wire.chunk())
            now = loop.time()
            if not data:
                channel.items.append((wire.eof_time(now), None))
                channel.ready.set()
                return
            channel.items.append((wire.send(len(data), now), data))
            channel.pending += len(data)
            channel.ready.set()

    async def _deliver(self, writer: asyncio.StreamWriter, channel: _Channel, up: bool) -> None:
        loop = asyncio.get_running_loop()
        items = channel.items
        while True:
            while not items:
                channel.ready.clear()
                await channel.ready.wait()
            wait = items[0][0] - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            now = loop.time()
            batch: list[bytes] = []
            eof = False
            while items and items[0][0] <= now:  # everything due, in FIFO order
                data = items.popleft()[1]
                if data is None:
                    eof = True
                    break
                batch.append(data)
            if batch:
                n = sum(map(len, batch))
                if up:  # counted first, so a peer that has the bytes sees them counted
                    self.bytes_up += n
                else:
                    self.bytes_down += n
                writer.writelines(batch)
                await writer.drain()
                channel.pending -= n
                channel.room.set()
            if eof:
                if writer.can_write_eof():
                    writer.write_eof()
                return


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _nodelay(writer: asyncio.StreamWriter) -> None:
    """Set TCP_NODELAY on the writer's socket (asyncio usually has already)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
