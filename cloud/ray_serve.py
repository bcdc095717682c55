"""The cloud half on Ray Serve: the same servicer and tail runtime, replicated.

    splitnet-cloud ray --model digits-cnn=w.safetensors --replicas 2 --num-cpus 0.5
    splitnet-cloud ray --address auto --model digits-cnn=w.safetensors --autoscale 1,8

Each replica hosts ``SplitInferenceService`` (cloud/service.py) over a ``TailRuntime``
(cloud/runtime.py): validation, decoding, the tail, encoding, status codes and the
stream protocol are the standalone server's own code. Only batching changes host:
requests queue in Ray's ``@serve.batch`` with ``batch_size_fn`` counting samples, so
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

import argparse
import asyncio
import logging
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NoReturn, cast

import grpc

from cloud.auth import TokenAuthInterceptor, load_tokens
from cloud.batcher import BatchResult, DynamicBatcher
from cloud.config import MiB, ServerConfig
from cloud.runtime import TailRuntime
from cloud.service import SplitInferenceService
from splitnet.errors import SplitNetError
from splitnet.v1 import inference_pb2 as pb
from splitnet.wire import RawChunk

__all__ = ["APP_NAME", "SERVICER_FUNCTION", "RayServeConfig", "build_app", "deploy", "main"]

logger = logging.getLogger(__name__)

APP_NAME = "splitnet"
DEPLOYMENT_NAME = "SplitInference"
# What Ray's gRPC proxy registers: our generated servicer, so it parses our messages.
SERVICER_FUNCTION = "splitnet.v1.inference_pb2_grpc.add_SplitInferenceServicer_to_server"


@dataclass(frozen=True, kw_only=True)
class RayServeConfig:
    """Everything ``splitnet-cloud ray`` can be told (the service limits are in ``server``)."""

    server: ServerConfig  # models, batching and request limits, as for splitnet-cloud
    address: str | None = None  # Ray cluster to join ("auto", "ray://..."); None: start one
    num_cpus_cluster: int | None = None  # CPUs of a locally started Ray (None: all)
    grpc_port: int = 9000  # Ray's gRPC proxy port (all interfaces, plaintext)
    http_port: int = 8000  # Ray's HTTP proxy, which Serve always starts (127.0.0.1)
    replicas: int = 1  # fixed replica count (ignored with autoscaling)
    autoscale: tuple[int, int] | None = None  # (min, max) replicas: Serve autoscaling
    target_ongoing_requests: float = 8.0  # autoscaling: requests per replica it aims for
    upscale_delay_s: float = 30.0  # autoscaling: sustained demand before adding replicas
    downscale_delay_s: float = 600.0  # autoscaling: sustained idleness before removing
    autoscaling_options: Mapping[str, Any] = field(default_factory=dict)  # more of Serve's
    max_ongoing_requests: int = 32  # requests one replica takes at once (>= max batch)
    num_cpus: float = 1.0  # CPUs reserved per replica (fractions allowed)
    num_gpus: float = 0.0  # GPUs reserved per replica

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.max_ongoing_requests < 1:
            raise ValueError("replicas and max_ongoing_requests must be at least 1")
        if self.autoscale is not None and not 0 <= self.autoscale[0] <= self.autoscale[1] > 0:
            raise ValueError("autoscale needs 0 <= MIN <= MAX and MAX >= 1")
        if min(self.upscale_delay_s, self.downscale_delay_s) < 0:
            raise ValueError("upscale and downscale delays must be >= 0")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.target_ongoing_requests <= 0:
            raise ValueError("num_cpus and num_gpus must be >= 0, target_ongoing_requests > 0")
        for port in (self.grpc_port, self.http_port):
            if not 1 <= port <= 65535:
                raise ValueError(f"port must be 1..65535, got {port}")


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


@dataclass
class _Item:
    """One request waiting in ``@serve.batch``."""

    key: tuple[str, str]  # (model, cut)
    value: Any  # (frontier, output codec), as the servicer submits it
    samples: int
    enqueued: float = field(default_factory=time.perf_counter)


def _samples(items: Sequence[_Item]) -> int:
    return sum(i.samples for i in items)


class _ServeBatcher(DynamicBatcher):
    """The servicer's batcher interface, with Ray's ``@serve.batch`` doing the queueing."""

    def __init__(self, submit: Any) -> None:
        self._submit = submit  # the deployment's @serve.batch method

    async def submit(self, key: Hashable, item: Any, samples: int = 1) -> BatchResult:
        result: BatchResult = await self._submit(_Item(cast(tuple[str, str], key), item, samples))
        return result

    async def close(self) -> None:
        return None


class SplitInferenceDeployment:
    """A Ray Serve replica: ``SplitInferenceService`` over its own ``TailRuntime``."""

    def __init__(self, config: ServerConfig) -> None:
        from ray import serve

        self.config = config
        self.runtime = TailRuntime(
            config.models,
            device=config.device,
            max_decoded_bytes=config.max_decoded_bytes,
            max_batch_size=config.max_batch_size,
            profile_runs=config.profile_runs,
        )
        self.executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="tail")
        self.service = SplitInferenceService(self.runtime, config, self.executor)
        self.auth = TokenAuthInterceptor(config.tokens) if config.tokens else None
        batched = serve.batch(
            max_batch_size=config.max_batch_size,
            batch_wait_timeout_s=config.max_queue_delay_us / 1e6,
            batch_size_fn=_samples,
        )(self._run_batch)
        self.service.batcher = _ServeBatcher(batched)

    async def _run_batch(self, items: list[_Item]) -> list[BatchResult]:
        """One ``@serve.batch`` batch: one tail run per (model, cut) in it, off the loop."""
        started = time.perf_counter()
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[item.key].append(i)
        total = _samples(items)
        results: list[BatchResult | None] = [None] * len(items)
        loop = asyncio.get_running_loop()
        for (model, cut), idx in groups.items():
            served = self.runtime.models[model]
            t0 = time.perf_counter()
            values = await loop.run_in_executor(
                self.executor,
                self.runtime.run_and_encode,
                served,
                cut,
                [items[i].value for i in idx],
            )
            compute = time.perf_counter() - t0
            for i, value in zip(idx, values, strict=True):
                queue_s = started - items[i].enqueued
                results[i] = BatchResult(value, max(queue_s, 0.0), compute, total)
        return [r for r in results if r is not None]

    def _authorized(self, ctx: _Context) -> bool:
        return self.auth is None or self.auth._valid(ctx.invocation_metadata())

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
def _autoscale(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    try:
        return int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"use MIN,MAX for --autoscale, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``splitnet-cloud ray``."""
    from cloud.cli import add_model_arguments  # the same model options as splitnet-cloud

    p = argparse.ArgumentParser(
        prog="splitnet-cloud ray",
        description="Serve the tails on Ray Serve (gRPC ingress, replicas, autoscaling).",
    )
    add_model_arguments(p, "; weights must be readable at this path on every Ray node")
    p.add_argument("--address", default=None,
                   help="Ray cluster to deploy on ('auto', 'ray://head:10001'); default: start "
                   "a local Ray and serve until Ctrl-C")  # fmt: skip
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of a locally started Ray")
    p.add_argument("--grpc-port", type=int, default=9000, help="Ray's gRPC proxy port")
    p.add_argument("--http-port", type=int, default=8000, help="Ray's HTTP proxy port")
    p.add_argument("--replicas", type=int, default=1, help="fixed number of replicas")
    p.add_argument("--autoscale", type=_autoscale, default=None, metavar="MIN,MAX",
                   help="autoscale between MIN and MAX replicas instead")  # fmt: skip
    p.add_argument("--target-ongoing-requests", type=float, default=8.0,
                   help="autoscaling: requests in flight per replica to aim for")  # fmt: skip
    p.add_argument("--upscale-delay", type=float, default=30.0,
                   help="autoscaling: seconds of demand before adding a replica")  # fmt: skip
    p.add_argument("--downscale-delay", type=float, default=600.0,
                   help="autoscaling: seconds of idleness before removing one")  # fmt: skip
    p.add_argument("--max-ongoing-requests", type=int, default=32,
                   help="requests one replica takes at once")  # fmt: skip
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (0.5 is fine)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--workers", type=int, default=1, help="tail threads per replica")
    p.add_argument("--max-decoded-mb", type=int, default=256, help="largest decoded request, MiB")
    p.add_argument("--max-batch-size", type=int, default=8, help="batching: samples per run")
    p.add_argument("--max-queue-delay-us", type=int, default=0,
                   help="batching: longest wait for a fuller batch (microseconds)")  # fmt: skip
    p.add_argument("--max-in-flight", type=int, default=256,
                   help="requests admitted per replica; more get RESOURCE_EXHAUSTED")  # fmt: skip
    p.add_argument("--request-timeout", type=float, default=30.0,
                   help="seconds a request may take (proxy and replica)")  # fmt: skip
    p.add_argument("--profile-runs", type=int, default=3, help="start-up tail timing runs")
    p.add_argument("--token-file", default=None,
                   help="require a bearer token (checked in the replica)")  # fmt: skip
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")
    return p


def config_from_args(args: argparse.Namespace) -> RayServeConfig:
    """Fill the typed configs from parsed arguments."""
    from cloud.cli import models_from_args

    server = ServerConfig(
        models=models_from_args(args),
        device=args.device,
        workers=args.workers,
        max_decoded_bytes=args.max_decoded_mb * MiB,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        max_in_flight=args.max_in_flight,
        profile_runs=args.profile_runs,
        request_timeout_s=args.request_timeout,
        tokens=load_tokens(args.token_file),
    )
    return RayServeConfig(
        server=server,
        address=args.address,
        num_cpus_cluster=args.ray_cpus,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        replicas=args.replicas,
        autoscale=args.autoscale,
        target_ongoing_requests=args.target_ongoing_requests,
        upscale_delay_s=args.upscale_delay,
        downscale_delay_s=args.downscale_delay,
        max_ongoing_requests=args.max_ongoing_requests,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
    )


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


def main(argv: Sequence[str] | None = None) -> int:
    """``splitnet-cloud ray ...``; returns the exit status."""
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import ray  # noqa: F401
    except ImportError:
        print("splitnet-cloud ray: error: Ray is not installed: pip install 'splitnet[ray]'",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        config = config_from_args(args)
        deploy(config)
    except (SplitNetError, ValueError, OSError) as e:
        print(f"splitnet-cloud ray: error: {e}", file=sys.stderr)
        return 2
    print(banner(config), flush=True)
    if config.address is not None:  # deployed on a cluster: it keeps serving without us
        print("deployed; remove it with: serve shutdown (or serve delete splitnet)", flush=True)
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    shutdown()
    print("splitnet-cloud ray stopped", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
