"""``EdgeConfig``: every setting of an ``EdgeClient``, typed and checked in one place.

    config = EdgeConfig(weights="w.safetensors", cut="pool1", codec="int8+zstd:1")
    client = EdgeClient("127.0.0.1:50051", "digits-cnn", config=config)
    client = EdgeClient("127.0.0.1:50051", "digits-cnn", cut="pool1")   # the same, by keyword

Keywords given beside ``config=`` replace those fields of it (``dataclasses.replace``),
so a shared base config can be specialised per client. Every invalid value raises
``ConfigError`` (also a ``ValueError``) naming the field and the valid range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypedDict

import torch

from splitnet.codecs import parse_codec
from splitnet.errors import CodecError, ConfigError
from splitnet.planning import CostTable, LinkEstimate
from splitnet.wire import CHUNK_BYTES

__all__ = ["AUTO", "DEFAULT_CODECS", "EdgeConfig", "EdgeOptions", "LB_POLICIES", "FALLBACKS"]

AUTO = "auto"  # cut="auto": planned from measurements, re-planned as the link moves
DEFAULT_CODECS = ("raw", "zstd:1", "int8+zstd:1")  # what cut="auto" chooses among
LB_POLICIES = ("round_robin", "pick_first")
FALLBACKS = ("error", "local")
MAX_CHUNK_BYTES = 64 << 20  # the channel's message limit: a chunk must fit in one message


@dataclass(frozen=True, kw_only=True)
class EdgeConfig:
    """How an ``EdgeClient`` runs its half, talks to the server and recovers from faults."""

    # --- the model
    weights: str | Path | None = None  # weights file; the server must have loaded the same
    input_shape: tuple[int, ...] | None = None  # example input with batch, e.g. (1, 3, 224, 224)
    model_name: str | None = None  # the server's name for the model (default: the model given)
    bundle: str | Path | None = None  # an edge bundle (splitnet export) instead of the model
    bundle_key: bytes | None = field(default=None, repr=False)  # its AES-256 key, if encrypted
    # --- the split
    cut: str = "input"  # where to cut (a cut name), or "auto" to plan it
    codec: str = "raw"  # frontier codec, e.g. "int8+zstd:1"
    output_codec: str = "raw"  # codec the server encodes the outputs with
    # --- calls, retries and faults
    deadline_s: float = 10.0  # per call, retries included; per request on a stream
    retries: int = 3  # further attempts after a retryable failure
    backoff_s: float = 0.05  # first pause between attempts; doubles, with jitter
    max_backoff_s: float = 2.0  # longest pause between attempts
    reconnect_wait_s: float = 1.0  # a retry waits up to this (doubling) for the channel
    retry_busy: bool = False  # also retry RESOURCE_EXHAUSTED (server full), with backoff
    fallback: str = "error"  # cloud unreachable: "error" raises, "local" runs the whole model
    # --- streams
    window: int = 8  # requests in flight on a stream (capped by the server's max_in_flight)
    chunk_bytes: int = CHUNK_BYTES  # payloads above this travel in chunks of this size
    # --- cut="auto"
    codecs: tuple[str, ...] = DEFAULT_CODECS  # codecs the planner may choose
    link: LinkEstimate | None = None  # prior link estimate (default: probed at connect)
    accuracy_budget: float = 0.005  # largest top-1 agreement loss allowed for a lossy codec
    calibration: torch.Tensor | None = field(default=None, compare=False, repr=False)  # inputs
    costs: CostTable | None = field(default=None, compare=False)  # a device profile to plan on
    edge_slowdown: float = 1.0  # emulate a device this many times slower (stretches the head)
    # --- security and routing
    token: str | None = field(default=None, repr=False)  # bearer token sent with every call
    tls_ca: str | Path | None = None  # CA of the server's certificate: TLS on
    tls_cert: str | Path | None = None  # client certificate, for mutual TLS (with tls_key)
    tls_key: str | Path | None = None  # client private key, for mutual TLS
    lb_policy: str | None = None  # "round_robin" or "pick_first"; None: from the target

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)  # frozen: normalise once, here

        for name in ("codec", "output_codec"):
            try:
                fix(name, str(parse_codec(getattr(self, name))))
            except CodecError as e:
                raise ConfigError(f"{name}: {e}") from None
        if isinstance(self.codecs, str) or not self.codecs:
            raise ConfigError("codecs must be a non-empty sequence of codec specs")
        try:
            fix("codecs", tuple(dict.fromkeys(str(parse_codec(c)) for c in self.codecs)))
        except CodecError as e:
            raise ConfigError(f"codecs: {e}") from None
        if self.input_shape is not None:
            shape = tuple(self.input_shape)
            if not shape or not all(isinstance(d, int) and d >= 1 for d in shape):
                raise ConfigError(f"input_shape must be positive ints, got {self.input_shape!r}")
            fix("input_shape", shape)
        if not self.cut or not isinstance(self.cut, str):
            raise ConfigError("cut must be a cut name or 'auto'")
        _positive("deadline_s", self.deadline_s)
        _at_least("retries", self.retries, 0, integer=True)
        _at_least("backoff_s", self.backoff_s, 0.0)
        _at_least("max_backoff_s", self.max_backoff_s, self.backoff_s)
        _positive("reconnect_wait_s", self.reconnect_wait_s)
        _at_least("window", self.window, 1, integer=True)
        _at_least("chunk_bytes", self.chunk_bytes, 1, integer=True)
        if self.chunk_bytes > MAX_CHUNK_BYTES:
            raise ConfigError(f"chunk_bytes must be at most {MAX_CHUNK_BYTES}")
        _at_least("edge_slowdown", self.edge_slowdown, 1.0)
        if not 0.0 <= self.accuracy_budget <= 1.0:
            raise ConfigError(f"accuracy_budget must be in [0, 1], got {self.accuracy_budget}")
        if self.fallback not in FALLBACKS:
            raise ConfigError(f"fallback must be 'error' or 'local', got {self.fallback!r}")
        if self.lb_policy is not None and self.lb_policy not in LB_POLICIES:
            raise ConfigError(
                f"lb_policy must be round_robin or pick_first, got {self.lb_policy!r}"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("a client certificate needs both tls_cert and tls_key")
        if self.token is not None and (
            not self.token
            or any(c in self.token for c in "\r\n\0")
            or self.token != self.token.strip()
        ):
            raise ConfigError("token must be one non-empty line without surrounding spaces")
        if self.bundle_key is not None and (
            not isinstance(self.bundle_key, bytes) or len(self.bundle_key) != 32
        ):
            raise ConfigError("bundle_key must be 32 bytes (AES-256)")
        if self.bundle is not None and self.weights is not None:
            raise ConfigError("give weights or a bundle, not both: a bundle carries its weights")
        if self.calibration is not None and not isinstance(self.calibration, torch.Tensor):
            raise ConfigError("calibration must be a tensor of inputs (a batch)")
        if self.costs is not None and not isinstance(self.costs, CostTable):
            raise ConfigError("costs must be a splitnet.planning.CostTable")

    @property
    def auto(self) -> bool:
        """True when the cut is planned (``cut="auto"``)."""
        return self.cut == AUTO


def _positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def _at_least(name: str, value: float, low: float, *, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if (
        isinstance(value, bool)
        or not isinstance(value, kind)
        or not math.isfinite(value)
        or value < low
    ):
        what = "an integer" if integer else "a finite number"
        raise ConfigError(f"{name} must be {what} >= {low:g}, got {value!r}")


class EdgeOptions(TypedDict, total=False):
    """``EdgeConfig``'s fields as keywords of ``EdgeClient`` (a test keeps them equal)."""

    weights: str | Path | None
    input_shape: tuple[int, ...] | None
    model_name: str | None
    bundle: str | Path | None
    bundle_key: bytes | None
    cut: str
    codec: str
    output_codec: str
    deadline_s: float
    retries: int
    backoff_s: float
    max_backoff_s: float
    reconnect_wait_s: float
    retry_busy: bool
    fallback: str
    window: int
    chunk_bytes: int
    codecs: tuple[str, ...]
    link: LinkEstimate | None
    accuracy_budget: float
    calibration: torch.Tensor | None
    costs: CostTable | None
    edge_slowdown: float
    token: str | None
    tls_ca: str | Path | None
    tls_cert: str | Path | None
    tls_key: str | Path | None
    lb_policy: str | None


def config_fields() -> list[str]:
    """The names of ``EdgeConfig``'s fields, in order."""
    return [f.name for f in fields(EdgeConfig)]
