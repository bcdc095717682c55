"""``EdgeClient``: run a model's head on the device and its tail on a splitnet server.

    with EdgeClient("127.0.0.1:50051", "digits-cnn", weights="w.safetensors",
                    cut="pool1", codec="int8+zstd:1") as client:
        result = client.infer(x)                 # output + timing breakdown
        for r in client.infer_many(images):      # pipelined over one stream, lazily
            ...

Settings are one ``EdgeConfig`` (``config=``, or its fields as keywords). Every call has
a deadline. ``UNAVAILABLE`` is retried with exponential backoff and jitter (and
``RESOURCE_EXHAUSTED`` with ``retry_busy``); when the cloud stays unreachable,
``fallback="local"`` runs the whole model on the device and marks the result
``fallback=True``; ``fallback="error"`` raises ``UnavailableError``. The client never
hangs on a dead server. It follows the limits the server publishes: message and
chunk size, batch size, and requests in flight.

The parts: ``edge.config`` (settings), ``edge.transport`` (channel, retries, errors),
``edge.route`` (the request bytes of a cut and codec), ``edge.stream`` (the pipelined
stream), ``edge.auto`` (planning), ``edge.model`` (what the device holds).
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields, replace
from typing import Any, Unpack

import grpc
import torch
from torch import nn

from edge.auto import AutoPlan
from edge.config import EdgeConfig, EdgeOptions
from edge.model import DeviceModel, SlowerDevice
from edge.results import InferResult, Timing
from edge.route import Route, as_stream_request
from edge.stream import Lane, LaneBroken, StreamCall, code_name, outputs_per_sample, response_bound
from edge.transport import UNREACHABLE, RetryPolicy, Transport, default_lb_policy, lb_options
from splitnet.codecs import decode, encode, parse_codec, torch_dtype
from splitnet.errors import (
    ConfigError,
    ModelMismatchError,
    ProtocolError,
    RemoteError,
    remote_error,
)
from splitnet.partition import OUTPUT
from splitnet.report import sample_input
from splitnet.v1 import inference_pb2 as pb

__all__ = [
    "EdgeClient",
    "EdgeConfig",
    "InferResult",
    "Timing",
    "default_lb_policy",
    "lb_options",
]

logger = logging.getLogger(__name__)

_CONFIG_FIELDS = frozenset(f.name for f in fields(EdgeConfig)) - {"cut", "codec"}
UNARY_MARGIN = 4096  # bytes of a message besides the payloads: over the limit, use a stream
# Settings that may change on a live client (configure); the rest shape what it built.
LIVE = frozenset(
    {"deadline_s", "retries", "backoff_s", "max_backoff_s", "reconnect_wait_s", "retry_busy",
     "fallback", "window"}
)  # fmt: skip


class EdgeClient:
    """A device-side client for one model split at one cut."""

    def __init__(
        self,
        target: str,
        model: str | nn.Module | None = None,
        *,
        config: EdgeConfig | None = None,
        **options: Unpack[EdgeOptions],
    ) -> None:
        if options:
            names = {f.name for f in fields(EdgeConfig)}
            unknown = sorted(set(options) - names)
            if unknown:
                raise TypeError(f"EdgeClient got unknown settings: {', '.join(unknown)}")
            config = replace(config or EdgeConfig(), **options)  # keywords override config
        self.config = config = config or EdgeConfig()
        self.target = target
        if config.bundle is not None:
            if model is not None and not isinstance(model, str):
                raise ConfigError(
                    "with a bundle, the model is the bundle's (give its name or None)"
                )
            self.device = DeviceModel.from_bundle(config.bundle, _bundle_key(config), model)
            if config.model_name is not None:
                self.device.name = config.model_name
        elif model is None:
            raise ConfigError("EdgeClient needs a model (a name or a module) or a bundle")
        else:
            self.device = DeviceModel.load(
                model,
                model_name=config.model_name,
                input_shape=config.input_shape,
                weights=config.weights,
            )
        allowed = self.device.codecs
        if allowed is not None:  # a bundle names the codecs it may be used with
            if config.codec not in allowed:
                raise ConfigError(
                    f"codec {config.codec} is not one this bundle allows: {', '.join(allowed)}"
                )
            if config.auto:
                kept = tuple(c for c in config.codecs if c in allowed) or ("raw",)
                self.config = config = replace(config, codecs=kept)
        if config.fallback == "local" and not self.device.can_run_whole:
            raise ConfigError(
                "fallback='local' runs the whole model, but this device holds only heads "
                f"({self.device.source}); export the bundle with --whole, or use fallback='error'"
            )
        self.transport = Transport(target, config)
        self.auto: AutoPlan | None = None
        self.server_info: pb.ModelInfo | None = None
        self.limits: pb.ServerLimits | None = None
        self._ids = itertools.count(1)
        self._window = config.window
        self._chunk_bytes = config.chunk_bytes
        self._max_message = 64 << 20
        self._max_batch = 0  # 0: no limit known
        self._response_bound = response_bound(1 << 20)
        self._lane: Lane | None = None  # the open stream ``infer`` sends on
        # --edge-slowdown: a device that many times slower, emulated (edge/model.py)
        self._slower = SlowerDevice.of(config.edge_slowdown) if config.edge_slowdown > 1 else None
        self._calibrate_device()
        first = self.device.first_cut() if config.auto else config.cut
        self._route = self._make_route(self.device.cut(first).name, config.codec)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _CONFIG_FIELDS:  # ``client.retries = 5`` would silently do nothing
            raise ConfigError(
                f"{name} is a setting: use client.configure({name}=...) on a live client, "
                "or build the client with it"
            )
        object.__setattr__(self, name, value)

    # ------------------------------------------------------- the model
    @property
    def model(self) -> nn.Module:
        """The whole model; ``ConfigError`` when the device holds only heads."""
        if self.device.whole is None:
            raise ConfigError(f"this device holds only heads ({self.device.source})")
        return self.device.whole

    @property
    def graph(self) -> Any:
        """The traced model (``SplitGraph``): every cut and its frontier."""
        return self.device.graph

    @property
    def model_name(self) -> str:
        """The server's name for the model."""
        return self.device.name

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The model's example input shape, with batch."""
        return self.device.input_shape

    @property
    def fingerprint(self) -> str:
        """The whole model's fingerprint, sent with every request."""
        return self.device.fingerprint

    @property
    def cut(self) -> str:
        """The cut requests use now."""
        return self._route.cut

    @property
    def codec(self) -> str:
        """The frontier codec requests use now."""
        return self._route.codec

    @property
    def head(self) -> nn.Module:
        """The head of the current cut."""
        return self._route.head

    @property
    def lb_policy(self) -> str:
        """How calls spread over the addresses the target resolves to."""
        return self.transport.lb_policy

    def _make_route(self, cut: str, codec: str) -> Route:
        return Route.build(
            model=self.device.name,
            cut=cut,
            fingerprint=self.device.fingerprint,
            output_codec=self.config.output_codec,
            codec=codec,
            head=self.device.head(cut),
        )

    def use(self, cut: str | None = None, codec: str | None = None) -> None:
        """Switch to another cut and/or codec for the next requests."""
        new_cut = self._route.cut if cut is None else self.device.cut(cut).name
        new_codec = self._route.codec if codec is None else str(parse_codec(codec))
        if (new_cut, new_codec) != (self._route.cut, self._route.codec):
            self._route = self._make_route(new_cut, new_codec)  # one assignment

    def configure(self, **changes: Any) -> None:
        """Change retry, deadline, fallback or window settings of a live client."""
        fixed = sorted(set(changes) - LIVE)
        if fixed:
            raise ConfigError(
                f"{', '.join(fixed)} cannot change on a live client (build a new EdgeClient); "
                f"these can: {', '.join(sorted(LIVE))}"
            )
        self.config = replace(self.config, **changes)
        if self.config.fallback == "local" and not self.device.can_run_whole:
            raise ConfigError("fallback='local' needs the whole model on the device")
        self.transport.policy = RetryPolicy.from_config(self.config)
        self._apply_limits()

    # --------------------------------------------------------- lifecycle
    def __enter__(self) -> EdgeClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Open the channel; check the server serves our model with our weights; plan."""
        self.transport.open()
        try:
            self.refresh_info()
            if self.config.auto:
                self.auto = AutoPlan.at_connect(
                    self.config,
                    self.device,
                    self._server_info(),
                    sample_input(self.device.input_shape),
                    self.probe_rtt,
                    self.emulated_warm_ms(),
                )
                self._follow_plan()
        except RemoteError as e:
            if self.config.fallback == "local" and e.code in UNREACHABLE:
                logger.warning("cloud %s unreachable (%s); will fall back to local", self.target, e)
            else:
                self.close()
                raise
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the stream and the channel."""
        if self._lane is not None:
            self._drop_lane(self._lane)
        self.transport.close()

    def refresh_info(self) -> pb.ModelInfo:
        """Ask the server about our model; check the fingerprint; adopt its limits."""
        resp = self.transport.model_info(self.device.name)
        if len(resp.models) != 1:
            raise RemoteError("UNKNOWN", f"GetModelInfo answered {len(resp.models)} models, not 1")
        info = resp.models[0]
        if info.fingerprint != self.device.fingerprint:
            raise ModelMismatchError(
                f"server's {self.device.name} has fingerprint {info.fingerprint[:16]}, ours is "
                f"{self.device.fingerprint[:16]}: load the same weights on both sides"
            )
        self.server_info = info
        self.limits = resp.limits if resp.HasField("limits") else None
        self._response_bound = response_bound(outputs_per_sample(info))
        self._apply_limits()
        return info

    def _apply_limits(self) -> None:
        """Follow the server's published limits (0 means the server did not say)."""
        lim = self.limits
        window, chunk, message, batch = self.config.window, self.config.chunk_bytes, 64 << 20, 0
        if lim is not None:
            if lim.max_in_flight:
                window = max(1, min(window, lim.max_in_flight))
            if lim.max_message_bytes:
                message = min(message, lim.max_message_bytes)
                chunk = min(chunk, max(1, lim.max_message_bytes - UNARY_MARGIN))
            if lim.chunk_bytes:
                chunk = min(chunk, lim.chunk_bytes)
            batch = lim.max_batch_size
        self._window, self._chunk_bytes, self._max_message, self._max_batch = (
            window,
            chunk,
            message,
            batch,
        )

    def _server_info(self) -> pb.ModelInfo:
        if self.server_info is None:
            raise RemoteError("UNAVAILABLE", "no model info from the server yet")
        return self.server_info

    def _follow_plan(self) -> None:
        assert self.auto is not None
        cut, codec = self.auto.next_choice()  # the plan, or an exploring probe
        if (cut, codec) != (self._route.cut, self._route.codec):
            self.use(cut=cut, codec=None if codec == "none" else codec)

    def _reconnected(self) -> None:
        """A call got through after a failure: the server may have restarted, or be
        another machine. Read its table again (cut="auto": it is the planner's prior).
        """
        if self.auto is None:
            return
        try:
            info = self.refresh_info()
        except RemoteError as e:  # still flaky: the next reconnect tries again
            logger.debug("refreshing the server's table failed: %s", e)
            return
        self.auto.refresh(info)
        self._follow_plan()

    def probe_rtt(self) -> float:
        """Round trip (ms) of a request with almost no payload and no compute: the
        model's own outputs sent at the ``output`` cut, by the way requests go (on the
        open stream once there is one), less what the server reports spending on it
        (queue, decode, compute). So it measures what a request's residual does (the
        network, the transport, serving's fixed cost), which a bare ping would miss.
        A unary call costs more than a message on the open stream: a probe sent that
        way read digits-cnn's round trip 0.5 ms over what its requests then took.
        """
        info = self._server_info()
        cut = info.cuts[-1]
        # Zeros, compressed both ways: a few dozen bytes, whatever the output size.
        rid = next(self._ids)
        request = pb.InferRequest(
            id=rid,
            model=self.device.name,
            cut=cut.name,
            fingerprint=self.device.fingerprint,
            output_codec="zstd:1",
        )
        for spec in cut.frontier:
            zeros = torch.zeros(list(spec.shape), dtype=torch_dtype(spec.dtype))
            request.frontier.append(encode(zeros, "zstd:1"))
        data = request.SerializeToString()
        transport = self.transport
        t0 = time.perf_counter()
        resp: pb.InferResponse | None = None
        if transport.connected_once and transport.lb_policy == "pick_first":
            answer = self._on_lane(rid, data, 1)
            if isinstance(answer, RemoteError):
                raise answer
            if answer is not None:
                resp = answer[0]
        if resp is None:
            t0 = time.perf_counter()
            raw = transport.call(
                lambda timeout, ready: transport.infer_raw(
                    data, timeout=timeout, wait_for_ready=ready, metadata=transport.metadata
                ),
                "probe",
            )
            resp = pb.InferResponse.FromString(raw)
        elapsed = (time.perf_counter() - t0) * 1e3
        served = resp.timing.queue_ms + resp.timing.decode_ms + resp.timing.compute_ms
        return max(elapsed - served, 0.0)

    # ---------------------------------------------------------- one call
    def infer(self, x: torch.Tensor) -> InferResult:
        """Run ``x`` (a batch) through head, wire and tail; retry, then fall back if asked."""
        route = self._route
        if route.cut == OUTPUT:  # everything on the device: nothing to send
            return self._planned_local(x)
        if self._max_batch and x.shape[0] > self._max_batch:
            return self._infer_in_parts(x)
        transport = self.transport
        if transport.infer_raw is None:
            transport.require_open()
        started = time.perf_counter()
        frontier = self._run_head(route, x, started)
        t1 = time.perf_counter()
        rid = next(self._ids)
        data = route.request(rid, route.encode(frontier))
        if len(data) > self._max_message:  # too big for one message: chunks on a stream
            (result,) = self.infer_many([x])
            return result
        sent = time.perf_counter()
        # On the open stream: no per-call cost. Round-robin spreads calls over servers,
        # and a stream stays on one, so there each request is its own call.
        if transport.connected_once and transport.lb_policy == "pick_first":
            answer = self._on_lane(rid, data, int(x.shape[0]))
            if answer is not None:
                if isinstance(answer, RemoteError):
                    if self.config.fallback == "local" and answer.code in UNREACHABLE:
                        return self._local(x, reason=str(answer))
                    raise answer
                resp, payloads, size = answer
                received = time.perf_counter()
                timing = Timing(
                    edge_ms=(t1 - started) * 1e3,
                    encode_ms=(sent - t1) * 1e3,
                    bytes_sent=len(data),
                    bytes_received=size,
                )
                result = self._finish(resp, payloads, route, timing, started, sent, received)
                if self.auto is not None:
                    self._learn(result, link=True)
                return result
            sent = time.perf_counter()
        try:
            raw = transport.infer_raw(
                data, timeout=transport.policy.deadline_s, metadata=transport.metadata
            )
        except grpc.RpcError as e:
            try:
                raw = transport.retry(
                    lambda timeout, ready: transport.infer_raw(
                        data, timeout=timeout, wait_for_ready=ready, metadata=transport.metadata
                    ),
                    e,
                    sent,
                    "Infer",
                )
            except RemoteError as err:
                if self.config.fallback == "local" and err.code in UNREACHABLE:
                    return self._local(x, reason=str(err))
                raise
            reconnected = True
        else:
            reconnected = False
        received = time.perf_counter()
        resp = pb.InferResponse.FromString(raw)
        timing = Timing(
            edge_ms=(t1 - started) * 1e3,
            encode_ms=(sent - t1) * 1e3,
            bytes_sent=len(data),
            bytes_received=len(raw),
        )
        result = self._finish(resp, None, route, timing, started, sent, received)
        if self.auto is not None:
            self._learn(result, link=not reconnected)
            if reconnected:
                self._reconnected()
        return result

    def _on_lane(
        self, rid: int, data: bytes, batch: int
    ) -> tuple[pb.InferResponse, list[bytearray] | None, int] | RemoteError | None:
        """Request ``rid`` on the persistent stream: its answer, the error that is its
        own (in-band, or the deadline), or None when it should go the unary way (the
        lane is busy with another thread, broke, or the server asks for a retry).
        """
        lane = self._lane
        if lane is None:
            lane = self._lane = Lane(self.transport, self.transport.policy.deadline_s)
        if not lane.lock.acquire(blocking=False):
            return None
        try:
            resp, payloads, size = lane.ask(
                as_stream_request(data), rid, self._response_bound(batch)
            )
        except LaneBroken as e:
            self._drop_lane(lane)
            if e.expired:
                return remote_error(
                    "DEADLINE_EXCEEDED",
                    f"no answer to request {rid} within {self.transport.policy.deadline_s:g} s",
                )
            return None
        except ProtocolError:
            self._drop_lane(lane)
            raise
        finally:
            lane.lock.release()
        if resp.HasField("error"):
            code = code_name(resp.error.code)
            if self.transport.policy.retryable(code):
                return None  # the unary path retries it, with backoff
            return remote_error(code, resp.error.message)
        return resp, payloads, size

    def _drop_lane(self, lane: Lane) -> None:
        if self._lane is lane:
            self._lane = None
        lane.close()

    def _device_key(self, cut: str) -> str:
        """The emulated device's name for a head: model, input shape and cut (the
        process's clients share one device).
        """
        return f"{self.device.name}{list(self.device.input_shape)}:{cut}"

    def _calibrate_device(self) -> None:
        """--edge-slowdown: time the warm compute of every head the device holds (and of
        the whole model) at once, before any request (the process's emulated device
        keeps them; a later client of the same model finds them known).
        """
        slower = self._slower
        if slower is None:
            return
        x = sample_input(self.device.input_shape)
        runs: dict[str, Callable[[], object]] = {
            self._device_key(c.name): functools.partial(self.device.head(c.name), x)
            for c in self.device.graph.cuts[: self.device.deepest + 1]
        }
        if self.device.can_run_whole:
            runs[self._device_key(OUTPUT)] = functools.partial(self.device.run_whole, x)
        with torch.no_grad():
            slower.calibrate_many(runs, nested=True)  # heads in cut order, then the model

    def emulated_warm_ms(self) -> dict[str, float]:
        """--edge-slowdown: the emulated device's warm compute per cut (ms), what it
        stretches each head's run by (``SlowerDevice``); ``output`` is the whole model.
        Empty on a real device.
        """
        slower = self._slower
        if slower is None:
            return {}
        cuts = [c.name for c in self.device.graph.cuts[: self.device.deepest + 1]]
        if self.device.can_run_whole:
            cuts.append(OUTPUT)
        warm = {c: slower.warm_s(self._device_key(c)) for c in cuts}
        return {c: 1e3 * s for c, s in warm.items() if s is not None}

    def _stretch(self, cut: str, started: float) -> None:
        """--edge-slowdown: make the run begun at ``started`` take the emulated device's
        time.
        """
        if self._slower is not None:
            self._slower.stretch(self._device_key(cut), started)

    def _run_head(self, route: Route, x: torch.Tensor, started: float) -> Any:
        with torch.no_grad():
            frontier = route.head(x)
        self._stretch(route.cut, started)
        return frontier

    def _finish(
        self,
        resp: pb.InferResponse,
        payloads: list[bytearray] | None,
        route: Route,
        timing: Timing,
        started: float,
        sent: float,
        received: float,
    ) -> InferResult:
        """Decode an answer and complete its timing."""
        if payloads is None:
            outputs = [decode(t) for t in resp.outputs]
        else:
            outputs = [decode(t, payload=p) for t, p in zip(resp.outputs, payloads, strict=True)]
            timing.bytes_received = sum(len(p) for p in payloads)
        done = time.perf_counter()
        st = resp.timing
        timing.queue_ms = st.queue_ms
        timing.cloud_ms = st.compute_ms
        timing.server_decode_ms = st.decode_ms
        timing.server_encode_ms = st.encode_ms
        timing.batch_size = st.batch_size
        timing.decode_ms = (done - received) * 1e3
        timing.total_ms = (done - started) * 1e3
        timing.network_ms = max(0.0, (received - sent) * 1e3 - st.total_ms)
        if not timing.bytes_received:
            timing.bytes_received = resp.ByteSize()
        output: Any = outputs[0] if len(outputs) == 1 else tuple(outputs)
        return InferResult(output=output, cut=route.cut, codec=route.codec, timing=timing)

    def _learn(self, result: InferResult, *, link: bool) -> None:
        """Feed the planner (cut="auto") and follow a new plan."""
        if self.auto is None:
            return
        result.prediction = self.auto.learn(
            result, link=link, probe_rtt=self.probe_rtt if link else None
        )
        self._follow_plan()

    def _infer_in_parts(self, x: torch.Tensor) -> InferResult:
        """A batch larger than the server's ``max_batch_size``: pipelined in parts, joined."""
        parts = list(self.infer_many(x.split(self._max_batch)))
        return _join(parts)

    # ---------------------------------------------------------- pipeline
    def infer_many(self, xs: Iterable[torch.Tensor]) -> Iterator[InferResult]:
        """Stream ``xs`` (any iterable, read lazily) over one ``InferStream`` call,
        results in order.

        The head and encoding of the next inputs overlap the network and the server:
        up to ``window`` requests are in flight (at most the server's ``max_in_flight``),
        and only their inputs are held. If the stream breaks, the requests without an
        answer are sent again on a fresh stream, then fall back or raise. An input
        larger than the server's ``max_batch_size`` travels in parts, joined again.
        """
        if not self._max_batch:
            return self._stream_all(iter(xs))
        counts: deque[int] = deque()
        return _regroup(self._stream_all(_parts(iter(xs), self._max_batch, counts)), counts)

    def _stream_all(self, source: Iterator[torch.Tensor]) -> Iterator[InferResult]:
        replay: deque[torch.Tensor] = deque()
        attempt = 0
        while True:
            if self._route.cut == OUTPUT:  # planned all on the device: nothing to stream
                source, replay = itertools.chain(replay, source), deque()
                for x in source:
                    yield self._planned_local(x)
                    if self._route.cut != OUTPUT:  # the plan (or a probe) went remote
                        break
                else:
                    return
                continue
            self.transport.require_open()
            stream = StreamCall(
                self,
                replay,
                source,
                window=self._window,
                chunk_bytes=self._chunk_bytes,
                max_response_bytes=self._response_bound,
            )
            try:
                for result in stream.results():
                    if attempt:  # a retried stream got through: the server may be new
                        attempt = 0
                        self._reconnected()
                    yield result
                return
            except RemoteError as e:
                replay = stream.unanswered()
                policy = self.transport.policy
                if policy.retryable(e.code) and attempt < policy.retries:
                    logger.info("stream: %s; retry %d", e.code, attempt + 1)
                    self.transport.pause(attempt)
                    attempt += 1
                    continue
                if self.config.fallback == "local" and e.code in UNREACHABLE:
                    for x in itertools.chain(replay, source):
                        yield self._local(x, reason=str(e))
                    return
                raise

    # ------------------------------------------------------------ pieces
    def _planned_local(self, x: torch.Tensor) -> InferResult:
        result = self._local(x, reason=None)
        if self.auto is not None:
            self.auto.observe_local(OUTPUT, result.timing.edge_ms)
            self._follow_plan()
        return result

    def _local(self, x: torch.Tensor, reason: str | None) -> InferResult:
        """The whole model on the device: planned (``reason`` None) or a fallback."""
        if reason is not None:
            logger.warning("cloud unreachable (%s): running %s locally", reason, self.device.name)
        started = time.perf_counter()
        out = self.device.run_whole(x)
        self._stretch(OUTPUT, started)
        ms = (time.perf_counter() - started) * 1e3
        return InferResult(
            output=out,
            cut=OUTPUT,
            codec="none",
            timing=Timing(edge_ms=ms, total_ms=ms),
            fallback=reason is not None,
            prediction=self.auto.prediction if self.auto is not None else None,
        )


def _bundle_key(config: EdgeConfig) -> bytes | None:
    """The bundle's key: given in the config, else from ``$SPLITNET_BUNDLE_KEY``."""
    if config.bundle_key is not None:
        return config.bundle_key
    from splitnet.bundle import read_key

    return read_key(None)


def _parts(
    source: Iterator[torch.Tensor], max_batch: int, counts: deque[int]
) -> Iterator[torch.Tensor]:
    """Each input, or its parts of at most ``max_batch`` samples (``counts`` says how many)."""
    for x in source:
        if x.shape[0] <= max_batch:
            counts.append(1)
            yield x
        else:
            parts = x.split(max_batch)
            counts.append(len(parts))
            yield from parts


def _regroup(results: Iterator[InferResult], counts: deque[int]) -> Iterator[InferResult]:
    """One result per input again, from the results of its parts (in order)."""
    for result in results:
        n = counts.popleft()
        if n == 1:
            yield result
        else:
            yield _join([result, *itertools.islice(results, n - 1)])


def _join(parts: list[InferResult]) -> InferResult:
    """One result from the results of a batch's parts (outputs concatenated)."""
    first = parts[0]
    if isinstance(first.output, tuple):
        output: Any = tuple(
            torch.cat([p.output[i] for p in parts]) for i in range(len(first.output))
        )
    else:
        output = torch.cat([p.output for p in parts])
    t = Timing()
    for p in parts:
        for name in ("edge_ms", "encode_ms", "decode_ms", "bytes_sent", "bytes_received"):
            setattr(t, name, getattr(t, name) + getattr(p.timing, name))
    t.total_ms = sum(p.timing.total_ms for p in parts)  # an upper bound: parts overlap
    t.batch_size = max(p.timing.batch_size for p in parts)
    return InferResult(
        output=output,
        cut=first.cut,
        codec=first.codec,
        timing=t,
        fallback=any(p.fallback for p in parts),
        prediction=parts[-1].prediction,
    )
