"""Example inputs, made by the model spec: what tracing, profiling and size tables run on.

Activations of an image compress like those of real images only if the input looks like
one, so each kind of model gets an input of its own:

    digits-cnn              real test digits from scikit-learn's set (a synthetic image
                            of the same shape where scikit-learn is not installed)
    torchvision:NAME        a synthetic image: smooth shading, soft-edged shapes and a
                            little grain, ImageNet-normalised; no data set, no download
    package.module:callable the callable's own ``example_input(shape, seed)`` attribute if
                            it has one, else a seeded standard normal tensor

Everything is deterministic: the same spec, shape and seed give the same tensor, on every
machine (the generators are torch's CPU ones, seeded per call).
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from splitnet.errors import ModelError
from splitnet.models import ModelSpec, resolve

__all__ = ["ExampleFactory", "example_input", "synthetic_image"]

logger = logging.getLogger(__name__)

# Makes example inputs: ``factory(shape, seed) -> tensor`` of exactly ``shape``.
ExampleFactory = Callable[[tuple[int, ...], int], torch.Tensor]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def example_input(
    spec_or_name: ModelSpec | str,
    input_shape: Sequence[int] | None = None,
    *,
    seed: int = 0,
) -> torch.Tensor:
    """An example input for a model, of ``input_shape`` (default: the spec's own).

    ``spec_or_name`` is a ``ModelSpec`` from ``resolve`` or a model name; a name of your
    own callable needs ``input_shape``. The spec's ``example_factory`` wins; then a
    callable model's ``example_input`` attribute; then the kind's default (module
    docstring). ``ModelError`` if a factory returns the wrong shape.
    """
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
    spec = resolve(spec_or_name, shape) if isinstance(spec_or_name, str) else spec_or_name
    shape = shape or spec.input_shape
    factory = spec.example_factory or _callable_factory(spec)
    if factory is not None:
        x = factory(shape, seed)
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ModelError(
                f"the example input factory of {spec.name!r} returned {got}, not a tensor "
                f"of shape {shape}"
            )
        return x
    if spec.kind == "builtin":
        return _digits(shape, seed)
    if spec.kind == "torchvision" and len(shape) == 4:
        return synthetic_image(shape, seed=seed)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def synthetic_image(shape: Sequence[int], *, seed: int = 0) -> torch.Tensor:
    """Deterministic image-like batch (N x C x H x W), normalised as torchvision expects.

    Each image: a smooth luminance field (a few low-frequency waves) with correlated
    colour, four to seven soft-edged discs and boxes of random colour, and grain of
    standard deviation 0.01, in [0, 1] before normalisation. Three channels use the
    ImageNet mean and std; other channel counts are centred as (x - 0.5) / 0.25.
    """
    if len(shape) != 4 or any(int(d) <= 0 for d in shape):
        raise ModelError(f"a synthetic image needs a positive N x C x H x W shape, not {shape}")
    n, c, h, w = (int(d) for d in shape)
    images = [_one_image(c, h, w, torch.Generator().manual_seed(seed * 7919 + i)) for i in range(n)]
    x = torch.stack(images)
    if c == 3:
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()
    return ((x - 0.5) / 0.25).contiguous()


def _one_image(c: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    def rand(*size: int) -> torch.Tensor:
        return torch.rand(size, generator=g)

    yy = torch.linspace(0.0, 1.0, h).view(h, 1)
    xx = torch.linspace(0.0, 1.0, w).view(1, w)
    luminance = torch.full((h, w), 0.5)
    for _ in range(4):  # waves of 0.5 to 3 cycles per image
        fy, fx, phase, amp = rand(4).tolist()
        luminance = luminance + 0.12 * amp * torch.sin(
            2 * math.pi * ((0.5 + 2.5 * fy) * yy + (0.5 + 2.5 * fx) * xx) + 2 * math.pi * phase
        )
    tint = 0.8 + 0.4 * rand(c, 1, 1)  # channels correlated, as in photographs
    img = luminance.unsqueeze(0) * tint
    edge = 1.5 / max(h, w)  # soft edges about 1.5 pixels wide
    for k in range(4 + int(rand(1).item() * 4)):
        cy, cx, size, alpha = rand(4).tolist()
        colour = rand(c, 1, 1)
        size = 0.08 + 0.25 * size
        if k % 2:  # a disc
            dist = torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - size
        else:  # a box
            dist = torch.maximum((yy - cy).abs(), (xx - cx).abs()) - size
        mask = torch.sigmoid(-dist / edge) * (0.6 + 0.4 * alpha)
        shade = 1.0 - 0.3 * (yy - cy)  # lit from above
        img = img * (1 - mask) + colour * shade * mask
    img = img + 0.01 * torch.randn((c, h, w), generator=g)
    return img.clamp(0.0, 1.0)


def _digits(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Real test digits (N x C x H x W), resized and repeated over channels as asked."""
    if len(shape) != 4:
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    from splitnet.data import digits_available, load_digits

    if not digits_available():
        logger.info("scikit-learn is not installed: digits-cnn examples are synthetic images")
        return synthetic_image(shape, seed=seed)
    test = load_digits(seed)["test"]
    n, c, h, w = shape
    x = test.x[torch.arange(n) % len(test)]
    if (h, w) != (8, 8):
        x = nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.repeat(1, c, 1, 1).contiguous()


def _callable_factory(spec: ModelSpec) -> ExampleFactory | None:
    """A callable model's ``example_input`` attribute, if it has a callable one."""
    if spec.kind != "callable":
        return None
    module_name, attr = spec.name.split(":")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ModelError(f"cannot import {spec.name!r}: {e}") from e
    factory = getattr(target, "example_input", None)
    return factory if callable(factory) else None
