"""The ``splitnet.v1.SplitGeneration`` servicer: split text generation, one session per stream.

    open ─► session table (capacity checked: fail fast) ─► prefill chunks ─► steps ─► close

Each message states its position; the session's cache says what it must be. Decode
steps of different sessions that are waiting together run as one batched call of their
half (``Segment.forward_batch``: the caches are left-padded into one batch and each
session gets its own new K/V back). Prefill chunks run alone. One group runs at a time,
so a cache is never touched by two threads: on the worker thread, or, for decode groups
measured faster than ``inline_us`` (a tiny model's step), on the event loop itself, where
the two thread hops would cost more than the step. The session's cache is freed when the
stream ends for any reason. Protocol: proto/splitnet/v1/generation.proto.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import torch

from cloud.job import RequestError
from cloud.sessions import ServedLM, Session, SessionTable
from splitnet.codecs import DecodeLimits, accepted_codecs, decode, encode, parse_codec
from splitnet.errors import CodecError, ConfigError, PartitionError
from splitnet.llm import Sampling, next_token, parse_block_cut
from splitnet.v1 import generation_pb2 as gpb
from splitnet.v1 import generation_pb2_grpc as gpb_grpc
from splitnet.wire import Unparsable

__all__ = ["GENERATION_SERVICE", "GenerationService", "StepBatcher"]

logger = logging.getLogger(__name__)

GENERATION_SERVICE = gpb.DESCRIPTOR.services_by_name["SplitGeneration"].full_name
INVALID = grpc.StatusCode.INVALID_ARGUMENT
MAX_CHUNK_TOKENS = 1024  # prefill tokens per message, at most (less when the message limit says)


def max_chunk_tokens(hidden_size: int, max_message_bytes: int) -> int:
    """Most prefill tokens one message may carry: float32 hidden states under the
    message limit (64 KiB left for the rest of the message), at most 1024.
    """
    return max(1, min(MAX_CHUNK_TOKENS, (max_message_bytes - (64 << 10)) // (hidden_size * 4)))


@dataclass(eq=False)
class _Work:
    """One prefill chunk or decode step waiting for the worker."""

    session: Session
    hidden: torch.Tensor  # [1, T, hidden], decoded
    sample: bool  # block.K: pick the next token after this message
    received: float
    future: asyncio.Future[tuple[gpb.GenerateResponse, float]] = field(repr=False)
    started: float = 0.0


def _failure(error: Exception) -> RequestError:
    """What the sessions of a failed group are told (the log has the details)."""
    if isinstance(error, RequestError):
        return error
    logger.error("generation step failed", exc_info=error)
    return RequestError(
        grpc.StatusCode.INTERNAL, "the server failed on this step; its log has the details"
    )


class StepBatcher:
    """Runs prefill chunks and decode steps on one worker; steps waiting together for the
    same half are one batched call.
    """

    def __init__(self, max_batch_size: int, device: str = "cpu", *, inline_us: int = 0) -> None:
        self.max_batch_size = max_batch_size
        self.device = torch.device(device)
        self.inline_us = inline_us  # decode groups measured faster than this run on the loop
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._queue: asyncio.Queue[_Work] | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches: list[int] = []  # sizes of the step batches run (for tests and stats)
        # Measured compute of a decode group, per (half, group size): microseconds, EWMA.
        self._step_us: dict[tuple[int, int], float] = {}
        self.inline_runs = 0  # groups run on the event loop (for tests and stats)
        self._busy = False  # the worker loop is running groups

    async def submit(
        self, work: _Work, *, alone: bool = False
    ) -> tuple[gpb.GenerateResponse, float]:
        """Queue ``work``; returns its result and its encode time (ms). ``alone``: no
        other session is open, so there is nothing to batch it with: a cheap decode step
        then runs at once, here, unless a group is still running or queued.
        """
        if alone and not self._busy and (self._queue is None or self._queue.empty()):
            if self._inline([work]):
                self.inline_runs += 1
                try:
                    return self._run([work])[0]
                except Exception as e:
                    raise _failure(e) from None
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        await self._queue.put(work)
        return await work.future

    async def close(self) -> None:
        """Stop the worker loop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            self._busy = True
            try:
                for group in self._groups(items):
                    try:
                        if self._inline(group):  # cheaper than the two thread hops it saves
                            self.inline_runs += 1
                            results = self._run(group)
                        else:
                            results = await loop.run_in_executor(self.executor, self._run, group)
                    except Exception as e:  # an error belongs to the requests that caused it
                        for w in group:
                            if not w.future.done():
                                w.future.set_exception(_failure(e))
                        continue
                    for w, r in zip(group, results, strict=True):
                        if not w.future.done():
                            w.future.set_result(r)
            finally:
                self._busy = False

    def _groups(self, items: list[_Work]) -> list[list[_Work]]:
        """Prefill chunks alone; single-token steps by half, up to max_batch_size each."""
        groups: list[list[_Work]] = []
        steps: dict[int, list[_Work]] = {}
        for w in items:
            if w.session.closed:
                w.future.cancel()
            elif w.hidden.shape[1] == 1:
                bucket = steps.setdefault(id(w.session.half), [])
                bucket.append(w)
                if len(bucket) == self.max_batch_size:
                    groups.append(steps.pop(id(w.session.half)))
            else:
                groups.append([w])
        groups.extend(steps.values())
        return groups

    def _inline(self, group: list[_Work]) -> bool:
        """Run ``group`` on the event loop? Only decode steps whose group was measured
        under ``inline_us``; prefill chunks and anything unmeasured go to the worker.
        """
        if self.inline_us <= 0 or group[0].hidden.shape[1] != 1:
            return False
        cost = self._step_us.get((id(group[0].session.half), len(group)))
        return cost is not None and cost < self.inline_us

    @torch.inference_mode()
    def _run(self, group: list[_Work]) -> list[tuple[gpb.GenerateResponse, float]]:
        start = time.perf_counter()
        for w in group:
            w.started = start
        segment = group[0].session.half.segment
        xs = torch.cat([w.hidden for w in group]) if len(group) > 1 else group[0].hidden
        xs = xs.to(self.device)
        if len(group) == 1:
            out = segment(xs, group[0].session.state)
        else:
            out = segment.forward_batch(xs, [w.session.state for w in group])
            self.batches.append(len(group))
        out = out.float().cpu()
        half = group[0].session.half
        tokens = [  # the head's choice is compute too: sampling is part of the model's step
            next_token(out[row, -1], w.session.sampling, w.session.length)
            if half.returns_logits and w.sample
            else None
            for row, w in enumerate(group)
        ]
        compute_ms = (time.perf_counter() - start) * 1e3
        if xs.shape[1] == 1:
            key = (id(half), len(group))
            old = self._step_us.get(key)
            us = compute_ms * 1e3
            self._step_us[key] = us if old is None else 0.8 * old + 0.2 * us
        results = []
        for row, w in enumerate(group):
            t0 = time.perf_counter()
            response = gpb.GenerateResponse()  # built in place: no copy when it is sent
            result = response.result
            result.length = w.session.length
            timing = result.timing
            timing.compute_ms = compute_ms
            timing.batch_size = len(group)
            token = tokens[row]
            if token is not None:
                result.token = token
            elif not half.returns_logits:
                result.hidden.CopyFrom(encode(out[row : row + 1].contiguous(), w.session.codec))
            results.append((response, (time.perf_counter() - t0) * 1e3))
        return results


class GenerationService(gpb_grpc.SplitGenerationServicer):
    """Answers GetGenerationInfo and Generate for the language models in ``models``."""

    def __init__(
        self,
        models: Mapping[str, ServedLM],
        table: SessionTable,
        *,
        max_message_bytes: int = 64 << 20,
        device: str = "cpu",
        inline_step_us: int = 0,
    ) -> None:
        self.models = dict(models)
        self.table = table
        self.max_message_bytes = max_message_bytes
        self.batcher = StepBatcher(table.limits.max_batch_size, device, inline_us=inline_step_us)
        self.codecs = accepted_codecs(llm_safe_only=True)
        self._reaper: asyncio.Task[None] | None = None
        self.sessions_opened = 0  # sessions admitted since start

    async def close(self) -> None:
        """Stop the worker and the idle reaper; end every session."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for s in self.table.sessions():
            self.table.end(s, "server stopped")
        await self.batcher.close()

    def start_reaper(self) -> None:
        """End idle sessions in the background (also when their streams are silent)."""
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        period = min(max(self.table.limits.idle_timeout_s / 4, 0.05), 1.0)
        while True:
            await asyncio.sleep(period)
            self.table.expire()

    def banner(self) -> list[str]:
        """One start-up phrase per language model."""
        lim = self.table.limits

        def timed(m: ServedLM) -> str:
            p = m.profile
            return "" if p is None else f", {sum(p.decode_ms) + p.lm_head_ms:.1f} ms a token"

        return [
            f"{m.name} generation ({m.lm.num_layers} blocks, cuts input, block.K and "
            f"block.K:block.M, {lim.max_sessions} sessions x {lim.max_tokens} tokens, "
            f"KV budget {lim.kv_budget_bytes >> 20} MiB{timed(m)})"
            for m in self.models.values()
        ]

    # ------------------------------------------------------------------ info
    def info(self) -> gpb.GenerationInfo:
        """Models, codecs, limits and capacity now."""
        return gpb.GenerationInfo(
            models=[m.to_pb() for m in self.models.values()],
            codecs=list(self.codecs),
            limits=self.table.limits.to_pb(),
            capacity=self.table.capacity(),
        )

    async def GetGenerationInfo(  # noqa: N802 - the proto's name
        self, request: gpb.GenerationInfoRequest, context: grpc.aio.ServicerContext
    ) -> gpb.GenerationInfo:
        """What is served and how much room is left."""
        return self.info()

    # ------------------------------------------------------------- sessions
    async def Generate(  # noqa: N802 - the proto's name
        self,
        request_iterator: AsyncIterator[gpb.GenerateRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[gpb.GenerateResponse]:
        """One session: open, prefill, steps, close (see the proto)."""
        session: Session | None = None
        reason = "dropped"
        requests = request_iterator.__aiter__()
        try:
            while True:
                wait = self.table.limits.idle_timeout_s
                if session is not None:
                    wait = max(self.table.idle_left_s(session), 0.0)
                try:
                    async with asyncio.timeout(wait):  # a timer, not a task per message
                        request = await requests.__anext__()
                except StopAsyncIteration:
                    reason = "half-closed"
                    return
                except TimeoutError:
                    reason = "idle"
                    raise RequestError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"session idle for more than {self.table.limits.idle_timeout_s:g} s: "
                        "its cache was freed; open a new session and send the prefix again",
                    ) from None
                received = time.perf_counter()
                if isinstance(request, Unparsable):
                    raise RequestError(INVALID, "a GenerateRequest that does not parse")
                if session is not None and session.closed:
                    reason = session.end_reason
                    raise RequestError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"session {session.id} ended ({session.end_reason}): its cache was "
                        "freed; open a new session and send the prefix again",
                    )
                kind = request.WhichOneof("kind")
                if kind == "open":
                    if session is not None:
                        raise RequestError(INVALID, "a second open on one stream: one session "
                                           "per Generate stream")  # fmt: skip
                    session = self._open(request.open)
                    self.sessions_opened += 1
                    yield gpb.GenerateResponse(opened=self._opened(session))
                    continue
                if session is None:
                    what = kind or "an empty message"
                    raise RequestError(
                        INVALID,
                        f"{what} before open: the first message of a stream opens the session",
                    )
                self.table.touch(session)
                if kind == "close":
                    reason = "closed"
                    yield gpb.GenerateResponse(closed=gpb.Closed(length=session.length))
                    return
                if kind == "prefill":
                    p = request.prefill
                    response = await self._advance(session, p, received, prefill=True,
                                                   last=p.last)  # fmt: skip
                else:
                    response = await self._advance(session, request.step, received,
                                                   prefill=False, last=True)  # fmt: skip
                yield response
        except RequestError as e:
            if session is not None:
                self.table.end(session, reason if reason != "dropped" else "error")
            await context.abort(e.code, e.message)
        finally:
            if session is not None:
                self.table.end(session, reason)

    def _open(self, o: gpb.OpenSession) -> Session:
        model = self.models.get(o.model)
        if model is None:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"no language model {o.model[:64]!r} here: this server generates with "
                f"{', '.join(sorted(self.models)) or 'none'}",
            )
        try:
            cut = parse_block_cut(o.cut, model.lm.num_layers)
            codec = parse_codec(o.codec or "raw")
            sampling = Sampling(
                temperature=float(o.temperature), top_p=float(o.top_p or 1.0), seed=int(o.seed)
            )
        except (PartitionError, CodecError, ConfigError) as e:
            raise RequestError(INVALID, str(e)) from None
        if o.fingerprint and o.fingerprint != model.fingerprint:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {model.name!r} here has fingerprint {model.fingerprint[:16]}..., the "
                f"client holds {o.fingerprint[:16]}...: load the same weights on both sides",
            )
        if not codec.llm_safe:
            raise RequestError(
                INVALID,
                f"codec {codec} is not safe for language-model hidden states (a few outlier "
                f"channels wreck plain int8): use one of {', '.join(self.codecs)}",
            )
        return self.table.open(model, cut, codec, sampling, int(o.max_tokens))

    @staticmethod
    def _hidden(s: Session, message: gpb.Prefill | gpb.DecodeStep, limit: int) -> torch.Tensor:
        """The message's hidden states, decoded and checked: [1, T, hidden], float32."""
        hidden_size = s.model.lm.hidden_size
        what = "prefill chunk" if isinstance(message, gpb.Prefill) else "step"
        if message.token_ids:
            raise RequestError(INVALID, f"token ids in a {what} at cut {s.cut.name}: only cut "
                               "input takes token ids; send hidden states")  # fmt: skip
        try:
            limits = DecodeLimits(max_rank=3, max_raw_bytes=limit * hidden_size * 8)
            hidden = decode(message.hidden, limits=limits)
        except CodecError as e:
            raise RequestError(
                INVALID, f"hidden states at position {message.position}: {e}"
            ) from None
        n = hidden.shape[1] if hidden.dim() == 3 else 0
        if (
            hidden.dim() != 3
            or hidden.shape[0] != 1
            or hidden.shape[2] != hidden_size
            or not (1 <= n <= limit)
        ):
            raise RequestError(
                INVALID,
                f"hidden states of shape {list(hidden.shape)[:4]}: a {what} carries "
                f"[1, T, {hidden_size}] with 1 <= T <= {limit}",
            )
        if hidden.dtype != torch.float32:
            raise RequestError(INVALID, f"hidden states are {hidden.dtype}: send float32")
        return hidden

    @staticmethod
    def _token_ids(s: Session, message: gpb.Prefill | gpb.DecodeStep, limit: int) -> torch.Tensor:
        """Cut ``input``: the message's token ids as a [1, T] tensor, checked."""
        what = "prefill chunk" if isinstance(message, gpb.Prefill) else "step"
        if message.HasField("hidden"):
            raise RequestError(INVALID, f"hidden states in a {what} at cut input: send "
                               "token_ids (the server embeds them)")  # fmt: skip
        ids = message.token_ids
        if not 1 <= len(ids) <= limit:
            raise RequestError(INVALID, f"{len(ids)} token ids in a {what}: it carries 1 to "
                               f"{limit}")  # fmt: skip
        vocab = s.model.lm.vocab_size
        tensor = torch.tensor(list(ids), dtype=torch.long)[None]
        if int(tensor.max()) >= vocab:
            raise RequestError(INVALID, f"token id {int(tensor.max())} in a {what}: ids are "
                               f"below the vocabulary size {vocab}")  # fmt: skip
        return tensor

    def _opened(self, s: Session) -> gpb.Opened:
        hidden = s.model.lm.hidden_size
        return gpb.Opened(
            session_id=s.id,
            max_tokens=s.max_tokens,
            max_chunk_tokens=max_chunk_tokens(hidden, self.max_message_bytes),
            returns_tokens=s.half.returns_logits,
            model=s.model.to_pb(),
            limits=self.table.limits.to_pb(),
            capacity=self.table.capacity(),
        )

    async def _advance(
        self,
        s: Session,
        message: gpb.Prefill | gpb.DecodeStep,
        received: float,
        *,
        prefill: bool,
        last: bool,
    ) -> gpb.GenerateResponse:
        position = message.position
        hidden_size = s.model.lm.hidden_size
        limit = max_chunk_tokens(hidden_size, self.max_message_bytes) if prefill else 1
        t0 = time.perf_counter()
        if s.cut.token_ids:
            hidden = self._token_ids(s, message, limit)
        else:
            hidden = self._hidden(s, message, limit)
        decode_ms = (time.perf_counter() - t0) * 1e3
        n = hidden.shape[1]
        if s.last is not None and s.last[0] == position and s.last[1] == n:
            return s.last[2]  # a retried message: the same answer, nothing appended
        if position != s.length:  # the caches disagree: the client reopens and replays
            raise RequestError(
                grpc.StatusCode.ABORTED,
                f"position {position}, but session {s.id} holds {s.length} tokens: the next "
                f"message must state position {s.length}",
            )
        if s.length + n > s.max_tokens:
            raise RequestError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"{s.length + n} tokens would pass this session's max_tokens {s.max_tokens}: "
                "open a session with a larger max_tokens",
            )
        loop = asyncio.get_running_loop()
        work = _Work(s, hidden, last, received, loop.create_future())
        response, encode_ms = await self.batcher.submit(work, alone=len(self.table) == 1)
        response.result.position = position
        t = response.result.timing
        t.queue_ms = (work.started - received) * 1e3 - decode_ms
        t.decode_ms = decode_ms
        t.encode_ms = encode_ms
        t.total_ms = (time.perf_counter() - received) * 1e3
        s.last = (position, n, response)
        return response


def generation_handler(service: GenerationService) -> grpc.GenericRpcHandler:
    """The service's method handlers (requests parsed safely: a bad one is INVALID_ARGUMENT)."""
    from splitnet.wire import safe_parser

    handlers = {
        "GetGenerationInfo": grpc.unary_unary_rpc_method_handler(
            service.GetGenerationInfo,
            request_deserializer=safe_parser(gpb.GenerationInfoRequest),
            response_serializer=gpb.GenerationInfo.SerializeToString,
        ),
        "Generate": grpc.stream_stream_rpc_method_handler(
            service.Generate,
            request_deserializer=safe_parser(gpb.GenerateRequest),
            response_serializer=gpb.GenerateResponse.SerializeToString,
        ),
    }
    return grpc.method_handlers_generic_handler(GENERATION_SERVICE, handlers)
