"""Profiling: how long the head and the tail take at every cut.

``profile_cuts`` runs the real head and tail modules of every cut (warm-up runs first,
then a low quantile of ``runs`` timings, so a noisy neighbour or a page fault adds to
few samples and moves the figure little), so module-call overheads count as they will
when serving.
``estimate_cuts`` is the quick alternative: it times each node once while the whole
graph runs in an interpreter and sums them (one pass for all cuts, but the
interpreter's per-node cost inflates small models).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from splitnet.partition import SplitGraph

__all__ = ["QUANTILE", "CutProfile", "describe", "estimate_cuts", "low_quantile", "profile_cuts"]


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


QUANTILE = 0.25  # noise on a shared machine only adds time: a low quantile resists it


def low_quantile(times: list[float], q: float = QUANTILE) -> float:
    """The ``q`` quantile of ``times`` (nearest rank): the median for q=0.5."""
    s = sorted(times)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def describe(runs: int, warmup: int, q: float = QUANTILE) -> str:
    """How ``profile_cuts`` measured, in words (published beside the figures)."""
    return (
        f"{q:.0%} quantile of {runs} timed runs per cut after {warmup} warm-up runs, "
        "in rounds across all cuts, real head and tail modules, batch of the example input"
    )


@torch.no_grad()
def profile_cuts(
    graph: SplitGraph,
    inputs: tuple[torch.Tensor, ...],
    *,
    runs: int = 7,
    warmup: int = 2,
    q: float = QUANTILE,
) -> list[CutProfile]:
    """Per-cut head and tail latency (ms) of ``graph`` on ``inputs``, measured on the
    real halves (batch and shape as in ``inputs``): the ``q`` quantile of ``runs``.

    The runs are interleaved rounds (each round times every cut once), so all cuts are
    measured over the same minutes: on a shared host whose speed drifts by 10-20% over
    minutes, cuts profiled one after the other disagreed by as much with each other.
    """
    sync = any(t.is_cuda for t in inputs)
    halves = []
    for cut in graph.cuts:
        head, tail = graph.split(cut.name)
        if sync:
            head, tail = head.to(inputs[0].device), tail.to(inputs[0].device)
        halves.append((cut.name, head, tail))
    for _ in range(warmup):
        for _, head, tail in halves:
            tail(*head(*inputs))
    head_times: dict[str, list[float]] = {name: [] for name, _, _ in halves}
    tail_times: dict[str, list[float]] = {name: [] for name, _, _ in halves}
    for _ in range(max(1, runs)):
        for name, head, tail in halves:
            t0 = time.perf_counter()
            frontier = head(*inputs)
            if sync:
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            tail(*frontier)
            if sync:
                torch.cuda.synchronize()
            head_times[name].append((t1 - t0) * 1e3)
            tail_times[name].append((time.perf_counter() - t1) * 1e3)
    return [
        CutProfile(name, low_quantile(head_times[name], q), low_quantile(tail_times[name], q))
        for name, _, _ in halves
    ]


@torch.no_grad()
def estimate_cuts(
    graph: SplitGraph, inputs: tuple[torch.Tensor, ...], *, runs: int = 5, warmup: int = 1
) -> list[CutProfile]:
    """Per-cut head and tail latency (ms) from one timed interpreter pass per run."""
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
