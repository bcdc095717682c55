"""One ``InferStream`` call: requests pipelined up to a window, answers in order.

The caller's thread does all the work: it takes the next input (lazily, from any
iterable), runs the head, encodes and queues the request; gRPC's thread only writes
the queued messages. At most ``window`` requests are unanswered at once, and only
their inputs are kept, so a stream of any length holds a bounded amount of memory
and, after a fault, exactly the unanswered inputs can be sent again on a new stream
(``StreamCall.unanswered``).

Each request must be answered within the deadline of its own sending: one watchdog
thread per stream cancels the call when the oldest unanswered request runs out, and
the stream then fails with ``DeadlineExceededError``. Violations of the stream
protocol by the server (a chunk nobody announced, an answer to another request) are
``ProtocolError``.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import torch

from edge.results import InferResult, Timing
from edge.route import Encoded, Route, payload_bytes
from edge.transport import rpc_error
from splitnet.errors import ProtocolError, remote_error
from splitnet.v1 import inference_pb2 as pb
from splitnet.wire import ChunkReader, RawChunk, iter_chunks

if TYPE_CHECKING:
    from edge.client import EdgeClient

__all__ = ["Lane", "LaneBroken", "StreamCall", "code_name", "outputs_per_sample", "response_bound"]

_END = object()  # ends the request iterator (half-close)
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def code_name(number: int) -> str:
    """The gRPC status code name for its number (``UNKNOWN`` for numbers it has not)."""
    return _CODE_NAMES.get(number, "UNKNOWN")


@dataclass(slots=True)
class _Sent:
    """A request on the wire, kept until it is answered."""

    x: torch.Tensor  # the input, for a retry on a new stream
    rid: int
    route: Route
    timing: Timing
    started: float  # head started
    sent: float  # queued for the wire
    alone: bool  # nothing else was unanswered: its time is its own, not a pipeline wait


class StreamCall:
    """One stream: ``results()`` yields an ``InferResult`` per input, in order."""

    def __init__(
        self,
        client: EdgeClient,
        replay: deque[torch.Tensor],
        source: Iterator[torch.Tensor],
        *,
        window: int,
        chunk_bytes: int,
        max_response_bytes: Callable[[int], int],
    ) -> None:
        self.client = client
        self.replay = replay  # inputs to send first (unanswered on a previous stream)
        self.source = source
        self.window = window
        self.chunk_bytes = chunk_bytes
        self.max_response_bytes = max_response_bytes  # bound on a response's chunked bytes
        self.sent: deque[_Sent] = deque()
        self.exhausted = False
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done = threading.Event()
        self._expired: _Sent | None = None
        self._poke = threading.Condition()
        self._deferred: Exception | None = None  # an input's own error, raised in its turn

    def unanswered(self) -> deque[torch.Tensor]:
        """Inputs sent and not answered, then those not yet sent, in order."""
        return deque([s.x for s in self.sent] + list(self.replay))

    # ---------------------------------------------------------- requests
    def _requests(self) -> Iterator[Any]:
        return iter(self._outbox.get, _END)

    def _next_input(self) -> torch.Tensor | None:
        if self.replay:
            return self.replay.popleft()
        if self.exhausted:
            return None
        try:
            return next(self.source)
        except StopIteration:
            self.exhausted = True
            return None

    def _send_one(self) -> bool:
        """Prepare and queue the next request; False when there is none."""
        x = self._next_input()
        if x is None:
            return False
        client = self.client
        started = time.perf_counter()
        route = client._route
        frontier = client._run_head(route, x, started)
        t1 = time.perf_counter()
        parts: Encoded = route.encode(frontier)
        rid = next(client._ids)
        total = payload_bytes(parts)
        entry = _Sent(x, rid, route, Timing(), started, 0.0, not self.sent)
        self.sent.append(entry)  # before it can fail: an input is never lost
        if total > self.chunk_bytes:
            header = route.chunked_header(rid, parts)
            self._outbox.put(header)
            for _, payload in parts:  # views of the payloads, copied once on send
                for data in iter_chunks([payload], self.chunk_bytes):
                    self._outbox.put(RawChunk(rid, data))
            sent_bytes = len(header) + total
        else:
            msg = route.stream_request(rid, parts)
            self._outbox.put(msg)
            sent_bytes = len(msg)
        now = time.perf_counter()
        entry.sent = now
        t = entry.timing
        t.edge_ms, t.encode_ms, t.bytes_sent = (t1 - started) * 1e3, (now - t1) * 1e3, sent_bytes
        if entry.alone:  # the watchdog was idle: give it a deadline to watch
            with self._poke:
                self._poke.notify()
        return True

    def _fill(self) -> None:
        """Send until the window is full or the inputs run out.

        An error of one input (its head, its encoding, the source itself) stops the
        sending; the requests before it are still answered, then it is raised.
        """
        if self.exhausted and not self.replay:
            return
        try:
            while len(self.sent) < self.window and self._send_one():
                pass
        except Exception as e:
            self._deferred = e
            self.exhausted = True
            self.replay.clear()
        if self.exhausted and not self.replay:
            self._outbox.put(_END)  # all sent: half-close

    def _raise_deferred(self) -> None:
        if self._deferred is not None:
            error, self._deferred = self._deferred, None
            raise error

    # ---------------------------------------------------------- watchdog
    def _watch(self, call: Any, deadline_s: float) -> None:
        """Cancel ``call`` when the oldest unanswered request outlives its deadline."""
        with self._poke:
            while not self._done.is_set():
                try:
                    oldest: _Sent | None = self.sent[0]
                except IndexError:  # nothing unanswered
                    oldest = None
                if oldest is None or oldest.sent == 0.0:
                    self._poke.wait(deadline_s)
                    continue
                left = oldest.sent + deadline_s - time.perf_counter()
                if left <= 0:
                    self._expired = oldest
                    call.cancel()
                    return
                self._poke.wait(left)

    # ---------------------------------------------------------- answers
    def results(self) -> Iterator[InferResult]:
        """Run the stream; raise ``RemoteError``/``ProtocolError`` on faults (then
        ``unanswered`` says what to send again).
        """
        client = self.client
        transport = client.transport
        call = transport.stream(self._requests(), metadata=transport.metadata)
        watchdog = threading.Thread(
            target=self._watch, args=(call, transport.policy.deadline_s), daemon=True
        )
        watchdog.start()
        reader = ChunkReader("response")
        pending: pb.InferResponse | None = None
        try:
            self._fill()
            if not self.sent:
                self._raise_deferred()
                return
            for msg in call:
                kind = msg.WhichOneof("kind")
                payloads: list[bytearray] | None = None
                if kind == "response":
                    resp = msg.response
                    if resp.chunked_payload_bytes:
                        expected = self.sent[0].x.shape[0] if self.sent else 1
                        limit = self.max_response_bytes(int(expected))
                        if not reader.start(
                            resp.id, resp.chunked_payload_bytes, len(resp.outputs), max_total=limit
                        ):
                            pending = resp
                            continue
                        payloads = reader.take()
                    pending = resp
                elif kind in ("raw_chunk", "chunk"):
                    chunk = msg if isinstance(msg, RawChunk) else msg.chunk
                    if not reader.add(chunk.id, chunk.data):
                        continue
                    payloads = reader.take()
                else:
                    raise ProtocolError("the server sent a message that is not a StreamResponse")
                resp, pending = pending, None
                assert resp is not None
                received = time.perf_counter()
                if not self.sent:
                    raise ProtocolError(f"the server answered request {resp.id}, never sent")
                entry = self.sent[0]
                if resp.id != entry.rid:
                    raise ProtocolError(
                        f"the server answered request {resp.id}, expected {entry.rid}"
                    )
                if resp.HasField("error"):
                    raise remote_error(code_name(resp.error.code), resp.error.message)
                self.sent.popleft()
                result = client._finish(
                    resp, payloads, entry.route, entry.timing, entry.started, entry.sent, received
                )
                client._learn(result, link=entry.alone)
                self._fill()  # keep the window full while the caller looks at this result
                yield result
                if not self.sent:
                    self._raise_deferred()
                    return
            reader.finish()
            if self.sent:
                raise remote_error(
                    "UNAVAILABLE",
                    f"the stream ended with {len(self.sent)} requests unanswered",
                )
        except grpc.RpcError as e:
            expired = self._expired
            if expired is not None:
                raise remote_error(
                    "DEADLINE_EXCEEDED",
                    f"no answer to request {expired.rid} within {transport.policy.deadline_s:g} s",
                ) from None
            raise rpc_error(e) from None
        finally:
            self._done.set()
            with self._poke:
                self._poke.notify()
            self._outbox.put(_END)
            call.cancel()


def response_bound(outputs_per_sample: int) -> Callable[[int], int]:
    """Largest chunked response a server may announce for a batch: every output value
    as 8 bytes, plus 1% and 64 KiB for codec framing.
    """

    def bound(batch: int) -> int:
        raw = 8 * outputs_per_sample * max(batch, 1)
        return raw + raw // 100 + (64 << 10)

    return bound


def outputs_per_sample(info: pb.ModelInfo) -> int:
    """Values in one sample's outputs, from ``GetModelInfo``."""
    return sum(math.prod(o.shape[1:]) for o in info.outputs) or 1


class LaneBroken(Exception):
    """The lane's stream failed; ``expired`` when its watchdog cut it at the deadline."""

    def __init__(self, error: grpc.RpcError | None, *, expired: bool) -> None:
        super().__init__("the lane's stream failed")
        self.error = error
        self.expired = expired


class Lane:
    """A persistent ``InferStream`` for requests one at a time (``EdgeClient.infer``).

    A unary ``Infer`` pays for a whole call on both sides: a new HTTP/2 stream,
    metadata, a status. A message on a stream that is already open pays for none of
    that, so ``infer`` sends each request on this lane once the channel has connected,
    and a broken lane sends the request the unary way (with its retries) and is
    opened again on the next request. With ``round_robin`` (several servers) there is no
    lane: a stream stays on one server, unary calls spread. One request is on the lane at
    a time (a client
    used from several threads sends the others unary); its deadline is watched by
    one thread per lane, which wakes only once per deadline while the lane is idle.
    """

    def __init__(self, transport: Any, deadline_s: float) -> None:
        self.lock = threading.Lock()  # held by the request on the lane
        self._deadline_s = deadline_s
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._call = transport.stream(iter(self._outbox.get, _END), metadata=transport.metadata)
        self._replies = iter(self._call)
        self._reader = ChunkReader("response")
        self._due = 0.0  # perf_counter time the request on the lane must be answered by
        self._guard = threading.Condition()
        self._expired = False
        self._closed = False
        threading.Thread(target=self._watch, daemon=True, name="splitnet-lane").start()

    def _watch(self) -> None:
        with self._guard:
            while not self._closed:
                due = self._due
                now = time.perf_counter()
                if due and now >= due:
                    self._expired = True
                    self._call.cancel()
                    return
                self._guard.wait(due - now if due else self._deadline_s)

    def ask(
        self, data: bytes, rid: int, max_response_bytes: int
    ) -> tuple[pb.InferResponse, list[bytearray] | None, int]:
        """Send one request (a serialized ``StreamRequest``); its response, its chunked
        payloads (or None) and the bytes received. The caller holds ``lock``.
        """
        with self._guard:
            self._due = time.perf_counter() + self._deadline_s
        self._outbox.put(data)
        try:
            received = 0
            while True:
                msg = next(self._replies)
                kind = msg.WhichOneof("kind")
                if kind == "response":
                    resp = msg.response
                    if resp.id != rid:
                        raise ProtocolError(
                            f"the server answered request {resp.id}, expected {rid}"
                        )
                    if not resp.chunked_payload_bytes:
                        return resp, None, msg.ByteSize()
                    if self._reader.start(
                        rid,
                        resp.chunked_payload_bytes,
                        len(resp.outputs),
                        max_total=max_response_bytes,
                    ):
                        return resp, self._reader.take(), msg.ByteSize()
                    pending, received = resp, msg.ByteSize()
                elif kind in ("raw_chunk", "chunk"):
                    chunk = msg if isinstance(msg, RawChunk) else msg.chunk
                    received += len(chunk.data)
                    if self._reader.add(chunk.id, chunk.data):
                        return pending, self._reader.take(), received
                else:
                    raise ProtocolError("the server sent a message that is not a StreamResponse")
        except grpc.RpcError as e:
            raise LaneBroken(e, expired=self._expired) from None
        except StopIteration:
            raise LaneBroken(None, expired=False) from None
        finally:
            with self._guard:
                self._due = 0.0

    def close(self) -> None:
        """End the stream and its watchdog."""
        with self._guard:
            self._closed = True
            self._guard.notify()
        self._outbox.put(_END)
        self._call.cancel()
