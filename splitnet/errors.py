"""The one error tree of splitnet.

::

    SplitNetError
     ├── ConfigError             a setting is invalid (also a ValueError)
     ├── PartitionError          a model cannot be traced, or a cut name is unknown
     ├── CodecError              a codec spec is invalid, or a wire tensor is malformed
     ├── ProtocolError           a peer broke the stream protocol (chunks, order, ids)
     ├── ModelError              a model name, factory or weights file cannot be loaded
     │    └── ModelMismatchError       the weights' fingerprint is not the expected one
     └── RemoteError             the server answered with an error (``code``: its name)
          ├── CancelledError           CANCELLED
          ├── InvalidArgumentError     INVALID_ARGUMENT
          ├── DeadlineExceededError    DEADLINE_EXCEEDED
          ├── NotFoundError            NOT_FOUND
          ├── PermissionDeniedError    PERMISSION_DENIED
          ├── ResourceExhaustedError   RESOURCE_EXHAUSTED
          ├── FailedPreconditionError  FAILED_PRECONDITION
          │    └── RemoteModelMismatchError  (also a ModelMismatchError)
          ├── AbortedError             ABORTED
          ├── OutOfRangeError          OUT_OF_RANGE
          ├── UnimplementedError       UNIMPLEMENTED
          ├── InternalError            INTERNAL
          ├── UnavailableError         UNAVAILABLE
          └── UnauthenticatedError     UNAUTHENTICATED

``remote_error(code, message)`` builds the right class from a status code's name; codes
map to classes by code, never by message text. In the splitnet protocol,
FAILED_PRECONDITION from an ``Infer`` call means the model's weights differ from the
request's fingerprint, so it arrives as ``RemoteModelMismatchError``: a mismatch is a
``ModelMismatchError`` whichever side finds it.

Every message says what was wrong and, where it can, how to fix it.
"""

from __future__ import annotations

__all__ = [
    "AbortedError",
    "CancelledError",
    "CodecError",
    "ConfigError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "ModelError",
    "ModelMismatchError",
    "NotFoundError",
    "OutOfRangeError",
    "PartitionError",
    "PermissionDeniedError",
    "ProtocolError",
    "RemoteError",
    "RemoteModelMismatchError",
    "ResourceExhaustedError",
    "SplitNetError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "remote_error",
]


class SplitNetError(Exception):
    """Root of every error splitnet raises on purpose."""


class ConfigError(SplitNetError, ValueError):
    """A configuration value is invalid; the message names it and the valid range."""


class PartitionError(SplitNetError):
    """A model cannot be traced or split, or a cut name is unknown."""


class CodecError(SplitNetError):
    """A codec spec is invalid, or a wire tensor fails validation."""


class ProtocolError(SplitNetError):
    """A peer broke the stream protocol: a chunk nobody announced, a request that began
    before the previous one's chunks were complete, an answer to the wrong request id.
    """


class ModelError(SplitNetError):
    """A model cannot be resolved, built, or loaded with its weights."""


class ModelMismatchError(ModelError):
    """A model's fingerprint differs from the one expected."""


class RemoteError(SplitNetError):
    """The remote side answered with an error.

    ``code`` is the gRPC status code name (for example ``"NOT_FOUND"``). Catch a
    subclass (``NotFoundError``...) or compare ``code``; never parse the message.
    """

    CODE = "UNKNOWN"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class CancelledError(RemoteError):
    """CANCELLED: the call was cancelled (usually by its own client)."""

    CODE = "CANCELLED"


class InvalidArgumentError(RemoteError):
    """INVALID_ARGUMENT: the request is malformed or does not fit the cut."""

    CODE = "INVALID_ARGUMENT"


class DeadlineExceededError(RemoteError):
    """DEADLINE_EXCEEDED: the call ran past its deadline (client's or server's)."""

    CODE = "DEADLINE_EXCEEDED"


class NotFoundError(RemoteError):
    """NOT_FOUND: the server does not serve this model, cut or session."""

    CODE = "NOT_FOUND"


class PermissionDeniedError(RemoteError):
    """PERMISSION_DENIED: authenticated, but not allowed to do this."""

    CODE = "PERMISSION_DENIED"


class ResourceExhaustedError(RemoteError):
    """RESOURCE_EXHAUSTED: a limit was reached; retry later or ask for less."""

    CODE = "RESOURCE_EXHAUSTED"


class FailedPreconditionError(RemoteError):
    """FAILED_PRECONDITION: the server's state does not allow the request."""

    CODE = "FAILED_PRECONDITION"


class RemoteModelMismatchError(FailedPreconditionError, ModelMismatchError):
    """The server's weights differ from the request's fingerprint."""


class AbortedError(RemoteError):
    """ABORTED: the operation was aborted (for example a session step out of order)."""

    CODE = "ABORTED"


class OutOfRangeError(RemoteError):
    """OUT_OF_RANGE: past a valid range (for example a session's token limit)."""

    CODE = "OUT_OF_RANGE"


class UnimplementedError(RemoteError):
    """UNIMPLEMENTED: the server does not offer this method."""

    CODE = "UNIMPLEMENTED"


class InternalError(RemoteError):
    """INTERNAL: the server failed; its log has the details."""

    CODE = "INTERNAL"


class UnavailableError(RemoteError):
    """UNAVAILABLE: the server cannot be reached or is shutting down; retry."""

    CODE = "UNAVAILABLE"


class UnauthenticatedError(RemoteError):
    """UNAUTHENTICATED: no valid credentials (bearer token) were sent."""

    CODE = "UNAUTHENTICATED"


_BY_CODE: dict[str, type[RemoteError]] = {
    cls.CODE: cls
    for cls in (
        CancelledError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        PermissionDeniedError,
        ResourceExhaustedError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        UnauthenticatedError,
    )
}
_BY_CODE["FAILED_PRECONDITION"] = RemoteModelMismatchError


def remote_error(code: str, message: str) -> RemoteError:
    """The ``RemoteError`` subclass for the status code named ``code``."""
    return _BY_CODE.get(code, RemoteError)(code, message)
