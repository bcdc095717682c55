"""The one error tree of splitnet.

::

    SplitNetError
     ├── PartitionError      a model cannot be traced, or a cut name is unknown
     ├── CodecError          a codec spec is invalid, or a wire tensor is malformed
     ├── ModelError          a model name, factory or weights file cannot be loaded
     │    └── ModelMismatchError   the weights' fingerprint is not the expected one
     └── RemoteError         the server answered with an error (carries the gRPC code)

Every message says what was wrong and, where it can, how to fix it.
"""

from __future__ import annotations

__all__ = [
    "CodecError",
    "ModelError",
    "ModelMismatchError",
    "PartitionError",
    "RemoteError",
    "SplitNetError",
]


class SplitNetError(Exception):
    """Root of every error splitnet raises on purpose."""


class PartitionError(SplitNetError):
    """A model cannot be traced or split, or a cut name is unknown."""


class CodecError(SplitNetError):
    """A codec spec is invalid, or a wire tensor fails validation."""


class ModelError(SplitNetError):
    """A model cannot be resolved, built, or loaded with its weights."""


class ModelMismatchError(ModelError):
    """A model's fingerprint differs from the one expected."""


class RemoteError(SplitNetError):
    """The remote side answered with an error.

    ``code`` is the gRPC status code name (for example ``"NOT_FOUND"``), so callers
    branch on the code, never on the message text.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
