"""The tail runtime: admit -> decode -> (batch) -> tail -> encode, independent of any server.

``TailRuntime`` loads the served models, traces them once, builds each cut's tail on
first use, and turns a request into a ``Job`` (cloud/job.py) only after validating it
against the cut it names, before any tensor is decoded. Refusals raise ``RequestError``
carrying the gRPC status code to answer with; ``run`` fills each job of a batch with its
own outputs or its own error.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from torch import fx, nn

from cloud.config import ModelEntry
from cloud.job import Job, RequestError, clip
from splitnet.codecs import (
    CodecSpec,
    DecodeLimits,
    accepted_codecs,
    decode,
    encode_parts,
    parse_codec,
    wire_dtype,
)
from splitnet.errors import CodecError, SplitNetError
from splitnet.examples import example_input
from splitnet.models import fingerprint, load_model, resolve
from splitnet.partition import Cut, SplitGraph, trace
from splitnet.profiling import describe, profile_cuts
from splitnet.v1 import inference_pb2 as pb

logger = logging.getLogger(__name__)

INVALID = grpc.StatusCode.INVALID_ARGUMENT


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
    profile_note: str = "not profiled"  # how tail_ms was obtained
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
        profile_runs: int = 7,
        profile: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        """``profile`` (model -> cut -> tail ms) replaces start-up profiling where given."""
        self.device = torch.device(device)
        self.max_decoded_bytes = max_decoded_bytes
        self.max_batch_size = max_batch_size
        self.limits = DecodeLimits(max_raw_bytes=max_decoded_bytes)
        self.models: dict[str, ServedModel] = {}
        for entry in entries:
            if entry.name in self.models:
                raise SplitNetError(f"model {entry.name!r} is listed twice")
            given = profile.get(entry.name) if profile is not None else None
            self.models[entry.name] = self._load(entry, 0 if given else profile_runs)
            if given:
                self.models[entry.name].tail_ms = dict(given)
                self.models[entry.name].profile_note = "given to the server (not measured)"

    def _load(self, entry: ModelEntry, profile_runs: int) -> ServedModel:
        spec = resolve(entry.name, entry.input_shape)
        model = load_model(
            entry.name,
            entry.weights,
            input_shape=spec.input_shape,
            expect_fingerprint=entry.fingerprint,
        )
        fp = fingerprint(model)
        x = example_input(spec)
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
            served.profile_note = f"{describe(profile_runs, 2)}, on {self.device}"
        return served

    # ----------------------------------------------------------------- info
    def model_info(self, name: str = "") -> pb.ModelInfoResponse:
        """The ``GetModelInfo`` answer (limits are added by the server)."""
        if name and name not in self.models:
            raise self._unknown_model(name)
        resp = pb.ModelInfoResponse(codecs=accepted_codecs())
        for served in self.models.values():
            if name and served.name != name:
                continue
            info = resp.models.add(
                name=served.name,
                fingerprint=served.fingerprint,
                input_shape=served.input_shape,
                tail_latency_method=served.profile_note,
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
    def admit(
        self,
        req: pb.InferRequest,
        *,
        chunked: bool = False,
        max_batch_size: int | None = None,
        max_decoded_bytes: int | None = None,
        client: str = "",
        received: float | None = None,
    ) -> Job:
        """Validate ``req`` against what it names and make it a ``Job``; nothing decoded.

        ``received`` is when the request arrived (default: now). Each frontier payload
        is read out of the request once, here; a ``chunked``
        request is validated against the sizes it announces, and its payloads are
        attached to the job when they have arrived.
        """
        served, cut, codec = self.lookup(req)
        self.check_announced(req, cut)
        if chunked:
            if len(req.chunked_payload_bytes) != len(req.frontier):  # O(1), before the walk
                raise RequestError(
                    INVALID,
                    f"{len(req.chunked_payload_bytes)} chunked payload sizes for "
                    f"{len(req.frontier)} tensors",
                )
            payloads: Sequence[bytes | bytearray] = ()
            sizes = list(req.chunked_payload_bytes)
        else:
            payloads = [t.payload for t in req.frontier]
            sizes = [len(p) for p in payloads]
        samples = self.check_frontier(
            req, cut, sizes, max_batch_size=max_batch_size, max_decoded_bytes=max_decoded_bytes
        )
        job = Job(req, served, cut, payloads, samples, sum(sizes), codec, client=client)
        if received is not None:
            job.received = received
        return job

    def lookup(self, req: pb.InferRequest) -> tuple[ServedModel, Cut, CodecSpec]:
        """The model, cut and output codec a request names; NOT_FOUND, FAILED_PRECONDITION
        or INVALID_ARGUMENT otherwise.
        """
        served = self.models.get(req.model)
        if served is None:
            raise self._unknown_model(req.model)
        try:
            cut = served.graph.cut(req.cut)
        except SplitNetError:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"model {served.name!r}: unknown cut {clip(req.cut)}; valid cuts: "
                f"{', '.join(served.graph.names)}",
            ) from None
        if req.fingerprint and req.fingerprint != served.fingerprint:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {served.name!r} here has fingerprint {served.fingerprint[:16]}..., the "
                f"request expects {req.fingerprint[:16]}...: load the same weights on both sides",
            )
        try:
            codec = parse_codec(req.output_codec or "raw")
        except CodecError as e:
            raise RequestError(INVALID, f"output codec: {e}") from None
        return served, cut, codec

    def check_announced(self, req: pb.InferRequest, cut: Cut) -> None:
        """Counts and ranks of the frontier headers against the cut: O(1) per tensor,
        before any per-entry work on a client's repeated fields.
        """
        if len(req.frontier) != len(cut.frontier):
            raise RequestError(
                INVALID,
                f"cut {cut.name!r} takes {len(cut.frontier)} tensors "
                f"({', '.join(f.name for f in cut.frontier)}), the request has {len(req.frontier)}",
            )
        for wire, want in zip(req.frontier, cut.frontier, strict=True):
            if len(wire.shape) != len(want.shape):
                raise RequestError(
                    INVALID,
                    f"tensor {want.name!r} of cut {cut.name!r} has rank {len(want.shape)}; "
                    f"the request's has rank {len(wire.shape)}",
                )

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
        self.check_announced(req, cut)
        max_batch = max_batch_size or self.max_batch_size
        max_bytes = max_decoded_bytes or self.max_decoded_bytes
        batch = -1
        total = 0
        for wire, want, size in zip(req.frontier, cut.frontier, payload_sizes, strict=True):
            shape = tuple(wire.shape)  # rank checked: at most a few entries
            if shape[1:] != want.shape[1:] or wire.dtype != wire_dtype(want.dtype):
                raise RequestError(
                    INVALID,
                    f"tensor {want.name!r} of cut {cut.name!r} must be (n, "
                    f"{', '.join(str(d) for d in want.shape[1:])}) {want.dtype}; got {list(shape)} "
                    f"dtype value {wire.dtype}",
                )
            if shape[0] < 1 or (batch != -1 and shape[0] != batch):
                raise RequestError(
                    INVALID, "every frontier tensor must have the same batch size n >= 1"
                )
            batch = shape[0]
            raw = math.prod(shape) * want.dtype.itemsize
            if wire.raw_nbytes != raw:
                raise RequestError(
                    INVALID,
                    f"malformed tensor {want.name!r}: raw_nbytes {wire.raw_nbytes}, but its shape "
                    f"{list(shape)} and dtype make {raw}",
                )
            if size > payload_bound(raw):
                raise RequestError(
                    INVALID,
                    f"malformed tensor {want.name!r}: a {size}-byte payload; a {list(shape)} "
                    f"{want.dtype} tensor never needs more than {payload_bound(raw)} in any codec",
                )
            total += raw
        if batch > max_batch:
            raise RequestError(
                INVALID, f"batch of {batch} exceeds the server's max batch size {max_batch}"
            )
        if total > max_bytes or sum(payload_sizes) > max_bytes:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request decodes to {total} bytes, over the limit of {max_bytes}",
            )
        return batch

    def decode(self, job: Job) -> None:
        """Decode the job's frontier; INVALID_ARGUMENT if a tensor is malformed."""
        t0 = time.perf_counter()
        try:
            tensors = [
                decode(t, limits=self.limits, payload=p)
                for t, p in zip(job.request.frontier, job.payloads, strict=True)
            ]
        except CodecError as e:
            raise RequestError(INVALID, f"malformed tensor: {e}") from None
        if self.device.type != "cpu":
            tensors = [t.to(self.device, non_blocking=True) for t in tensors]
        job.frontier = tensors
        job.payloads = ()  # the bytes are no longer needed
        job.decode_s = time.perf_counter() - t0

    @torch.no_grad()
    def run(self, jobs: Sequence[Job]) -> None:
        """One batch of one (model, cut): the tail once over every job's frontier, then
        each job's outputs encoded with its own codec into its response. A job whose
        outputs its codec cannot carry gets its own error; the others are answered.
        Raises only if the tail itself fails.
        """
        first = jobs[0]
        tail = first.model.tail(first.cut.name)
        t0 = time.perf_counter()
        if len(jobs) == 1:
            outputs = [_to_cpu(_flatten(tail(*first.frontier)))]
        else:
            sizes = [j.samples for j in jobs]
            stacked = [torch.cat(parts) for parts in zip(*(j.frontier for j in jobs), strict=True)]
            split = [o.split(sizes) for o in _to_cpu(_flatten(tail(*stacked)))]
            outputs = [[s[i] for s in split] for i in range(len(jobs))]
        compute = time.perf_counter() - t0
        for job, outs in zip(jobs, outputs, strict=True):
            job.frontier = []
            job.compute_s = compute
            self.encode_outputs(job, outs)

    def encode_outputs(self, job: Job, outputs: Sequence[torch.Tensor]) -> None:
        """Encode ``outputs`` into the job's response, in place, with its codec."""
        t0 = time.perf_counter()
        tensors = job.response.outputs
        try:
            for o in outputs:
                header, payload = encode_parts(o, job.output_codec)
                t = tensors.add()
                t.MergeFrom(header)
                t.payload = payload if isinstance(payload, bytes) else payload.tobytes()
        except CodecError as e:
            del tensors[:]
            job.error = RequestError(
                INVALID, f"output codec {job.output_codec}: {e} (request {job.request.id})"
            )
        job.encode_s = time.perf_counter() - t0

    def _unknown_model(self, name: str) -> RequestError:
        return RequestError(
            grpc.StatusCode.NOT_FOUND,
            f"unknown model {clip(name)}; this server serves: {', '.join(self.models)}",
        )


def payload_bound(raw_nbytes: int) -> int:
    """The most payload bytes any codec can need for a tensor of ``raw_nbytes``: the raw
    bytes, or zstd of them at its worst (a frame over incompressible data grows by well
    under 1/64 plus a small header).
    """
    return raw_nbytes + raw_nbytes // 64 + 1024


def _to_cpu(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t if t.device.type == "cpu" else t.cpu() for t in tensors]
