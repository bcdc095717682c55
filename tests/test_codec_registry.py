"""The codec registry: one list of steps behind the grammar, the errors, the accepted
codecs and the decoder; and specs from the network handled as hostile text.
"""

from __future__ import annotations

import tracemalloc

import pytest
import torch

from splitnet.codecs import (
    MAX_SPEC_CHARS,
    CodecSpec,
    DecodeLimits,
    accepted_codecs,
    codec_grammar,
    decode,
    encode,
    parse_codec,
    registry,
)
from splitnet.errors import CodecError
from splitnet.v1 import tensor_pb2 as pb

MiB = 1 << 20


def test_accepted_codecs_are_every_step_alone_and_with_zstd() -> None:
    codecs = accepted_codecs()
    assert codecs == (
        "raw",
        "zstd:3",
        "fp16",
        "fp16+zstd:3",
        "bf16",
        "bf16+zstd:3",
        "int8",
        "int8+zstd:3",
        "int8c",
        "int8c+zstd:3",
        "int8o:4",
        "int8o:4+zstd:3",
    )
    for c in codecs:
        assert str(parse_codec(c)) == c


def test_llm_safety_flags() -> None:
    safe = {c: parse_codec(c).llm_safe for c in accepted_codecs()}
    assert [c for c, ok in safe.items() if not ok] == [
        "int8",
        "int8+zstd:3",
        "int8c",
        "int8c+zstd:3",
    ]
    assert accepted_codecs(llm_safe_only=True) == tuple(c for c, ok in safe.items() if ok)
    assert parse_codec("zstd:19").llm_safe and parse_codec("int8o:64+zstd:1").llm_safe


def test_lossless_flags() -> None:
    assert [c for c in accepted_codecs() if parse_codec(c).lossless] == ["raw", "zstd:3"]


def test_grammar_names_every_registered_step() -> None:
    grammar = codec_grammar()
    for cls in registry.PRECISION_STEPS + registry.ENTROPY_STEPS:
        assert cls.name in grammar
        if cls.param:
            assert f"{cls.param.low}..{cls.param.high}" in grammar
    with pytest.raises(CodecError) as info:
        parse_codec("gzip")
    assert codec_grammar() in str(info.value)


def test_the_decoder_dispatches_every_wire_step_from_the_registry() -> None:
    oneof = pb.Step.DESCRIPTOR.oneofs_by_name["kind"]
    assert set(registry.WIRE_PRECISION) | set(registry.WIRE_ENTROPY) == {
        f.name for f in oneof.fields
    }
    x = torch.randn(4, 32, 8)
    for cls in registry.PRECISION_STEPS:
        spec = "raw" if cls.name == "raw" else cls.name
        kinds = [s.WhichOneof("kind") for s in encode(x, spec).steps]
        assert kinds == ([] if cls.wire_kind is None else [cls.wire_kind])
        if cls.wire_kind is not None:
            assert issubclass(cls, registry.WIRE_PRECISION[cls.wire_kind])


def test_codec_spec_fills_default_parameters() -> None:
    assert CodecSpec(precision="int8o") == parse_codec("int8o") == parse_codec("int8o:4")
    assert CodecSpec(precision="int8o").precision_param == 4
    assert CodecSpec(precision="fp16").precision_param is None
    with pytest.raises(CodecError, match="takes no parameter"):
        CodecSpec(precision="fp16", precision_param=3)
    with pytest.raises(CodecError, match="takes no parameter"):
        parse_codec("raw:3")
    assert parse_codec("int8o+zstd").short == "int8o+zstd"
    assert str(parse_codec("int8o+zstd")) == "int8o:4+zstd:3"


# ------------------------------------------------------------------ hostile spec text


def assert_refused_cheaply(spec: str, match: str) -> str:
    """parse_codec raises CodecError with a short message, allocating under 1 MiB."""
    before = set(registry._CANONICAL)
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match=match) as info:
            parse_codec(spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MiB, f"parse_codec allocated {peak} bytes refusing a spec"
    assert set(registry._CANONICAL) == before
    message = str(info.value)
    assert len(message) < 600, message[:200]
    return message


def test_a_huge_spec_is_refused_before_parsing() -> None:
    message = assert_refused_cheaply("raw" + " " * (40 * MiB), "at most 64")
    assert "raw" not in message


def test_a_zstd_level_of_thousands_of_digits_is_a_codec_error() -> None:
    assert_refused_cheaply("zstd:" + "9" * 4301, "at most 64")
    assert_refused_cheaply("int8+zstd:" + "9" * 4301, "at most 64")
    # Within the length bound the level is still refused by range, never by int().
    assert_refused_cheaply("zstd:" + "9" * (MAX_SPEC_CHARS - 5), r"1\.\.22")


@pytest.mark.parametrize("spec", ["zstd:\u0663", "zstd:\uff13", "int8o:\u0664", "zstd:3\u00b2"])
def test_only_ascii_digits_count(spec: str) -> None:
    assert_refused_cheaply(spec, "invalid codec spec")


def test_error_messages_quote_a_short_prefix_only() -> None:
    spec = "q" * MAX_SPEC_CHARS
    message = assert_refused_cheaply(spec, "invalid codec spec")
    assert "q" * 33 not in message and "64 characters" in message


def test_the_cache_holds_only_canonical_and_short_forms() -> None:
    texts = ["raw", "zstd", "ZSTD", " zstd:3 ", "int8o", "Int8O:4", "fp16+zstd:1"]
    texts += ["raw" + " " * n for n in range(1, 60)]
    texts += [f"int8+zstd:{level}" for level in range(1, 23)]
    for t in texts:
        parse_codec(t)
    for key, spec in registry._CANONICAL.items():
        assert key in (str(spec), spec.short), key
    assert all(len(k) <= 20 for k in registry._CANONICAL)
    assert "raw " not in registry._CANONICAL


def test_parse_is_the_same_with_and_without_the_cache() -> None:
    for c in accepted_codecs():
        first, second = parse_codec(c), parse_codec(c)
        assert first is second  # canonical text: cached
        assert parse_codec(c.upper()) == first  # not canonical: parsed again, same value


# ------------------------------------------------------------------ counts before entries


def test_decode_checks_the_rank_before_reading_dimensions() -> None:
    msg = pb.Tensor(shape=[1] * 2_000_000, dtype=pb.DTYPE_FLOAT32, raw_nbytes=4, payload=bytes(4))
    msg = pb.Tensor.FromString(msg.SerializeToString())
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="rank 2000000 exceeds the limit of 8") as info:
            decode(msg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MiB, f"decode allocated {peak} bytes before rejecting"
    assert len(str(info.value)) < 100


def test_shapes_in_messages_are_cut_short() -> None:
    limits = DecodeLimits(max_rank=10_000, max_dim=4)
    msg = pb.Tensor(shape=[1] * 9_999 + [5], dtype=pb.DTYPE_FLOAT32, raw_nbytes=20)
    with pytest.raises(CodecError, match="rank 10000") as info:
        decode(msg, limits=limits)
    assert len(str(info.value)) < 200
