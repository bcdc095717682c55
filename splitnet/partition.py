"""Partitioning: trace a model once, list every valid cut, split it into head and tail.

A model is traced with ``torch.fx`` (falling back to ``torch.export`` where fx cannot
trace it). Nodes run in topological order; the cut after node *i* sends the
**frontier**: every value produced at or before *i* that is used after *i*. In a chain
that is one tensor, inside a residual block two. Parameters (``get_attr`` nodes) never
cross a cut: each half reads the ones it needs. Cuts whose frontier holds a value that
is not a tensor (a shape, a tuple) are not offered.

    graph = trace(model, (x,))
    [c.name for c in graph.cuts]          # ['input', 'conv1', ..., 'output']
    head, tail = graph.split("layer2.1.relu")
    assert torch.equal(tail(*head(x)), model(x))
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_structure

from splitnet.errors import PartitionError

__all__ = ["Cut", "FrontierTensor", "SplitGraph", "trace"]

logger = logging.getLogger(__name__)

_TRACE_LOCK = threading.Lock()
INPUT = "input"
OUTPUT = "output"
_SUFFIX_RE = re.compile(r"_\d+$")


@dataclass(frozen=True)
class FrontierTensor:
    """One tensor crossing a cut, as seen with the example input."""

    name: str  # the graph value's name (unique within the model)
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Bytes on the wire as float32 (floating tensors) or their own dtype (others)."""
        size = 4 if self.dtype.is_floating_point else torch.empty((), dtype=self.dtype).itemsize
        return self.numel * size


@dataclass(frozen=True)
class Cut:
    """A place the model can be cut."""

    name: str  # stable, human: a node name, or "input" / "output"
    index: int  # position in execution order (0 is "input")
    frontier: tuple[FrontierTensor, ...]  # the tensors that cross, in the order head returns
    head_params: int  # parameters the head holds
    tail_params: int  # parameters the tail holds

    @property
    def nbytes(self) -> int:
        """Bytes crossing the cut, float tensors counted as float32."""
        return sum(t.nbytes for t in self.frontier)


@dataclass(frozen=True)
class _Meta:
    is_tensor: bool
    shape: tuple[int, ...] = ()
    dtype: torch.dtype | None = None


class _Recorder(fx.Interpreter):
    """Runs the graph once and records the kind, shape and dtype of every value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.meta: dict[fx.Node, _Meta] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if isinstance(value, torch.Tensor):
            self.meta[n] = _Meta(True, tuple(value.shape), value.dtype)
        else:
            self.meta[n] = _Meta(False)
        return value


class SplitGraph:
    """A traced model: its valid cuts and a way to split it at any of them."""

    def __init__(self, gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], method: str):
        self.module = gm
        self.method = method  # "fx" or "export"
        self.example_inputs = example_inputs
        # Placeholders first (torch.export puts parameter reads before them).
        every = [n for n in gm.graph.nodes if n.op != "output"]
        nodes = [n for n in every if n.op == "placeholder"]
        nodes += [n for n in every if n.op != "placeholder"]
        self._output = next(n for n in gm.graph.nodes if n.op == "output")
        self._nodes = nodes
        self._pos = {n: i for i, n in enumerate(nodes)}
        recorder = _Recorder(gm)
        with torch.no_grad():
            recorder.run(*example_inputs)
        self._meta = recorder.meta
        self.cuts: list[Cut] = self._find_cuts()
        self._by_name = {c.name: c for c in self.cuts}

    # ------------------------------------------------------------------ cuts
    @property
    def names(self) -> list[str]:
        """Cut names in execution order."""
        return [c.name for c in self.cuts]

    @property
    def nodes(self) -> list[fx.Node]:
        """The graph's nodes in execution order (placeholders first, no output node)."""
        return list(self._nodes)

    def boundary(self, name: str) -> int:
        """Index in ``nodes`` of the last node the head of cut ``name`` runs."""
        return self._boundary[self.cut(name).name]

    def cut(self, name: str) -> Cut:
        """The cut called ``name``; ``PartitionError`` lists the valid ones otherwise."""
        try:
            return self._by_name[name]
        except KeyError:
            raise PartitionError(
                f"unknown cut {name!r}; valid cuts: {', '.join(self.names)}"
            ) from None

    def _find_cuts(self) -> list[Cut]:
        end = len(self._nodes)
        last_use: dict[fx.Node, int] = {}
        for n in self._nodes:
            uses = [self._pos.get(u, end) for u in n.users]
            last_use[n] = max(uses, default=-1)
        names = self._node_names()
        param_sizes = {
            k: p.numel() for k, p in self.module.named_parameters(remove_duplicate=False)
        }
        uses_params = {n: self._params_of(n, param_sizes) for n in self._nodes}

        n_inputs = sum(1 for n in self._nodes if n.op == "placeholder")
        self._boundary: dict[str, int] = {}
        cuts: list[Cut] = []
        previous: tuple[fx.Node, ...] | None = None
        for i in range(n_inputs - 1, end):
            node = self._nodes[i]
            if node.op == "get_attr" or (i >= n_inputs and i == end - 1):
                continue  # parameters never cross; the last node is the "output" cut
            live = tuple(n for n in self._nodes[: i + 1] if n.op != "get_attr" and last_use[n] > i)
            if live == previous or not live or not all(self._meta[n].is_tensor for n in live):
                continue
            previous = live
            name = INPUT if i == n_inputs - 1 else names[node]
            cuts.append(self._make_cut(name, len(cuts), live, i, uses_params, param_sizes))
            self._boundary[name] = i
        out_live = tuple(n for n in self._nodes if last_use[n] == end and n.op != "get_attr")
        if out_live and all(self._meta[n].is_tensor for n in out_live):
            cuts.append(
                self._make_cut(OUTPUT, len(cuts), out_live, end - 1, uses_params, param_sizes)
            )
            self._boundary[OUTPUT] = end - 1
        return cuts

    def _make_cut(
        self,
        name: str,
        index: int,
        live: tuple[fx.Node, ...],
        i: int,
        uses_params: dict[fx.Node, set[str]],
        sizes: dict[str, int],
    ) -> Cut:
        head: set[str] = set().union(*(uses_params[n] for n in self._nodes[: i + 1]))
        tail: set[str] = set().union(*(uses_params[n] for n in self._nodes[i + 1 :]))
        frontier = tuple(
            FrontierTensor(n.name, self._meta[n].shape, self._meta[n].dtype or torch.float32)
            for n in live
        )
        return Cut(
            name=name,
            index=index,
            frontier=frontier,
            head_params=sum(sizes[k] for k in head),
            tail_params=sum(sizes[k] for k in tail),
        )

    def _params_of(self, n: fx.Node, sizes: dict[str, int]) -> set[str]:
        """Parameter names node ``n`` reads (``get_attr`` reads count for their users)."""
        used = {str(a.target) for a in n.all_input_nodes if a.op == "get_attr"}
        if n.op == "call_module":
            prefix = f"{n.target}."
            used |= {k for k in sizes if k.startswith(prefix)}
        return used & sizes.keys()

    def _node_names(self) -> dict[fx.Node, str]:
        """Human names: module paths for module calls, scope + op for the rest."""
        names: dict[fx.Node, str] = {}
        seen: dict[str, int] = {}
        reserved = {INPUT, OUTPUT}
        for n in self._nodes:
            if n.op == "call_module":
                base = str(n.target)
            else:
                stack = n.meta.get("nn_module_stack") or {}
                scope = ""
                if stack:
                    last = list(stack.values())[-1]
                    scope = str(last[0] if isinstance(last, tuple) else last)
                op = _SUFFIX_RE.sub("", n.name)
                base = f"{scope}.{op}" if scope else op
            count = seen.get(base, 0)
            seen[base] = count + 1
            name = base if count == 0 else f"{base}_{count}"
            while name in reserved:
                name += "_"
            reserved.add(name)
            names[n] = name
        return names

    # ----------------------------------------------------------------- split
    def split(self, cut_name: str) -> tuple[fx.GraphModule, fx.GraphModule]:
        """Return ``(head, tail)``: ``head(*inputs)`` gives the frontier tuple,
        ``tail(*frontier)`` the model's output. Each half holds only what it uses.
        """
        cut = self.cut(cut_name)
        live_names = [t.name for t in cut.frontier]
        by_name = {n.name: n for n in self._nodes}
        live = [by_name[name] for name in live_names]
        boundary = self._boundary[cut.name]
        head_nodes = self._nodes[: boundary + 1]
        tail_nodes = self._nodes[boundary + 1 :]

        head_graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in head_nodes:
            if n.op == "get_attr" and not any(self._pos.get(u, -1) <= boundary for u in n.users):
                continue
            env[n] = head_graph.node_copy(n, env.__getitem__)
        head_graph.output(tuple(env[n] for n in live))

        tail_graph = fx.Graph()
        tenv: dict[fx.Node, fx.Node] = {}
        for n in live:
            tenv[n] = tail_graph.placeholder(n.name)
            tenv[n].meta = dict(n.meta)
        for n in head_nodes:  # parameters the tail reads are re-read, never sent
            if n.op == "get_attr" and any(
                self._pos.get(u, len(self._nodes)) > boundary for u in n.users
            ):
                tenv[n] = tail_graph.node_copy(n, tenv.__getitem__)
        for n in tail_nodes:
            if n.op == "placeholder":
                continue
            tenv[n] = tail_graph.node_copy(n, tenv.__getitem__)
        tail_graph.node_copy(self._output, tenv.__getitem__)
        out_spec = _out_spec(self.module)
        if out_spec is not None:  # torch.export graphs rebuild the output's structure
            in_spec = tree_structure((tuple(live_names), {}))
            info = fx.graph._PyTreeInfo(orig_args=live_names, in_spec=in_spec, out_spec=out_spec)
            tail_graph.set_codegen(fx.graph._PyTreeCodeGen(info))

        head = fx.GraphModule(self.module, head_graph, class_name="Head")
        tail = fx.GraphModule(self.module, tail_graph, class_name="Tail")
        return head.eval(), tail.eval()


def _out_spec(gm: fx.GraphModule) -> Any:
    codegen = getattr(gm.graph, "_codegen", None)
    info = getattr(codegen, "pytree_info", None)
    return getattr(info, "out_spec", None)


def _describe(err: BaseException) -> str:
    """The error's type and first line, plus the user code that raised it."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]
    frames = [
        f
        for f in traceback.extract_tb(err.__traceback__)
        if "/torch/" not in f.filename and "splitnet/partition" not in f.filename
    ]
    if frames:
        f = frames[-1]
        text += f" (at {f.filename}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`)"
    return text


def trace(
    model: nn.Module,
    example_inputs: Iterable[torch.Tensor] | torch.Tensor,
    *,
    check: bool = True,
) -> SplitGraph:
    """Trace ``model`` on ``example_inputs`` (a tuple of tensors) and list its cuts.

    ``check`` runs the traced graph and the model once and requires equal outputs.
    """
    inputs = (
        (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    )
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise PartitionError("example_inputs must be a tensor or a tuple of tensors")
    model = model.eval()
    with _TRACE_LOCK:  # fx patches global state while tracing: one trace at a time
        gm, method = _trace_locked(model, inputs)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    try:
        graph = SplitGraph(gm, inputs, method)
    except Exception as err:
        raise PartitionError(
            f"the traced graph of {type(model).__name__} fails to run: {_describe(err)}"
        ) from err
    if check:
        _check_equal(model, gm, inputs)
    return graph


def _trace_locked(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[fx.GraphModule, str]:
    try:
        return fx.symbolic_trace(model), "fx"
    except Exception as fx_err:  # fx raises many types; we report, then try export
        logger.info(
            "torch.fx could not trace %s (%s); trying torch.export",
            type(model).__name__,
            _describe(fx_err),
        )
        try:
            return _export(model, inputs), "export"
        except Exception as ex_err:
            raise PartitionError(
                f"cannot trace {type(model).__name__}: torch.fx failed with "
                f"{_describe(fx_err)}; torch.export failed with {_describe(ex_err)}"
            ) from ex_err


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    ep = torch.export.export(model, inputs, strict=False)
    gm = ep.module()
    if not isinstance(gm, fx.GraphModule):  # pragma: no cover - depends on torch version
        raise TypeError(f"torch.export gave {type(gm).__name__}, not a GraphModule")
    return gm


def _check_equal(model: nn.Module, gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
    with torch.no_grad():
        want = model(*inputs)
        got = gm(*inputs)
    flat_want, flat_got = _flatten(want), _flatten(got)
    same = len(flat_want) == len(flat_got) and all(
        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b) or a == b
        for a, b in zip(flat_want, flat_got, strict=False)
    )
    if not same:
        raise PartitionError(
            f"the traced graph of {type(model).__name__} does not reproduce the model's output "
            "(it may depend on Python state the tracer cannot see)"
        )


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flatten(v)]
    if isinstance(value, dict):
        return [x for k in sorted(value) for x in _flatten(value[k])]
    return [value]
