"""The handwritten digits set that scikit-learn ships, split deterministically.

1,797 images of 8x8 pixels (values 0..16), scaled to [0, 1] and shaped N x 1 x 8 x 8.
The split is a seeded permutation: 60% train, 20% validation, 20% test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from splitnet.errors import SplitNetError

__all__ = ["Split", "digits_available", "load_digits"]


@dataclass(frozen=True)
class Split:
    """Images (N x 1 x 8 x 8, float32 in [0, 1]) and labels (N, int64)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def digits_available() -> bool:
    """Whether the digits set can be loaded (scikit-learn is installed and importable)."""
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        return False
    return True


def load_digits(seed: int = 0) -> dict[str, Split]:
    """Return ``{"train": ..., "val": ..., "test": ...}``, the same for the same seed."""
    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError as e:
        raise SplitNetError(
            "the digits data set needs scikit-learn: pip install 'splitnet[data]'"
        ) from e
    bunch = sk_load()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_train, n_val = int(0.6 * len(order)), int(0.2 * len(order))
    parts = {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
    return {
        name: Split(torch.from_numpy(images[idx]).unsqueeze(1), torch.from_numpy(labels[idx]))
        for name, idx in parts.items()
    }
