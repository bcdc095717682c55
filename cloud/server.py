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
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cloud.auth import TokenAuthInterceptor
from cloud.config import ServerConfig
from cloud.metrics import Metrics
from cloud.runtime import TailRuntime
from cloud.service import SplitInferenceService
from splitnet.v1 import inference_pb2 as pb
from splitnet.wire import safe_parser, serialize_stream_message, stream_parser

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SplitInference"].full_name


def channel_options(config: ServerConfig) -> list[tuple[str, int]]:
    """GRPC options: message limits, and keepalive that suits mobile links."""
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Allow clients' keepalive pings every 10 s even without calls in flight.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ]


class CloudServer:
    """A running server; create with ``await CloudServer.start(config)``."""

    def __init__(
        self,
        config: ServerConfig,
        server: grpc.aio.Server,
        service: SplitInferenceService,
        health_servicer: health.aio.HealthServicer,
        executor: ThreadPoolExecutor,
        port: int,
    ) -> None:
        self.config = config
        self.server = server
        self.service = service
        self.health = health_servicer
        self.executor = executor
        self.port = port
        self._stopped = asyncio.Event()

    @classmethod
    async def start(cls, config: ServerConfig, runtime: TailRuntime | None = None) -> CloudServer:
        """Load the models, bind, and start serving."""
        loop = asyncio.get_running_loop()
        if runtime is None:
            # Loading and profiling take seconds: keep the loop free meanwhile.
            runtime = await loop.run_in_executor(None, _make_runtime, config)
        executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="tail")
        metrics = Metrics() if config.metrics_port is not None else None
        interceptors = (
            [TokenAuthInterceptor(config.tokens, on_refuse=_count_refusals(metrics))]
            if config.tokens
            else None
        )
        server = grpc.aio.server(options=channel_options(config), interceptors=interceptors)
        service = SplitInferenceService(runtime, config, executor, metrics=metrics)
        server.add_generic_rpc_handlers((_handlers(service),))
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = f"[{config.host}]" if ":" in config.host else config.host
        if config.tls_cert is not None and config.tls_key is not None:
            client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
            credentials = grpc.ssl_server_credentials(
                [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
            port = server.add_secure_port(f"{address}:{config.port}", credentials)
        else:
            port = server.add_insecure_port(f"{address}:{config.port}")
        if port == 0:
            raise OSError(
                f"cannot listen on {config.host}:{config.port} (in use, or no such address)"
            )
        await server.start()
        if metrics is not None and config.metrics_port is not None:
            # TLS on the gRPC port means HTTPS here, with the same certificate.
            metrics.port = metrics.serve(
                config.metrics_host,
                config.metrics_port,
                certfile=config.tls_cert,
                keyfile=config.tls_key,
            )
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        return cls(config, server, service, health_servicer, executor, port)

    @property
    def address(self) -> str:
        """``host:port`` as a client would dial it."""
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"{host}:{self.port}"

    def banner(self) -> str:
        """The one start-up line: address, models, fingerprints, cuts."""
        models = "; ".join(
            f"{m.name} fingerprint {m.fingerprint[:16]} cuts {len(m.graph.cuts)} "
            f"({m.graph.cuts[0].name} .. {m.graph.cuts[-1].name})"
            for m in self.service.runtime.models.values()
        )
        c = self.config
        return (
            f"splitnet-cloud listening on {self.address} device {c.device} | {models} | "
            f"max batch {c.max_batch_size}, queue delay {c.max_queue_delay_us} us, "
            f"in flight {c.max_in_flight}, {c.security}, "
            f"auth {'bearer token' if c.tokens else 'none'}{self._metrics_banner()}"
        )

    def _metrics_banner(self) -> str:
        m = self.service.metrics
        if m is None:
            return ""
        scheme = "https" if self.config.tls_cert else "http"
        host = self.config.metrics_host
        host = f"[{host}]" if ":" in host else host
        return f", metrics {scheme}://{host}:{m.port}/metrics"

    async def stop(self, grace: float | None = None) -> None:
        """Go NOT_SERVING, let in-flight requests finish (up to ``grace`` s), then stop."""
        if self._stopped.is_set():
            return
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.grace_s if grace is None else grace)
        await self.service.batcher.close()
        if self.service.metrics is not None:
            self.service.metrics.close()
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
        config.models,
        device=config.device,
        max_decoded_bytes=config.max_decoded_bytes,
        max_batch_size=config.max_batch_size,
        profile_runs=config.profile_runs,
    )


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
