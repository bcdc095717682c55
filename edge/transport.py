"""The channel to the server, and the one retry policy every call follows.

``Transport`` owns the gRPC channel (TLS, bearer token, load balancing, keepalive) and
the raw method handles; ``RetryPolicy`` decides what is retried and how long to wait.
Unary calls, probes and streams all retry through it, and every ``grpc.RpcError``
leaves this module as the ``RemoteError`` subclass for its status code.

A first attempt fails fast if the server is down; each retry waits (bounded, growing)
for the channel to reconnect, so a restarted server is picked up. A channel that has
never connected is checked for a TLS mismatch after its first failure
(``edge.tls``): retrying cannot fix one, so it is reported at once, by name.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from edge.config import LB_POLICIES, EdgeConfig
from edge.tls import diagnose_tls
from splitnet.errors import ConfigError, RemoteError, SplitNetError, remote_error
from splitnet.v1 import inference_pb2 as pb
from splitnet.wire import serialize_stream_message, stream_parser

__all__ = ["RetryPolicy", "Transport", "default_lb_policy", "lb_options", "rpc_error"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Codes for which the cloud counts as unreachable (fallback="local" applies).
UNREACHABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
MAX_MESSAGE_BYTES = 64 << 20
_METHOD = "/splitnet.v1.SplitInference/"


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """What is retried, how often, and the pauses between attempts."""

    deadline_s: float  # a call and all its retries end by then
    retries: int  # further attempts after the first
    backoff_s: float  # first pause; doubles per attempt
    max_backoff_s: float  # longest pause
    reconnect_wait_s: float  # a retry waits this long (doubling) for the channel to connect
    busy: bool = False  # RESOURCE_EXHAUSTED (server full) is retried too

    @classmethod
    def from_config(cls, config: EdgeConfig) -> RetryPolicy:
        """The policy an ``EdgeConfig`` asks for."""
        return cls(
            deadline_s=config.deadline_s,
            retries=config.retries,
            backoff_s=config.backoff_s,
            max_backoff_s=config.max_backoff_s,
            reconnect_wait_s=config.reconnect_wait_s,
            busy=config.retry_busy,
        )

    def retryable(self, code: str) -> bool:
        """True for the codes another attempt may cure."""
        return code == "UNAVAILABLE" or (self.busy and code == "RESOURCE_EXHAUSTED")

    def pause_s(self, attempt: int, rng: random.Random) -> float:
        """Pause before retry ``attempt + 1``: exponential, jittered by 0.5x..1.5x."""
        return min(self.backoff_s * 2**attempt, self.max_backoff_s) * (0.5 + rng.random())

    def attempt_timeout_s(self, attempt: int, left_s: float) -> float:
        """How long attempt ``attempt`` (0 first) may take, ``left_s`` being left."""
        if attempt == 0:
            return max(left_s, 0.001)
        return max(min(left_s, self.reconnect_wait_s * 2 ** (attempt - 1)), 0.001)


def rpc_error(e: grpc.RpcError, context: str = "") -> RemoteError:
    """The ``RemoteError`` subclass for ``e``'s status code, with its details."""
    code = e.code() if callable(getattr(e, "code", None)) else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    details = (e.details() if callable(getattr(e, "details", None)) else None) or name
    return remote_error(name, f"{context}{details}")


class Transport:
    """One channel to one target, with the client's credentials and retry policy."""

    def __init__(self, target: str, config: EdgeConfig, rng: random.Random | None = None) -> None:
        self.target = target
        self.policy = RetryPolicy.from_config(config)
        self.lb_policy = config.lb_policy or default_lb_policy(target)
        self._tls = (
            (config.tls_ca, config.tls_cert, config.tls_key)
            if config.tls_ca or config.tls_cert
            else None
        )
        for path in (p for p in self._tls or () if p is not None):
            if not Path(path).is_file():
                raise ConfigError(f"TLS file {str(path)!r} does not exist or is not a file")
        # Sent with every call when the server requires a bearer token.
        self.metadata: tuple[tuple[str, str], ...] | None = (
            (("authorization", f"Bearer {config.token}"),) if config.token else None
        )
        self._rng = rng or random.Random()
        self._channel: grpc.Channel | None = None
        self.connected_once = False  # True after the first answered call
        # Raw handles: requests go out as bytes the caller serialised (its size is
        # then known for free), answers come back as bytes the caller parses once.
        self.infer_raw: Any = None
        self.model_info_raw: Any = None
        self.stream: Any = None

    # ------------------------------------------------------------ channel
    def open(self) -> None:
        """Open the channel (connections are made lazily, on the first call)."""
        if self._channel is not None:
            return
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 20_000),  # notice dead links on mobile networks
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.enable_retries", 0),  # retries are ours, with backoff and a deadline
            ("grpc.initial_reconnect_backoff_ms", 100),  # find a restarted server quickly
            ("grpc.max_reconnect_backoff_ms", 2_000),
            *lb_options(self.lb_policy),
        ]
        if self._tls is None:
            channel = grpc.insecure_channel(self.target, options=options)
        else:
            ca, cert, key = (Path(p).read_bytes() if p else None for p in self._tls)
            credentials = grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=key, certificate_chain=cert
            )
            channel = grpc.secure_channel(self.target, credentials, options=options)
        self._channel = channel
        # Registered methods (as generated stubs do) skip a per-call method lookup.
        self.infer_raw = channel.unary_unary(_METHOD + "Infer", _registered_method=True)
        self.model_info_raw = channel.unary_unary(_METHOD + "GetModelInfo", _registered_method=True)
        # Chunk frames skip protobuf's copies (the same bytes on the wire).
        self.stream = channel.stream_stream(
            _METHOD + "InferStream",
            request_serializer=_serialize_out,
            response_deserializer=stream_parser(pb.StreamResponse),
            _registered_method=True,
        )

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
            self.infer_raw = self.model_info_raw = self.stream = None

    @property
    def is_open(self) -> bool:
        """True between ``open`` and ``close``."""
        return self._channel is not None

    def require_open(self) -> None:
        """``SplitNetError`` unless the channel is open."""
        if self._channel is None:
            raise SplitNetError("EdgeClient is not connected: use it as a context manager")

    # -------------------------------------------------------------- calls
    def call(self, fn: Callable[[float, bool], T], what: str = "call") -> T:
        """``fn(timeout, wait_for_ready)`` within the deadline, retried by the policy."""
        self.require_open()
        started = time.perf_counter()
        try:
            result = fn(self.policy.deadline_s, False)
        except grpc.RpcError as e:
            return self.retry(fn, e, started, what)
        self.connected_once = True
        return result

    def retry(
        self, fn: Callable[[float, bool], T], first: grpc.RpcError, started: float, what: str
    ) -> T:
        """Attempts after ``first`` failed (the slow path of ``call``)."""
        policy = self.policy
        deadline = started + policy.deadline_s
        error = first
        attempt = 0
        while True:
            code = _code_name(error)
            # A retry that waited for the channel and ran out of its wait: still unreachable.
            unreachable = code == "UNAVAILABLE" or (attempt > 0 and code == "DEADLINE_EXCEEDED")
            if unreachable and not self.connected_once and attempt == 0:
                reason = diagnose_tls(self.target, self._tls, deadline - time.perf_counter())
                if reason is not None:
                    raise remote_error("UNAVAILABLE", reason) from None
            left = deadline - time.perf_counter()
            if (unreachable or policy.retryable(code)) and attempt < policy.retries and left > 0:
                pause = policy.pause_s(attempt, self._rng)
                logger.info("%s: %s; retry %d in %.0f ms", what, code, attempt + 1, pause * 1e3)
                time.sleep(min(pause, left))
                attempt += 1
                left = deadline - time.perf_counter()
                try:
                    result = fn(policy.attempt_timeout_s(attempt, left), True)
                except grpc.RpcError as e:
                    error = e
                    continue
                self.connected_once = True
                return result
            if unreachable:
                raise remote_error(
                    "UNAVAILABLE",
                    f"cloud {self.target} unreachable after {attempt + 1} attempts: "
                    f"{error.details() or code}",
                ) from None
            raise rpc_error(error) from None

    def pause(self, attempt: int) -> None:
        """Wait before retry ``attempt + 1`` of something the caller retries (a stream)."""
        time.sleep(self.policy.pause_s(attempt, self._rng))

    def diagnose(self) -> str | None:
        """Why TLS keeps the channel from connecting, or None (see ``edge.tls``)."""
        if self.connected_once:
            return None
        return diagnose_tls(self.target, self._tls)

    def model_info(self, model: str) -> pb.ModelInfoResponse:
        """``GetModelInfo`` for ``model``, retried by the policy."""
        data = pb.ModelInfoRequest(model=model).SerializeToString()
        raw = self.call(
            lambda timeout, ready: self.model_info_raw(
                data, timeout=timeout, wait_for_ready=ready, metadata=self.metadata
            ),
            "GetModelInfo",
        )
        return pb.ModelInfoResponse.FromString(raw)


def _serialize_out(msg: Any) -> bytes:
    """Stream messages: bytes the caller wrote itself, raw chunks, or protobuf messages."""
    return msg if isinstance(msg, bytes) else serialize_stream_message(msg)


def _code_name(e: grpc.RpcError) -> str:
    code = e.code() if callable(getattr(e, "code", None)) else None
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


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
    if policy not in LB_POLICIES:
        raise ConfigError(f"lb_policy must be round_robin or pick_first, got {policy!r}")
    if policy == "pick_first":
        return []
    return [("grpc.service_config", json.dumps({"loadBalancingConfig": [{policy: {}}]}))]
