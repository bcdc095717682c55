"""The one object a request becomes on the server, from admission to its response.

::

    service: parse, authenticate, admit ──► Job(request, model, cut, payloads, codec)
    runtime.decode(job)                    ──► job.frontier
    batcher.submit(job)  ─► runtime.run(jobs) ─► job.response.outputs (or job.error)
    service: job.response + timings        ──► the wire

A ``Job`` is filled in place as it moves; nothing crosses the batcher untyped. An error
caused by one request (its output codec, its tensors, its deadline) is that job's
``error`` and fails it alone; only a failure of the tail itself fails its batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import torch

from splitnet.codecs import CodecSpec
from splitnet.v1 import inference_pb2 as pb

if TYPE_CHECKING:
    from cloud.runtime import ServedModel
    from splitnet.partition import Cut

__all__ = ["Job", "RequestError", "clip"]

CLIP_CHARS = 64  # most characters of a client's string quoted back in a message


def clip(text: str, limit: int = CLIP_CHARS) -> str:
    """``repr`` of a client's string, cut to ``limit`` characters: a refusal never quotes
    a hostile request back at its own size.
    """
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class RequestError(Exception):
    """A request the server refuses, with the status code to answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_pb(self) -> pb.Error:
        """The in-band form (streams answer errors without ending)."""
        return pb.Error(code=self.code.value[0], message=self.message)


@dataclass(eq=False, slots=True)
class Job:
    """One admitted request on its way through the server."""

    request: pb.InferRequest  # as parsed; its payloads are not read again
    model: ServedModel  # the served model it names
    cut: Cut  # the cut it names
    payloads: Sequence[bytes | bytearray]  # frontier payloads, read out of protobuf once
    samples: int  # batch rows (dimension 0 of the frontier)
    nbytes_in: int  # frontier payload bytes (announced, for a chunked request)
    output_codec: CodecSpec  # how to encode its outputs
    client: str = ""  # who sent it (token or peer address), for fair shares
    reserved: int = 0  # bytes of the pending budget it holds (chunked, until decoded)
    received: float = field(default_factory=time.perf_counter)  # when it arrived
    frontier: list[torch.Tensor] = field(default_factory=list)  # decoded tensors
    response: pb.InferResponse = field(default_factory=pb.InferResponse)  # built in place
    envelope: pb.StreamResponse | None = None  # on streams: holds ``response``
    error: RequestError | None = None  # set when this request alone failed
    decode_s: float = 0.0  # validating and decoding the frontier
    enqueued: float = 0.0  # when it entered the batcher
    queue_s: float = 0.0  # waiting in the batcher
    compute_s: float = 0.0  # its batch's tail run
    encode_s: float = 0.0  # encoding its outputs
    batch_size: int = 0  # samples in the batch it ran in

    @property
    def key(self) -> tuple[str, str]:
        """What the batcher groups by: ``(model, cut)``."""
        return self.model.name, self.cut.name
