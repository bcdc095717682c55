"""The halves equal the whole: every cut of every model, every codec."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from zoo import ZOO, Untraceable, make

import splitnet
from splitnet import PartitionError
from splitnet.models import load_model
from splitnet.report import sample_input

LOSSLESS = ["raw", "zstd:1"]
# Worst error allowed on the model's output, relative to its largest magnitude.
# Measured worst cases over every cut of the models below: fp16 4e-4, bf16 2.6e-3,
# int8 1.0e-2, int8c 1.0e-2 (per tensor on small channels, like int8); the tolerances
# leave about 3x headroom.
TOLERANCE = {"fp16": 2e-3, "bf16": 1e-2, "int8": 3e-2, "int8c": 3e-2}


def _flat(value: Any) -> list[torch.Tensor]:
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flat(v)]
    return [value]


def _check_model(model: nn.Module, inputs: tuple[torch.Tensor, ...], lossy: bool = True) -> int:
    graph = splitnet.trace(model, inputs)
    names = [c.name for c in graph.cuts]
    assert names[0] == "input" and names[-1] == "output"
    assert len(set(names)) == len(names)
    model_keys = set(model.state_dict())
    with torch.no_grad():
        want = _flat(model(*inputs))
        for cut in graph.cuts:
            head, tail = graph.split(cut.name)
            # Each half holds only what it uses, under the model's own names.
            head_keys, tail_keys = set(head.state_dict()), set(tail.state_dict())
            assert head_keys <= model_keys and tail_keys <= model_keys, cut.name
            frontier = head(*inputs)
            assert isinstance(frontier, tuple)
            assert [tuple(t.shape) for t in frontier] == [f.shape for f in cut.frontier]
            assert cut.nbytes == sum(
                t.numel() * 4 for t in frontier if t.is_floating_point()
            ) + sum(t.numel() * t.element_size() for t in frontier if not t.is_floating_point())
            for codec in LOSSLESS:
                sent = [splitnet.decode(splitnet.encode(t, codec)) for t in frontier]
                got = _flat(tail(*sent))
                for g, w in zip(got, want, strict=True):
                    assert torch.equal(g, w), (cut.name, codec)
            if not lossy:
                continue
            for codec, tol in TOLERANCE.items():
                sent = [splitnet.decode(splitnet.encode(t, codec)) for t in frontier]
                for g, w in zip(_flat(tail(*sent)), want, strict=True):
                    err = float((g - w).abs().max() / w.abs().max().clamp(min=1e-12))
                    assert err <= tol, (cut.name, codec, err)
    return len(graph.cuts)


def _param_owners(model: nn.Module, graph: splitnet.SplitGraph, cut: str) -> None:
    """The head holds no parameter that only the tail uses, and vice versa."""
    head, tail = graph.split(cut)
    gm = graph.module
    used: dict[str, set[str]] = {"head": set(), "tail": set()}
    for side, half in (("head", head), ("tail", tail)):
        for node in half.graph.nodes:
            if node.op == "call_module":
                used[side] |= {
                    f"{node.target}.{k}"
                    for k, _ in gm.get_submodule(node.target).named_parameters()
                }
            elif node.op == "get_attr":
                used[side].add(str(node.target))
    assert {k for k, _ in head.named_parameters()} <= used["head"]
    assert {k for k, _ in tail.named_parameters()} <= used["tail"]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_every_cut(name: str) -> None:
    model, inputs = make(name)
    assert _check_model(model, inputs) >= 3


def test_residual_cut_inside_block_sends_two_tensors() -> None:
    model, inputs = make("residual")
    graph = splitnet.trace(model, inputs)
    inside = graph.cut("conv1")
    assert len(inside.frontier) == 2  # the block's input and the branch
    assert len(graph.cut("stem").frontier) == 1


def test_inception_branches_cross_together() -> None:
    model, inputs = make("inception")
    graph = splitnet.trace(model, inputs)
    assert max(len(c.frontier) for c in graph.cuts) >= 3


def test_tuple_output_and_shared_module() -> None:
    model, inputs = make("tuple")
    graph = splitnet.trace(model, inputs)
    assert len(graph.cut("output").frontier) == 2
    head, tail = graph.split("trunk.1")
    out = tail(*head(*inputs))
    assert isinstance(out, tuple) and len(out) == 2

    model, inputs = make("shared")
    graph = splitnet.trace(model, inputs)
    # proj runs before and after the cut: both halves hold it
    head, tail = graph.split("mid")
    assert "proj.weight" in head.state_dict() and "proj.weight" in tail.state_dict()
    assert "out.weight" not in head.state_dict() and "out.weight" in tail.state_dict()
    for cut in graph.names:
        _param_owners(model, graph, cut)


def test_buffers_follow_their_half() -> None:
    model, inputs = make("residual")
    graph = splitnet.trace(model, inputs)
    head, tail = graph.split("stem")
    assert "bn.running_mean" in tail.state_dict() and "bn.running_mean" not in head.state_dict()
    head, tail = graph.split("bn")
    assert "bn.running_var" in head.state_dict() and "bn.running_var" not in tail.state_dict()
    assert "stem.weight" not in tail.state_dict()


def test_param_counts() -> None:
    model, inputs = make("chain")
    graph = splitnet.trace(model, inputs)
    total = sum(p.numel() for p in model.parameters())
    for cut in graph.cuts:
        head, tail = graph.split(cut.name)
        assert cut.head_params == sum(p.numel() for p in head.parameters())
        assert cut.tail_params == sum(p.numel() for p in tail.parameters())
    assert graph.cut("input").tail_params == total
    assert graph.cut("output").head_params == total


def test_export_fallback() -> None:
    model, inputs = make("needs_export")
    graph = splitnet.trace(model, inputs)
    assert graph.method == "export"


def test_unknown_cut_lists_valid_names() -> None:
    model, inputs = make("chain")
    graph = splitnet.trace(model, inputs)
    with pytest.raises(PartitionError) as err:
        graph.split("body.7")
    assert "body.7" in str(err.value) and "body.0" in str(err.value) and "output" in str(err.value)


def test_untraceable_names_the_failing_operation() -> None:
    with pytest.raises(PartitionError) as err:
        splitnet.trace(Untraceable(), (torch.randn(4),))
    text = str(err.value)
    assert "torch.fx" in text and "torch.export" in text
    assert "if x.sum() > 0" in text  # the line of user code that failed


def test_cut_names_are_stable() -> None:
    a = splitnet.trace(*make("residual")).names
    b = splitnet.trace(*make("residual")).names
    assert a == b
    assert "conv1" in a and "bn" in a


def test_digits_cnn_every_cut(digits_weights: Any) -> None:
    model = load_model("digits-cnn", digits_weights)
    x = sample_input((4, 1, 8, 8))
    assert _check_model(model, (x,)) >= 15


VISION = ["resnet18", "mobilenet_v2", "vgg16", "alexnet"]


@pytest.mark.parametrize("arch", VISION)
def test_torchvision_every_cut(arch: str) -> None:
    pytest.importorskip("torchvision")
    model = load_model(f"torchvision:{arch}")
    # 64x64 keeps the test fast on two cores; the graph is the same as at 224x224.
    x = sample_input((1, 3, 64, 64))
    n = _check_model(model, (x,))
    assert n >= 20


def test_resnet18_names() -> None:
    pytest.importorskip("torchvision")
    graph = splitnet.trace(load_model("torchvision:resnet18"), (sample_input((1, 3, 64, 64)),))
    assert "layer2.1.relu" in graph.names
    assert len(graph.cut("layer2.1.conv1").frontier) == 2
