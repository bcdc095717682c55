"""gRPC health checking and reflection: open to probes, but bounded.

Load balancers, orchestrators and tools call ``grpc.health.v1.Health`` and server
reflection without credentials, so both stay open; what an anonymous caller can hold
is bounded instead:

- a health request larger than ``MAX_REQUEST_BYTES`` is refused before it is parsed
  (no served name is longer), and so is a name the server does not serve: nothing a
  client invents is kept;
- at most ``max_watchers`` health ``Watch`` streams are open at once; more get
  ``RESOURCE_EXHAUSTED``;
- a reflection request larger than ``MAX_REFLECTION_BYTES`` is answered as an
  invalid one, without parsing it or echoing it back.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

from splitnet.wire import Unparsable

__all__ = ["MAX_REFLECTION_BYTES", "MAX_REQUEST_BYTES", "BoundedHealth", "reflection_handler"]

MAX_REQUEST_BYTES = 256  # a HealthCheckRequest naming any service we serve is far smaller
MAX_REFLECTION_BYTES = 4096  # symbol and file names of our protos are far shorter


class _TooLarge(Unparsable):
    def __init__(self, size: int) -> None:
        self.message = (
            f"health check request of {size} bytes; no service name here needs more than "
            f"{MAX_REQUEST_BYTES}"
        )


def _parse(data: bytes) -> health_pb2.HealthCheckRequest | Unparsable:
    if len(data) > MAX_REQUEST_BYTES:
        return _TooLarge(len(data))
    try:
        return health_pb2.HealthCheckRequest.FromString(data)
    except Exception as e:  # protobuf's DecodeError
        return Unparsable(health_pb2.HealthCheckRequest, e)


class BoundedHealth(health.aio.HealthServicer):
    """The reference async servicer, refusing unknown names and capping watchers."""

    def __init__(self, max_watchers: int = 32) -> None:
        super().__init__()
        self.max_watchers = max_watchers
        self.watchers = 0

    async def _refuse_unknown(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, Unparsable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        if request.service not in self._server_status:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown service; this server reports: {', '.join(sorted(self._server_status))}",
            )

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        """The status of a served service."""
        await self._refuse_unknown(request, context)
        return await super().Check(request, context)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
        """Stream the status of a served service as it changes."""
        await self._refuse_unknown(request, context)
        if self.watchers >= self.max_watchers:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.watchers} health Watch streams are open, the most this server "
                "allows; poll Check instead",
            )
        self.watchers += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watchers -= 1

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's handlers, with the bounded parser."""
        serialize = health_pb2.HealthCheckResponse.SerializeToString
        return grpc.method_handlers_generic_handler(
            health.SERVICE_NAME,
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self.Check, request_deserializer=_parse, response_serializer=serialize
                ),
                "Watch": grpc.unary_stream_rpc_method_handler(
                    self.Watch, request_deserializer=_parse, response_serializer=serialize
                ),
            },
        )


def _parse_reflection(data: bytes) -> reflection_pb2.ServerReflectionRequest:
    """Oversized or malformed: an empty request, which reflection answers as invalid."""
    if len(data) > MAX_REFLECTION_BYTES:
        return reflection_pb2.ServerReflectionRequest()
    try:
        return reflection_pb2.ServerReflectionRequest.FromString(data)
    except Exception:  # protobuf's DecodeError
        return reflection_pb2.ServerReflectionRequest()


def reflection_handler(service_names: tuple[str, ...]) -> grpc.GenericRpcHandler:
    """Server reflection for ``service_names`` (and itself), with the bounded parser."""
    servicer = ReflectionServicer((*service_names, reflection.SERVICE_NAME))
    return grpc.method_handlers_generic_handler(
        reflection.SERVICE_NAME,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=_parse_reflection,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
