from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitnet import ModelError, ModelMismatchError, fingerprint, load_model
from splitnet.models import resolve, save_weights


def test_digits_cnn_shape() -> None:
    model = load_model("digits-cnn")
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert not model.training


def test_torchvision_random_weights_are_deterministic() -> None:
    pytest.importorskip("torchvision")
    a = load_model("torchvision:resnet18")
    b = load_model("torchvision:resnet18")
    assert fingerprint(a) == fingerprint(b)
    assert resolve("torchvision:resnet18").input_shape == (1, 3, 224, 224)


def test_user_callable() -> None:
    model = load_model("zoo:Chain", input_shape=(1, 16))
    assert model(torch.zeros(1, 16)).shape == (1, 8)
    with pytest.raises(ModelError, match="input shape"):
        resolve("zoo:Chain")
    with pytest.raises(ModelError, match="cannot import"):
        load_model("no_such_module:thing", input_shape=(1,))


@pytest.mark.parametrize("bad", ["resnet18", "torchvision:nope", "digits"])
def test_bad_names_say_how_to_fix(bad: str) -> None:
    with pytest.raises(ModelError) as err:
        load_model(bad)
    assert "torchvision" in str(err.value)


def test_safetensors_round_trip_and_fingerprint(tmp_path: Path) -> None:
    model = load_model("digits-cnn")
    with torch.no_grad():
        model.fc2.bias.add_(1.0)
    path = tmp_path / "w.safetensors"
    save_weights(model, path)
    again = load_model("digits-cnn", path)
    assert fingerprint(again) == fingerprint(model)
    assert fingerprint(again) != fingerprint(load_model("digits-cnn"))
    load_model("digits-cnn", path, expect_fingerprint=fingerprint(model))
    with pytest.raises(ModelMismatchError):
        load_model("digits-cnn", path, expect_fingerprint="0" * 64)


def test_fingerprint_covers_names_dtypes_and_bytes() -> None:
    state = {"a": torch.zeros(2), "b": torch.ones(3)}
    base = fingerprint(state)
    assert fingerprint({"a": torch.zeros(2), "c": torch.ones(3)}) != base
    assert fingerprint({"a": torch.zeros(2, dtype=torch.float64), "b": torch.ones(3)}) != base
    assert fingerprint({"a": torch.zeros(1, 2), "b": torch.ones(3)}) != base
    assert fingerprint({"b": torch.ones(3), "a": torch.zeros(2)}) == base


def test_weights_load_safely(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_model("digits-cnn", tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="cannot read"):
        load_model("digits-cnn", junk)
    # A pickle that would run code is refused by weights_only loading.
    evil = tmp_path / "evil.pt"
    import pickle

    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    evil.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ModelError):
        load_model("digits-cnn", evil)
    other = tmp_path / "other.safetensors"
    save_weights(load_model("zoo:Chain", input_shape=(1, 16)), other)
    with pytest.raises(ModelError, match="do not fit"):
        load_model("digits-cnn", other)
