"""Models: one name resolves to the same module on the edge and in the cloud.

Names:

    digits-cnn                 built in: a small CNN for scikit-learn's 8x8 digits
    torchvision:NAME           any torchvision classification model, random weights
    package.module:callable    your own: a callable returning an ``nn.Module``

Weights load from safetensors (or a ``torch.load(weights_only=True)`` file); nothing is
ever downloaded. A model's fingerprint is the sha256 over its state dict, computed the
same way everywhere (see ``fingerprint``).
"""

from __future__ import annotations

import hashlib
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from splitnet.errors import ModelError, ModelMismatchError

__all__ = [
    "DigitsCNN",
    "ModelSpec",
    "fingerprint",
    "is_trained",
    "load_model",
    "load_weights",
    "resolve",
    "save_weights",
    "untrained_warning",
]

DIGITS_CNN = "digits-cnn"
_CALLABLE_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 digit images: a stem, a residual block, and a classifier.

    The residual block means cuts inside it send two tensors, as in real networks.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.block = ResidualBlock(32)
        self.pool1 = nn.MaxPool2d(2)  # 8x8 -> 4x4
        self.conv = nn.Sequential(
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        self.pool2 = nn.MaxPool2d(2)  # 4x4 -> 2x2
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * 2 * 2, 128)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.25)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.pool1(self.block(self.stem(x)))
        x = self.flatten(self.pool2(self.conv(x)))
        return self.fc2(self.dropout(self.relu(self.fc1(x))))


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What a model name resolves to."""

    name: str  # as the user wrote it
    input_shape: tuple[int, ...]  # default example input, batch 1
    kind: str  # "builtin", "torchvision" or "callable"
    # Makes example inputs, ``factory(shape, seed) -> tensor``; None: the kind's default
    # (see ``splitnet.examples``).
    example_factory: Callable[[tuple[int, ...], int], torch.Tensor] | None = None

    def example_input(
        self, input_shape: tuple[int, ...] | None = None, *, seed: int = 0
    ) -> torch.Tensor:
        """An example input of ``input_shape`` (default: this spec's); see ``splitnet.examples``."""
        from splitnet.examples import example_input

        return example_input(self, input_shape, seed=seed)


def resolve(
    name: str,
    input_shape: tuple[int, ...] | None = None,
    *,
    example_factory: Callable[[tuple[int, ...], int], torch.Tensor] | None = None,
) -> ModelSpec:
    """Check a model name and return its spec; ``ModelError`` says how to fix a bad one.

    ``example_factory`` overrides how example inputs are made (``ModelSpec.example_input``).
    """
    if name == DIGITS_CNN:
        return ModelSpec(
            name=name,
            input_shape=input_shape or (1, 1, 8, 8),
            kind="builtin",
            example_factory=example_factory,
        )
    if name.startswith("torchvision:"):
        size = 299 if name.endswith("inception_v3") else 224
        return ModelSpec(
            name=name,
            input_shape=input_shape or (1, 3, size, size),
            kind="torchvision",
            example_factory=example_factory,
        )
    if _CALLABLE_RE.match(name):
        if input_shape is None:
            raise ModelError(f"model {name!r} is your own: give its input shape (--input-shape)")
        return ModelSpec(
            name=name, input_shape=input_shape, kind="callable", example_factory=example_factory
        )
    raise ModelError(
        f"unknown model {name!r}: use digits-cnn, torchvision:NAME (e.g. torchvision:resnet18) "
        "or package.module:callable"
    )


def is_trained(name: str, weights: str | Path | None) -> bool:
    """Whether ``name`` loaded with ``weights`` has trained weights, as far as splitnet knows.

    Built-in and torchvision models without a weights file have their seeded random
    initial weights (nothing is ever downloaded). Your own callable decides its weights
    itself, so it counts as trained.
    """
    if weights is not None:
        return True
    return resolve(name, (1,)).kind == "callable"  # the shape is irrelevant here


def untrained_warning(name: str, weights: str | Path | None) -> str | None:
    """One line to show a user who runs ``name`` without weights; None if it is trained."""
    if is_trained(name, weights):
        return None
    if name == DIGITS_CNN:
        return (
            f"{name} has no weights: it is untrained and its answers are noise; train it "
            f"(splitnet train {name} --out W.safetensors) and pass the file"
        )
    return (
        f"{name} has no weights: it runs with random initial weights (splitnet never "
        "downloads any), so its answers are noise; pass a weights file for real outputs"
    )


def build(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """Build the module for ``spec`` with deterministic random weights."""
    torch.manual_seed(seed)
    if spec.kind == "builtin":
        return DigitsCNN()
    if spec.kind == "torchvision":
        try:
            import torchvision
        except ImportError as e:
            raise ModelError("torchvision is not installed: pip install 'splitnet[vision]'") from e
        arch = spec.name.split(":", 1)[1]
        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise ModelError(
                f"torchvision has no classification model {arch!r}; for example: "
                + ", ".join(sorted(torchvision.models.list_models(module=torchvision.models))[:12])
                + ", ..."
            )
        extra = {"init_weights": False} if arch in ("googlenet", "inception_v3") else {}
        if arch in ("googlenet", "inception_v3"):
            extra["aux_logits"] = False
        return torchvision.models.get_model(arch, weights=None, **extra)
    module_name, attr = spec.name.split(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ModelError(f"cannot import {spec.name!r}: {e}") from e
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec.name!r} returned {type(model).__name__}, not an nn.Module")
    return model


def load_model(
    name: str,
    weights: str | Path | None = None,
    *,
    input_shape: tuple[int, ...] | None = None,
    expect_fingerprint: str | None = None,
) -> nn.Module:
    """Build the model called ``name``, load ``weights`` if given, and put it in eval mode.

    ``expect_fingerprint`` pins the weights: the full sha256 or a prefix of at least 16
    hex digits (as the server's banner prints it); anything else raises
    ``ModelMismatchError``.
    """
    if expect_fingerprint is not None:
        expect_fingerprint = expect_fingerprint.strip().lower()
        if len(expect_fingerprint) < 16 or any(
            c not in "0123456789abcdef" for c in expect_fingerprint
        ):
            raise ModelError(
                f"expected fingerprint {expect_fingerprint!r} for {name!r} must be at least "
                "16 hex digits of the sha256 (splitnet train and splitnet-cloud print it)"
            )
    model = build(resolve(name, input_shape))
    if weights is not None:
        load_weights(model, weights)
    model.eval()
    if expect_fingerprint is not None:
        got = fingerprint(model)
        if not got.startswith(expect_fingerprint):
            source = f"weights {str(weights)!r}" if weights is not None else "its initial weights"
            raise ModelMismatchError(
                f"model {name!r} with {source} has fingerprint {got[:16]}..., but "
                f"{expect_fingerprint[:16]}... is pinned: refusing to load other weights"
            )
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors file (or a weights-only torch file) into ``model``, strictly."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"weights file {str(path)!r} does not exist or is not a file "
            "(train one: splitnet train)"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files raise many types
        raise ModelError(f"cannot read weights {str(path)!r}: {e}") from e
    if not isinstance(state, dict):
        raise ModelError(f"{str(path)!r} holds {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise ModelError(f"weights {str(path)!r} do not fit the model: {' '.join(first)}") from e


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Save ``model``'s state dict as safetensors."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))


def fingerprint(model: nn.Module | dict[str, torch.Tensor]) -> str:
    r"""sha256 over the state dict: for each entry in sorted key order, the UTF-8 line
    ``name\\tdtype\\tshape\\tnbytes\\n`` followed by the tensor's little-endian bytes.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        shape = ",".join(str(d) for d in t.shape)
        nbytes = t.numel() * t.element_size()
        h.update(f"{key}\t{str(t.dtype).removeprefix('torch.')}\t{shape}\t{nbytes}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
