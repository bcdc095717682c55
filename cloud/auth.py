"""Bearer-token authentication, checked before any payload is decoded.

A client sends ``authorization: Bearer <token>`` as gRPC metadata. The interceptor
compares it in constant time against the server's tokens; a request without a valid
token is answered ``UNAUTHENTICATED`` by a handler that reads the request as raw bytes
and never parses it. Health checking and reflection stay open, so load balancers and
orchestrators can probe the server (they reveal no model and run nothing).

Tokens come from a file (one per line, ``#`` comments) or the ``SPLITNET_TOKENS``
environment variable (comma-separated).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from splitnet.errors import ConfigError

__all__ = ["OPEN_SERVICES", "TokenAuthInterceptor", "load_tokens"]

ENV_VAR = "SPLITNET_TOKENS"
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/")
MIN_TOKEN_LENGTH = 16


def load_tokens(path: str | Path | None = None, *, env: bool = True) -> frozenset[str]:
    """Tokens from ``path`` and/or ``$SPLITNET_TOKENS``; ``ConfigError`` for a file with
    none, or for weak ones.
    """
    tokens: set[str] = set()
    if path is not None:
        text = Path(path).read_text()
        found = {line.strip() for line in text.splitlines()}
        found = {t for t in found if t and not t.startswith("#")}  # "  # x" is a comment
        if not found:
            raise ConfigError(
                f"token file {str(path)!r} holds no token: put one per line, or leave "
                "--token-file out to serve without authentication"
            )
        tokens |= found
    if env and os.environ.get(ENV_VAR):
        tokens |= {t.strip() for t in os.environ[ENV_VAR].split(",") if t.strip()}
    weak = [t for t in tokens if len(t) < MIN_TOKEN_LENGTH]
    if weak:
        raise ConfigError(
            f"{len(weak)} token(s) shorter than {MIN_TOKEN_LENGTH} characters; use long random "
            "tokens (for example: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return frozenset(tokens)


def _deny(message: str) -> tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]:
    async def abort(_request: bytes, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(_requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # No deserializer: whatever was sent stays unparsed bytes.
    return grpc.unary_unary_rpc_method_handler(abort), grpc.stream_stream_rpc_method_handler(
        abort_stream
    )


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health and reflection without a valid bearer token."""

    def __init__(
        self, tokens: Iterable[str], on_refuse: Callable[[str], None] | None = None
    ) -> None:
        self._tokens = [t.encode() for t in tokens]
        self._on_refuse = on_refuse  # called with the method name of each refused call
        if not self._tokens:
            raise ValueError("token authentication needs at least one token")
        self._unary_deny, self._stream_deny = _deny(
            "missing or invalid bearer token (send 'authorization: Bearer <token>')"
        )

    def authorized(self, metadata: Any) -> bool:
        """True if ``metadata`` carries ``authorization: Bearer <one of the tokens>``."""
        for key, value in metadata or ():
            if key == "authorization":
                text = value.decode() if isinstance(value, bytes) else str(value)
                scheme, _, token = text.partition(" ")
                if scheme.lower() != "bearer":
                    return False
                given = token.strip().encode()
                # Compare against every token, always: the time does not say which matched.
                ok = False
                for t in self._tokens:
                    ok |= hmac.compare_digest(given, t)
                return ok
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        if method.startswith(OPEN_SERVICES) or self.authorized(
            handler_call_details.invocation_metadata
        ):
            return await continuation(handler_call_details)
        if self._on_refuse is not None:
            self._on_refuse(method)
        # A streaming handler for every refused call, unary ones too (the wire is the
        # same): it aborts before reading a message, where a unary handler would make
        # gRPC receive and buffer the whole request first.
        return self._stream_deny
