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


# ------------------------------------------------------------------ example inputs


def test_example_inputs_come_from_the_spec() -> None:
    from splitnet.data import load_digits
    from splitnet.examples import example_input

    digit = example_input("digits-cnn", (2, 1, 8, 8))
    assert torch.equal(digit, load_digits(0)["test"].x[:2])  # real test digits
    image = example_input("torchvision:resnet18")
    assert image.shape == (1, 3, 224, 224)
    assert torch.equal(image, resolve("torchvision:resnet18").example_input())  # deterministic
    assert not torch.equal(image, example_input("torchvision:resnet18", seed=1))
    # ImageNet-normalised values of pixels in [0, 1]
    assert -2.2 < float(image.min()) and float(image.max()) < 2.7
    assert example_input("zoo:Chain", (3, 16)).shape == (3, 16)  # seeded normal


def test_own_example_factory_from_the_spec_or_the_callable() -> None:
    from splitnet.examples import example_input

    spec = resolve("zoo:Chain", (1, 16), example_factory=lambda shape, seed: torch.full(shape, 7.0))
    assert torch.equal(example_input(spec), torch.full((1, 16), 7.0))
    # example_models.with_example carries its own example_input(shape, seed)
    assert torch.equal(example_input("example_models:with_example", (2, 4)), torch.ones(2, 4))
    bad = resolve("zoo:Chain", (1, 16), example_factory=lambda shape, seed: torch.zeros(2))
    with pytest.raises(ModelError, match="shape"):
        example_input(bad)


def test_synthetic_image_compresses_like_a_photograph() -> None:
    """At every tenth cut of resnet18, frontier bytes under zstd:1 and int8+zstd:1 are
    within 25% of those of a real photograph at 112x112 (scikit-learn's china.jpg); the old input
    (a digit blown up to 224x224) was 2x off at the input."""
    pytest.importorskip("torchvision")
    from sklearn.datasets import load_sample_image

    from splitnet import trace
    from splitnet.examples import IMAGENET_MEAN, IMAGENET_STD, synthetic_image
    from splitnet.report import encoded_nbytes

    photo = torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1)
    photo = torch.nn.functional.interpolate(
        photo.float().unsqueeze(0) / 255, size=(112, 112), mode="bilinear", antialias=True
    )
    photo = (photo - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(1, 3, 1, 1)
    synthetic = synthetic_image((1, 3, 112, 112))  # as at 224, and faster
    graph = trace(load_model("torchvision:resnet18"), (synthetic,))
    with torch.no_grad():
        for cut in graph.names[::10]:
            head, _ = graph.split(cut)
            for codec in ("zstd:1", "int8+zstd:1"):
                real = encoded_nbytes(head(photo), codec)
                ours = encoded_nbytes(head(synthetic), codec)
                assert 0.75 < ours / real < 1.25, (cut, codec, ours, real)


NO_SKLEARN = """
import sys
sys.modules["sklearn"] = None  # any import of scikit-learn now raises ImportError
from splitnet.cli import main
from splitnet.data import digits_available
from splitnet.examples import example_input
from splitnet.models import load_model
from splitnet.partition import trace
from splitnet.profiling import profile_cuts
from splitnet.report import sample_input
assert not digits_available()
x = example_input("torchvision:alexnet", (1, 3, 64, 64))
graph = trace(load_model("torchvision:alexnet"), (x,))
assert len(graph.cuts) > 10 and profile_cuts(graph, (x,), runs=1)
assert sample_input((1, 3, 64, 64)).shape == (1, 3, 64, 64)
assert example_input("digits-cnn").shape == (1, 1, 8, 8)  # a synthetic image instead
assert main(["cuts", "torchvision:alexnet", "--input-shape", "1,3,64,64", "--json"]) == 0
assert "sklearn" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
print("traced without scikit-learn")
"""


def test_torchvision_needs_no_scikit_learn() -> None:
    pytest.importorskip("torchvision")
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", NO_SKLEARN], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "traced without scikit-learn" in done.stdout


def test_is_trained_and_the_warning(tmp_path: Path) -> None:
    from splitnet.models import is_trained, untrained_warning

    assert not is_trained("digits-cnn", None)
    assert not is_trained("torchvision:resnet18", None)
    assert is_trained("digits-cnn", tmp_path / "w.safetensors")
    assert is_trained("zoo:Chain", None)  # your own callable loads its own weights
    assert "untrained" in (untrained_warning("digits-cnn", None) or "")
    assert "random initial weights" in (untrained_warning("torchvision:resnet18", None) or "")
    assert untrained_warning("digits-cnn", "w.safetensors") is None
    with pytest.raises(ModelError):
        is_trained("nope", None)
