from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits-cnn trained once per test session with the default recipe."""
    from splitnet.models import load_model, save_weights
    from splitnet.training import TrainConfig, train_digits

    model = load_model("digits-cnn").train()
    with torch.enable_grad():
        result = train_digits(model, TrainConfig())
    path = tmp_path_factory.mktemp("weights") / "digits-cnn.safetensors"
    save_weights(model, path)
    (path.parent / "accuracy.txt").write_text(f"{result['test']}")
    return path
