"""Codecs: turn a tensor into the wire ``Tensor`` message and back, safely.

A codec spec is a string: an optional precision step, then an optional entropy step,
joined by ``+`` (case and surrounding spaces do not matter; at most 64 characters)::

    raw            the bytes as they are
    zstd[:LEVEL]   zstd, level 1..22 (default 3)
    fp16, bf16     cast floats to 16 bits (fp16 after scaling by a power of two
                   when the values are tiny or large, so they keep 11 bits)
    int8           affine int8, one scale per tensor
    int8c          affine int8, one scale per channel (axis 1); per tensor where channels
                   hold fewer than 16 values each (their parameters would outweigh them)
    int8o[:K]      int8 per row of the last axis (a token), with the K channels of
                   largest magnitude (default 4, at most 256) kept in fp16: for
                   language-model hidden states, whose few outlier channels wreck int8
    int8+zstd:1    chains: precision first, then zstd

The steps are classes in one registry (``splitnet.codecs.registry``): the grammar, the
error for a bad spec, ``accepted_codecs()`` and the decoder's dispatch all come from it.

Precision steps apply to floating tensors only; other dtypes travel losslessly.
Lossy codecs never return silently wrong values: ``fp16`` and ``bf16`` keep NaN and
infinities but refuse finite values they cannot carry (beyond bf16's range, or beyond
what fp16 reaches with its largest scaling), and the int8 codecs refuse NaN and
infinities, each with a ``CodecError``. ``CodecSpec.llm_safe`` says whether a codec
is fit for language-model hidden states (plain ``int8``/``int8c`` are not).

The message says everything needed to decode it (see ``proto/splitnet/v1/tensor.proto``,
whose comments give each step's exact decode recipe). ``decode`` treats the message as
hostile: it checks counts, dtype, rank, dimensions, declared sizes and the zstd frame
header *before* it allocates anything, and raises ``CodecError`` saying what was wrong.
``estimate_nbytes`` predicts the encoded size from the shape and dtype (and a sample,
for zstd) without encoding.
"""

from __future__ import annotations

from splitnet.codecs.dtypes import torch_dtype, wire_dtype
from splitnet.codecs.estimate import SizeEstimate, estimate_nbytes
from splitnet.codecs.registry import (
    MAX_SPEC_CHARS,
    PRECISIONS,
    CodecSpec,
    accepted_codecs,
    codec_grammar,
    parse_codec,
)
from splitnet.codecs.tensor import DEFAULT_LIMITS, DecodeLimits, decode, encode, encode_parts

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_SPEC_CHARS",
    "PRECISIONS",
    "CodecSpec",
    "DecodeLimits",
    "SizeEstimate",
    "accepted_codecs",
    "codec_grammar",
    "decode",
    "encode",
    "encode_parts",
    "estimate_nbytes",
    "parse_codec",
    "torch_dtype",
    "wire_dtype",
]
