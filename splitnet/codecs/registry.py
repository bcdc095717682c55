"""The one list of codec steps: spec grammar, parsing, accepted codecs, wire dispatch.

Every place that needs to know which codecs exist asks this module: the parser, the
error message for a bad spec, the list a server publishes in ``GetModelInfo``, the
encoder (which step a spec names) and the decoder (which class validates a wire
``Step``). Adding a step is adding its class to ``PRECISION_STEPS`` or
``ENTROPY_STEPS``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Final

from splitnet.codecs.base import EntropyStep, Param, PrecisionStep
from splitnet.codecs.cast import Bf16, Cast, Fp16
from splitnet.codecs.outlier import OutlierInt8
from splitnet.codecs.quantize import Int8, Int8PerChannel, Quantize
from splitnet.codecs.raw import Raw
from splitnet.codecs.zstd import Zstd
from splitnet.errors import CodecError

__all__ = [
    "ENTROPY_STEPS",
    "MAX_SPEC_CHARS",
    "PRECISIONS",
    "PRECISION_STEPS",
    "CodecSpec",
    "accepted_codecs",
    "codec_grammar",
    "parse_codec",
    "quote",
]

# The registry. Order is the order of the grammar and of accepted_codecs().
PRECISION_STEPS: Final[tuple[type[PrecisionStep], ...]] = (
    Raw,
    Fp16,
    Bf16,
    Int8,
    Int8PerChannel,
    OutlierInt8,
)
ENTROPY_STEPS: Final[tuple[type[EntropyStep], ...]] = (Zstd,)
# Which class validates and decodes each field of the wire Step oneof.
WIRE_PRECISION: Final[dict[str, type[PrecisionStep]]] = {
    "cast": Cast,
    "quantize": Quantize,
    "outlier_int8": OutlierInt8,
}
WIRE_ENTROPY: Final[dict[str, type[EntropyStep]]] = {"zstd": Zstd}

_RAW = "none"  # CodecSpec.precision of the raw step (the spec text says "raw")
_BY_NAME: Final[dict[str, type[PrecisionStep]]] = {
    (_RAW if cls is Raw else cls.name): cls for cls in PRECISION_STEPS
}
_ENTROPY_BY_NAME: Final = {cls.name: cls for cls in ENTROPY_STEPS}
PRECISIONS: Final[tuple[str, ...]] = tuple(_BY_NAME)  # CodecSpec.precision values

MAX_SPEC_CHARS: Final = 64  # longer specs are refused before any parsing
_CACHE_MAX = 1024
_DIGITS = re.compile(r"[0-9]+")  # ASCII only: int() would also take other scripts' digits
# Spec text -> its CodecSpec, for two texts per spec only: the canonical one
# (str(spec), "int8o:4+zstd:3") and its shorthand (spec.short, "int8o+zstd"). Both are
# functions of the parsed spec, never a client's raw text, so the keys are few and short.
_CANONICAL: dict[str, CodecSpec] = {}


def quote(text: str, limit: int = 32) -> str:
    """``repr(text)``, cut to ``limit`` characters: client text in a message stays short."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def _with_param(name: str, param: Param | None) -> str:
    return f"{name}[:{param.name}]" if param else name


def codec_grammar() -> str:
    """The spec grammar in words, built from the registry (used in every parse error)."""
    names = [_with_param(cls.name, cls.param) for cls in PRECISION_STEPS]
    params = [f"{cls.param}" for cls in PRECISION_STEPS if cls.param]
    entropy = ENTROPY_STEPS[0]
    tail = _with_param(entropy.name, entropy.param)
    return (
        f"{', '.join(names[:-1])} or {names[-1]}"
        + (f" ({'; '.join(params)})" if params else "")
        + f", optionally followed by +{tail} ({entropy.param}); or {tail} alone; "
        "for example int8+zstd:1"
    )


def _check_param(name: str, param: Param | None, value: int | None) -> int | None:
    if param is None:
        if value is not None:
            raise CodecError(f"{name} takes no parameter; expected {codec_grammar()}")
        return None
    if value is None:
        return param.default
    if not param.low <= value <= param.high:
        raise CodecError(f"{name} {param.name} must be {param.low}..{param.high}, got {value}")
    return value


@dataclass(frozen=True, kw_only=True)
class CodecSpec:
    """A parsed codec spec such as ``int8+zstd:1`` or ``int8o:4``."""

    precision: str = _RAW  # one of PRECISIONS ("none" is raw)
    precision_param: int | None = None  # the precision step's parameter; None: its default
    zstd_level: int | None = None  # None: no entropy step

    def __post_init__(self) -> None:
        cls = _BY_NAME.get(self.precision) if isinstance(self.precision, str) else None
        if cls is None:
            shown = quote(self.precision) if isinstance(self.precision, str) else "?"
            raise CodecError(f"unknown precision {shown}; expected one of {PRECISIONS}")
        value = _check_param(cls.name, cls.param, self.precision_param)
        object.__setattr__(self, "precision_param", value)
        if self.zstd_level is not None:
            _check_param(Zstd.name, Zstd.param, self.zstd_level)

    @cached_property
    def precision_step(self) -> PrecisionStep:
        """The configured precision step (``Raw`` for ``raw``)."""
        return _BY_NAME[self.precision](self.precision_param)

    @cached_property
    def entropy_step(self) -> EntropyStep | None:
        """The configured entropy step, if any."""
        return None if self.zstd_level is None else Zstd(self.zstd_level)

    @property
    def lossless(self) -> bool:
        """True when decoding returns the exact input."""
        return _BY_NAME[self.precision].lossless

    @property
    def llm_safe(self) -> bool:
        """True when the codec is fit for language-model hidden states: lossless, fp16,
        bf16 or the outlier-aware ``int8o``; plain ``int8``/``int8c`` are not (a few
        outlier channels ~10^4x the median set their scales).
        """
        return _BY_NAME[self.precision].llm_safe

    def _text(self, short: bool) -> str:
        cls = _BY_NAME[self.precision]
        parts = [] if cls is Raw else [cls.name]
        if cls.param and not (short and self.precision_param == cls.param.default):
            parts[0] += f":{self.precision_param}"
        if self.zstd_level is not None:
            default = short and Zstd.param and self.zstd_level == Zstd.param.default
            parts.append(Zstd.name if default else f"{Zstd.name}:{self.zstd_level}")
        return "+".join(parts) or Raw.name

    def __str__(self) -> str:
        return self._text(short=False)

    @property
    def short(self) -> str:
        """The spec with default parameters left out (``int8o+zstd``); parses to ``self``."""
        return self._text(short=True)


def parse_codec(spec: str | CodecSpec) -> CodecSpec:
    """Parse ``"int8+zstd:1"`` and friends; ``CodecError`` stating the grammar if invalid.

    Case and surrounding spaces do not matter. Specs longer than ``MAX_SPEC_CHARS``
    are refused before any parsing; only canonical texts are cached.
    """
    if isinstance(spec, CodecSpec):
        return spec
    if not isinstance(spec, str):
        raise CodecError(
            f"a codec spec is a string such as 'int8+zstd:1', not {type(spec).__name__}"
        )
    if len(spec) > MAX_SPEC_CHARS:  # O(1), before hashing or looking at the text
        raise CodecError(
            f"codec spec of {len(spec)} characters; a spec has at most {MAX_SPEC_CHARS} "
            "(for example int8+zstd:1)"
        )
    hit = _CANONICAL.get(spec)
    if hit is not None:
        return hit
    parsed = _parse(spec)
    if (spec == str(parsed) or spec == parsed.short) and len(_CANONICAL) < _CACHE_MAX:
        _CANONICAL[spec] = parsed
    return parsed


def _split(part: str, spec: str) -> tuple[str, int | None]:
    """``"zstd:3"`` -> ``("zstd", 3)``; ``"fp16"`` -> ``("fp16", None)``."""
    name, colon, value = part.partition(":")
    if not colon:
        return name, None
    if not _DIGITS.fullmatch(value):  # "", "-1", "x", non-ASCII digits
        raise _invalid(spec)
    return name, int(value)  # at most MAX_SPEC_CHARS digits: int() is cheap


def _invalid(spec: str) -> CodecError:
    return CodecError(f"invalid codec spec {quote(spec)}: expected {codec_grammar()}")


def _parse(spec: str) -> CodecSpec:
    parts = spec.strip().lower().split("+")
    if len(parts) > 2:
        raise _invalid(spec)
    first, first_value = _split(parts[0], spec)
    if len(parts) == 1 and first in _ENTROPY_BY_NAME:  # "zstd[:N]" alone
        return CodecSpec(zstd_level=_check_param(first, Zstd.param, first_value))
    cls = next((c for c in PRECISION_STEPS if c.name == first), None)
    if cls is None:
        raise _invalid(spec)
    level = None
    if len(parts) == 2:
        second, second_value = _split(parts[1], spec)
        if second not in _ENTROPY_BY_NAME:
            raise _invalid(spec)
        level = _check_param(second, Zstd.param, second_value)
    precision = _RAW if cls is Raw else cls.name
    return CodecSpec(
        precision=precision,
        precision_param=_check_param(first, cls.param, first_value),
        zstd_level=level,
    )


def accepted_codecs(*, llm_safe_only: bool = False) -> tuple[str, ...]:
    """Every precision step alone and followed by zstd, as canonical specs with default
    parameters (``raw``, ``zstd:3``, ``fp16``, ``fp16+zstd:3``, ..., ``int8o:4+zstd:3``):
    what a server publishes in ``GetModelInfo.codecs``. Other parameters (``zstd:1``,
    ``int8o:8``) are accepted too; ``codec_grammar()`` says which.
    ``llm_safe_only`` keeps the codecs fit for language-model hidden states.
    """
    out = []
    for cls in PRECISION_STEPS:
        if llm_safe_only and not cls.llm_safe:
            continue
        precision = _RAW if cls is Raw else cls.name
        for level in (None, Zstd.param.default if Zstd.param else None):
            out.append(str(CodecSpec(precision=precision, zstd_level=level)))
    return tuple(out)
