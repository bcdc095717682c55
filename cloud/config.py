"""Server configuration: a typed, validated dataclass that the CLI only fills in."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from splitnet.errors import ConfigError
from splitnet.wire import CHUNK_BYTES

MiB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class ModelEntry:
    """One model to serve."""

    name: str  # registry name, e.g. "digits-cnn" or "torchvision:resnet18"
    weights: str | None = None  # safetensors file; None: the model's deterministic init
    input_shape: tuple[int, ...] | None = None  # None: the registry's default
    fingerprint: str | None = None  # pinned sha256 (or >= 16-digit prefix), checked at load


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Everything ``splitnet-cloud`` can be told."""

    models: tuple[ModelEntry, ...] = field(default_factory=tuple)  # at least one
    host: str = "127.0.0.1"  # address to listen on
    port: int = 50051  # port to listen on; 0 picks a free one (printed)
    device: str = "cpu"  # cpu, cuda or cuda:N
    workers: int = 2  # threads running decode, tail and encode
    max_message_bytes: int = 64 * MiB  # largest gRPC message accepted or sent
    max_decoded_bytes: int = 256 * MiB  # largest decoded frontier per request
    max_batch_size: int = 8  # dynamic batching: most samples per tail run
    max_queue_delay_us: int = 0  # dynamic batching: longest wait for a fuller batch
    max_in_flight: int = 256  # requests admitted at once; more get RESOURCE_EXHAUSTED
    max_pending_bytes: int = 256 * MiB  # bytes all unfinished chunked requests may hold
    chunk_idle_s: float = 10.0  # longest wait for a chunked request's next chunk
    max_concurrent_rpcs: int = 1024  # calls gRPC runs at once; more get RESOURCE_EXHAUSTED
    max_streams_per_connection: int = 128  # HTTP/2 streams one connection may have open
    max_metadata_size: int = 16 << 10  # request headers per call, in bytes
    max_health_watches: int = 32  # health Watch streams open at once (probes: poll Check)
    chunk_bytes: int = CHUNK_BYTES  # size of the chunks large payloads travel in on streams
    profile_runs: int = 7  # timed runs per cut at start-up (after 2 warm-ups; LMs: <= 3; 0: skip)
    inline_tail_us: int = 200  # tails profiled faster than this run on the event loop (0: never)
    grace_s: float = 10.0  # how long in-flight requests may finish at shutdown
    request_timeout_s: float = 30.0  # longest a request may wait and run on the server
    tokens: frozenset[str] = frozenset()  # bearer tokens; empty: no authentication
    tls_cert: str | None = None  # server certificate (PEM): serve TLS (with the key)
    tls_key: str | None = None  # server private key (PEM)
    tls_client_ca: str | None = None  # CA of client certificates: require mutual TLS
    insecure: bool = False  # allow plaintext on a non-loopback address
    metrics_port: int | None = None  # Prometheus /metrics port (0: any; HTTPS with TLS); off
    metrics_host: str = "127.0.0.1"  # address of the metrics endpoint
    metrics_open: bool = False  # metrics without the token / client cert gRPC asks for
    # --- generation sessions (language models: --model smollm2, hf:DIR, tiny:...)
    llm_max_sessions: int = 32  # generation sessions open at once
    llm_max_tokens: int = 2048  # prompt + generated tokens one generation session may hold
    llm_kv_budget_bytes: int = 1024 * MiB  # KV cache all generation sessions may reserve
    llm_idle_s: float = 60.0  # a generation session silent this long is ended, its cache freed
    llm_max_batch: int = 8  # decode steps of concurrent sessions run as one call, at most
    llm_inline_step_us: int = 5000  # decode steps measured faster run on the event loop (0: never)

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("serve at least one model (--model NAME[=WEIGHTS])")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be cpu or cuda, got {self.device!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        for name in (
            "workers",
            "max_message_bytes",
            "max_decoded_bytes",
            "max_batch_size",
            "max_in_flight",
            "max_pending_bytes",
            "chunk_bytes",
            "max_concurrent_rpcs",
            "max_streams_per_connection",
            "max_metadata_size",
            "max_health_watches",
            "llm_max_sessions",
            "llm_max_tokens",
            "llm_kv_budget_bytes",
            "llm_max_batch",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if min(self.max_queue_delay_us, self.profile_runs, self.grace_s, self.inline_tail_us,
               self.llm_inline_step_us) < 0:  # fmt: skip
            raise ConfigError(
                "max_queue_delay_us, profile_runs, grace_s, inline_tail_us and "
                "llm_inline_step_us must be >= 0"
            )
        if self.chunk_bytes > self.max_message_bytes // 2:
            raise ConfigError("chunk_bytes must be at most half of max_message_bytes")
        if self.request_timeout_s <= 0 or self.chunk_idle_s <= 0 or self.llm_idle_s <= 0:
            raise ConfigError("request_timeout_s, chunk_idle_s and llm_idle_s must be > 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("mutual TLS (--tls-client-ca) needs --tls-cert and --tls-key")
        if self.tls_cert is None and not self.insecure and not is_loopback(self.host):
            raise ConfigError(
                f"refusing to listen on {self.host} without TLS: give --tls-cert and --tls-key "
                "(make a test CA with `splitnet certs`), or --insecure to accept plaintext"
            )

        if self.metrics_port is not None:
            if not 0 <= self.metrics_port <= 65535:
                raise ConfigError(f"metrics port must be 0..65535, got {self.metrics_port}")
            if self.tls_cert is None and not self.insecure and not is_loopback(self.metrics_host):
                raise ConfigError(
                    f"refusing to serve metrics on {self.metrics_host} in plaintext: give "
                    "--tls-cert and --tls-key (metrics then use HTTPS), or --insecure"
                )

    @property
    def security(self) -> str:
        """One of mtls, tls or plaintext."""
        if self.tls_cert is None:
            return "plaintext"
        return "mtls" if self.tls_client_ca else "tls"


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _per_model(models: Sequence[ModelEntry], specs: Sequence[str], flag: str) -> dict[str, str]:
    """``NAME=VALUE`` options, checked against the served models' names."""
    wanted: dict[str, str] = {}
    for text in specs:
        name, _, value = text.rpartition("=")
        if not name or not value:
            raise ConfigError(f"{flag} {text!r}: use NAME=VALUE, NAME as given to --model")
        wanted[name] = value
    unknown = set(wanted) - {m.name for m in models}
    if unknown:
        raise ConfigError(f"{flag} names {', '.join(sorted(unknown))}, which no --model serves")
    return wanted


def pin_fingerprints(models: Sequence[ModelEntry], pins: Sequence[str]) -> tuple[ModelEntry, ...]:
    """Attach each ``NAME=SHA256`` of ``--expect-fingerprint`` to its model."""
    wanted = _per_model(models, pins, "--expect-fingerprint")
    return tuple(replace(m, fingerprint=wanted[m.name]) if m.name in wanted else m for m in models)


def set_input_shapes(models: Sequence[ModelEntry], specs: Sequence[str]) -> tuple[ModelEntry, ...]:
    """Attach each ``NAME=1,3,224,224`` of ``--input-shape`` to its model."""
    wanted = _per_model(models, specs, "--input-shape")
    out = []
    for m in models:
        if m.name in wanted:
            try:
                shape = tuple(int(d) for d in wanted[m.name].replace("x", ",").split(","))
            except ValueError:
                raise ConfigError(
                    f"--input-shape {m.name}={wanted[m.name]}: give dimensions like 1,3,224,224"
                ) from None
            if not shape or min(shape) <= 0:
                raise ConfigError(f"--input-shape {m.name}: dimensions must be positive")
            m = replace(m, input_shape=shape)
        out.append(m)
    return tuple(out)
