"""``cut="auto"``: choose the cut and codec from measurements, and re-plan as the link moves.

At connect time the device profiles the model (head latency per cut, bytes and
encode/decode time per cut and codec, all on a real input) unless it is given a cost
table (``EdgeConfig.costs``: a device profile measured elsewhere, or a test's), the
server's ``GetModelInfo`` gives the tail latency per cut, and probes (requests with
almost no payload and no compute) give the per-request round trip. Those are priors:
every response then teaches the planner each component it measured (the head and the
encoding timed here; the server's decode and compute, per batch size) and feeds
``LinkEstimator``. When the link or a learned component moves by 25% (and 0.5 ms) the
planner chooses again; after a reconnect the server's table is read again. Requests
8, 16, 32, ... (and the one after each) explore (``AutoPlan`` says what, and what it
costs), so a cut never tried is not wrongly priced forever. The choice and its
predicted breakdown are reported (``AutoPlan.prediction``, ``history``, ``probes``,
``replans``).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from edge.config import DEFAULT_CODECS, EdgeConfig
from edge.model import DeviceModel
from edge.results import InferResult
from splitnet.partition import INPUT, OUTPUT, SplitGraph
from splitnet.planning import (
    CostTable,
    LinkEstimate,
    LinkEstimator,
    Planner,
    Prediction,
    table_from_frontiers,
)
from splitnet.planning import measure_costs as _measure
from splitnet.v1 import inference_pb2 as pb

__all__ = ["DEFAULT_CODECS", "AutoPlan", "calibrate_agreement"]

logger = logging.getLogger(__name__)

RTT_PROBE_EVERY = 20  # requests between round-trip probes
PRIOR_MBIT = 100.0  # bandwidth assumed until requests measure it
PROBE_FIRST = 8  # the first exploring request; then every power of two after it
PROBE_REQUESTS = 2  # requests per probe: the first at a new cut pays one-time costs
PROBE_LINK_FACTOR = 4.0  # no probe whose transfer alone takes this many times the plan


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
    timed here, request bytes estimated and codec times fitted on ``x``'s frontiers; no
    all-on-device choice, and lossy codecs without calibration (so the planner never
    picks them).
    """
    edge: dict[str, float] = {}
    frontiers: dict[str, list[torch.Tensor]] = {}
    for cut in device.names:
        head = device.head(cut)
        frontiers[cut] = list(head(x))
        edge[cut] = _median_ms(lambda h=head: h(x), runs) * edge_slowdown  # type: ignore[misc]
    return table_from_frontiers(
        frontiers,
        edge,
        codecs,
        cloud_ms,
        result_bytes=result_bytes,
        runs=runs,
        edge_slowdown=edge_slowdown,
    )


def result_bytes(info: pb.ModelInfo) -> int:
    """Size of a response at batch 1: raw float32 outputs plus message framing."""
    return 40 + sum(4 * math.prod(o.shape) + 16 for o in info.outputs)


def server_profile(info: pb.ModelInfo) -> dict[str, float]:
    """The server's start-up tail latency per cut (``GetModelInfo``): the cloud prior."""
    return {c.name: c.tail_latency_ms for c in info.cuts}


def is_probe_point(n: int) -> bool:
    """Request ``n`` (counted from 1) explores: 8, 16, 32, 64, ..."""
    return n >= PROBE_FIRST and n & (n - 1) == 0


@dataclass
class AutoPlan:
    """The planner state of one client.

    Exploration: request number ``n`` (8, 16, 32, ... counted in answered requests, so
    the schedule is deterministic) and the one after it (the first request at a cut
    pays one-time costs; the second shows its steady cost) go to one probe target
    instead of the plan, in turn: the best all-cloud choice (cut ``input``), all on
    the device (where the model is here), and the runner-up (the best split at a cut
    other than the plan's, which also calibrates the heads not yet run). Probes take
    ``2 * floor(log2(n / 4))`` of the first ``n`` requests (8 of 100, 14 of 1000),
    each costing the difference between the probe's and the plan's latency. A target
    whose transfer alone (bytes over the learned bandwidth) would take more than
    ``PROBE_LINK_FACTOR`` times the plan's latency is not probed.
    """

    planner: Planner
    estimator: LinkEstimator
    prediction: Prediction | None = None
    history: list[tuple[int, Prediction]] = field(default_factory=list)  # (request, choice)
    probes: list[tuple[int, str, str]] = field(default_factory=list)  # (request, cut, codec)
    replans: list[tuple[int, str]] = field(default_factory=list)  # (request, what moved)
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
            server_profile(info),
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
        A given table's ``cloud_ms`` wins where it names a cut; the server's profile
        fills in the rest.
        """
        prior = config.link
        if prior is None:
            rtt = statistics.median(probe_rtt() for _ in range(5))
            prior = LinkEstimate(up_mbit=PRIOR_MBIT, down_mbit=PRIOR_MBIT, rtt_ms=rtt)
        if config.costs is not None:
            given = config.costs
            table = replace(given, cloud_ms={**server_profile(info), **given.cloud_ms})
            return cls.from_table(table, prior=prior, accuracy_budget=config.accuracy_budget)
        graph, whole = device.graph, device.whole
        if whole is None:  # only heads here: profile them; lossy codecs stay uncalibrated
            table = measure_heads(
                device,
                sample,
                config.codecs,
                server_profile(info),
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

    def replan(self, reason: str = "") -> Prediction:
        """Choose on the current estimates; log a change."""
        choice = self.planner.plan(self.estimator.estimate)
        self.estimator.planned()
        self.planner.planned()
        if reason:
            self.replans.append((self.requests, reason))
        if self.prediction is None or (choice.cut, choice.codec) != (
            self.prediction.cut,
            self.prediction.codec,
        ):
            logger.info("plan%s: %s", f" ({reason})" if reason else "", choice.describe())
            self.history.append((self.requests, choice))
        self.prediction = choice
        return choice

    # ------------------------------------------------------------ exploring
    def probe_targets(self) -> list[tuple[str, str]]:
        """What exploration tries, in turn: the best all-cloud choice, all on the
        device (if the model is here), the runner-up (the best split at another cut);
        never the plan itself.
        """
        assert self.prediction is not None
        chosen = (self.prediction.cut, self.prediction.codec)
        link = self.estimator.estimate
        plan_ms = self.planner.predict(*chosen, link).total_ms
        # The transfer is what probing cannot correct (bytes are known, the bandwidth is
        # learned from every request): a target whose transfer alone dwarfs the plan is
        # not worth a request (ResNet-18's input over 0.13 Mbit/s takes 37 s).
        preds = [
            p
            for p in self.planner.candidates(link)
            if p.up_ms + p.down_ms <= PROBE_LINK_FACTOR * plan_ms
        ]
        targets: list[tuple[str, str]] = []
        for p in preds:  # fastest first: the first at input is the best all-cloud choice
            if p.cut == INPUT:
                targets.append((p.cut, p.codec))
                break
        if any(p.cut == OUTPUT for p in preds):
            targets.append((OUTPUT, "none"))
        for p in preds:  # the runner-up: the best real split at another cut than the plan's
            if p.cut not in (INPUT, OUTPUT, chosen[0]):
                targets.append((p.cut, p.codec))
                break
        return [k for k in targets if k != chosen]

    def next_choice(self) -> tuple[str, str]:
        """(cut, codec) for the next request: the plan, or a probe on the schedule."""
        assert self.prediction is not None
        n = self.requests + 1
        start = next((m for m in range(n, n - PROBE_REQUESTS, -1) if is_probe_point(m)), None)
        if start is not None:
            if not (self.probes and self.probes[-1][0] == start) and n == start:
                targets = self.probe_targets()
                if targets:
                    k = start.bit_length() - PROBE_FIRST.bit_length()
                    self.probes.append((start, *targets[k % len(targets)]))
            if self.probes and self.probes[-1][0] == start:
                return self.probes[-1][1], self.probes[-1][2]
        return self.prediction.cut, self.prediction.codec

    # ------------------------------------------------------------ learning
    def learn(
        self, result: InferResult, *, link: bool, probe_rtt: Callable[[], float] | None
    ) -> Prediction:
        """Feed one answered request (not a fallback) to the planner.

        Every component it measured is learned (head and encode here; decode and compute,
        for its batch, from the server). ``link`` False: the request waited behind
        others in a pipeline, so its time says nothing about the link.
        """
        t = result.timing
        self.planner.observe_request(
            result.cut,
            result.codec,
            edge_ms=t.edge_ms,
            encode_ms=t.encode_ms,
            decode_ms=t.server_decode_ms,
            cloud_ms=t.cloud_ms,
            batch=t.batch_size,
        )
        if not link:
            self.requests += 1
            return self._maybe_replan()
        # What the components do not price: the link and the fixed per-request cost.
        residual = t.total_ms - t.edge_ms - t.encode_ms - t.decode_ms - t.queue_ms
        residual -= t.server_decode_ms + t.cloud_ms
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
        """Feed one answered request's link share; probe the RTT now and then; re-plan
        if the link or a component moved.
        """
        self.requests += 1
        if probe_rtt is not None and self.requests % RTT_PROBE_EVERY == 0:
            try:
                self.estimator.observe_rtt(probe_rtt())
            except Exception as e:  # a failed probe must not fail the request
                logger.debug("rtt probe failed: %s", e)
        self.estimator.observe(residual_ms, bytes_up, bytes_down, queue_ms)
        return self._maybe_replan()

    def _maybe_replan(self) -> Prediction:
        assert self.prediction is not None
        if self.estimator.should_replan():
            return self.replan("link")
        if self.planner.moved is not None:
            return self.replan(self.planner.moved)
        return self.prediction

    def observe_local(self, cut: str, edge_ms: float) -> None:
        """A request answered on the device (the plan said all-edge): learn its time;
        nothing to learn about the link.
        """
        self.planner.observe_edge(cut, edge_ms)
        self.requests += 1
        self._maybe_replan()

    def refresh(self, info: pb.ModelInfo) -> Prediction:
        """The server's table again (after a reconnect: it may have restarted, or be
        another machine): its profile is the cloud prior again, beside only the newest
        observation of each cut, so two more observations decide; then re-plan.
        """
        planner = self.planner
        planner.table = replace(
            planner.table, cloud_ms={**planner.table.cloud_ms, **server_profile(info)}
        )
        for key, seen in planner.cloud_seen.items():
            planner.cloud_seen[key] = deque(list(seen)[-1:], maxlen=seen.maxlen)
        return self.replan("reconnected: server table refreshed")
