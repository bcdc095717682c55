"""The error tree: pinned, drawn in its docstring, and mapped by status code."""

from __future__ import annotations

import grpc
import pytest

from splitnet import errors
from splitnet.errors import (
    CodecError,
    ConfigError,
    ModelError,
    ModelMismatchError,
    PartitionError,
    ProtocolError,
    RemoteError,
    RemoteModelMismatchError,
    SplitNetError,
    remote_error,
)

TREE = {
    "SplitNetError": Exception,
    "ConfigError": SplitNetError,
    "PartitionError": SplitNetError,
    "CodecError": SplitNetError,
    "ProtocolError": SplitNetError,
    "ModelError": SplitNetError,
    "ModelMismatchError": ModelError,
    "RemoteError": SplitNetError,
    "CancelledError": RemoteError,
    "InvalidArgumentError": RemoteError,
    "DeadlineExceededError": RemoteError,
    "NotFoundError": RemoteError,
    "PermissionDeniedError": RemoteError,
    "ResourceExhaustedError": RemoteError,
    "FailedPreconditionError": RemoteError,
    "RemoteModelMismatchError": errors.FailedPreconditionError,
    "AbortedError": RemoteError,
    "OutOfRangeError": RemoteError,
    "UnimplementedError": RemoteError,
    "InternalError": RemoteError,
    "UnavailableError": RemoteError,
    "UnauthenticatedError": RemoteError,
}


def test_the_tree_is_pinned_and_drawn() -> None:
    classes = {n for n in errors.__all__ if n != "remote_error"}
    assert classes == set(TREE)
    doc = errors.__doc__ or ""
    for name, parent in TREE.items():
        cls = getattr(errors, name)
        assert issubclass(cls, parent), name
        assert name in doc, f"{name} is not drawn in splitnet/errors.py's docstring"
    assert issubclass(ConfigError, ValueError)  # config errors are still ValueErrors
    assert issubclass(RemoteModelMismatchError, ModelMismatchError)  # whichever side finds it
    for cls in (PartitionError, CodecError, ProtocolError):
        assert not issubclass(cls, RemoteError)


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_every_status_code_maps_by_code(code: grpc.StatusCode) -> None:
    err = remote_error(code.name, "some text that must not matter: NOT_FOUND UNAVAILABLE")
    assert isinstance(err, RemoteError)
    assert err.code == code.name
    assert err.message.startswith("some text")
    if code.name in ("OK", "UNKNOWN", "DATA_LOSS", "ALREADY_EXISTS"):  # never sent by us
        assert type(err) is RemoteError
    elif code == grpc.StatusCode.FAILED_PRECONDITION:
        assert isinstance(err, ModelMismatchError)
    else:
        assert type(err).CODE == code.name
        # The class is the one named after the code, never chosen from the message.
        expected = "".join(w.capitalize() for w in code.name.split("_")) + "Error"
        assert type(err).__name__ == expected


def test_the_root_catches_everything_on_purpose() -> None:
    for name in TREE:
        assert issubclass(getattr(errors, name), SplitNetError) or name == "SplitNetError"
