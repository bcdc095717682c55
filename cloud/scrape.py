"""``/metrics`` over HTTP(S), served on the server's own event loop, bounded.

prometheus_client's ``start_http_server`` runs the TLS handshake inside ``accept()`` on
its one thread with no timeout (one idle connection blocks every scrape) and keeps a
thread per connection. This endpoint instead:

- handshakes TLS with a timeout, off any shared thread (asyncio's ``ssl_handshake_timeout``);
- holds at most ``max_connections`` connections; when full, a new one takes the place
  of the oldest still waiting for its request (a scraper sends its request at once, so
  idle connections cannot lock scrapers out), or is closed if none is waiting;
- reads one request of at most ``MAX_HEADER_BYTES`` within ``timeout_s``, answers it and
  closes: no idle connection lasts;
- asks for what the gRPC port asks for, unless the operator opens it on purpose: a
  bearer token when the server has tokens, a client certificate under mutual TLS.
"""

from __future__ import annotations

import asyncio
import hmac
import ssl
from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["MAX_HEADER_BYTES", "ScrapeServer"]

MAX_HEADER_BYTES = 16 << 10


class ScrapeServer:
    """The metrics endpoint of one server (see the module docstring)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        tokens: Iterable[str] = (),
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 16,
        timeout_s: float = 5.0,
    ) -> None:
        self.registry = registry
        self._tokens = [t.encode() for t in tokens]
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.active = 0
        self.evicted = 0  # idle connections closed to make room
        self._reading: dict[asyncio.StreamWriter, None] = {}  # waiting for a request, oldest first
        self._gone: set[asyncio.StreamWriter] = set()  # evicted: their place is already given
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); return the port."""
        self._server = await asyncio.start_server(
            self._handle,
            host,
            port,
            ssl=self.ssl_context,
            ssl_handshake_timeout=self.timeout_s if self.ssl_context else None,
            limit=MAX_HEADER_BYTES,
            reuse_port=False,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        """Stop listening and drop open connections."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def _authorized(self, head: bytes) -> bool:
        if not self._tokens:
            return True
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                ok = False
                for t in self._tokens:  # every token, always: the time says nothing
                    ok |= hmac.compare_digest(token.strip(), t)
                return scheme.lower() == b"bearer" and ok
        return False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= self.max_connections:
            if not self._reading:
                writer.close()
                return
            oldest = next(iter(self._reading))
            del self._reading[oldest]
            oldest.transport.abort()  # its handler ends; its place is ours now
            self._gone.add(oldest)
            self.active -= 1
            self.evicted += 1
        self.active += 1
        try:
            self._reading[writer] = None
            try:
                async with asyncio.timeout(self.timeout_s):
                    head = await reader.readuntil(b"\r\n\r\n")
            finally:
                self._reading.pop(writer, None)
            method, _, rest = head.partition(b" ")
            path = rest.partition(b" ")[0].split(b"?")[0]
            if method not in (b"GET", b"HEAD") or path not in (b"/metrics", b"/"):
                status, body = b"404 Not Found", b"only GET /metrics is served here\n"
                ctype = b"text/plain"
            elif not self._authorized(head):
                status, body = b"401 Unauthorized", b"send 'Authorization: Bearer <token>'\n"
                ctype = b"text/plain"
            else:
                status, body, ctype = b"200 OK", generate_latest(self.registry), b""
                ctype = CONTENT_TYPE_LATEST.encode()
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
                + b"\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n" + (body if method != b"HEAD" else b"")
            )  # fmt: skip
            async with asyncio.timeout(self.timeout_s):
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            if writer in self._gone:
                self._gone.discard(writer)
            else:
                self.active -= 1
            writer.close()
