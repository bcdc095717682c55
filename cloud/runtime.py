"""The tail runtime: decode -> (batch) -> tail -> encode, independent of any server.

``TailRuntime`` loads the served models, traces them once, builds each cut's tail on
first use, and validates every request against the cut it names before any tensor is
decoded. It raises ``RequestError`` carrying the gRPC status code to answer with.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from torch import fx, nn

from cloud.config import ModelEntry
from splitnet.codecs import DecodeLimits, decode, encode, parse_codec, wire_dtype
from splitnet.errors import CodecError, SplitNetError
from splitnet.models import fingerprint, load_model, resolve
from splitnet.partition import Cut, SplitGraph, trace
from splitnet.profiling import profile_cuts
from splitnet.report import sample_input
from splitnet.v1 import inference_pb2 as pb
from splitnet.v1 import tensor_pb2

logger = logging.getLogger(__name__)

ACCEPTED_CODECS = ("raw", "zstd", "fp16", "bf16", "int8", "int8c", "+zstd chains")


class RequestError(Exception):
    """A request the server refuses, with the status code to answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class ServedModel:
    """A model as served: traced once, tails built on first use."""

    name: str
    model: nn.Module
    graph: SplitGraph
    fingerprint: str
    input_shape: tuple[int, ...]
    outputs: list[tuple[tuple[int, ...], torch.dtype]]
    tail_ms: dict[str, float] = field(default_factory=dict)
    _tails: dict[str, fx.GraphModule] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def tail(self, cut: str) -> fx.GraphModule:
        """The tail module for ``cut`` (built once, then cached)."""
        tail = self._tails.get(cut)
        if tail is None:
            with self._lock:
                tail = self._tails.get(cut)
                if tail is None:
                    tail = self._tails[cut] = self.graph.split(cut)[1]
        return tail


def _flatten(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _flatten(value[k])]
    raise SplitNetError(f"model output holds a {type(value).__name__}, not tensors")


class TailRuntime:
    """Everything between the wire and the tail, shared by every server host."""

    def __init__(
        self,
        entries: Sequence[ModelEntry],
        *,
        device: str = "cpu",
        max_decoded_bytes: int = 256 << 20,
        max_batch_size: int = 8,
        profile_runs: int = 3,
    ) -> None:
        self.device = torch.device(device)
        self.max_decoded_bytes = max_decoded_bytes
        self.max_batch_size = max_batch_size
        self.limits = DecodeLimits(max_raw_bytes=max_decoded_bytes)
        self.models: dict[str, ServedModel] = {}
        for entry in entries:
            if entry.name in self.models:
                raise SplitNetError(f"model {entry.name!r} is listed twice")
            self.models[entry.name] = self._load(entry, profile_runs)

    def _load(self, entry: ModelEntry, profile_runs: int) -> ServedModel:
        spec = resolve(entry.name, entry.input_shape)
        model = load_model(
            entry.name,
            entry.weights,
            input_shape=spec.input_shape,
            expect_fingerprint=entry.fingerprint,
        )
        fp = fingerprint(model)
        x = sample_input(spec.input_shape)
        graph = trace(model, (x,))
        with torch.no_grad():
            outputs = [(tuple(t.shape), t.dtype) for t in _flatten(model(x))]
        model.to(self.device)
        graph.module.to(self.device)
        served = ServedModel(entry.name, model, graph, fp, spec.input_shape, outputs)
        if profile_runs:
            xd = x.to(self.device)
            served.tail_ms = {
                p.cut: p.tail_ms for p in profile_cuts(graph, (xd,), runs=profile_runs)
            }
        return served

    # ----------------------------------------------------------------- info
    def model_info(self, name: str = "") -> pb.ModelInfoResponse:
        """The ``GetModelInfo`` answer (limits are added by the server)."""
        if name and name not in self.models:
            raise self._unknown_model(name)
        resp = pb.ModelInfoResponse(codecs=list(ACCEPTED_CODECS))
        for served in self.models.values():
            if name and served.name != name:
                continue
            info = resp.models.add(
                name=served.name, fingerprint=served.fingerprint, input_shape=served.input_shape
            )
            for cut in served.graph.cuts:
                c = info.cuts.add(
                    name=cut.name,
                    float32_bytes=cut.nbytes,
                    head_params=cut.head_params,
                    tail_params=cut.tail_params,
                    tail_latency_ms=served.tail_ms.get(cut.name, 0.0),
                )
                for f in cut.frontier:
                    c.frontier.add(name=f.name, shape=f.shape, dtype=wire_dtype(f.dtype))
            for i, (shape, dtype) in enumerate(served.outputs):
                info.outputs.add(name=f"output{i}", shape=shape, dtype=wire_dtype(dtype))
        return resp

    # ------------------------------------------------------------ requests
    def lookup(self, req: pb.InferRequest) -> tuple[ServedModel, Cut]:
        """The model and cut a request names; NOT_FOUND / FAILED_PRECONDITION otherwise."""
        served = self.models.get(req.model)
        if served is None:
            raise self._unknown_model(req.model)
        try:
            cut = served.graph.cut(req.cut)
        except SplitNetError as e:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"model {req.model!r}: {e}") from None
        if req.fingerprint and req.fingerprint != served.fingerprint:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {req.model!r} here has fingerprint {served.fingerprint[:16]}..., the "
                f"request expects {req.fingerprint[:16]}...: load the same weights on both sides",
            )
        if req.output_codec:
            try:
                parse_codec(req.output_codec)
            except CodecError as e:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        return served, cut

    def check_frontier(
        self,
        req: pb.InferRequest,
        cut: Cut,
        payload_sizes: Sequence[int],
        *,
        max_batch_size: int | None = None,
        max_decoded_bytes: int | None = None,
    ) -> int:
        """Validate the frontier headers against the cut, before decoding; return the batch."""
        max_batch = max_batch_size or self.max_batch_size
        max_bytes = max_decoded_bytes or self.max_decoded_bytes
        if len(req.frontier) != len(cut.frontier):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"cut {cut.name!r} takes {len(cut.frontier)} tensors "
                f"({', '.join(f.name for f in cut.frontier)}), the request has {len(req.frontier)}",
            )
        batch = -1
        total = 0
        for wire, want in zip(req.frontier, cut.frontier, strict=True):
            shape = tuple(wire.shape)
            if (
                len(shape) != len(want.shape)
                or shape[1:] != want.shape[1:]
                or wire.dtype != wire_dtype(want.dtype)
            ):
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"tensor {want.name!r} of cut {cut.name!r} must be (n, "
                    f"{', '.join(str(d) for d in want.shape[1:])}) {want.dtype}; got {list(shape)} "
                    f"dtype value {wire.dtype}",
                )
            if shape[0] < 1 or (batch != -1 and shape[0] != batch):
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "every frontier tensor must have the same batch size n >= 1",
                )
            batch = shape[0]
            total += wire.raw_nbytes
        if batch > max_batch:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"batch of {batch} exceeds the server's max batch size {max_batch}",
            )
        if total > max_bytes or sum(payload_sizes) > max_bytes:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request decodes to {total} bytes, over the limit of {max_bytes}",
            )
        return batch

    def decode_frontier(
        self, req: pb.InferRequest, payloads: Sequence[bytes | bytearray] | None = None
    ) -> list[torch.Tensor]:
        """Decode the frontier (payloads from chunks if given); INVALID_ARGUMENT if malformed."""
        try:
            if payloads is None:
                tensors = [decode(t, limits=self.limits) for t in req.frontier]
            else:
                tensors = [
                    decode(t, limits=self.limits, payload=p)
                    for t, p in zip(req.frontier, payloads, strict=True)
                ]
        except CodecError as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed tensor: {e}") from None
        if self.device.type != "cpu":
            tensors = [t.to(self.device, non_blocking=True) for t in tensors]
        return tensors

    @torch.no_grad()
    def run_batch(
        self, served: ServedModel, cut: str, frontiers: Sequence[Sequence[torch.Tensor]]
    ) -> list[list[torch.Tensor]]:
        """Run the tail once over several requests' frontiers; split the outputs back."""
        tail = served.tail(cut)
        if len(frontiers) == 1:
            outs = _flatten(tail(*frontiers[0]))
            return [[o.cpu() if o.device.type != "cpu" else o for o in outs]]
        sizes = [f[0].shape[0] for f in frontiers]
        stacked = [torch.cat(parts) for parts in zip(*frontiers, strict=True)]
        outs = [o.cpu() for o in _flatten(tail(*stacked))]
        split = [o.split(sizes) for o in outs]
        return [[s[i] for s in split] for i in range(len(sizes))]

    def run_and_encode(
        self, served: ServedModel, cut: str, items: Sequence[tuple[Sequence[torch.Tensor], str]]
    ) -> list[tuple[list[tensor_pb2.Tensor], float]]:
        """One batch: the tail over every item's frontier, then each item's outputs encoded
        with its own codec. Returns ``(outputs, encode_seconds)`` per item.
        """
        results = self.run_batch(served, cut, [frontier for frontier, _ in items])
        out: list[tuple[list[tensor_pb2.Tensor], float]] = []
        for outputs, (_, codec) in zip(results, items, strict=True):
            t0 = time.perf_counter()
            out.append((self.encode_outputs(outputs, codec), time.perf_counter() - t0))
        return out

    def encode_outputs(
        self, outputs: Sequence[torch.Tensor], codec: str
    ) -> list[tensor_pb2.Tensor]:
        """Encode the outputs with the codec the request asked for (default raw)."""
        try:
            return [encode(o, codec or "raw") for o in outputs]
        except CodecError as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"output codec: {e}") from None

    def _unknown_model(self, name: str) -> RequestError:
        return RequestError(
            grpc.StatusCode.NOT_FOUND,
            f"unknown model {name!r}; this server serves: {', '.join(self.models)}",
        )
