"""splitnet: cut a PyTorch model in two and run the halves on an edge device and a server."""

__version__ = "0.1.0"

from splitnet.codecs import CodecSpec, DecodeLimits, decode, encode, parse_codec
from splitnet.errors import (
    CodecError,
    ConfigError,
    ModelError,
    ModelMismatchError,
    PartitionError,
    ProtocolError,
    RemoteError,
    SplitNetError,
    remote_error,
)
from splitnet.models import fingerprint, load_model
from splitnet.partition import Cut, FrontierTensor, SplitGraph, trace

__all__ = [
    "CodecError",
    "CodecSpec",
    "ConfigError",
    "Cut",
    "FrontierTensor",
    "SplitGraph",
    "DecodeLimits",
    "ModelError",
    "ModelMismatchError",
    "PartitionError",
    "ProtocolError",
    "RemoteError",
    "SplitNetError",
    "decode",
    "encode",
    "fingerprint",
    "load_model",
    "parse_codec",
    "remote_error",
    "trace",
]
