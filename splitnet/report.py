"""Reports on a traced model: the cut table and per-cut, per-codec accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from splitnet.codecs import decode, encode, parse_codec
from splitnet.data import Split
from splitnet.examples import example_input, synthetic_image
from splitnet.models import DIGITS_CNN
from splitnet.partition import Cut, SplitGraph
from splitnet.training import predict

__all__ = ["codec_accuracy", "cut_table", "encoded_nbytes", "format_table", "sample_input"]


def sample_input(shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """An example input of ``shape``, guessed from the shape alone (kept for old callers).

    N x 1 x 8 x 8 gets real digits, other 4-D shapes a synthetic image, anything else a
    seeded random tensor. Prefer ``splitnet.examples.example_input(spec_or_name,
    input_shape)``, which asks the model spec and needs no scikit-learn for torchvision.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) == 4 and shape[1:] == (1, 8, 8):
        return example_input(DIGITS_CNN, shape, seed=seed)
    if len(shape) == 4:
        return synthetic_image(shape, seed=seed)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def encoded_nbytes(frontier: Sequence[torch.Tensor], codec: str) -> int:
    """Wire bytes of the encoded frontier (whole ``Tensor`` messages)."""
    return sum(encode(t, codec).ByteSize() for t in frontier)


def cut_table(graph: SplitGraph, x: torch.Tensor, codecs: Sequence[str]) -> list[dict[str, Any]]:
    """One row per cut: frontier, float32 bytes, bytes per codec measured on ``x``."""
    rows = []
    for cut in graph.cuts:
        head, _ = graph.split(cut.name)
        with torch.no_grad():
            frontier = head(x)
        row: dict[str, Any] = {
            "cut": cut.name,
            "tensors": len(cut.frontier),
            "shapes": [list(t.shape) for t in cut.frontier],
            "float32_bytes": cut.nbytes,
            "head_params": cut.head_params,
            "tail_params": cut.tail_params,
            "bytes": {c: encoded_nbytes(frontier, c) for c in codecs},
        }
        rows.append(row)
    return rows


def codec_accuracy(
    model: nn.Module,
    graph: SplitGraph,
    split: Split,
    codecs: Sequence[str],
    cuts: Sequence[Cut] | None = None,
) -> list[dict[str, Any]]:
    """Top-1 accuracy and agreement with the unsplit model, for each cut and codec.

    Each image is encoded on its own (batch 1, as a device sends it), so per-tensor
    quantisation scales are those a real request would use.
    """
    reference = predict(model, split.x)
    base_acc = float((reference == split.y).float().mean())
    rows = []
    for cut in cuts or graph.cuts:
        head, tail = graph.split(cut.name)
        with torch.no_grad():
            frontier = [head(split.x[i : i + 1]) for i in range(len(split))]
        for codec in codecs:
            spec = parse_codec(codec)
            sent = 0
            decoded: list[list[torch.Tensor]] = [[] for _ in cut.frontier]
            for sample in frontier:
                for k, t in enumerate(sample):
                    msg = encode(t, spec)
                    sent += msg.ByteSize()
                    decoded[k].append(decode(msg))
            stacked = [torch.cat(parts) for parts in decoded]
            with torch.no_grad():
                pred = tail(*stacked).argmax(dim=1)
            rows.append(
                {
                    "cut": cut.name,
                    "codec": str(spec),
                    "accuracy": float((pred == split.y).float().mean()),
                    "agreement": float((pred == reference).float().mean()),
                    "model_accuracy": base_acc,
                    "ratio": cut.nbytes * len(split) / max(sent, 1),
                }
            )
    return rows


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Plain text table with right-aligned numbers."""
    cells = [[str(h) for h in header]] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for j, row in enumerate(cells):
        parts = [
            v.rjust(w) if j and _numeric(v) else v.ljust(w)
            for v, w in zip(row, widths, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _numeric(s: str) -> bool:
    return (
        s.replace(",", "").replace(".", "").replace("%", "").replace("x", "").lstrip("-").isdigit()
    )
