"""``cut="auto"``: choose the cut and codec from measurements, and re-plan as the link moves.

At connect time the device profiles the model (head latency per cut, bytes and
encode/decode time per cut and codec, all on a real input) unless it is given a cost
table (``EdgeConfig.costs``: a device profile measured elsewhere, or a test's), the
server's ``GetModelInfo`` gives the tail latency per cut, and probes (requests with
almost no payload and no compute) give the per-request round trip. Every response
then feeds ``LinkEstimator``; when an estimate moves by 25% the planner chooses again.
The choice and its predicted breakdown are reported (``AutoPlan.prediction``,
``AutoPlan.history``).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from edge.config import DEFAULT_CODECS, EdgeConfig
from edge.model import DeviceModel
from edge.results import InferResult
from splitnet.codecs import decode, encode, parse_codec
from splitnet.partition import SplitGraph
from splitnet.planning import (
    CostTable,
    LinkEstimate,
    LinkEstimator,
    PairCost,
    Planner,
    Prediction,
)
from splitnet.planning import measure_costs as _measure
from splitnet.v1 import inference_pb2 as pb

__all__ = ["DEFAULT_CODECS", "AutoPlan", "calibrate_agreement"]

logger = logging.getLogger(__name__)

RTT_PROBE_EVERY = 20  # requests between round-trip probes
PRIOR_MBIT = 100.0  # bandwidth assumed until requests measure it


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


def _median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def measure_heads(
    device: DeviceModel,
    x: torch.Tensor,
    codecs: Sequence[str],
    cloud_ms: dict[str, float],
    *,
    result_bytes: int,
    runs: int = 5,
    edge_slowdown: float = 1.0,
) -> CostTable:
    """The cost table of a device that holds only heads (a bundle): each head it holds
    timed here, request bytes and codec times measured on ``x``; no all-on-device
    choice, and lossy codecs without calibration (so the planner never picks them).
    """
    edge: dict[str, float] = {}
    pairs: dict[tuple[str, str], PairCost] = {}
    for cut in device.names:
        head = device.head(cut)
        frontier = head(x)
        edge[cut] = _median_ms(lambda h=head: h(x), runs) * edge_slowdown  # type: ignore[misc]
        for codec in codecs:
            msgs = [encode(t, codec) for t in frontier]
            name = str(parse_codec(codec))
            pairs[(cut, name)] = PairCost(
                cut=cut,
                codec=name,
                bytes_up=sum(m.ByteSize() + 4 for m in msgs),
                encode_ms=_median_ms(lambda: [encode(t, codec) for t in frontier], runs),  # noqa: B023
                decode_ms=_median_ms(lambda: [decode(m) for m in msgs], runs),  # noqa: B023
            )
    return CostTable(
        edge_ms=edge,
        cloud_ms=cloud_ms,
        pairs=pairs,
        result_bytes=result_bytes,
        edge_slowdown=edge_slowdown,
    )


def result_bytes(info: pb.ModelInfo) -> int:
    """Size of a response at batch 1: raw float32 outputs plus message framing."""
    return 40 + sum(4 * math.prod(o.shape) + 16 for o in info.outputs)


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
        cuts: Sequence[str] | None = None,
    ) -> AutoPlan:
        """Profile here, take the server's tail latencies from ``info``, and plan."""
        table = _measure(
            graph,
            x,
            codecs,
            {c.name: c.tail_latency_ms for c in info.cuts},
            result_bytes=result_bytes(info),
            runs=runs,
            edge_slowdown=edge_slowdown,
            agreement=agreement,
            cuts=cuts,
        )
        return cls.from_table(table, prior=prior, accuracy_budget=accuracy_budget)

    @classmethod
    def from_table(
        cls, table: CostTable, *, prior: LinkEstimate, accuracy_budget: float = 0.005
    ) -> AutoPlan:
        """Plan on a cost table measured elsewhere (or built by a test)."""
        plan = cls(Planner(table, accuracy_budget=accuracy_budget), LinkEstimator(prior))
        plan.replan()
        return plan

    @classmethod
    def at_connect(
        cls,
        config: EdgeConfig,
        device: DeviceModel,
        info: pb.ModelInfo,
        sample: torch.Tensor,
        probe_rtt: Callable[[], float],
    ) -> AutoPlan:
        """The plan a client starts with: its config's cost table or a profile made
        here, its link prior or five probes, lossy codecs calibrated where it can.
        """
        prior = config.link
        if prior is None:
            rtt = statistics.median(probe_rtt() for _ in range(5))
            prior = LinkEstimate(up_mbit=PRIOR_MBIT, down_mbit=PRIOR_MBIT, rtt_ms=rtt)
        if config.costs is not None:
            return cls.from_table(config.costs, prior=prior, accuracy_budget=config.accuracy_budget)
        graph, whole = device.graph, device.whole
        if whole is None:  # only heads here: profile them; lossy codecs stay uncalibrated
            table = measure_heads(
                device,
                sample,
                config.codecs,
                {c.name: c.tail_latency_ms for c in info.cuts},
                result_bytes=result_bytes(info),
                edge_slowdown=config.edge_slowdown,
            )
            return cls.from_table(table, prior=prior, accuracy_budget=config.accuracy_budget)
        calibration = config.calibration
        if calibration is None and tuple(sample.shape[1:]) == (1, 8, 8):
            from splitnet.data import load_digits

            calibration = load_digits()["val"].x  # the digits model's own validation set
        agreement = (
            calibrate_agreement(whole, graph, calibration, config.codecs)
            if calibration is not None and whole is not None
            else None
        )
        return cls.build(
            graph,
            sample,
            info,
            codecs=config.codecs,
            prior=prior,
            accuracy_budget=config.accuracy_budget,
            agreement=agreement,
            edge_slowdown=config.edge_slowdown,
        )

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

    def learn(
        self, result: InferResult, *, link: bool, probe_rtt: Callable[[], float] | None
    ) -> Prediction:
        """Feed one answered request (not a fallback) to the planner.

        ``link`` False: the request waited behind others in a pipeline, so its time says
        nothing about the link (only the edge calibration learns from it).
        """
        t = result.timing
        self.planner.observe_edge(result.cut, t.edge_ms)
        if not link:
            assert self.prediction is not None
            return self.prediction
        priced = self.planner.predict(result.cut, result.codec, self.estimator.estimate)
        # What the cost table does not price: the link and the fixed per-request cost.
        residual = t.total_ms - t.edge_ms - t.encode_ms - t.decode_ms - t.queue_ms
        residual -= priced.decode_ms + priced.cloud_ms
        return self.observe(
            residual_ms=residual,
            bytes_up=t.bytes_sent,
            bytes_down=t.bytes_received,
            queue_ms=t.queue_ms,
            probe_rtt=probe_rtt,
        )

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

    def observe_local(self, cut: str, edge_ms: float) -> None:
        """A request answered on the device (the plan said all-edge): calibrate the
        local estimate; nothing to learn about the link.
        """
        self.planner.observe_edge(cut, edge_ms)
        self.requests += 1
