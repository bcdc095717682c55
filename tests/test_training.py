"""The model lifecycle on the real digits data: train, evaluate, split with codecs."""

from __future__ import annotations

from pathlib import Path

import pytest

import splitnet
from splitnet.data import load_digits
from splitnet.models import load_model
from splitnet.report import codec_accuracy
from splitnet.training import accuracy


def test_split_is_deterministic() -> None:
    a, b = load_digits(0), load_digits(0)
    assert (a["test"].y == b["test"].y).all()
    assert len(a["train"]) + len(a["val"]) + len(a["test"]) == 1797
    assert not (load_digits(1)["test"].y == a["test"].y).all()


def test_trained_accuracy(digits_weights: Path) -> None:
    model = load_model("digits-cnn", digits_weights)
    acc = accuracy(model, load_digits()["test"])
    assert acc >= 0.97
    assert float((digits_weights.parent / "accuracy.txt").read_text()) == pytest.approx(acc)


def test_int8_zstd_loses_at_most_half_a_point(digits_weights: Path) -> None:
    model = load_model("digits-cnn", digits_weights)
    test = load_digits()["test"]
    graph = splitnet.trace(model, (test.x[:1],))
    rows = codec_accuracy(model, graph, test, ["raw", "int8+zstd:1"])
    by = {(r["cut"], r["codec"]): r for r in rows}
    for cut in graph.names:
        raw, lossy = by[(cut, "raw")], by[(cut, "int8+zstd:1")]
        assert raw["accuracy"] == raw["model_accuracy"]  # lossless: exactly the model
        assert raw["agreement"] == 1.0
        assert raw["accuracy"] - lossy["accuracy"] <= 0.005, cut
        assert lossy["ratio"] > 0
