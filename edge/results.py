"""What a request returns: the output, the cut and codec it used, and where its time went."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from splitnet.planning import Prediction

__all__ = ["InferResult", "Timing"]


@dataclass(slots=True)
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


@dataclass(slots=True)
class InferResult:
    """The model's output for one input, and how it was obtained."""

    output: Any  # a tensor, or a tuple of tensors for several outputs
    cut: str  # "output": computed entirely on the device
    codec: str  # "none" when nothing was sent
    timing: Timing = field(default_factory=Timing)
    fallback: bool = False  # True: computed entirely on the device (cloud unreachable)
    prediction: Prediction | None = None  # cut="auto": the plan in force, with its breakdown
