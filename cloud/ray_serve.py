"""The cloud half on Ray Serve: the same servicer and tail runtime, replicated.

    splitnet-cloud ray --model digits-cnn=w.safetensors --replicas 2 --num-cpus 0.5
    splitnet-cloud ray --address auto --model digits-cnn=w.safetensors --autoscale 1,8

(the command is in cloud/cli.py; this module is the library it calls)

Each replica hosts ``SplitInferenceService`` (cloud/service.py) over a ``TailRuntime``
(cloud/runtime.py): validation, decoding, the tail, encoding, status codes and the
stream protocol are the standalone server's own code. Only batching changes host:
requests queue in Ray's ``@serve.batch`` (``RayBatcher``, the service's ``Batcher``
given through its constructor) with ``batch_size_fn`` counting samples, so
``max_batch_size`` (samples) and ``max_queue_delay_us`` mean what they mean in
``splitnet-cloud``; one batch may mix models and cuts, and runs one tail per
(model, cut) group.

Ray's gRPC proxy parses the request with our generated servicer (``grpc_servicer_
functions``) and routes it to a replica; with one application deployed no
``application`` metadata is needed, so ``EdgeClient`` works unchanged. A status set on
the request's ``grpc_context`` is what the proxy answers, which is how the replica
returns the same codes as the standalone server. The proxy listens in plaintext on
every interface and takes no interceptors: put TLS in front of it (see README,
"Scaling out"); bearer tokens, if configured, are checked in the replica.

``ray`` is imported lazily: ``cloud`` works without the ``ray`` extra.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc

from cloud.auth import TokenAuthInterceptor
from cloud.batcher import fail_batch
from cloud.config import ServerConfig
from cloud.job import Job
from cloud.runtime import TailRuntime
from cloud.service import SplitInferenceService
from splitnet.errors import ConfigError, SplitNetError
from splitnet.v1 import inference_pb2 as pb
from splitnet.wire import RawChunk

__all__ = [
    "APP_NAME",
    "SERVICER_FUNCTION",
    "RayBatcher",
    "RayServeConfig",
    "banner",
    "build_app",
    "deploy",
    "shutdown",
]

logger = logging.getLogger(__name__)

APP_NAME = "splitnet"
DEPLOYMENT_NAME = "SplitInference"
# What Ray's gRPC proxy registers: our generated servicer, so it parses our messages.
SERVICER_FUNCTION = "splitnet.v1.inference_pb2_grpc.add_SplitInferenceServicer_to_server"


@dataclass(frozen=True, kw_only=True)
class RayServeConfig:
    """Everything ``splitnet-cloud ray`` can be told (the service limits are in ``server``)."""

    server: ServerConfig  # models, batching and request limits, as for splitnet-cloud
    address: str | None = None  # Ray cluster to deploy on: auto or ray://HOST:PORT (default: local)
    num_cpus_cluster: int | None = None  # CPUs of a locally started Ray (default: all)
    grpc_port: int = 9000  # Ray's gRPC proxy port (all interfaces, plaintext)
    http_port: int = 8000  # Ray's HTTP proxy, which Serve always starts (127.0.0.1)
    replicas: int = 1  # fixed number of replicas (ignored with autoscaling)
    autoscale: tuple[int, int] | None = None  # (min, max) replicas: Serve autoscaling
    target_ongoing_requests: float = 8.0  # autoscaling: requests per replica it aims for
    upscale_delay_s: float = 30.0  # autoscaling: seconds of demand before adding a replica
    downscale_delay_s: float = 600.0  # autoscaling: seconds of idleness before removing one
    autoscaling_options: Mapping[str, Any] = field(default_factory=dict)  # more of Serve's
    max_ongoing_requests: int = 32  # requests one replica takes at once (>= max batch)
    num_cpus: float = 1.0  # CPUs reserved per replica (0.5 is fine)
    num_gpus: float = 0.0  # GPUs reserved per replica

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.max_ongoing_requests < 1:
            raise ConfigError("replicas and max_ongoing_requests must be at least 1")
        if self.autoscale is not None and not 0 <= self.autoscale[0] <= self.autoscale[1] > 0:
            raise ConfigError("autoscale needs 0 <= MIN <= MAX and MAX >= 1")
        if min(self.upscale_delay_s, self.downscale_delay_s) < 0:
            raise ConfigError("upscale and downscale delays must be >= 0")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.target_ongoing_requests <= 0:
            raise ConfigError("num_cpus and num_gpus must be >= 0, target_ongoing_requests > 0")
        for port in (self.grpc_port, self.http_port):
            if not 1 <= port <= 65535:
                raise ConfigError(f"port must be 1..65535, got {port}")


# --------------------------------------------------------------- replica side
class _Aborted(Exception):
    """Raised by ``_Context.abort``: the status is already on the Ray context."""


class _Context:
    """The part of ``grpc.aio.ServicerContext`` the servicer uses, over Ray's context.

    ``abort`` sets the code and details on Ray's per-request context (the proxy answers
    with them) and raises, like grpc's own ``abort``.
    """

    def __init__(self, ray_context: Any) -> None:
        self.ray_context = ray_context

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        if self.ray_context is not None:
            self.ray_context.set_code(code)
            self.ray_context.set_details(details)
        raise _Aborted(details)

    def invocation_metadata(self) -> Any:
        return self.ray_context.invocation_metadata() if self.ray_context is not None else ()


def _samples(jobs: Sequence[Job]) -> int:
    return sum(j.samples for j in jobs)


class RayBatcher:
    """The ``Batcher`` interface (cloud/batcher.py) over Ray Serve's ``@serve.batch``.

    ``max_batch_size`` counts samples (``batch_size_fn``), as in ``DynamicBatcher``; one
    Ray batch may mix models and cuts, and runs one tail per (model, cut) in it.
    """

    def __init__(self, runtime: TailRuntime, executor: Executor, config: ServerConfig) -> None:
        from ray import serve

        self.runtime = runtime
        self.executor = executor
        self._batched = serve.batch(
            max_batch_size=config.max_batch_size,
            batch_wait_timeout_s=config.max_queue_delay_us / 1e6,
            batch_size_fn=_samples,
        )(self._run_batch)

    def idle(self, key: tuple[str, str]) -> bool:
        """Never: every job goes through Ray's queue."""
        return False

    async def submit(self, job: Job) -> None:
        """Queue ``job`` in Ray's batch; return when its batch has run."""
        job.enqueued = time.perf_counter()
        await self._batched(job)

    async def _run_batch(self, jobs: list[Job]) -> list[None]:
        started = time.perf_counter()
        groups: dict[tuple[str, str], list[Job]] = defaultdict(list)
        for job in jobs:
            groups[job.key].append(job)
        total = _samples(jobs)
        loop = asyncio.get_running_loop()
        for key, group in groups.items():
            try:
                await loop.run_in_executor(self.executor, self.runtime.run, group)
            except Exception as e:
                fail_batch(group, key, e)
            for job in group:  # the runtime sets compute_s: the tail's own time
                job.queue_s, job.batch_size = max(started - job.enqueued, 0.0), total
        return [None] * len(jobs)

    async def close(self) -> None:
        """Nothing to stop: Ray owns the queue."""


class SplitInferenceDeployment:
    """A Ray Serve replica: ``SplitInferenceService`` over its own ``TailRuntime``."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.runtime = TailRuntime(
            config.models,
            device=config.device,
            max_decoded_bytes=config.max_decoded_bytes,
            max_batch_size=config.max_batch_size,
            profile_runs=config.profile_runs,
        )
        self.executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="tail")
        self.service = SplitInferenceService(
            self.runtime,
            config,
            self.executor,
            batcher=RayBatcher(self.runtime, self.executor, config),
        )
        self.auth = TokenAuthInterceptor(config.tokens) if config.tokens else None

    def _authorized(self, ctx: _Context) -> bool:
        return self.auth is None or self.auth.authorized(ctx.invocation_metadata())

    async def _deny(self, ctx: _Context) -> None:
        await ctx.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or invalid bearer token (send 'authorization: Bearer <token>')",
        )

    async def GetModelInfo(  # noqa: N802 - the RPC's name
        self, request: pb.ModelInfoRequest, grpc_context: Any = None
    ) -> pb.ModelInfoResponse:
        """The RPC; same answer as the standalone server's."""
        ctx = _Context(grpc_context)
        try:
            if not self._authorized(ctx):
                await self._deny(ctx)
            return await self.service.GetModelInfo(request, ctx)
        except _Aborted:
            return pb.ModelInfoResponse()

    async def Infer(  # noqa: N802 - the RPC's name
        self, request: pb.InferRequest, grpc_context: Any = None
    ) -> pb.InferResponse:
        """The RPC; errors are answered with the standalone server's status codes."""
        ctx = _Context(grpc_context)
        try:
            if not self._authorized(ctx):
                await self._deny(ctx)
            return await self.service.Infer(request, ctx)
        except _Aborted:
            return pb.InferResponse()

    async def InferStream(  # noqa: N802 - the RPC's name
        self, request_stream: AsyncIterator[pb.StreamRequest], grpc_context: Any = None
    ) -> AsyncIterator[pb.StreamResponse]:
        """The bidirectional RPC: the servicer's stream protocol, in-band errors included.

        A broken protocol (a chunk nobody announced) ends the stream with the status the
        servicer sets, raised so that Ray's proxy answers it.
        """
        ctx = _Context(grpc_context)
        if not self._authorized(ctx):
            try:
                await self._deny(ctx)
            except _Aborted as e:
                raise SplitNetError(str(e)) from None
        try:
            async for msg in self.service.InferStream(request_stream, ctx):
                if isinstance(msg, RawChunk):  # Ray serializes with protobuf: same bytes
                    yield pb.StreamResponse(chunk=pb.Chunk(id=msg.id, data=bytes(msg.data)))
                else:
                    yield msg
        except _Aborted as e:
            raise SplitNetError(str(e)) from None

    async def check_health(self) -> None:
        """Ray Serve's replica health check: the runtime holds its models."""
        if not self.runtime.models:  # pragma: no cover - never true after __init__
            raise SplitNetError("no models loaded")


# ---------------------------------------------------------------- driver side
def build_app(config: RayServeConfig) -> Any:
    """The Serve application (a bound deployment) for ``serve.run``."""
    from ray import serve

    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": config.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
    }
    if config.autoscale is not None:
        options["autoscaling_config"] = {
            "min_replicas": config.autoscale[0],
            "max_replicas": config.autoscale[1],
            "target_ongoing_requests": config.target_ongoing_requests,
            "upscale_delay_s": config.upscale_delay_s,
            "downscale_delay_s": config.downscale_delay_s,
            **config.autoscaling_options,
        }
    else:
        options["num_replicas"] = config.replicas
    deployment: Any = serve.deployment(SplitInferenceDeployment)
    deployment = deployment.options(**options)
    return deployment.bind(config.server)


def deploy(config: RayServeConfig, *, runtime_env: dict[str, Any] | None = None) -> None:
    """Connect to (or start) Ray, start Serve with our gRPC ingress, run the app.

    Returns once every replica has loaded its models and the proxy routes to them.
    """
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    if not ray.is_initialized():
        ray.init(
            address=config.address,
            num_cpus=config.num_cpus_cluster if config.address is None else None,
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=False,
        )
    serve.start(
        http_options={"host": "127.0.0.1", "port": config.http_port},
        grpc_options=gRPCOptions(
            port=config.grpc_port,
            grpc_servicer_functions=[SERVICER_FUNCTION],
            request_timeout_s=config.server.request_timeout_s,
        ),
    )
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)


def shutdown() -> None:
    """Delete the Serve application and stop Serve and Ray (this process's connection)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


# ------------------------------------------------------------------ command
def banner(config: RayServeConfig) -> str:
    """The start-up line."""
    scale = (
        f"autoscaling {config.autoscale[0]}..{config.autoscale[1]} replicas"
        if config.autoscale
        else f"{config.replicas} replica(s)"
    )
    models = ", ".join(m.name for m in config.server.models)
    return (
        f"splitnet-cloud ray listening on 0.0.0.0:{config.grpc_port} (Ray gRPC proxy, "
        f"plaintext) | {models} | {scale} x {config.num_cpus:g} CPU | max batch "
        f"{config.server.max_batch_size}, queue delay {config.server.max_queue_delay_us} us"
    )
