"""The standalone server: the servicer plus health checking, reflection and shutdown.

server = await CloudServer.start(config)   # binds, prints nothing
print(server.banner())
await server.wait()                       # until stop() or a signal
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import torch
from grpc_health.v1 import health, health_pb2

from cloud.auth import TokenAuthInterceptor
from cloud.config import ServerConfig
from cloud.memory import manage_memory
from cloud.metrics import Metrics
from cloud.probes import BoundedHealth, reflection_handler
from cloud.runtime import TailRuntime
from cloud.scrape import ScrapeServer
from cloud.service import SplitInferenceService
from splitnet.errors import ConfigError
from splitnet.llm.models import is_llm_name
from splitnet.v1 import inference_pb2 as pb
from splitnet.wire import safe_parser, serialize_stream_message, stream_parser

if TYPE_CHECKING:
    from cloud.generation import GenerationService

logger = logging.getLogger(__name__)

STREAM_WINDOW_BYTES = 1 << 20  # HTTP/2 receive window per stream (see channel_options)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SplitInference"].full_name


def channel_options(config: ServerConfig) -> list[tuple[str, int]]:
    """GRPC's own server limits, set on purpose (README, "Security" says why each)."""
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # HTTP/2 streams one connection may have open at once (gRPC's default: unbounded).
        ("grpc.max_concurrent_streams", config.max_streams_per_connection),
        # Request metadata (headers) per call: a bearer token needs well under this.
        ("grpc.max_metadata_size", config.max_metadata_size),
        # A port in use is an error, not a port shared with a stale server (gRPC's
        # default, SO_REUSEPORT, lets two servers answer on one port in turn).
        ("grpc.so_reuseport", 0),
        # Keepalive: clients may ping every 10 s, even without calls in flight (mobile
        # links); a client pinging faster is warned, then disconnected after 3 strikes.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 3),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # A fixed receive window per stream instead of one grown by BDP probing: a call
        # the server has not accepted yet (an unauthenticated one, say) gets at most this
        # much buffered, however late the refusal runs on a busy machine (with probing,
        # a loaded CI machine buffered 105 MiB for 12 refused 48 MiB calls). A message
        # being read opens the window to its own size, so uploads lose nothing: 8 MiB over
        # 200 Mbit/s, 40 ms took 0.46-0.54 s either way.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
    ]


class CloudServer:
    """A running server; create with ``await CloudServer.start(config)``."""

    def __init__(
        self,
        config: ServerConfig,
        server: grpc.aio.Server,
        service: SplitInferenceService,
        health_servicer: BoundedHealth,
        executor: ThreadPoolExecutor,
        port: int,
        scrape: ScrapeServer | None = None,
    ) -> None:
        self.config = config
        self.scrape = scrape
        self.server = server
        self.service = service
        self.health = health_servicer
        self.executor = executor
        self.port = port
        self.generation: GenerationService | None = None  # when language models are served
        self._stopped = asyncio.Event()

    @classmethod
    async def start(cls, config: ServerConfig, runtime: TailRuntime | None = None) -> CloudServer:
        """Load the models, bind, and start serving."""
        loop = asyncio.get_running_loop()
        if runtime is None:
            # Loading and profiling take seconds: keep the loop free meanwhile.
            runtime = await loop.run_in_executor(None, _make_runtime, config)
        executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="tail")
        manage_memory()  # freed request memory goes back to the system (cloud/memory.py)
        metrics = Metrics() if config.metrics_port is not None else None
        interceptors = (
            [TokenAuthInterceptor(config.tokens, on_refuse=_count_refusals(metrics))]
            if config.tokens
            else None
        )
        server = grpc.aio.server(
            options=channel_options(config),
            interceptors=interceptors,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        service = SplitInferenceService(runtime, config, executor, metrics=metrics)
        health_servicer = BoundedHealth(config.max_health_watches)
        generation = await _generation(config, loop)
        served = (SERVICE_NAME,) if generation is None else (SERVICE_NAME, generation[1])
        server.add_generic_rpc_handlers(
            (
                _handlers(service),
                *(() if generation is None else (generation[2],)),
                health_servicer.handler(),
                reflection_handler((*served, health.SERVICE_NAME)),
            )
        )
        if config.tls_cert is not None and config.tls_key is not None:
            check_tls_files(config)  # a wrong pair would fail later as "Failed to bind"
            client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
            credentials = grpc.ssl_server_credentials(
                [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
            port = _bind(lambda where: server.add_secure_port(where, credentials), config)
        else:
            port = _bind(server.add_insecure_port, config)
        await server.start()
        scrape = None
        if metrics is not None and config.metrics_port is not None:
            scrape = ScrapeServer(
                metrics.registry,
                tokens=() if config.metrics_open else config.tokens,
                ssl_context=_metrics_tls(config),
            )
            await scrape.start(config.metrics_host, config.metrics_port)
        for name in ("", *served):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        made = cls(config, server, service, health_servicer, executor, port, scrape)
        if generation is not None:
            made.generation = generation[0]
            service.generation_info = generation[0].info
            generation[0].start_reaper()
        return made

    @property
    def address(self) -> str:
        """``host:port`` as a client would dial it."""
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"{host}:{self.port}"

    def banner(self) -> str:
        """The one start-up line: address, models, fingerprints, cuts."""
        models = "; ".join(
            [
                f"{m.name} fingerprint {m.fingerprint[:16]} cuts {len(m.graph.cuts)} "
                f"({m.graph.cuts[0].name} .. {m.graph.cuts[-1].name})"
                for m in self.service.runtime.models.values()
            ]
            + (self.generation.banner() if self.generation is not None else [])
        )
        c = self.config
        return (
            f"splitnet-cloud listening on {self.address} device {c.device} | {models} | "
            f"max batch {c.max_batch_size}, queue delay {c.max_queue_delay_us} us, "
            f"in flight {c.max_in_flight}, {c.security}, "
            f"auth {'bearer token' if c.tokens else 'none'}{self._metrics_banner()}"
        )

    def _metrics_banner(self) -> str:
        if self.scrape is None:
            return ""
        c = self.config
        scheme = "https" if c.tls_cert else "http"
        host = f"[{c.metrics_host}]" if ":" in c.metrics_host else c.metrics_host
        guard = (
            "open"
            if c.metrics_open or not (c.tokens or c.tls_client_ca)
            else " + ".join(
                w for w, on in (("token", c.tokens), ("client cert", c.tls_client_ca)) if on
            )
        )
        return f", metrics {scheme}://{host}:{self.scrape.port}/metrics ({guard})"

    async def stop(self, grace: float | None = None) -> None:
        """Go NOT_SERVING, let in-flight requests finish (up to ``grace`` s), then stop."""
        if self._stopped.is_set():
            return
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.grace_s if grace is None else grace)
        await self.service.batcher.close()
        if self.generation is not None:
            await self.generation.close()
        if self.scrape is not None:
            await self.scrape.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()

    def handle_signals(self) -> None:
        """Drain and stop on SIGTERM / SIGINT (call before announcing the server)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, functools.partial(self._on_signal, sig))
            except (NotImplementedError, RuntimeError):  # pragma: no cover - not main thread
                pass

    async def wait(self) -> None:
        """Serve until ``stop()`` or SIGTERM / SIGINT."""
        self.handle_signals()
        await self._stopped.wait()

    async def wait_stopped(self) -> None:
        """Wait until ``stop()`` has finished (no signal handlers)."""
        await self._stopped.wait()

    def _on_signal(self, sig: int) -> None:
        logger.warning("%s: draining in-flight requests, then stopping", signal.Signals(sig).name)
        asyncio.get_running_loop().create_task(self.stop())


def _handlers(service: SplitInferenceService) -> grpc.GenericRpcHandler:
    """The service's method handlers, as generated, except that InferStream reads and
    writes chunk frames without protobuf copies (same bytes on the wire).
    """
    handlers = {
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            service.GetModelInfo,
            request_deserializer=safe_parser(pb.ModelInfoRequest),
            response_serializer=pb.ModelInfoResponse.SerializeToString,
        ),
        "Infer": grpc.unary_unary_rpc_method_handler(
            service.Infer,
            request_deserializer=safe_parser(pb.InferRequest),
            response_serializer=pb.InferResponse.SerializeToString,
        ),
        "InferStream": grpc.stream_stream_rpc_method_handler(
            service.InferStream,
            request_deserializer=stream_parser(pb.StreamRequest),
            response_serializer=serialize_stream_message,
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def _bind(add_port: Callable[[str], int], config: ServerConfig) -> int:
    host = f"[{config.host}]" if ":" in config.host else config.host
    port = 0 if config.port and not _port_free(config.host, config.port) else None
    if port is None:  # free: gRPC binds it (its own failure logs a line of C++ noise)
        try:
            port = add_port(f"{host}:{config.port}")
        except RuntimeError:  # grpc raises "Failed to bind" instead of returning 0
            port = 0
    if port == 0:
        raise OSError(
            f"cannot listen on {config.host}:{config.port}: the port is in use (another "
            "server?) or the address is not this machine's; pick another --port, or 0 for any"
        )
    return port


def _port_free(host: str, port: int) -> bool:
    """True if ``host:port`` can be bound (no server there, SO_REUSEPORT or not)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
        try:
            probe.bind((host.strip("[]"), port))
        except OSError:
            return False
    return True


def check_tls_files(config: ServerConfig) -> None:
    """Refuse unreadable certificate files, and a certificate and key that do not match."""
    assert config.tls_cert is not None and config.tls_key is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for flag, path in (("--tls-cert", config.tls_cert), ("--tls-key", config.tls_key),
                       ("--tls-client-ca", config.tls_client_ca)):  # fmt: skip
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{flag} {path!r}: no such file")
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except ssl.SSLError as e:
        raise ConfigError(
            f"--tls-cert {config.tls_cert!r} and --tls-key {config.tls_key!r} do not make a "
            f"pair ({e.reason or e}): give the key the certificate was made for"
        ) from None
    if config.tls_client_ca is not None:
        try:
            ctx.load_verify_locations(config.tls_client_ca)
        except ssl.SSLError as e:
            raise ConfigError(
                f"--tls-client-ca {config.tls_client_ca!r} is not a PEM CA certificate ({e})"
            ) from None


def _metrics_tls(config: ServerConfig) -> ssl.SSLContext | None:
    """HTTPS with the gRPC port's certificate; client certificates required under mTLS
    (unless the metrics are opened on purpose).
    """
    if config.tls_cert is None or config.tls_key is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_client_ca is not None and not config.metrics_open:
        ctx.load_verify_locations(config.tls_client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _count_refusals(metrics: Metrics | None) -> Callable[[str], None] | None:
    if metrics is None:
        return None

    def refused(method: str) -> None:
        metrics.failed("", "", grpc.StatusCode.UNAUTHENTICATED.name)
        logger.debug("call to %s refused: UNAUTHENTICATED", method)

    return refused


def _make_runtime(config: ServerConfig) -> TailRuntime:
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        from splitnet.errors import SplitNetError

        raise SplitNetError("--device cuda: no CUDA device is available here; use --device cpu")
    return TailRuntime(
        [m for m in config.models if not is_llm_name(m.name)],
        device=config.device,
        max_decoded_bytes=config.max_decoded_bytes,
        max_batch_size=config.max_batch_size,
        profile_runs=config.profile_runs,
    )


async def _generation(
    config: ServerConfig, loop: asyncio.AbstractEventLoop
) -> tuple[GenerationService, str, grpc.GenericRpcHandler] | None:
    """The generation service for the language models among ``config.models`` (loaded
    off the event loop), or None when there are none.
    """
    names = [m.name for m in config.models if is_llm_name(m.name)]
    if not names:
        return None
    from cloud.generation import GENERATION_SERVICE, GenerationService, generation_handler
    from cloud.sessions import ServedLM, SessionLimits, SessionTable
    from splitnet.llm import load_lm

    def load() -> dict[str, ServedLM]:
        served = {n: ServedLM(load_lm(n), config.device) for n in names}
        if config.profile_runs:  # what a client's --cut auto prices the cloud half from
            for m in served.values():
                m.measure_profile(min(config.profile_runs, 3))
        return served

    models = await loop.run_in_executor(None, load)
    limits = SessionLimits(
        max_sessions=config.llm_max_sessions,
        max_tokens=config.llm_max_tokens,
        kv_budget_bytes=config.llm_kv_budget_bytes,
        idle_timeout_s=config.llm_idle_s,
        max_batch_size=config.llm_max_batch,
    )
    service = GenerationService(
        models, SessionTable(limits), max_message_bytes=config.max_message_bytes,
        device=config.device, inline_step_us=config.llm_inline_step_us,
    )  # fmt: skip
    return service, GENERATION_SERVICE, generation_handler(service)


class BackgroundServer:
    """A server on an event loop in a thread of its own, for embedding (tests, benchmarks,
    notebooks). ``BackgroundServer(config)`` returns once it listens; ``stop()`` ends it.
    """

    def __init__(self, config: ServerConfig, runtime: TailRuntime | None = None) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self.error: BaseException | None = None
        self.server: CloudServer | None = None
        self.thread = threading.Thread(target=self._main, args=(runtime,), daemon=True)
        self.thread.start()
        if not self._started.wait(120):
            raise RuntimeError("server did not start in 120 s")
        if self.error is not None:
            raise self.error

    def _main(self, runtime: TailRuntime | None) -> None:
        asyncio.set_event_loop(self.loop)

        async def run() -> None:
            try:
                self.server = await CloudServer.start(self.config, runtime)
            except BaseException as e:  # reported to the test thread
                self.error = e
                self._started.set()
                return
            self._started.set()
            await self.server.wait_stopped()

        try:
            self.loop.run_until_complete(run())
        finally:
            self.loop.close()

    @property
    def port(self) -> int:
        """The port it listens on."""
        assert self.server is not None
        return self.server.port

    @property
    def address(self) -> str:
        """``host:port`` to dial."""
        assert self.server is not None
        return self.server.address

    def stop(self, grace: float = 0.5) -> None:
        """Stop the server (in-flight requests get ``grace`` seconds) and its thread."""
        if self.server is not None and self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result(30)
        self.thread.join(30)
