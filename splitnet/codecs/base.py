"""What every codec step implements.

A *precision step* (cast, quantize, outlier int8) turns a floating tensor into the
bytes of a narrower stage and writes its parameters into one ``Step`` message; an
*entropy step* (zstd) compresses whatever bytes it is given. Each is one class with

* ``encode``: the tensor (or the stage bytes) in, the stage bytes (or compressed
  bytes) out, its parameters written into the ``Step`` message;
* ``validate`` (a classmethod, keyed by the ``Step`` oneof field it reads): checks a
  hostile ``Step`` message against the tensor's dtype and shape *before anything is
  allocated*, and returns a ``Decoding``: the stage size the payload must have, and
  the function that turns those bytes into the tensor;
* ``plan`` and ``extremes``: the ``Step`` message a tensor would get, from cheap
  reductions only, and the smallest and largest one any tensor of a shape can get.
  ``estimate_nbytes`` builds on them (see ``splitnet.codecs.estimate``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from splitnet.v1 import tensor_pb2 as pb

__all__ = ["Buffer", "Decoding", "EntropyStep", "Param", "PrecisionStep", "Shape"]

Buffer = bytes | bytearray | memoryview
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Param:
    """The optional integer a spec may give a step after a colon (``zstd:3``, ``int8o:4``)."""

    name: str  # how the grammar names it, e.g. "LEVEL"
    low: int  # smallest accepted value
    high: int  # largest accepted value
    default: int  # the value when the spec gives none

    def __str__(self) -> str:
        return f"{self.name} {self.low}..{self.high}, default {self.default}"


class Decoding(NamedTuple):
    """What a validated precision step tells the decoder."""

    stage_nbytes: int  # the payload's size before any entropy step
    finish: Callable[[Buffer], torch.Tensor]  # stage bytes -> the decoded tensor


class PrecisionStep(ABC):
    """A step that changes how each value is represented (or, for ``raw``, does not)."""

    name: ClassVar[str]  # the spec name, e.g. "fp16" (subclasses with variants override)
    wire_kind: ClassVar[str | None]  # the Step oneof field it writes; None: writes none
    lossless: ClassVar[bool] = False  # decoding returns the exact input
    llm_safe: ClassVar[bool] = False  # fit for language-model hidden states (outlier channels)
    param: ClassVar[Param | None] = None  # its optional integer parameter
    summary: ClassVar[str]  # one line for the grammar's documentation

    def __init__(self, value: int | None = None) -> None:
        """A configured step; ``value`` is its parameter (already range-checked)."""
        self.value = value

    def applies(self, dtype: torch.dtype, shape: Shape) -> bool:
        """Whether a tensor of this dtype and shape gets this step (else it goes raw)."""
        return dtype.is_floating_point and 0 not in shape

    @abstractmethod
    def plan(self, t: torch.Tensor, step: pb.Step) -> Any:
        """Write the parameters ``t`` would travel with into ``step``; return what
        ``apply`` needs. Uses reductions over ``t`` only; raises ``CodecError`` where
        the step cannot represent ``t``.
        """

    @abstractmethod
    def apply(self, t: torch.Tensor, plan: Any) -> np.ndarray:
        """The stage values of ``t`` (a C-contiguous array), given ``plan``'s result."""

    def encode(self, t: torch.Tensor, step: pb.Step) -> np.ndarray:
        """Encode a contiguous CPU tensor ``t`` that this step applies to."""
        return self.apply(t, self.plan(t, step))

    @abstractmethod
    def extremes(self, dtype: torch.dtype, shape: Shape) -> tuple[pb.Step, pb.Step]:
        """The smallest and the largest ``Step`` message (serialized size) this step
        writes for any tensor of ``dtype`` and ``shape``.
        """

    @classmethod
    @abstractmethod
    def validate(cls, step: pb.Step, dtype: torch.dtype, shape: Shape, numel: int) -> Decoding:
        """Check a received step against the tensor it claims to describe; allocate nothing."""


class EntropyStep(ABC):
    """A lossless step over bytes, applied after the precision step."""

    name: ClassVar[str]
    wire_kind: ClassVar[str]
    param: ClassVar[Param | None] = None
    summary: ClassVar[str]

    def __init__(self, value: int | None = None) -> None:
        """A configured step; ``value`` is its parameter (already range-checked)."""
        self.value = value

    @abstractmethod
    def encode(self, data: memoryview, step: pb.Step) -> bytes:
        """Compress ``data``, writing the step's fields into ``step``."""

    @abstractmethod
    def bounds(self, nbytes: int) -> tuple[int, int]:
        """The least and the most bytes any ``nbytes`` of input can compress to."""

    @abstractmethod
    def sample_nbytes(self, data: memoryview) -> int:
        """The compressed size of ``data``, measured on a bounded sample of it."""

    @classmethod
    @abstractmethod
    def decode(cls, step: pb.Step, payload: Buffer, expected: int) -> Buffer:
        """Decompress ``payload``, which must expand to exactly ``expected`` bytes,
        checking the frame before allocating. The result is writable where it can be.
        """
