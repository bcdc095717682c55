"""Split text generation from the edge: ``Generator`` runs the edge half of a language model
and one ``SplitGeneration.Generate`` session with the server.

    with Generator("127.0.0.1:50051", GenerateConfig(model="smollm2", cut="block.15")) as g:
        result = g.generate(g.encode("What is the capital of France?"), max_new_tokens=32)
    print(result.text, result.tokens_per_s, result.breakdown())

The edge keeps its own KV cache (and, U-shaped, a second one for its last blocks) and
every hidden state it has sent. When the stream breaks (the server was killed or
restarted, or the session timed out), it reconnects with backoff, opens a new session,
sends everything it had sent before as one prefill, and carries on: with a lossless
codec, greedy tokens are the same as without the fault. Protocol:
proto/splitnet/v1/generation.proto.
"""

from __future__ import annotations

import functools
import logging
import queue
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import torch

from splitnet.codecs import decode, encode, parse_codec
from splitnet.errors import ConfigError, ProtocolError, RemoteError, remote_error
from splitnet.llm import LanguageModel, Sampling, load_lm, next_token, parse_block_cut
from splitnet.llm.halves import EdgeHalf, EdgeState
from splitnet.llm.models import decode_ids, encode_text
from splitnet.v1 import generation_pb2 as gpb

__all__ = ["GenerateConfig", "GenerationResult", "Generator", "TokenTiming"]

logger = logging.getLogger(__name__)

_METHOD = "/splitnet.v1.SplitGeneration/"
MAX_MESSAGE_BYTES = 64 << 20
# The first prefill chunk is sent before the server has said its chunk limit: this much
# float32 fits the message limit of any server with --max-message-mb 1 or more.
FIRST_CHUNK_BYTES = 256 << 10
# Codes after which a new session may succeed (the server restarted, the session idled out).
RECONNECT_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", "ABORTED"})


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """How a ``Generator`` splits the model, samples and talks to the server."""

    model: str  # language model name, the same on both sides: smollm2, hf:DIR, tiny:...
    cut: str = "block.1"  # block.K, or U-shaped block.K:block.M
    codec: str = "raw"  # hidden-state codec both ways: raw, fp16, bf16, int8o[:K] (+zstd)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling mass
    seed: int = 0  # with the position, decides each draw
    chunk_tokens: int | None = None  # prefill tokens per message (None: the server's maximum)
    stop_at_eos: bool = True  # stop after the model's end-of-sequence token
    reconnects: int = 5  # new sessions tried after a broken stream, per generation
    backoff_s: float = 0.1  # first pause before a reconnect; doubles, with jitter
    max_backoff_s: float = 2.0  # longest pause between reconnects
    connect_timeout_s: float = 10.0  # how long opening a session may wait for the server
    token: str | None = field(default=None, repr=False)  # bearer token
    tls_ca: str | Path | None = None  # CA of the server's certificate: TLS on
    tls_cert: str | Path | None = None  # client certificate, for mutual TLS
    tls_key: str | Path | None = None  # client private key, for mutual TLS

    def __post_init__(self) -> None:
        parse_codec(self.codec)  # CodecError names the valid ones
        if not parse_codec(self.codec).llm_safe:
            raise ConfigError(
                f"codec {self.codec!r} is not safe for language-model hidden states: use raw, "
                "fp16, bf16 or int8o (outlier channels in fp16)"
            )
        Sampling(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ConfigError("chunk_tokens must be at least 1")
        if self.reconnects < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ConfigError("reconnects, backoff_s and max_backoff_s must be >= 0")

    @property
    def sampling(self) -> Sampling:
        """The sampling settings."""
        return Sampling(temperature=self.temperature, top_p=self.top_p, seed=self.seed)


@dataclass(frozen=True)
class TokenTiming:
    """Where one decode step's time went, in milliseconds, and its bytes."""

    edge_ms: float  # the edge's blocks (and head, U-shaped)
    encode_ms: float  # encoding the hidden state (and decoding the answer's)
    network_ms: float  # round trip minus the server's time
    queue_ms: float  # waiting on the server for its batch
    compute_ms: float  # the server's blocks (decode and encode included)
    total_ms: float  # the whole step, as the edge saw it
    bytes_up: int  # request message size
    bytes_down: int  # response message size
    batch_size: int  # sessions the server ran this step with
    round_trip_ms: float = 0.0  # message sent -> answer received
    server_blocks_ms: float = 0.0  # the server's blocks (and head) alone, for its batch


@dataclass
class GenerationResult:
    """What ``Generator.generate`` produced and how long it took."""

    tokens: list[int]  # generated ids (the end-of-sequence token included, as generate())
    text: str  # their text ("" without a tokenizer)
    prompt_tokens: int
    ttft_s: float  # start -> first token (prefill included)
    total_s: float  # start -> last token
    steps: list[TokenTiming] = field(default_factory=list)  # one per decode step
    prefill_bytes: int = 0  # bytes up and down for the prefill
    reconnects: int = 0  # new sessions opened after a broken stream

    @property
    def tokens_per_s(self) -> float:
        """Decode rate: tokens after the first, per second after the first."""
        decode_s = self.total_s - self.ttft_s
        return (len(self.tokens) - 1) / decode_s if len(self.tokens) > 1 and decode_s > 0 else 0.0

    @property
    def bytes_per_token(self) -> float:
        """Mean bytes up + down per decode step."""
        if not self.steps:
            return 0.0
        return sum(s.bytes_up + s.bytes_down for s in self.steps) / len(self.steps)

    def breakdown(self) -> dict[str, float]:
        """Mean milliseconds per decode step: edge, encode, network, cloud queue and compute."""
        n = max(len(self.steps), 1)
        keys = ("edge_ms", "encode_ms", "network_ms", "queue_ms", "compute_ms", "total_ms")
        return {k: sum(getattr(s, k) for s in self.steps) / n for k in keys}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (what ``splitnet-edge generate --json`` prints)."""
        return {
            "tokens": self.tokens,
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "ttft_s": self.ttft_s,
            "total_s": self.total_s,
            "tokens_per_s": self.tokens_per_s,
            "bytes_per_token": self.bytes_per_token,
            "prefill_bytes": self.prefill_bytes,
            "reconnects": self.reconnects,
            "per_token_ms": self.breakdown(),
            "steps": [asdict(s) for s in self.steps],
        }


class _Broken(Exception):
    """The stream ended; a new session may continue (``error`` says why)."""

    def __init__(self, error: RemoteError) -> None:
        super().__init__(str(error))
        self.error = error


class _Session:
    """One Generate stream: send a message, read its answer."""

    def __init__(self, call: Callable[..., Any], metadata: Any) -> None:
        # SimpleQueue: C-implemented, no condition variable on the per-token path
        self._requests: queue.SimpleQueue[gpb.GenerateRequest | None] = queue.SimpleQueue()
        self._responses: Iterator[gpb.GenerateResponse] = call(
            iter(self._requests.get, None), metadata=metadata
        )
        self.opened: gpb.Opened | None = None

    def ask(self, request: gpb.GenerateRequest) -> gpb.GenerateResponse:
        self.send(request)
        return self.receive()

    def send(self, request: gpb.GenerateRequest) -> None:
        """Queue a message without waiting for an answer (answers come in order)."""
        self._requests.put(request)

    def receive(self) -> gpb.GenerateResponse:
        """The next answer on the stream."""
        try:
            return next(self._responses)
        except StopIteration:
            raise _Broken(remote_error("UNAVAILABLE", "the server ended the stream")) from None
        except grpc.RpcError as e:
            code = e.code().name if hasattr(e, "code") else "UNKNOWN"
            details = e.details() if hasattr(e, "details") else str(e)
            error = remote_error(code, details or code)
            if code in RECONNECT_CODES:
                raise _Broken(error) from None
            raise error from None

    def close(self) -> None:
        self._requests.put(None)
        cancel = getattr(self._responses, "cancel", None)
        if cancel is not None:
            cancel()


class Generator:
    """The edge half of a language model and its sessions with one server."""

    def __init__(
        self,
        server: str,
        config: GenerateConfig,
        *,
        lm: LanguageModel | None = None,
        rng: random.Random | None = None,
        bundle: str | Path | None = None,
        bundle_key: bytes | None = None,
    ) -> None:
        self.server = server
        self.config = config
        if bundle is not None:  # only the edge half, from `splitnet export` (no checkpoint)
            if lm is not None:
                raise ConfigError("give lm or bundle, not both")
            from splitnet.llm.bundle import load_edge

            held = load_edge(bundle, bundle_key, model=config.model, cut=config.cut,
                             codec=config.codec)  # fmt: skip
            lm, self.edge, self.cut = held.lm, held.edge, held.edge.cut
            self.fingerprint = held.bundle.fingerprint  # the whole model's, at export
        else:
            lm = lm if lm is not None else load_lm(config.model)
            self.fingerprint = lm.fingerprint  # sent at open: the server refuses others
            self.cut = parse_block_cut(config.cut, lm.num_layers)
            self.edge = EdgeHalf(lm, self.cut)  # only the edge's modules are kept
        # Only the edge's modules and the tokenizer are kept: when the model was loaded
        # here, the server's blocks are freed with ``lm``.
        self.tokenizer = lm.tokenizer
        self.vocab_size = lm.vocab_size
        self.hidden_size = lm.hidden_size
        self.eos = frozenset(lm.eos_token_ids) if config.stop_at_eos else frozenset()
        self.codec = parse_codec(config.codec)
        self._rng = rng or random.Random()
        self._chunk_limit: int | None = None  # the least max_chunk_tokens a session gave
        self._channel: grpc.Channel | None = None
        self._call: Any = None
        self.metadata = (("authorization", f"Bearer {config.token}"),) if config.token else None

    # ------------------------------------------------------------ channel
    def __enter__(self) -> Generator:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        """Open the channel (connections are made on the first call)."""
        if self._channel is not None:
            return
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.enable_retries", 0),  # reconnects are ours: a new session and a replay
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ]
        c = self.config
        if c.tls_ca or c.tls_cert:
            for p in (c.tls_ca, c.tls_cert, c.tls_key):
                if p is not None and not Path(p).is_file():
                    raise ConfigError(f"TLS file {str(p)!r} does not exist or is not a file")
            ca, cert, key = (
                Path(p).read_bytes() if p else None for p in (c.tls_ca, c.tls_cert, c.tls_key)
            )
            creds = grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=key, certificate_chain=cert
            )
            self._channel = grpc.secure_channel(self.server, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(self.server, options=options)
        self._call = self._channel.stream_stream(
            _METHOD + "Generate",
            request_serializer=gpb.GenerateRequest.SerializeToString,
            response_deserializer=gpb.GenerateResponse.FromString,
            _registered_method=True,
        )
        self._info = self._channel.unary_unary(
            _METHOD + "GetGenerationInfo",
            request_serializer=gpb.GenerationInfoRequest.SerializeToString,
            response_deserializer=gpb.GenerationInfo.FromString,
            _registered_method=True,
        )

    def close(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def info(self, timeout_s: float = 10.0) -> gpb.GenerationInfo:
        """The server's models, codecs, limits and free capacity."""
        self.open()
        try:
            info: gpb.GenerationInfo = self._info(
                gpb.GenerationInfoRequest(), timeout=timeout_s, metadata=self.metadata,
                wait_for_ready=True,
            )  # fmt: skip
            return info
        except grpc.RpcError as e:
            raise remote_error(e.code().name, e.details() or "") from None

    # ---------------------------------------------------------- generation
    def encode(self, text: str, *, chat: bool = True) -> list[int]:
        """Token ids of ``text`` (a one-turn chat prompt when the model has a template)."""
        return encode_text(self.tokenizer, self.config.model, text, chat=chat)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` ("" without a tokenizer)."""
        return decode_ids(self.tokenizer, ids)

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int = 64,
        *,
        on_token: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` after ``prompt_ids``; ``on_token`` is called
        with each id as it arrives.
        """
        if not prompt_ids:
            raise ConfigError("the prompt needs at least one token")
        if max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be at least 1")
        self.open()
        run = _Run(self, list(prompt_ids), max_new_tokens, on_token)
        try:
            return run.go()
        finally:
            run.end()


class _Run:
    """One ``generate`` call: the edge's caches, what was sent, the current session."""

    def __init__(
        self,
        gen: Generator,
        prompt: list[int],
        max_new_tokens: int,
        on_token: Callable[[int], None] | None,
    ) -> None:
        self.gen = gen
        self.prompt = prompt
        self.max_new = max_new_tokens
        self.on_token = on_token
        self.state: EdgeState = gen.edge.new_state()
        self.sent: list[torch.Tensor] = []  # hidden states at the cut, every position sent
        self.session: _Session | None = None
        self.reconnects = 0
        self.prefill_bytes = 0

    # -- the loop
    @torch.inference_mode()
    def go(self) -> GenerationResult:
        gen = self.gen
        start = time.perf_counter()
        hidden = gen.edge.front(torch.tensor([self.prompt]), self.state.front)
        self.sent.append(hidden)
        answer = self._with_reconnects(self._prefill, step=False)
        tokens: list[int] = []
        steps: list[TokenTiming] = []
        ttft = 0.0
        while True:
            token = self._token_from(answer, position=len(self.prompt) + len(tokens))
            tokens.append(token)
            if not ttft:
                ttft = time.perf_counter() - start
            if self.on_token is not None:
                self.on_token(token)
            if token in gen.eos or len(tokens) == self.max_new:
                break
            position = len(self.prompt) + len(tokens) - 1
            t0 = time.perf_counter()
            hidden = gen.edge.front(torch.tensor([[token]]), self.state.front)
            edge_ms = (time.perf_counter() - t0) * 1e3
            self.sent.append(hidden)
            answer, timing = self._with_reconnects(
                functools.partial(self._step, position, hidden), step=True
            )
            if timing is not None:  # None: answered by a replay after a fault
                timing["edge_ms"] += edge_ms
                timing["total_ms"] += edge_ms
                steps.append(TokenTiming(**timing))
        total = time.perf_counter() - start
        self._close(polite=True)
        return GenerationResult(
            tokens=tokens,
            text=gen.decode(tokens),
            prompt_tokens=len(self.prompt),
            ttft_s=ttft,
            total_s=total,
            steps=steps,
            prefill_bytes=self.prefill_bytes,
            reconnects=self.reconnects,
        )

    def _token_from(self, answer: Any, position: int) -> int:
        """The next token: the server's (block.K), or sampled here from the edge's tail."""
        if isinstance(answer, int):
            return answer
        return next_token(answer[0, -1], self.gen.config.sampling, position)

    # -- messages
    def _open_request(self) -> gpb.GenerateRequest:
        gen, c = self.gen, self.gen.config
        o = gpb.OpenSession(
            model=c.model, cut=gen.cut.name, codec=str(gen.codec),
            max_tokens=len(self.prompt) + self.max_new,
            temperature=c.temperature, top_p=c.top_p, seed=c.seed,
            fingerprint=gen.fingerprint,
        )  # fmt: skip
        return gpb.GenerateRequest(open=o)

    def _opened(self, reply: gpb.GenerateResponse) -> gpb.Opened:
        if reply.WhichOneof("kind") != "opened":
            raise ProtocolError(f"the server answered open with {reply.WhichOneof('kind')}")
        if reply.opened.returns_tokens == self.gen.cut.u_shaped:
            raise ProtocolError("the server's half does not match the cut")
        return reply.opened

    def _chunk(self, everything: torch.Tensor, start: int, stop: int) -> gpb.GenerateRequest:
        piece = everything[:, start:stop].contiguous()
        last = stop >= everything.shape[1]
        if self.gen.cut.token_ids:  # cut input: the ids themselves
            prefill = gpb.Prefill(position=start, token_ids=piece[0].tolist(), last=last)
        else:
            prefill = gpb.Prefill(position=start, hidden=encode(piece, self.gen.codec),
                                  last=last)  # fmt: skip
        return gpb.GenerateRequest(prefill=prefill)

    def _prefill(self) -> Any:
        """(Re)open a session and send every hidden state sent so far; returns the answer
        for the last position: a token (block.K) or the edge tail's logits (U-shaped).

        Nothing waits for a round trip it does not need: the first chunk goes right
        behind the open, the rest as soon as the open's answer gives the server's chunk
        limit, and the answers are read after. Until a session has told this generator
        the limit, the first chunk holds what any server takes (``FIRST_CHUNK_BYTES`` of
        float32); a server that takes less gets the prefill again, within its limit.
        """
        gen = self.gen
        self._close()
        session = self.session = _Session(gen._call, gen.metadata)
        everything = torch.cat(self.sent, dim=1)
        total = everything.shape[1]
        wanted = gen.config.chunk_tokens or total
        known = gen._chunk_limit
        first = min(total, wanted, known or max(1, FIRST_CHUNK_BYTES // (4 * gen.hidden_size)))
        sizes: list[int] = []  # bytes of each chunk sent

        def send(start: int, stop: int) -> None:
            request = self._chunk(everything, start, stop)
            sizes.append(request.ByteSize())
            session.send(request)

        session.send(self._open_request())
        send(0, first)
        opened = session.opened = self._opened(session.receive())
        # The least limit seen: behind a balancer of unlike servers, each retry lowers it,
        # so retries end.
        gen._chunk_limit = min(known or opened.max_chunk_tokens, opened.max_chunk_tokens)
        if first > opened.max_chunk_tokens:  # the chunk sent is over this server's limit
            return self._prefill()  # the limit is known now: once more, within it
        limit = min(opened.max_chunk_tokens, wanted)
        starts = [0, *range(first, total, limit)]
        for start in starts[1:]:
            send(start, min(start + limit, total))
        outs: list[torch.Tensor] = []
        token: int | None = None
        for i, start in enumerate(starts):
            reply = session.receive()
            stop = starts[i + 1] if i + 1 < len(starts) else total
            self.prefill_bytes += reply.ByteSize() + sizes[i]
            result = self._result(reply, start)
            if result.WhichOneof("output") == "hidden":
                outs.append(decode(result.hidden))
            elif stop >= total and result.WhichOneof("output") == "token":
                token = result.token
        if not self.gen.cut.u_shaped:
            if token is None:
                raise ProtocolError("the last prefill chunk's answer carries no token")
            return token
        back = self.state.back
        assert back is not None
        rows = torch.cat(outs, dim=1)[:, back.length :]  # what the edge's tail has not seen
        return self.gen.edge.finish(rows, self.state)

    def _step(self, position: int, hidden: torch.Tensor) -> tuple[Any, dict[str, Any]]:
        assert self.session is not None
        t0 = time.perf_counter()
        if self.gen.cut.token_ids:  # cut input: the id itself
            step = gpb.DecodeStep(position=position, token_ids=hidden[0].tolist())
        else:
            step = gpb.DecodeStep(position=position, hidden=encode(hidden, self.gen.codec))
        req = gpb.GenerateRequest(step=step)
        t1 = time.perf_counter()
        reply = self.session.ask(req)
        t2 = time.perf_counter()
        result = self._result(reply, position)
        encode_ms = (t1 - t0) * 1e3
        edge_ms = 0.0
        answer: Any
        if result.WhichOneof("output") == "token":
            answer = result.token
        elif result.WhichOneof("output") == "hidden":
            t3 = time.perf_counter()
            back_in = decode(result.hidden)
            t4 = time.perf_counter()
            answer = self.gen.edge.finish(back_in, self.state)
            encode_ms += (t4 - t3) * 1e3
            edge_ms = (time.perf_counter() - t4) * 1e3
        else:
            raise ProtocolError(f"the answer at position {position} carries no output")
        st = result.timing
        round_ms = (t2 - t1) * 1e3
        timing = {
            "edge_ms": edge_ms,
            "encode_ms": encode_ms,
            "network_ms": max(round_ms - st.total_ms, 0.0),
            "queue_ms": st.queue_ms,
            "compute_ms": st.compute_ms + st.decode_ms + st.encode_ms,
            "total_ms": (time.perf_counter() - t0) * 1e3,
            "bytes_up": req.ByteSize(),
            "bytes_down": reply.ByteSize(),
            "batch_size": st.batch_size,
            "round_trip_ms": round_ms,
            "server_blocks_ms": st.compute_ms,
        }
        return answer, timing

    def _result(self, reply: gpb.GenerateResponse, position: int) -> gpb.StepResult:
        if reply.WhichOneof("kind") != "result" or reply.result.position != position:
            raise ProtocolError(
                f"expected the result for position {position}, got {reply.WhichOneof('kind')} "
                f"for position {reply.result.position}"
            )
        return reply.result

    # -- faults
    def _with_reconnects(self, fn: Callable[[], Any], *, step: bool) -> Any:
        """``fn()``; after a broken stream, a new session replays the prefix, then the
        message is answered by the replay itself (its last position is the pending one).
        """
        c = self.gen.config
        try:
            return fn()
        except _Broken as e:
            error = e.error
        for attempt in range(c.reconnects):
            pause = min(c.backoff_s * 2**attempt, c.max_backoff_s) * (0.5 + self.gen._rng.random())
            logger.warning("stream broken (%s); new session in %.2f s", error.code, pause)
            time.sleep(pause)
            self.reconnects += 1
            try:
                answer = self._prefill()
            except _Broken as e:
                error = e.error
                continue
            if not step:
                return answer
            return answer, None  # the replay answered the pending step: no step timing
        raise error

    def _close(self, *, polite: bool = False) -> None:
        """End the session; ``polite``: say so first (the server answers ``closed``)."""
        if self.session is None:
            return
        if polite:
            try:
                self.session.ask(gpb.GenerateRequest(close=gpb.CloseSession()))
            except (_Broken, RemoteError) as e:  # the tokens are in hand: only log it
                logger.debug("close: %s", e)
        self.session.close()
        self.session = None

    def end(self) -> None:
        self._close()
