"""``cut="auto"``: choose the cut and codec from measurements, and re-plan as the link moves.

At connect time the device profiles the model (head latency per cut, bytes and
encode/decode time per cut and codec, all on a real input), the server's
``GetModelInfo`` gives the tail latency per cut, and probes (requests with almost no
payload and no compute) give the per-request round trip. Every response then feeds
``LinkEstimator``; when an estimate moves by 25% the planner chooses again. The choice
and its predicted breakdown are reported (``AutoPlan.prediction``, ``AutoPlan.history``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from splitnet.partition import SplitGraph
from splitnet.planning import CostTable, LinkEstimate, LinkEstimator, Planner, Prediction
from splitnet.planning import measure_costs as _measure
from splitnet.v1 import inference_pb2 as pb

__all__ = ["AutoPlan", "calibrate_agreement"]

logger = logging.getLogger(__name__)

DEFAULT_CODECS = ("raw", "zstd:1", "int8+zstd:1")
RTT_PROBE_EVERY = 20  # requests between health-check round-trip probes


@torch.no_grad()
def calibrate_agreement(
    model: torch.nn.Module, graph: SplitGraph, xs: torch.Tensor, codecs: Sequence[str]
) -> dict[tuple[str, str], float]:
    """Top-1 agreement with the unsplit model for every (cut, lossy codec), on ``xs``
    (each sample encoded on its own, as a device sends it).
    """
    from splitnet.codecs import parse_codec
    from splitnet.data import Split
    from splitnet.report import codec_accuracy

    lossy = [c for c in codecs if not parse_codec(c).lossless]
    if not lossy:
        return {}
    reference = model(xs).argmax(dim=1)
    rows = codec_accuracy(model, graph, Split(xs, reference), lossy)
    return {(r["cut"], r["codec"]): r["agreement"] for r in rows}


@dataclass
class AutoPlan:
    """The planner state of one client."""

    planner: Planner
    estimator: LinkEstimator
    prediction: Prediction | None = None
    history: list[tuple[int, Prediction]] = field(default_factory=list)  # (request, choice)
    requests: int = 0

    @classmethod
    def build(
        cls,
        graph: SplitGraph,
        x: torch.Tensor,
        info: pb.ModelInfo,
        *,
        codecs: Sequence[str] = DEFAULT_CODECS,
        prior: LinkEstimate,
        accuracy_budget: float = 0.005,
        agreement: dict[tuple[str, str], float] | None = None,
        edge_slowdown: float = 1.0,
        runs: int = 5,
    ) -> AutoPlan:
        """Profile here, take the server's tail latencies from ``info``, and plan."""
        cloud = {c.name: c.tail_latency_ms for c in info.cuts}
        result_bytes = 40 + sum(4 * math.prod(o.shape) + 16 for o in info.outputs)
        table: CostTable = _measure(
            graph,
            x,
            codecs,
            cloud,
            result_bytes=result_bytes,
            runs=runs,
            edge_slowdown=edge_slowdown,
            agreement=agreement,
        )
        plan = cls(Planner(table, accuracy_budget=accuracy_budget), LinkEstimator(prior))
        plan.replan()
        return plan

    def replan(self) -> Prediction:
        """Choose on the current estimate; log a change."""
        choice = self.planner.plan(self.estimator.estimate)
        self.estimator.planned()
        if self.prediction is None or (choice.cut, choice.codec) != (
            self.prediction.cut,
            self.prediction.codec,
        ):
            logger.info("plan: %s", choice.describe())
            self.history.append((self.requests, choice))
        self.prediction = choice
        return choice

    def observe(
        self,
        *,
        residual_ms: float,
        bytes_up: int,
        bytes_down: int,
        queue_ms: float,
        probe_rtt: Callable[[], float] | None = None,
    ) -> Prediction:
        """Feed one answered request; probe the RTT now and then; re-plan if needed."""
        self.requests += 1
        if probe_rtt is not None and self.requests % RTT_PROBE_EVERY == 0:
            try:
                self.estimator.observe_rtt(probe_rtt())
            except Exception as e:  # a failed probe must not fail the request
                logger.debug("rtt probe failed: %s", e)
        self.estimator.observe(residual_ms, bytes_up, bytes_down, queue_ms)
        assert self.prediction is not None
        if self.estimator.should_replan():
            return self.replan()
        return self.prediction

    def observe_local(self) -> None:
        """A request answered on the device (the plan said all-edge): nothing to learn
        about the link, but probe it now and then so a better link is noticed.
        """
        self.requests += 1
