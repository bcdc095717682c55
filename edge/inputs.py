"""Input files for ``splitnet-edge``: ``.npy``, ``.pt`` and ``.png``, read as model batches.

Every mistake (a missing file, a corrupt one, a text file named ``.npy``, a shape that
does not fit) is an ``InputError`` whose message names the file and what was wrong.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from splitnet.errors import SplitNetError

__all__ = ["InputError", "load_input"]

SUFFIXES = (".npy", ".pt", ".png")


class InputError(SplitNetError):
    """An input file cannot be used."""


def load_input(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    """Read one input file as a float32 batch of the model's input ``shape``."""
    if path.suffix not in SUFFIXES:
        raise InputError(f"{path}: unsupported input type (use .npy, .pt or .png)")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix == ".npy":
        x = _npy(path)
    elif path.suffix == ".pt":
        x = _pt(path)
    else:
        x = _png(path, shape)
    per_sample = math.prod(shape[1:])
    if tuple(x.shape[1:]) != tuple(shape[1:]) and x.numel() and x.numel() % per_sample == 0:
        x = x.reshape(-1, *shape[1:])
    if tuple(x.shape[1:]) != tuple(shape[1:]) or x.shape[0] == 0:
        raise InputError(f"{path}: shape {list(x.shape)} does not fit the input {list(shape)}")
    return x.contiguous()


def _npy(path: Path) -> torch.Tensor:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, OSError, EOFError... for bad files
        raise InputError(f"{path}: not a valid .npy array ({_first_line(e)})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
        kind = getattr(arr, "dtype", type(arr))
        raise InputError(f"{path}: holds {kind}, not numbers")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _pt(path: Path) -> torch.Tensor:
    try:
        x = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad files
        raise InputError(f"{path}: not a readable tensor file ({_first_line(e)})") from None
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{path} holds {type(x).__name__}, not a tensor")
    if x.is_complex() or x.dtype == torch.bool:
        raise InputError(f"{path}: holds {x.dtype}, not real numbers")
    return x.float()


def _png(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise InputError("reading .png needs Pillow: pip install pillow") from None
    if len(shape) != 4 or shape[1] not in (1, 3):
        raise InputError(f"{path}: an image fits only an N x 1|3 x H x W input, not {list(shape)}")
    c, h, w = shape[1:]
    try:
        with Image.open(path) as img:
            pixels = img.convert("L" if c == 1 else "RGB").resize((w, h))
            arr = np.asarray(pixels, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable image ({_first_line(e)})") from None
    if c == 1 and arr.mean() > 0.5:  # dark ink on light paper: invert, as in the data set
        arr = 1.0 - arr
    return torch.from_numpy(arr).reshape(1, h, w, c).permute(0, 3, 1, 2)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
