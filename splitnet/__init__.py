"""splitnet: cut a PyTorch model in two and run the halves on an edge device and a server."""

from splitnet.codecs import CodecSpec, DecodeLimits, decode, encode, parse_codec
from splitnet.partition import Cut, FrontierTensor, SplitGraph, trace
from splitnet.errors import (
    CodecError,
    ModelError,
    ModelMismatchError,
    PartitionError,
    RemoteError,
    SplitNetError,
)

__all__ = [
    "CodecError",
    "CodecSpec",
    "Cut",
    "FrontierTensor",
    "SplitGraph",
    "DecodeLimits",
    "ModelError",
    "ModelMismatchError",
    "PartitionError",
    "RemoteError",
    "SplitNetError",
    "decode",
    "encode",
    "parse_codec",
    "trace",
]
