"""Training and evaluation of the digits model (the model lifecycle)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from splitnet.data import Split, load_digits

__all__ = ["TrainConfig", "accuracy", "predict", "train_digits"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train the digits model."""

    epochs: int = 40  # passes over the training split
    batch_size: int = 64  # images per step
    lr: float = 3e-3  # AdamW learning rate (cosine-decayed to 0)
    weight_decay: float = 1e-4  # AdamW weight decay
    seed: int = 0  # seeds weights, data order and augmentation

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel in each direction."""
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    out = torch.empty_like(x)
    offsets = torch.randint(0, 3, (len(x), 2), generator=gen)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + 8, dx : dx + 8]
    return out


def train_digits(
    model: nn.Module,
    config: TrainConfig = TrainConfig(),
    *,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` on the digits train split; return val and test accuracy.

    ``progress(epoch, loss)`` is called after every epoch.
    """
    torch.manual_seed(config.seed)
    data = load_digits(config.seed)
    train = data["train"]
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * -(-len(train) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        total = 0.0
        for start in range(0, len(train), config.batch_size):
            idx = order[start : start + config.batch_size]
            x, y = _augment(train.x[idx], gen), train.y[idx]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if progress is not None:
            progress(epoch + 1, total / len(train))
    model.eval()
    return {"val": accuracy(model, data["val"]), "test": accuracy(model, data["test"])}


@torch.no_grad()
def predict(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int = 256
) -> torch.Tensor:
    """Class predictions of ``fn`` over ``x``, in batches."""
    return torch.cat([fn(x[i : i + batch]).argmax(dim=1) for i in range(0, len(x), batch)])


def accuracy(fn: Callable[[torch.Tensor], torch.Tensor], split: Split) -> float:
    """Top-1 accuracy of ``fn`` on ``split``, in [0, 1]."""
    return float((predict(fn, split.x) == split.y).float().mean())
