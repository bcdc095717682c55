"""The ``splitnet.v1.SplitInference`` servicer on ``grpc.aio``.

The event loop only moves messages: decoding, the tail and encoding run on the
executor. Admission is bounded (``max_in_flight``): a full server answers
``RESOURCE_EXHAUSTED`` at once instead of queueing silently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Hashable, Sequence
from concurrent.futures import Executor
from typing import Any, NoReturn, cast

import grpc

from cloud.batcher import DynamicBatcher
from cloud.config import ServerConfig
from cloud.metrics import Metrics
from cloud.runtime import RequestError, TailRuntime
from splitnet.errors import CodecError, ProtocolError
from splitnet.v1 import inference_pb2 as pb
from splitnet.v1 import inference_pb2_grpc as pb_grpc
from splitnet.wire import RawChunk, Reassembler, Unparsable, iter_chunks, strip_payloads

logger = logging.getLogger(__name__)

STREAM_WINDOW = 64  # requests of one stream being worked on at once
INLINE_DECODE_BYTES = 64 << 10  # smaller requests are decoded on the event loop


class SplitInferenceService(pb_grpc.SplitInferenceServicer):
    """Answers GetModelInfo, Infer and InferStream for the models in ``runtime``."""

    def __init__(
        self,
        runtime: TailRuntime,
        config: ServerConfig,
        executor: Executor,
        metrics: Metrics | None = None,
    ) -> None:
        self.runtime = runtime
        self.config = config
        self.executor = executor
        self.metrics = metrics
        # Metric labels come from here only: names a client invents are counted as "".
        self._cut_names = {
            name: frozenset(c.name for c in m.graph.cuts) for name, m in runtime.models.items()
        }
        self.batcher = DynamicBatcher(
            self._run_batch,
            executor,
            max_batch_size=config.max_batch_size,
            max_queue_delay_us=config.max_queue_delay_us,
            inline=self._inline,
        )
        self.in_flight = 0
        self.served = 0

    # ---------------------------------------------------------------- RPCs
    async def GetModelInfo(
        self, request: pb.ModelInfoRequest | Unparsable, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfoResponse:
        if isinstance(request, Unparsable):
            await _abort(context, RequestError(grpc.StatusCode.INVALID_ARGUMENT, request.message))
        try:
            resp = self.runtime.model_info(request.model)
        except RequestError as e:
            await _abort(context, e)
        c = self.config
        resp.limits.CopyFrom(
            pb.ServerLimits(
                max_message_bytes=c.max_message_bytes,
                max_decoded_bytes=c.max_decoded_bytes,
                max_batch_size=c.max_batch_size,
                chunk_bytes=c.chunk_bytes,
                max_in_flight=c.max_in_flight,
            )
        )
        from splitnet import __version__

        resp.server_version = __version__
        return resp

    async def Infer(
        self, request: pb.InferRequest | Unparsable, context: grpc.aio.ServicerContext
    ) -> pb.InferResponse:
        if isinstance(request, Unparsable):
            error = RequestError(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            if self.metrics is not None:
                self.metrics.failed("", "", error.code.name)
            logger.debug("request ? INVALID_ARGUMENT: %s", request.message)
            await _abort(context, error)
        if request.chunked_payload_bytes:
            error = RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, "chunked payloads are for InferStream only"
            )
            self._failed(request, error, time.perf_counter())
            await _abort(context, error)
        try:
            return await self._handle(request, None)
        except RequestError as e:
            await _abort(context, e)

    async def InferStream(
        self,
        request_iterator: AsyncIterator[pb.StreamRequest | RawChunk | Unparsable],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StreamResponse | RawChunk]:
        order: asyncio.Queue[asyncio.Task[pb.InferResponse] | None] = asyncio.Queue(STREAM_WINDOW)
        protocol_error: list[str] = []
        reader = asyncio.get_running_loop().create_task(
            self._read_stream(request_iterator, order, protocol_error)
        )
        try:
            while True:
                task = await order.get()
                if task is None:
                    break
                resp = await task
                for msg in self._response_messages(resp):
                    yield msg
            if protocol_error:
                if self.metrics is not None:
                    self.metrics.failed("", "", grpc.StatusCode.INVALID_ARGUMENT.name)
                logger.debug("stream ended: protocol error: %s", protocol_error[0])
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, protocol_error[0])
        finally:
            reader.cancel()
            while not order.empty():
                pending = order.get_nowait()
                if pending is not None:
                    pending.cancel()

    # ------------------------------------------------------------- helpers
    async def _read_stream(
        self,
        requests: AsyncIterator[pb.StreamRequest | RawChunk | Unparsable],
        order: asyncio.Queue[asyncio.Task[pb.InferResponse] | None],
        protocol_error: list[str],
    ) -> None:
        loop = asyncio.get_running_loop()
        header: pb.InferRequest | None = None
        assembler: Reassembler | None = None
        try:
            async for msg in requests:
                kind = msg.WhichOneof("kind")
                if kind == "request" and isinstance(msg, pb.StreamRequest):
                    if header is not None:
                        raise CodecError(
                            f"request {msg.request.id} began before request "
                            f"{header.id}'s chunks were complete"
                        )
                    req = msg.request
                    if req.chunked_payload_bytes:
                        header = req
                        assembler = Reassembler(
                            req.chunked_payload_bytes,
                            len(req.frontier),
                            self.config.max_decoded_bytes,
                        )
                        if assembler.done:
                            await order.put(
                                loop.create_task(self._answer(req, assembler.payloads()))
                            )
                            header = assembler = None
                        continue
                    await order.put(loop.create_task(self._answer(req, None)))
                elif kind in ("raw_chunk", "chunk") and not isinstance(msg, Unparsable):
                    chunk = msg if isinstance(msg, RawChunk) else msg.chunk
                    if header is None or assembler is None or chunk.id != header.id:
                        raise CodecError(f"chunk for request {chunk.id} that was not announced")
                    assembler.add(chunk.data)
                    if assembler.done:
                        await order.put(
                            loop.create_task(self._answer(header, assembler.payloads()))
                        )
                        header = assembler = None
                elif isinstance(msg, Unparsable):
                    raise CodecError(msg.message)
                else:
                    raise CodecError("empty stream message")
            if header is not None:
                raise CodecError(f"stream ended before request {header.id}'s chunks were complete")
        except (CodecError, ProtocolError) as e:
            protocol_error.append(str(e))
        finally:
            await order.put(None)

    async def _answer(
        self, request: pb.InferRequest, payloads: Sequence[bytearray] | None
    ) -> pb.InferResponse:
        """Like ``_handle`` but errors travel in-band (streams keep going)."""
        try:
            return await self._handle(request, payloads)
        except RequestError as e:
            return pb.InferResponse(
                id=request.id, error=pb.Error(code=e.code.value[0], message=e.message)
            )

    async def _handle(
        self, request: pb.InferRequest, payloads: Sequence[bytearray] | None
    ) -> pb.InferResponse:
        received = time.perf_counter()
        try:
            return await self._serve(request, payloads, received)
        except RequestError as e:
            self._failed(request, e, received)
            raise

    def _labels(self, request: pb.InferRequest) -> tuple[str, str]:
        cuts = self._cut_names.get(request.model)
        if cuts is None:
            return "", ""
        return request.model, request.cut if request.cut in cuts else ""

    def _failed(self, request: pb.InferRequest, error: RequestError, received: float) -> None:
        """Count and log (debug) one refused request."""
        model, cut = self._labels(request)
        if self.metrics is not None:
            self.metrics.failed(model, cut, error.code.name)
        logger.debug(
            "request %d %s@%s %s %.2fms: %s",
            request.id,
            model or "?",
            cut or "?",
            error.code.name,
            (time.perf_counter() - received) * 1e3,
            error.message,
        )

    async def _serve(
        self, request: pb.InferRequest, payloads: Sequence[bytearray] | None, received: float
    ) -> pb.InferResponse:
        if self.in_flight >= self.config.max_in_flight:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server is at its limit of {self.config.max_in_flight} requests in flight; retry",
            )
        self.in_flight += 1
        if self.metrics is not None:
            self.metrics.pending.set(self.in_flight)
        try:
            served, cut = self.runtime.lookup(request)
            sizes = (
                [len(p) for p in payloads]
                if payloads is not None
                else [len(t.payload) for t in request.frontier]
            )
            batch = self.runtime.check_frontier(
                request,
                cut,
                sizes,
                max_batch_size=self.config.max_batch_size,
                max_decoded_bytes=self.config.max_decoded_bytes,
            )
            t0 = time.perf_counter()
            if sum(sizes) <= INLINE_DECODE_BYTES:  # microseconds: a thread hop costs more
                frontier = self.runtime.decode_frontier(request, payloads)
            else:
                frontier = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.runtime.decode_frontier, request, payloads
                )
            decoded = time.perf_counter()
            try:
                # asyncio.timeout, not wait_for: no extra task per request.
                async with asyncio.timeout(self.config.request_timeout_s):
                    result = await self.batcher.submit(
                        (served.name, cut.name), (frontier, request.output_codec), batch
                    )
            except TimeoutError:
                raise RequestError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"request {request.id} waited and ran over the server's limit of "
                    f"{self.config.request_timeout_s:g} s",
                ) from None
            except Exception:
                logger.exception(
                    "tail of %s@%s failed on request %d", served.name, cut.name, request.id
                )
                raise RequestError(
                    grpc.StatusCode.INTERNAL,
                    f"the tail failed on request {request.id}; the server log has the details",
                ) from None
            outputs, encode_s = result.value
            done = time.perf_counter()
            self.served += 1
            resp = pb.InferResponse(id=request.id, outputs=outputs)
            resp.timing.CopyFrom(
                pb.ServerTiming(
                    queue_ms=result.queue_s * 1e3,
                    decode_ms=(decoded - t0) * 1e3,
                    compute_ms=result.compute_s * 1e3,
                    encode_ms=encode_s * 1e3,
                    batch_size=result.batch_size,
                    total_ms=(done - received) * 1e3,
                )
            )
            if self.metrics is not None:
                self.metrics.ok(
                    served.name,
                    cut.name,
                    samples=batch,
                    total_s=done - received,
                    queue_s=result.queue_s,
                    decode_s=decoded - t0,
                    compute_s=result.compute_s,
                    encode_s=encode_s,
                    bytes_in=sum(sizes),
                    bytes_out=sum(len(o.payload) for o in outputs),
                )
            logger.debug(
                "request %d %s@%s OK batch=%d %.2fms",
                request.id,
                served.name,
                cut.name,
                result.batch_size,
                (done - received) * 1e3,
            )
            return resp
        finally:
            self.in_flight -= 1
            if self.metrics is not None:
                self.metrics.pending.set(self.in_flight)

    def _inline(self, key: Hashable) -> bool:
        model, cut = cast(tuple[str, str], key)
        tail_ms = self.runtime.models[model].tail_ms.get(cut)
        return tail_ms is not None and tail_ms * 1e3 < self.config.inline_tail_us

    def _run_batch(self, key: Hashable, items: Sequence[Any]) -> list[Any]:
        model, cut = cast(tuple[str, str], key)
        results = self.runtime.run_and_encode(self.runtime.models[model], cut, items)
        if self.metrics is not None:
            self.metrics.executed(model, cut, sum(frontier[0].shape[0] for frontier, _ in items))
        return results

    def _response_messages(self, resp: pb.InferResponse) -> list[pb.StreamResponse | RawChunk]:
        payloads = strip_payloads(resp.outputs, self.config.chunk_bytes)
        if payloads is None:
            return [pb.StreamResponse(response=resp)]
        resp.chunked_payload_bytes.extend(len(p) for p in payloads)
        msgs: list[pb.StreamResponse | RawChunk] = [pb.StreamResponse(response=resp)]
        msgs += [RawChunk(resp.id, d) for d in iter_chunks(payloads, self.config.chunk_bytes)]
        return msgs


async def _abort(context: grpc.aio.ServicerContext, error: RequestError) -> NoReturn:
    """End the RPC with the error's status code and message."""
    await context.abort(error.code, error.message)
    raise AssertionError("context.abort returned")  # pragma: no cover
