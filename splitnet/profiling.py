"""Profiling: how long the head and the tail take at every cut, from one kind of run.

Each node of the traced graph is timed while the whole model runs (median over
``runs`` after a warm-up), so one pass prices every cut: the head of a cut costs the
sum of the nodes up to it, the tail the sum of the rest.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from splitnet.partition import SplitGraph

__all__ = ["CutProfile", "profile_cuts"]


@dataclass(frozen=True)
class CutProfile:
    """Measured latency of each half at one cut, for one input shape."""

    cut: str
    head_ms: float  # cumulative time of every node up to and including the cut
    tail_ms: float  # time of every node after the cut


class _Timer(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, sync: bool) -> None:
        super().__init__(gm)
        self.times: dict[fx.Node, float] = {}
        self.sync = sync

    def run_node(self, n: fx.Node) -> Any:
        t0 = time.perf_counter()
        value = super().run_node(n)
        if self.sync:
            torch.cuda.synchronize()
        self.times[n] = time.perf_counter() - t0
        return value


@torch.no_grad()
def profile_cuts(
    graph: SplitGraph, inputs: tuple[torch.Tensor, ...], *, runs: int = 5, warmup: int = 1
) -> list[CutProfile]:
    """Per-cut head and tail latency (ms) of ``graph`` on ``inputs``."""
    sync = any(t.is_cuda for t in inputs)
    samples: dict[fx.Node, list[float]] = {}
    for i in range(warmup + max(1, runs)):
        timer = _Timer(graph.module, sync)
        timer.run(*inputs)
        if i >= warmup:
            for node, t in timer.times.items():
                samples.setdefault(node, []).append(t)
    cost = [statistics.median(samples.get(n, [0.0])) * 1e3 for n in graph.nodes]
    total = sum(cost)
    out = []
    for cut in graph.cuts:
        head = sum(cost[: graph.boundary(cut.name) + 1])
        out.append(CutProfile(cut.name, head, max(total - head, 0.0)))
    return out
