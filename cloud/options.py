"""Command-line options built from the typed configs, so each default lives in one place.

Every field of a config dataclass becomes a flag: its name with dashes, its type and
default from the annotation and the field, its help from the field's own comment. Two
naming rules keep the flags short: a ``_s`` suffix is dropped (``grace_s`` is
``--grace``, in seconds), and ``_bytes`` becomes ``_mb`` (``max_message_bytes`` is
``--max-message-mb``, in MiB). Fields a command fills another way (``models``,
``tokens``) are skipped by name.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
from collections.abc import Container, Mapping
from typing import Any, Union, get_args, get_origin, get_type_hints

from cloud.config import MiB, ModelEntry, pin_fingerprints, set_input_shapes
from splitnet.llm.models import is_llm_name

__all__ = [
    "add_config_arguments",
    "add_model_arguments",
    "config_values",
    "field_comments",
    "models_from_args",
]

_COMMENT = re.compile(r"^\s+(\w+):[^#]*#\s*(.*)$")


def field_comments(cls: type) -> dict[str, str]:
    """``{field: its trailing comment}`` read from the class's source."""
    comments: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        m = _COMMENT.match(line)
        if m:
            comments.setdefault(m.group(1), m.group(2).strip())
    return comments


def _flag(name: str) -> tuple[str, int]:
    """The flag of a field and the unit its value is given in on the command line."""
    if name.endswith("_bytes"):
        return "--" + name.removesuffix("_bytes").replace("_", "-") + "-mb", MiB
    return "--" + name.removesuffix("_s").replace("_", "-"), 1


def _metavar(name: str, kind: type, unit: int) -> str:
    if unit != 1:
        return "MIB"
    if name.endswith("_s"):
        return "SECONDS"
    if name.endswith("_us"):
        return "US"
    return {int: "N", float: "X"}.get(kind, name.rsplit("_", 1)[-1].upper())


def _base_type(annotation: Any) -> tuple[type, bool]:
    """``(int, True)`` for ``int | None``; ``(float, False)`` for ``float``."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    skip: Container[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Add one flag per field of the dataclass ``cls`` (see the module docstring).

    ``defaults`` overrides a field's default for this command only (say why where used).
    """
    hints = get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, unit = _flag(f.name)
        kind, optional = _base_type(hints[f.name])
        default = (defaults or {}).get(f.name, f.default)
        help_text = comments.get(f.name, "")
        if kind is bool:
            parser.add_argument(flag, action="store_true", dest=f.name, help=help_text)
            continue
        if kind not in (int, float, str):
            raise TypeError(f"{cls.__name__}.{f.name}: no flag for type {kind}")
        if unit != 1:  # sizes in MiB, fractions allowed
            kind = float
            default = None if default is None else default / unit
        shown = (
            ""
            if default is None
            else f" (default {default:g})"
            if kind is float
            else (f" (default {default})")
        )
        parser.add_argument(
            flag,
            type=kind,
            default=default,
            dest=f.name,
            metavar=_metavar(f.name, kind, unit),
            help=f"{help_text}{shown}".replace("%", "%%"),
        )


def config_values(args: argparse.Namespace, cls: type, *, skip: Container[str] = ()) -> dict:
    """The keyword arguments for ``cls`` from flags added by ``add_config_arguments``."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        _, unit = _flag(f.name)
        values[f.name] = int(value * unit) if unit != 1 and value is not None else value
    return values


def _model(text: str) -> ModelEntry:
    if is_llm_name(text):  # smollm2, hf:DIR, tiny:llama:layers=6 (its "=" is no weights file)
        return ModelEntry(name=text)
    name, _, weights = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"invalid --model {text!r}: use NAME or NAME=WEIGHTS")
    return ModelEntry(name=name, weights=weights or None)


def add_model_arguments(p: argparse.ArgumentParser, note: str = "") -> None:
    """``--model``, ``--input-shape`` and ``--expect-fingerprint`` (both hosts share them)."""
    p.add_argument(
        "--model",
        type=_model,
        action="append",
        required=True,
        metavar="NAME[=WEIGHTS]",
        help="a model to serve (repeatable), e.g. digits-cnn=digits.safetensors; language "
        "models for generation sessions: smollm2, hf:DIR, tiny:llama[:layers=6,...]" + note,
    )
    p.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=SHAPE",
        help="input shape of model NAME with batch, e.g. my.mod:net=1,3,224,224 (needed for "
        "pkg.module:callable models); repeatable",
    )
    p.add_argument(
        "--expect-fingerprint",
        action="append",
        default=[],
        metavar="NAME=SHA256",
        help="refuse to start unless model NAME's weights have this fingerprint (the full "
        "sha256 or its first 16+ hex digits); repeatable",
    )


def models_from_args(args: argparse.Namespace) -> tuple[ModelEntry, ...]:
    """The models of ``add_model_arguments``, with their shapes and pinned fingerprints."""
    return set_input_shapes(pin_fingerprints(args.model, args.expect_fingerprint), args.input_shape)
