"""The ``splitnet.v1.SplitInference`` servicer on ``grpc.aio``.

One request flows one way (cloud/job.py)::

    parse ─► admit (slot, lookup, validate) ─► decode ─► batcher ─► tail, encode ─► respond

The event loop only moves messages: large decodes and slow tails run on the executor;
a small request for an idle, fast tail runs straight through on the loop, with no task
or thread hop. Every failure becomes a ``RequestError`` with its own status code: unary
calls end with it, stream requests answer it in-band and the stream goes on.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from typing import NoReturn

import grpc

from cloud.admission import Admission
from cloud.batcher import Batcher, DynamicBatcher
from cloud.config import ServerConfig
from cloud.job import Job, RequestError
from cloud.metrics import Metrics
from cloud.runtime import TailRuntime
from splitnet import __version__
from splitnet.errors import ProtocolError
from splitnet.v1 import generation_pb2 as gpb
from splitnet.v1 import inference_pb2 as pb
from splitnet.v1 import inference_pb2_grpc as pb_grpc
from splitnet.wire import (
    ChunkReader,
    OutOfBounds,
    RawChunk,
    Unparsable,
    iter_chunks,
    strip_payloads,
)

__all__ = ["SplitInferenceService"]

logger = logging.getLogger(__name__)

STREAM_WINDOW = 64  # requests of one stream being worked on at once
INLINE_DECODE_BYTES = 64 << 10  # smaller requests are decoded on the event loop
INVALID = grpc.StatusCode.INVALID_ARGUMENT

# What a stream's writer waits on, in request order: an answer, or work that will give one.
_Answer = pb.StreamResponse | asyncio.Task[pb.StreamResponse]


class SplitInferenceService(pb_grpc.SplitInferenceServicer):
    """Answers GetModelInfo, Infer and InferStream for the models in ``runtime``."""

    def __init__(
        self,
        runtime: TailRuntime,
        config: ServerConfig,
        executor: Executor,
        *,
        batcher: Batcher | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.runtime = runtime
        self.config = config
        self.executor = executor
        self.metrics = metrics
        self.batcher: Batcher = batcher or DynamicBatcher(
            self._run,
            executor,
            max_batch_size=config.max_batch_size,
            max_queue_delay_us=config.max_queue_delay_us,
            inline=self._inline,
        )
        self.admission = Admission(
            config.max_in_flight,
            config.max_pending_bytes,
            metrics.pending.set if metrics is not None else None,
        )
        # Metric labels come from here only: names a client invents are counted as "".
        self._cut_names = {
            name: frozenset(c.name for c in m.graph.cuts) for name, m in runtime.models.items()
        }
        self.served = 0
        # The generation service's info (limits, capacity now), when the server runs one;
        # GetModelInfo carries it so one call shows all the server can take.
        self.generation_info: Callable[[], gpb.GenerationInfo] | None = None

    # ---------------------------------------------------------------- RPCs
    async def GetModelInfo(
        self, request: pb.ModelInfoRequest | Unparsable, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfoResponse:
        if isinstance(request, Unparsable):
            await _abort(context, RequestError(INVALID, request.message))
        try:
            resp = self.runtime.model_info(request.model)
        except RequestError as e:
            await _abort(context, e)
        except Exception as e:  # a bug of ours: a status code, not UNKNOWN with its text
            logger.error("GetModelInfo failed inside the server", exc_info=e)
            await _abort(
                context,
                RequestError(
                    grpc.StatusCode.INTERNAL,
                    "GetModelInfo failed inside the server; the server log has the details",
                ),
            )
        c = self.config
        limits = resp.limits
        limits.max_message_bytes = c.max_message_bytes
        limits.max_decoded_bytes = c.max_decoded_bytes
        limits.max_batch_size = c.max_batch_size
        limits.chunk_bytes = c.chunk_bytes
        limits.max_in_flight = c.max_in_flight
        limits.max_pending_bytes = c.max_pending_bytes
        limits.chunk_idle_s = c.chunk_idle_s
        limits.max_streams_per_connection = c.max_streams_per_connection
        resp.server_version = __version__
        if self.generation_info is not None:
            resp.generation.CopyFrom(self.generation_info())
        return resp

    async def Infer(
        self, request: pb.InferRequest | Unparsable, context: grpc.aio.ServicerContext
    ) -> pb.InferResponse:
        received = time.perf_counter()
        try:
            if isinstance(request, Unparsable):
                raise RequestError(INVALID, request.message)
            if request.chunked_payload_bytes:
                raise RequestError(INVALID, "chunked payloads are for InferStream only")
            job = self._admit(request, self._client(context), chunked=False, received=received)
        except RequestError as e:
            self._failed(request, e)
            await _abort(context, e)
        try:
            await self._process(job)
        except RequestError as e:
            await _abort(context, e)
        return job.response

    async def InferStream(
        self,
        request_iterator: AsyncIterator[pb.StreamRequest | RawChunk | Unparsable],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StreamResponse | RawChunk]:
        answers: asyncio.Queue[_Answer | None] = asyncio.Queue(STREAM_WINDOW)
        broken: list[RequestError] = []
        # context.read(), not the iterator: grpc's iterator keeps the last message alive
        # while it waits for the next, so a stalled stream would pin a refused message.
        # A host without read() (Ray Serve's replica context) hands over its own iterator.
        readable = callable(getattr(context, "read", None))
        source = _messages(context) if readable else request_iterator
        reader = asyncio.get_running_loop().create_task(
            self._read_stream(source, self._client(context), answers, broken)
        )
        try:
            while (item := await answers.get()) is not None:
                envelope = item if isinstance(item, pb.StreamResponse) else await item
                try:
                    messages = self._response_messages(envelope)
                except Exception as e:  # a bug of ours: this answer fails in-band, alone
                    logger.error("answer %d failed inside the server", envelope.response.id,
                                 exc_info=e)  # fmt: skip
                    error = RequestError(
                        grpc.StatusCode.INTERNAL,
                        f"request {envelope.response.id} failed inside the server; the "
                        "server log has the details",
                    )
                    messages = [_error_envelope(envelope.response.id, error)]
                for msg in messages:
                    yield msg
            if broken:
                self._failed(None, broken[0])
                await _abort(context, broken[0])
        finally:
            reader.cancel()
            while not answers.empty():
                pending = answers.get_nowait()
                if isinstance(pending, asyncio.Task):
                    pending.cancel()

    # ------------------------------------------------------ the one path
    def _admit(
        self,
        request: pb.InferRequest,
        client: str,
        *,
        chunked: bool,
        stream: bool = False,
        received: float | None = None,
    ) -> Job:
        """A slot (and for a chunked request, its announced bytes), then a validated
        ``Job``; nothing is decoded yet. On a stream the response is built inside its
        ``StreamResponse`` envelope, so it is never copied.
        """
        self.admission.acquire(client)
        try:
            job = self.runtime.admit(
                request,
                chunked=chunked,
                max_batch_size=self.config.max_batch_size,
                max_decoded_bytes=self.config.max_decoded_bytes,
                received=received,
                client=client,
            )
            if chunked:
                self.admission.reserve(job.nbytes_in)
                job.reserved = job.nbytes_in
        except RequestError:
            self.admission.release(client)
            raise
        except Exception as e:  # a bug of ours: this request fails, nothing else
            self.admission.release(client)
            raise _internal(request, e) from None
        if stream:
            job.envelope = pb.StreamResponse()
            job.response = job.envelope.response
        return job

    def _release(self, job: Job) -> None:
        """Give back what the job holds: its pending bytes and its slot."""
        if job.reserved:
            self.admission.unreserve(job.reserved)
            job.reserved = 0
        self.admission.release(job.client)

    async def _process(self, job: Job) -> None:
        """Decode, batch, answer an admitted job (its ``response`` is complete on return);
        what it holds is released however it ends.
        """
        try:
            if job.nbytes_in <= INLINE_DECODE_BYTES:  # microseconds: a thread hop costs more
                self.runtime.decode(job)
            else:
                await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.runtime.decode, job
                )
            if job.reserved:  # decoded: its chunk bytes are gone
                self.admission.unreserve(job.reserved)
                job.reserved = 0
            try:
                if self.batcher.idle(job.key):  # runs right here, now: nothing to wait for
                    await self.batcher.submit(job)
                else:
                    async with asyncio.timeout(self.config.request_timeout_s):
                        await self.batcher.submit(job)
            except TimeoutError:
                raise RequestError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"request {job.request.id} waited and ran over the server's limit of "
                    f"{self.config.request_timeout_s:g} s",
                ) from None
            if job.error is not None:
                raise job.error
            self._respond(job)
        except RequestError as e:
            self._failed(job.request, e, job.received)
            raise
        except Exception as e:  # a bug of ours: this request fails, nothing else
            error = _internal(job.request, e)
            self._failed(job.request, error, job.received)
            raise error from None
        finally:
            self._release(job)

    def _respond(self, job: Job) -> None:
        """Complete the job's response (outputs already in place) with the timings."""
        done = time.perf_counter()
        resp = job.response
        resp.id = job.request.id
        t = resp.timing
        t.queue_ms = job.queue_s * 1e3
        t.decode_ms = job.decode_s * 1e3
        t.compute_ms = job.compute_s * 1e3
        t.encode_ms = job.encode_s * 1e3
        t.batch_size = job.batch_size
        t.total_ms = (done - job.received) * 1e3
        self.served += 1
        if self.metrics is not None:
            self.metrics.ok(
                *job.key,
                samples=job.samples,
                total_s=done - job.received,
                queue_s=job.queue_s,
                decode_s=job.decode_s,
                compute_s=job.compute_s,
                encode_s=job.encode_s,
                bytes_in=job.nbytes_in,
                bytes_out=sum(len(o.payload) for o in resp.outputs),
            )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "request %d %s@%s OK batch=%d %.2fms",
                job.request.id,
                *job.key,
                job.batch_size,
                (done - job.received) * 1e3,
            )

    # ---------------------------------------------------------- streams
    async def _read_stream(
        self,
        requests: AsyncIterator[pb.StreamRequest | RawChunk | Unparsable],
        client: str,
        answers: asyncio.Queue[_Answer | None],
        broken: list[RequestError],
    ) -> None:
        """Read requests and chunks in order; queue one answer per request.

        While a request's chunks are arriving, each must come within ``chunk_idle_s``;
        a stall fails the stream and releases what the request held.
        """
        chunks = ChunkReader("request")
        waiting: Job | None = None  # the admitted job whose chunks are arriving
        refused = -1  # id of a chunked request refused at its header: its chunks are dropped
        messages = aiter(requests)
        msg: pb.StreamRequest | RawChunk | Unparsable | None = None
        req: pb.InferRequest | None = None
        try:
            while True:
                # Hold nothing of the last message while waiting for the next: a refused
                # one (however large it parsed to) must not stay pinned by a stalled stream.
                msg = req = None
                try:
                    if waiting is None:
                        msg = await anext(messages)
                    else:
                        async with asyncio.timeout(self.config.chunk_idle_s):
                            msg = await anext(messages)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    assert waiting is not None
                    raise RequestError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"request {waiting.request.id}'s chunks stopped arriving for "
                        f"{self.config.chunk_idle_s:g} s; its bytes were released",
                    ) from None
                kind = msg.WhichOneof("kind")
                if kind == "request" and isinstance(msg, pb.StreamRequest):
                    req = msg.request
                    chunks.check_idle(req.id)
                    refused = -1
                    if not req.chunked_payload_bytes:
                        await answers.put(await self._answer_soon(req, client, None))
                        continue
                    try:
                        waiting = self._admit(req, client, chunked=True, stream=True)
                    except RequestError as e:  # refused: answer in-band, drop its chunks
                        self._failed(req, e)
                        await answers.put(_error_envelope(req.id, e))
                        refused = req.id
                        continue
                    if chunks.start(req.id, req.chunked_payload_bytes, len(req.frontier),
                                    max_total=self.config.max_decoded_bytes):  # fmt: skip
                        waiting.payloads = chunks.take() or ()
                        job, waiting = waiting, None
                        await answers.put(await self._answer_soon(req, client, job))
                elif kind in ("raw_chunk", "chunk") and not isinstance(msg, Unparsable):
                    chunk = msg if isinstance(msg, RawChunk) else msg.chunk
                    if chunk.id == refused and not chunks.busy:
                        continue  # sent before the client read the refusal, or sent anyway
                    if chunks.add(chunk.id, chunk.data):
                        payloads = chunks.take()
                        if waiting is not None and payloads is not None:
                            waiting.payloads = payloads
                            job, waiting = waiting, None
                            await answers.put(await self._answer_soon(job.request, client, job))
                elif isinstance(msg, OutOfBounds) and msg.request_id is not None:
                    # A request far over a count bound, refused unparsed: answered in-band
                    # by its id; chunks that follow it are dropped, as for any refusal.
                    chunks.check_idle(msg.request_id)
                    error = RequestError(INVALID, msg.message)
                    self._failed(None, error)
                    await answers.put(_error_envelope(msg.request_id, error))
                    refused = msg.request_id
                elif isinstance(msg, Unparsable):
                    raise ProtocolError(msg.message)
                else:
                    raise ProtocolError("empty stream message")
            chunks.finish()
        except ProtocolError as e:
            broken.append(RequestError(INVALID, str(e)))
        except RequestError as e:
            broken.append(e)
        except Exception as e:  # a bug of ours: the stream ends with a status, not silently
            logger.error("stream reader failed inside the server", exc_info=e)
            broken.append(
                RequestError(
                    grpc.StatusCode.INTERNAL,
                    "the stream failed inside the server; the server log has the details",
                )
            )
        finally:
            msg = req = None
            if waiting is not None:  # its chunks never completed: give back what it held
                self._release(waiting)
            await answers.put(None)

    async def _answer_soon(self, req: pb.InferRequest, client: str, job: Job | None) -> _Answer:
        """The answer itself when it can be computed right here without waiting (small,
        fast, idle), else a task computing it, so the stream keeps reading meanwhile.
        """
        if job is None:
            try:
                job = self._admit(req, client, chunked=False, stream=True)
            except RequestError as e:
                self._failed(req, e)
                return _error_envelope(req.id, e)
        if job.nbytes_in <= INLINE_DECODE_BYTES and self.batcher.idle(job.key):
            return await self._answer(job)  # never suspends: no task needed
        return asyncio.get_running_loop().create_task(self._answer(job))

    async def _answer(self, job: Job) -> pb.StreamResponse:
        try:
            await self._process(job)
        except RequestError as e:
            return _error_envelope(job.request.id, e)
        assert job.envelope is not None
        return job.envelope

    def _response_messages(self, envelope: pb.StreamResponse) -> list[pb.StreamResponse | RawChunk]:
        """The envelope, and after it the chunks of outputs too large for one message."""
        resp = envelope.response
        payloads = strip_payloads(resp.outputs, self.config.chunk_bytes)
        if payloads is None:
            return [envelope]
        resp.chunked_payload_bytes.extend(len(p) for p in payloads)
        msgs: list[pb.StreamResponse | RawChunk] = [envelope]
        msgs += [RawChunk(resp.id, d) for d in iter_chunks(payloads, self.config.chunk_bytes)]
        return msgs

    # ---------------------------------------------------------- helpers
    def _client(self, context: grpc.aio.ServicerContext) -> str:
        """Who is asking, for fair shares: the bearer token where the server requires
        one (hashed), else the peer address without its port.
        """
        if self.config.tokens:
            for key, value in context.invocation_metadata() or ():
                if key == "authorization":
                    text = value if isinstance(value, str) else bytes(value).decode("latin-1")
                    return "token:" + hashlib.sha256(text.encode()).hexdigest()[:16]
        peer = getattr(context, "peer", None)
        address = peer() if callable(peer) else ""
        return (address or "").rsplit(":", 1)[0]

    def _inline(self, key: tuple[str, str]) -> bool:
        served = self.runtime.models.get(key[0])
        tail_ms = served.tail_ms.get(key[1]) if served is not None else None
        return tail_ms is not None and tail_ms * 1e3 < self.config.inline_tail_us

    def _run(self, jobs: Sequence[Job]) -> None:
        self.runtime.run(jobs)
        if self.metrics is not None:
            self.metrics.executed(*jobs[0].key, sum(j.samples for j in jobs))

    def _labels(self, request: pb.InferRequest | None) -> tuple[str, str]:
        if request is None or isinstance(request, Unparsable):
            return "", ""
        cuts = self._cut_names.get(request.model)
        if cuts is None:
            return "", ""
        return request.model, request.cut if request.cut in cuts else ""

    def _failed(
        self,
        request: pb.InferRequest | Unparsable | None,
        error: RequestError,
        received: float | None = None,
    ) -> None:
        """Count and log (debug) one refused request."""
        model, cut = self._labels(request if isinstance(request, pb.InferRequest) else None)
        if self.metrics is not None:
            self.metrics.failed(model, cut, error.code.name)
        if logger.isEnabledFor(logging.DEBUG):
            rid = request.id if isinstance(request, pb.InferRequest) else "?"
            took = f" {(time.perf_counter() - received) * 1e3:.2f}ms" if received else ""
            logger.debug(
                "request %s %s@%s %s%s: %s",
                rid,
                model or "?",
                cut or "?",
                error.code.name,
                took,
                error.message,
            )


async def _messages(
    context: grpc.aio.ServicerContext,
) -> AsyncIterator[pb.StreamRequest | RawChunk | Unparsable]:
    """The stream's messages, read with ``context.read()``; no reference to one is kept
    here once it has been handed on.
    """
    while True:
        msg = await context.read()
        if msg is grpc.aio.EOF:
            return
        yield msg
        del msg


def _internal(request: pb.InferRequest, error: Exception) -> RequestError:
    """A failure of ours on one request: logged in full, answered without details."""
    logger.error("request %d failed inside the server", request.id, exc_info=error)
    return RequestError(
        grpc.StatusCode.INTERNAL,
        f"request {request.id} failed inside the server; the server log has the details",
    )


def _error_envelope(rid: int, error: RequestError) -> pb.StreamResponse:
    envelope = pb.StreamResponse()
    envelope.response.id = rid
    envelope.response.error.CopyFrom(error.to_pb())
    return envelope


async def _abort(context: grpc.aio.ServicerContext, error: RequestError) -> NoReturn:
    """End the RPC with the error's status code and message."""
    await context.abort(error.code, error.message)
    raise AssertionError("context.abort returned")  # pragma: no cover
