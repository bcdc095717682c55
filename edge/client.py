"""``EdgeClient``: run a model's head on the device and its tail on a splitnet server.

    with EdgeClient("127.0.0.1:50051", "digits-cnn", weights="w.safetensors",
                    cut="pool1", codec="int8+zstd:1") as client:
        result = client.infer(x)                 # output + timing breakdown
        for r in client.infer_many(images):      # pipelined over one stream
            ...

Every call has a deadline. ``UNAVAILABLE`` is retried with exponential backoff and
jitter; when the cloud stays unreachable, ``fallback="local"`` runs the whole model
on the device and marks the result ``fallback=True``; ``fallback="error"`` raises
``RemoteError``. The client never hangs on a dead server.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import random
import statistics
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from torch import nn

from edge.auto import DEFAULT_CODECS, AutoPlan, calibrate_agreement
from splitnet.codecs import decode, encode, encode_parts, parse_codec, torch_dtype
from splitnet.errors import ModelMismatchError, RemoteError, SplitNetError
from splitnet.models import fingerprint, load_model, resolve
from splitnet.partition import OUTPUT, trace
from splitnet.planning import LinkEstimate, Prediction
from splitnet.report import sample_input
from splitnet.v1 import inference_pb2 as pb
from splitnet.v1 import inference_pb2_grpc as pb_grpc
from splitnet.wire import (
    CHUNK_BYTES,
    RawChunk,
    Reassembler,
    iter_chunks,
    serialize_stream_message,
    stream_parser,
)

__all__ = ["EdgeClient", "InferResult", "Timing"]

logger = logging.getLogger(__name__)

AUTO = "auto"
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
# RemoteError.code names for which the cloud counts as unreachable (fallback applies).
UNREACHABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


@dataclass
class Timing:
    """Where one request's time went, in milliseconds."""

    edge_ms: float = 0.0  # head on the device
    encode_ms: float = 0.0  # encoding the frontier
    network_ms: float = 0.0  # end-to-end minus everything measured on either side
    queue_ms: float = 0.0  # waiting in the server's batcher
    server_decode_ms: float = 0.0
    cloud_ms: float = 0.0  # the tail on the server (whole batch)
    server_encode_ms: float = 0.0
    decode_ms: float = 0.0  # decoding the outputs on the device
    total_ms: float = 0.0  # head start to outputs decoded
    batch_size: int = 1  # samples in the server's batch
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class InferResult:
    """The model's output for one input, and how it was obtained."""

    output: Any  # a tensor, or a tuple of tensors for several outputs
    cut: str
    codec: str
    timing: Timing = field(default_factory=Timing)
    fallback: bool = False  # True: computed entirely on the device (cloud unreachable)
    prediction: Prediction | None = None  # cut="auto": the plan in force, with its breakdown


class EdgeClient:
    """A device-side client for one model split at one cut."""

    def __init__(
        self,
        target: str,
        model: str | nn.Module,
        *,
        weights: str | Path | None = None,
        input_shape: tuple[int, ...] | None = None,
        cut: str = "input",
        codec: str = "raw",
        output_codec: str = "raw",
        deadline_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.05,
        fallback: str = "error",
        chunk_bytes: int = CHUNK_BYTES,
        window: int = 8,
        model_name: str | None = None,
        reconnect_wait_s: float = 1.0,
        codecs: Sequence[str] = DEFAULT_CODECS,
        link: LinkEstimate | None = None,
        accuracy_budget: float = 0.005,
        calibration: torch.Tensor | None = None,
        edge_slowdown: float = 1.0,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        lb_policy: str | None = None,
    ) -> None:
        if fallback not in ("error", "local"):
            raise ValueError("fallback must be 'error' or 'local'")
        if deadline_s <= 0 or retries < 0 or window < 1 or edge_slowdown < 1:
            raise ValueError(
                "deadline_s must be > 0, retries >= 0, window >= 1, edge_slowdown >= 1"
            )
        if isinstance(model, str):
            spec = resolve(model, input_shape)
            self.model_name = model_name or model
            self.model = load_model(model, weights, input_shape=spec.input_shape)
            self.input_shape = spec.input_shape
        else:
            if input_shape is None or model_name is None:
                raise ValueError("a module needs input_shape and model_name (the server's name)")
            self.model, self.model_name, self.input_shape = model.eval(), model_name, input_shape
        self.target = target
        self.codec = str(parse_codec(codec))
        self.output_codec = str(parse_codec(output_codec))
        self.deadline_s = deadline_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.fallback = fallback
        self.chunk_bytes = chunk_bytes
        self.window = window
        self.reconnect_wait_s = reconnect_wait_s
        self.fingerprint = fingerprint(self.model)
        self.graph = trace(self.model, (sample_input(self.input_shape),))
        self.edge_slowdown = edge_slowdown  # >1 emulates a slower device: head time x F
        # Sent with every call when the server requires a bearer token.
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("a client certificate needs both tls_cert and tls_key")
        self._tls = (tls_ca, tls_cert, tls_key) if tls_ca or tls_cert else None
        # How calls spread over the addresses a target resolves to (see lb_options).
        self.lb_policy = lb_policy or default_lb_policy(target)
        lb_options(self.lb_policy)  # an unknown policy fails here, not at connect
        # cut="auto": planned at connect, re-planned as the link moves (see edge.auto).
        self.auto: AutoPlan | None = None
        self._auto_args: (
            tuple[tuple[str, ...], LinkEstimate | None, float, torch.Tensor | None] | None
        ) = (tuple(codecs), link, accuracy_budget, calibration) if cut == AUTO else None
        self.cut = self.graph.cut("input" if cut == AUTO else cut).name
        self.codec = str(parse_codec(codec))
        self.head, _ = self.graph.split(self.cut)
        self._current = (self.cut, self.codec, self.head)
        self._ids = itertools.count(1)
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.SplitInferenceStub | None = None
        self.server_info: pb.ModelInfo | None = None

    # --------------------------------------------------------- lifecycle
    def __enter__(self) -> EdgeClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Open the channel and check the server serves our model with our weights."""
        options = [
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.keepalive_time_ms", 20_000),  # notice dead links on mobile networks
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.enable_retries", 0),  # retries are ours, with backoff and a deadline
            ("grpc.initial_reconnect_backoff_ms", 100),  # find a restarted server quickly
            ("grpc.max_reconnect_backoff_ms", 2_000),
            *lb_options(self.lb_policy),
        ]
        if self._tls is None:
            self._channel = grpc.insecure_channel(self.target, options=options)
        else:
            ca, cert, key = (Path(p).read_bytes() if p else None for p in self._tls)
            credentials = grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=key, certificate_chain=cert
            )
            self._channel = grpc.secure_channel(self.target, credentials, options=options)
        self._stub = pb_grpc.SplitInferenceStub(self._channel)
        # As generated, but chunk frames skip protobuf's copies (same bytes on the wire).
        self._infer_stream = self._channel.stream_stream(
            "/splitnet.v1.SplitInference/InferStream",
            request_serializer=serialize_stream_message,
            response_deserializer=stream_parser(pb.StreamResponse),
        )
        try:
            self.refresh_info()
            if self._auto_args is not None:
                self._plan()
        except RemoteError as e:
            if self.fallback == "local" and e.code in UNREACHABLE:
                logger.warning("cloud %s unreachable (%s); will fall back to local", self.target, e)
            else:
                self.close()
                raise

    def refresh_info(self) -> pb.ModelInfo:
        """Ask the server about our model; check the fingerprint and the cut."""
        resp = self._call(
            lambda timeout, ready: self._stub_().GetModelInfo(
                pb.ModelInfoRequest(model=self.model_name),
                timeout=timeout,
                wait_for_ready=ready,
                metadata=self._metadata,
            )
        )
        info = resp.models[0]
        if info.fingerprint != self.fingerprint:
            raise ModelMismatchError(
                f"server's {self.model_name} has fingerprint {info.fingerprint[:16]}, ours is "
                f"{self.fingerprint[:16]}: load the same weights on both sides"
            )
        self.server_info = info
        return info

    def _plan(self) -> None:
        assert self._auto_args is not None
        codecs, link, budget, calibration = self._auto_args
        if calibration is None and self.input_shape[1:] == (1, 8, 8):
            from splitnet.data import load_digits

            calibration = load_digits()["val"].x  # the digits model's own validation set
        agreement = (
            calibrate_agreement(self.model, self.graph, calibration, codecs)
            if calibration is not None
            else None
        )
        if link is None:
            rtt = statistics.median(self.probe_rtt() for _ in range(5))
            link = LinkEstimate(up_mbit=100.0, down_mbit=100.0, rtt_ms=rtt)
        assert self.server_info is not None
        self.auto = AutoPlan.build(
            self.graph,
            sample_input(self.input_shape),
            self.server_info,
            codecs=codecs,
            prior=link,
            accuracy_budget=budget,
            agreement=agreement,
            edge_slowdown=self.edge_slowdown,
        )
        self._follow_plan()

    def _follow_plan(self) -> None:
        assert self.auto is not None and self.auto.prediction is not None
        p = self.auto.prediction
        if (p.cut, p.codec) != (self.cut, self.codec):
            self.use(cut=p.cut, codec=self.codec if p.codec == "none" else p.codec)

    def probe_rtt(self) -> float:
        """Round trip (ms) of a request with almost no payload and no compute: the
        model's own outputs sent at the ``output`` cut. It carries every fixed cost of
        a request (network, transport, serving), which a bare ping would miss.
        """
        assert self.server_info is not None
        cut = self.server_info.cuts[-1]
        # Zeros, compressed both ways: a few dozen bytes, whatever the output size.
        request = pb.InferRequest(
            model=self.model_name, cut=cut.name, fingerprint=self.fingerprint, output_codec="zstd:1"
        )
        for spec in cut.frontier:
            zeros = torch.zeros(list(spec.shape), dtype=torch_dtype(spec.dtype))
            request.frontier.append(encode(zeros, "zstd:1"))
        t0 = time.perf_counter()
        self._stub_().Infer(request, timeout=self.deadline_s, metadata=self._metadata)
        return (time.perf_counter() - t0) * 1e3

    def close(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
            self._stub = None

    def _stub_(self) -> pb_grpc.SplitInferenceStub:
        if self._stub is None:
            raise SplitNetError("EdgeClient is not connected: use it as a context manager")
        return self._stub

    def use(self, cut: str | None = None, codec: str | None = None) -> None:
        """Switch to another cut and/or codec for the next requests."""
        new_cut = self.cut if cut is None else self.graph.cut(cut).name
        head = self.head if new_cut == self.cut else self.graph.split(new_cut)[0]
        new_codec = self.codec if codec is None else str(parse_codec(codec))
        # One assignment, read once per request: a pipelined stream never mixes them.
        self._current = (new_cut, new_codec, head)
        self.cut, self.codec, self.head = self._current

    # ---------------------------------------------------------- one call
    def infer(self, x: torch.Tensor) -> InferResult:
        """Run ``x`` (a batch) through head, wire and tail; retry, then fall back if asked."""
        if self.cut == OUTPUT:  # everything on the device: nothing to send
            result = self._local(x, reason=None)
            if self.auto is not None:
                self.auto.planner.observe_edge(OUTPUT, result.timing.edge_ms)
                self.auto.observe_local()
            return result
        t0 = time.perf_counter()
        request = pb.InferRequest()
        timing, _, codec = self._prepare(x, next(self._ids), request)
        sent = time.perf_counter()
        try:
            resp = self._call(
                lambda timeout, ready: self._stub_().Infer(
                    request, timeout=timeout, wait_for_ready=ready, metadata=self._metadata
                )
            )
        except RemoteError as e:
            if self.fallback == "local" and e.code in UNREACHABLE:
                return self._local(x, reason=str(e))
            raise
        return self._learn(self._finish(resp, None, timing, t0, sent, request.cut, codec))

    def _learn(self, result: InferResult, link: bool = True) -> InferResult:
        """Feed the planner (cut="auto") and follow a new plan.

        ``link`` False: the request waited behind others in a pipeline, so its time says
        nothing about the link (only the edge calibration learns from it).
        """
        if self.auto is not None and not link and not result.fallback:
            self.auto.planner.observe_edge(result.cut, result.timing.edge_ms)
            result.prediction = self.auto.prediction
        elif self.auto is not None and not result.fallback:
            t = result.timing
            est = self.auto.estimator.estimate
            self.auto.planner.observe_edge(result.cut, t.edge_ms)
            priced = self.auto.planner.predict(result.cut, result.codec, est)
            # What the cost table does not price: the link and the fixed per-request cost.
            residual = t.total_ms - t.edge_ms - t.encode_ms - t.decode_ms - t.queue_ms
            residual -= priced.decode_ms + priced.cloud_ms
            self.auto.observe(
                residual_ms=residual,
                bytes_up=t.bytes_sent,
                bytes_down=t.bytes_received,
                queue_ms=t.queue_ms,
                probe_rtt=self.probe_rtt,
            )
            result.prediction = self.auto.prediction
            self._follow_plan()
        return result

    def _call(self, fn: Any) -> Any:
        """Call ``fn(timeout, wait_for_ready)`` within the deadline, retrying UNAVAILABLE.

        The first attempt fails fast if the server is down; each retry waits (bounded,
        growing) for the channel to reconnect, so a restarted server is picked up.
        """
        deadline = time.monotonic() + self.deadline_s
        for attempt in itertools.count():
            left = deadline - time.monotonic()
            waiting = attempt > 0
            budget = min(left, self.reconnect_wait_s * 2 ** (attempt - 1)) if waiting else left
            try:
                return fn(max(budget, 0.001), waiting)
            except grpc.RpcError as e:
                code = e.code()
                left = deadline - time.monotonic()
                unreachable = code in RETRYABLE or (
                    waiting and code == grpc.StatusCode.DEADLINE_EXCEEDED
                )
                if unreachable and attempt < self.retries and left > 0:
                    pause = min(self.backoff_s * 2**attempt, 2.0) * (0.5 + random.random())
                    logger.info("%s; retry %d in %.0f ms", code.name, attempt + 1, pause * 1e3)
                    time.sleep(min(pause, max(left, 0)))
                    continue
                if unreachable:
                    raise RemoteError(
                        "UNAVAILABLE",
                        f"cloud {self.target} unreachable after {attempt + 1} attempts: "
                        f"{e.details() or code.name}",
                    ) from None
                raise RemoteError(code.name, e.details() or code.name) from None
        raise AssertionError("unreachable")  # pragma: no cover

    # ---------------------------------------------------------- pipeline
    def infer_many(self, xs: Iterable[torch.Tensor]) -> Iterator[InferResult]:
        """Stream ``xs`` over one ``InferStream`` call, results in order.

        The head and encoding of the next inputs overlap the network and the server:
        up to ``window`` requests are in flight. If the stream breaks, the requests
        without an answer are retried on a fresh stream, then fall back or raise.
        """
        todo = list(xs)
        if self.cut == OUTPUT:  # planned all on the device: nothing to stream
            yield from (self.infer(x) for x in todo)
            return
        done = 0
        attempt = 0
        while done < len(todo):
            try:
                for result in self._stream(todo[done:]):
                    done += 1
                    attempt = 0
                    yield result
            except RemoteError as e:
                if e.code == "UNAVAILABLE" and attempt < self.retries:
                    time.sleep(min(self.backoff_s * 2**attempt, 2.0) * (0.5 + random.random()))
                    attempt += 1
                    continue
                if self.fallback == "local" and e.code in UNREACHABLE:
                    for x in todo[done:]:
                        done += 1
                        yield self._local(x, reason=str(e))
                    return
                raise

    def _stream(self, xs: list[torch.Tensor]) -> Iterator[InferResult]:
        slots = threading.Semaphore(self.window)
        stop = threading.Event()
        prepared: queue.Queue[tuple[int, Timing, float, float, str, str, bool]] = queue.Queue()
        in_flight = [0]  # requests sent and not yet answered

        def requests() -> Iterator[pb.StreamRequest | RawChunk]:
            for x in xs:
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                t0 = time.perf_counter()
                rid = next(self._ids)
                msg = pb.StreamRequest()  # built in place: wrapping would copy the payloads
                timing, payloads, codec = self._prepare(x, rid, msg.request, self.chunk_bytes)
                alone = in_flight[0] == 0  # its timing is its own, not a pipeline wait
                in_flight[0] += 1
                prepared.put((rid, timing, t0, time.perf_counter(), msg.request.cut, codec, alone))
                yield msg
                if payloads is not None:  # views of the payloads, copied once on send
                    for data in iter_chunks(payloads, self.chunk_bytes):
                        yield RawChunk(rid, data)

        # The whole stream may take as long as every request's deadline together.
        call = self._infer_stream(
            requests(), timeout=self.deadline_s * max(1, len(xs)), metadata=self._metadata
        )
        try:
            answered = 0
            assembler: Reassembler | None = None
            pending: pb.InferResponse | None = None
            for msg in call:
                kind = msg.WhichOneof("kind")
                if kind == "response":
                    pending = msg.response
                    if pending.chunked_payload_bytes:
                        assembler = Reassembler(
                            pending.chunked_payload_bytes, len(pending.outputs), 1 << 31
                        )
                        if not assembler.done:
                            continue
                elif assembler is not None and pending is not None:
                    assembler.add(msg.data if kind == "raw_chunk" else msg.chunk.data)
                    if not assembler.done:
                        continue
                else:
                    raise SplitNetError("server sent a chunk nobody announced")
                assert pending is not None
                rid, timing, t0, sent, cut, codec, alone = prepared.get(timeout=self.deadline_s)
                in_flight[0] -= 1
                if pending.id != rid:
                    raise SplitNetError(f"server answered request {pending.id}, expected {rid}")
                payloads = assembler.payloads() if assembler is not None else None
                result = self._learn(
                    self._finish(pending, payloads, timing, t0, sent, cut, codec), link=alone
                )
                assembler = pending = None
                answered += 1
                slots.release()
                yield result
            if answered < len(xs):
                raise RemoteError(
                    "UNAVAILABLE", f"stream ended after {answered} of {len(xs)} answers"
                )
        except grpc.RpcError as e:
            raise RemoteError(e.code().name, e.details() or e.code().name) from None
        finally:
            stop.set()
            call.cancel()

    # ------------------------------------------------------------ pieces
    def _prepare(
        self, x: torch.Tensor, rid: int, request: pb.InferRequest, chunk_bytes: int | None = None
    ) -> tuple[Timing, list[bytes | memoryview] | None, str]:
        """Run the head on ``x`` and fill ``request`` with the encoded frontier; return
        the timing, the payloads left for chunks (or None) and the codec used.

        With ``chunk_bytes`` (streams), payloads larger than that together are left out
        of the request and returned, to be sent as chunks; otherwise None is returned.
        """
        cut, codec, head = self._current
        timing = Timing()
        t0 = time.perf_counter()
        with torch.no_grad():
            frontier = head(x)
        self._slow_down(t0)
        t1 = time.perf_counter()
        request.id = rid
        request.model = self.model_name
        request.cut = cut
        request.fingerprint = self.fingerprint
        request.output_codec = self.output_codec
        parts = [encode_parts(t, codec) for t in frontier]
        request.frontier.extend(header for header, _ in parts)
        payloads = [p for _, p in parts]
        total = sum(len(p) for p in payloads)
        chunked = chunk_bytes is not None and total > chunk_bytes
        if chunked:
            request.chunked_payload_bytes.extend(len(p) for p in payloads)
        else:
            for t, p in zip(request.frontier, payloads, strict=True):
                t.payload = p if isinstance(p, bytes) else p.tobytes()
        t2 = time.perf_counter()
        timing.edge_ms, timing.encode_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3
        timing.bytes_sent = request.ByteSize() + (total if chunked else 0)
        return timing, payloads if chunked else None, codec

    def _finish(
        self,
        resp: pb.InferResponse,
        payloads: list[bytearray] | None,
        timing: Timing,
        t0: float,
        sent: float,
        cut: str,
        codec: str,
    ) -> InferResult:
        received = time.perf_counter()
        if resp.HasField("error"):
            code = grpc.StatusCode(_code_tuple(resp.error.code)).name
            raise RemoteError(code, resp.error.message)
        if payloads is None:
            outputs = [decode(t) for t in resp.outputs]
        else:
            outputs = [decode(t, payload=p) for t, p in zip(resp.outputs, payloads, strict=True)]
        done = time.perf_counter()
        st = resp.timing
        timing.queue_ms, timing.cloud_ms = st.queue_ms, st.compute_ms
        timing.server_decode_ms, timing.server_encode_ms = st.decode_ms, st.encode_ms
        timing.batch_size = st.batch_size
        timing.decode_ms = (done - received) * 1e3
        timing.total_ms = (done - t0) * 1e3
        timing.network_ms = max(0.0, (received - sent) * 1e3 - st.total_ms)
        timing.bytes_received = resp.ByteSize()
        output: Any = outputs[0] if len(outputs) == 1 else tuple(outputs)
        return InferResult(output=output, cut=cut, codec=codec, timing=timing)

    def _local(self, x: torch.Tensor, reason: str | None) -> InferResult:
        """The whole model on the device: planned (``reason`` None) or a fallback."""
        if reason is not None:
            logger.warning("cloud unreachable (%s): running %s locally", reason, self.model_name)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model(x)
        self._slow_down(t0)
        ms = (time.perf_counter() - t0) * 1e3
        timing = Timing(edge_ms=ms, total_ms=ms)
        return InferResult(
            output=out,
            cut=OUTPUT,
            codec="none",
            timing=timing,
            fallback=reason is not None,
            prediction=self.auto.prediction if self.auto is not None else None,
        )

    def _slow_down(self, started: float) -> None:
        """Emulate a device ``edge_slowdown`` times slower than this machine."""
        if self.edge_slowdown > 1:
            time.sleep((time.perf_counter() - started) * (self.edge_slowdown - 1))


def default_lb_policy(target: str) -> str:
    """``round_robin`` for targets that can name several servers, else ``pick_first``.

    A ``dns:///`` name (a Kubernetes headless Service resolves to every ready pod) or an
    ``ipv4:``/``ipv6:`` list gets a connection to each address and calls spread over
    them; gRPC's default, ``pick_first``, would send everything to one pod for as long
    as the connection lives.
    """
    several = target.startswith("dns:") or (target.startswith(("ipv4:", "ipv6:")) and "," in target)
    return "round_robin" if several else "pick_first"


def lb_options(policy: str) -> list[tuple[str, str]]:
    """The channel option that selects a load-balancing policy (a default service config);
    none for ``pick_first``, gRPC's own default.
    """
    if policy not in ("round_robin", "pick_first"):
        raise ValueError(f"lb_policy must be round_robin or pick_first, got {policy!r}")
    if policy == "pick_first":
        return []
    return [("grpc.service_config", json.dumps({"loadBalancingConfig": [{policy: {}}]}))]


def _code_tuple(number: int) -> tuple[int, str]:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.value
    return grpc.StatusCode.UNKNOWN.value
