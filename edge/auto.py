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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

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
    slowed_ms,
    table_from_frontiers,
)
from splitnet.planning import measure_costs as _measure
from splitnet.v1 import inference_pb2 as pb

__all__ = ["DEFAULT_CODECS", "AutoPlan", "PlanChange", "calibrate_agreement"]

logger = logging.getLogger(__name__)

RTT_PROBE_EVERY = 20  # requests between round-trip probes
PRIOR_MBIT = 100.0  # bandwidth assumed until requests measure it
PROBE_FIRST = 8  # the first exploring request; then every power of two after it
PROBE_REQUESTS = 2  # requests per probe: the first at a new cut pays one-time costs
PROBE_LINK_FACTOR = 4.0  # no probe whose transfer alone takes this many times the plan
MEASURED_WINDOW = 8  # steady end-to-end samples kept per (cut, codec)
DOUBT = 0.5  # a pair never run: its components resting on priors alone, priced this much more
SWITCH_MEASURED = 1.05  # switch to a measured pair only if this much cheaper than the plan
SWITCH_PREDICTED = 1.10  # switch to a pair never run only if this much cheaper (with its doubt)
TRIAL_SAMPLES = 2  # steady requests a new plan runs before it is compared with the one it replaced


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
    warm_ms: Mapping[str, float] | None = None,
) -> CostTable:
    """The cost table of a device that holds only heads (a bundle): each head it holds
    timed here (on an emulated slower device, as it runs them: ``slowed_ms``), request
    bytes estimated and codec times fitted on ``x``'s frontiers; no all-on-device
    choice, and lossy codecs without calibration (so the planner never picks them).
    """
    edge: dict[str, float] = {}
    frontiers: dict[str, list[torch.Tensor]] = {}
    for cut in device.names:
        head = device.head(cut)
        frontiers[cut] = list(head(x))
        run_ms = _median_ms(lambda h=head: h(x), runs)  # type: ignore[misc]
        edge[cut] = slowed_ms(run_ms, edge_slowdown, (warm_ms or {}).get(cut))
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


class PlanChange(NamedTuple):
    """One change of plan: from which request, to what, and what drove it."""

    request: int  # requests answered when the plan changed
    prediction: Prediction  # the new plan and its predicted breakdown
    why: str  # what drove it: the prices compared, and whether each was measured


@dataclass
class Trial:
    """A plan just switched to, on trial against the one it replaced."""

    previous: tuple[str, str]  # the plan it replaced, to go back to
    samples: int = 0  # steady end-to-end samples of the new plan since the switch


@dataclass
class AutoPlan:
    """The planner state of one client.

    Choosing: every (cut, codec) has a *price*. A pair this client has run is priced by
    what it measured end to end (``measured``: the median of its last
    ``MEASURED_WINDOW`` steady requests, each with its link share re-priced on the
    current link estimate); a pair never run by its prediction, plus ``DOUBT`` times
    the components of it that rest on priors alone (``Planner.unobserved_ms``: a head
    never run, a tail the server only profiled; once two heads or tails are measured,
    only as much of one as the scaled profile missed by on them). After every answered
    request the cheapest price is compared with the plan's: a measured alternative must
    be cheaper by ``SWITCH_MEASURED``, a predicted one by ``SWITCH_PREDICTED``. A switch starts a
    trial: after ``TRIAL_SAMPLES`` steady requests at the new plan, it goes back to the
    plan it replaced if that one measured cheaper (and the new plan keeps its
    measurements, so it is not tried from its prediction again). After each such
    rejection the next switch to a pair never run waits twice as long as the last
    (``trial_gap``: 2, 4, 8, ... requests). The first request at each cut pays one-time
    costs (a head or tail built and run cold) and is not a sample. Requests that waited
    in a pipeline (``infer_many``) are not samples either: their time says nothing of
    the pair alone. ``history`` says what drove each change.

    Exploration: request number ``n`` (8, 16, 32, ... counted in answered requests, so
    the schedule is deterministic) and the one after it (the first request at a cut
    pays one-time costs; the second shows its steady cost) go to one probe target
    instead of the plan: of the best all-cloud choice (cut ``input``), all on the
    device (where the model is here) and two runners-up at other cuts than the plan's
    (the pair expected cheapest, measured or predicted without doubt: a near-equal cut
    ranked second; and the pair whose price less its doubt is lowest: a cut the profile
    may overprice), the one whose cut was sent a request longest ago (never first). So both
    baselines are measured by request 17 and re-measured every few probes, and a plan
    that measures more than ``SWITCH_MEASURED`` worse than a measured baseline is left
    at the next request. Probes take
    ``2 * floor(log2(n / 4))`` of the first ``n`` requests (8 of 100, 14 of 1000),
    each costing the difference between the probe's and the plan's latency. A target
    whose transfer alone (bytes over the learned bandwidth) would take more than
    ``PROBE_LINK_FACTOR`` times the plan's latency is not probed. Trials cost at most
    ``TRIAL_SAMPLES + 1`` requests at a worse pair each; with the doubling gap, at
    most about ``log2(n)`` of them are rejected in ``n`` requests.
    """

    planner: Planner
    estimator: LinkEstimator
    prediction: Prediction | None = None
    history: list[PlanChange] = field(default_factory=list)
    probes: list[tuple[int, str, str]] = field(default_factory=list)  # (request, cut, codec)
    replans: list[tuple[int, str]] = field(default_factory=list)  # (request, what moved)
    requests: int = 0
    # (cut, codec) -> steady end-to-end samples, each less its link share at the time
    samples: dict[tuple[str, str], deque[float]] = field(default_factory=dict)
    last_sent: dict[tuple[str, str], int] = field(default_factory=dict)  # -> last request
    cuts_run: set[str] = field(default_factory=set)  # cuts whose cold first request is past
    trial: Trial | None = None
    rejected: list[tuple[int, tuple[str, str]]] = field(default_factory=list)  # went back
    trial_gap: int = 2  # requests the next switch to a pair never run waits (after a rejection)
    next_trial_at: int = 0  # request from which a pair never run may be switched to
    # Every allowed pair's prediction, made at each re-plan (when the link or a component
    # moved) and for the cut of each answered request: what the prices start from.
    predictions: dict[tuple[str, str], Prediction] = field(default_factory=dict)

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
        warm_ms: Mapping[str, float] | None = None,
    ) -> AutoPlan:
        """Profile here, take the server's tail latencies from ``info``, and plan.
        ``warm_ms``: an emulated slower device's warm compute per cut (``slowed_ms``).
        """
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
            warm_ms=warm_ms,
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
        warm_ms: Mapping[str, float] | None = None,
    ) -> AutoPlan:
        """The plan a client starts with: its config's cost table or a profile made
        here, its link prior or five probes, lossy codecs calibrated where it can.
        A given table's ``cloud_ms`` wins where it names a cut; the server's profile
        fills in the rest. ``warm_ms``: what an emulated slower device stretches, per
        cut (``EdgeClient.emulated_warm_ms``).
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
                warm_ms=warm_ms,
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
            warm_ms=warm_ms,
        )

    def replan(self, reason: str = "") -> Prediction:
        """Choose on the current estimates and measurements (see the class); movement
        of the link and the components is measured from here on.
        """
        if reason:
            self.replans.append((self.requests, reason))
        self.estimator.planned()
        self.planner.planned()
        link = self.estimator.estimate
        self.predictions = {(p.cut, p.codec): p for p in self.planner.candidates(link)}
        return self._decide()

    # ------------------------------------------------------------ pricing
    def _key(self) -> tuple[str, str] | None:
        p = self.prediction
        return None if p is None else (p.cut, p.codec)

    @staticmethod
    def _link_ms(p: Prediction) -> float:
        """What the link estimate contributes to a prediction (0 all on the device)."""
        return p.up_ms + p.rtt_ms + p.queue_ms + p.down_ms

    def _price(self, p: Prediction) -> float:
        seen = self.samples.get((p.cut, p.codec))
        if seen:
            return statistics.median(seen) + self._link_ms(p)
        return p.total_ms + DOUBT * self.planner.unobserved_ms(p)

    def _expect(self, p: Prediction) -> float:
        """The price with no doubt: measured where it ran, else its prediction."""
        if (p.cut, p.codec) in self.samples:
            return self._price(p)
        return p.total_ms

    def _hope(self, p: Prediction) -> float:
        """The price with the doubt taken off: what exploring a pair may find."""
        if (p.cut, p.codec) in self.samples:
            return self._price(p)
        return p.total_ms - DOUBT * self.planner.unobserved_ms(p)

    def price(self, cut: str, codec: str) -> float:
        """What the planner expects ``(cut, codec)`` to take now, in ms: measured
        (re-priced on the current link) where it ran, else predicted with its doubt.
        """
        return self._price(self.planner.predict(cut, codec, self.estimator.estimate))

    def measured_ms(self, cut: str, codec: str) -> float | None:
        """The median end-to-end time measured at ``(cut, codec)``, re-priced on the
        current link; None where it has no steady sample.
        """
        return self.price(cut, codec) if (cut, codec) in self.samples else None

    def _describe(self, key: tuple[str, str], ms: float) -> str:
        what = "measured" if key in self.samples else "predicted"
        return f"{key[0]} {key[1]} {ms:.1f} ms {what}"

    # ------------------------------------------------------------ choosing
    def _decide(self) -> Prediction:
        """The plan after one more answered request (see the class)."""
        priced = {k: (self._price(p), p) for k, p in self.predictions.items()}
        current = self._key()
        if current is None or current not in priced:
            key = min(priced, key=lambda k: priced[k][0])
            return self._switch(
                key, priced[key][1], f"first plan: {self._describe(key, priced[key][0])}"
            )
        now = priced[current][0]
        if self.trial is not None:
            if self.trial.samples < TRIAL_SAMPLES:
                self.prediction = priced[current][1]
                return self.prediction
            previous, self.trial = self.trial.previous, None
            if previous in priced and priced[previous][0] < now:
                self.rejected.append((self.requests, current))
                self.next_trial_at = self.requests + self.trial_gap
                self.trial_gap *= 2
                why = (
                    f"back: {self._describe(current, now)} after its trial, "
                    f"{self._describe(previous, priced[previous][0])}"
                )
                return self._switch(previous, priced[previous][1], why, trial=False)
        open_to_new = self.requests >= self.next_trial_at
        best = min(
            (k for k in priced if k in self.samples or open_to_new or k == current),
            key=lambda k: priced[k][0],
        )
        margin = SWITCH_MEASURED if best in self.samples else SWITCH_PREDICTED
        if best != current and priced[best][0] * margin < now:
            why = f"{self._describe(best, priced[best][0])} < {self._describe(current, now)}"
            return self._switch(best, priced[best][1], why)
        self.prediction = priced[current][1]
        return self.prediction

    def _switch(
        self, key: tuple[str, str], p: Prediction, why: str, trial: bool = True
    ) -> Prediction:
        previous = self._key()
        self.trial = Trial(previous) if trial and previous is not None else None
        self.prediction = p
        self.history.append(PlanChange(self.requests, p, why))
        logger.info("plan: %s (%s)", p.describe(), why)
        return p

    # ------------------------------------------------------------ exploring
    def probe_targets(self) -> list[tuple[str, str]]:
        """What exploration tries: the best all-cloud choice, all on the device (if
        the model is here), and two runners-up at other cuts: the pair expected
        cheapest (measured, or predicted without doubt) and the pair with the lowest
        price less its doubt; never the plan itself; the one whose cut was sent a
        request longest ago first.
        """
        chosen = self._key()
        assert chosen is not None
        link = self.estimator.estimate
        plan_ms = self.price(*chosen)
        # The transfer is what probing cannot correct (bytes are known, the bandwidth is
        # learned from every request): a target whose transfer alone dwarfs the plan is
        # not worth a request (ResNet-18's input over 0.13 Mbit/s takes 37 s).
        preds = sorted(
            (
                p
                for p in self.planner.candidates(link)
                if p.up_ms + p.down_ms <= PROBE_LINK_FACTOR * plan_ms
            ),
            key=self._price,
        )
        targets: list[tuple[str, str]] = []
        for p in preds:  # cheapest first: the first at input is the best all-cloud choice
            if p.cut == INPUT:
                targets.append((p.cut, p.codec))
                break
        if any(p.cut == OUTPUT for p in preds):
            targets.append((OUTPUT, "none"))
        # The runners-up: the real splits at other cuts than the plan's that are expected
        # to be the cheapest (measured, or predicted with no doubt either way), and that
        # may be (their doubt taken off, not added: exploring is for finding out). The
        # first finds a near-equal cut the model ranks second; the second a cut the
        # profile may overprice.
        others = [p for p in preds if p.cut not in (INPUT, OUTPUT, chosen[0])]
        for rank in (self._expect, self._hope):
            if others:
                runner_up = min(others, key=rank)
                targets.append((runner_up.cut, runner_up.codec))
        targets = [k for k in dict.fromkeys(targets) if k != chosen]
        # Longest ago by cut, not by pair: what a probe teaches is mostly its cut's head
        # and tail, and the best all-cloud codec can change after every probe of it (on
        # a fast link, digits' input went zstd:1, raw, int8+zstd:1), which would make
        # it a pair never sent at every probe point and starve the runners-up.
        last: dict[str, int] = {}
        for (cut, _), n in self.last_sent.items():
            last[cut] = max(n, last.get(cut, -1))
        return sorted(targets, key=lambda k: last.get(k[0], -1))

    def next_choice(self) -> tuple[str, str]:
        """(cut, codec) for the next request: the plan, or a probe on the schedule."""
        assert self.prediction is not None
        n = self.requests + 1
        start = next((m for m in range(n, n - PROBE_REQUESTS, -1) if is_probe_point(m)), None)
        if start is not None:
            if not (self.probes and self.probes[-1][0] == start) and n == start:
                targets = self.probe_targets()
                if targets:
                    self.probes.append((start, *targets[0]))
            if self.probes and self.probes[-1][0] == start:
                return self.probes[-1][1], self.probes[-1][2]
        return self.prediction.cut, self.prediction.codec

    # ------------------------------------------------------------ learning
    def learn(
        self, result: InferResult, *, link: bool, probe_rtt: Callable[[], float] | None
    ) -> Prediction:
        """Feed one answered request (not a fallback) to the planner.

        Every component it measured is learned (head and encode here; decode and compute,
        for its batch, from the server), and its end-to-end time is a sample of its
        pair. ``link`` False: the request waited behind others in a pipeline, so its
        time says nothing about the link or the pair.
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
            bytes_up=t.bytes_sent,
        )
        key = (result.cut, result.codec)
        if not link:
            self._answered(key)
            return self._after_request()
        # What the components do not price: the link and the fixed per-request cost.
        residual = t.total_ms - t.edge_ms - t.encode_ms - t.decode_ms - t.queue_ms
        residual -= t.server_decode_ms + t.cloud_ms
        self._observe_link(
            residual_ms=residual,
            bytes_up=t.bytes_sent,
            bytes_down=t.bytes_received,
            queue_ms=t.queue_ms,
            probe_rtt=probe_rtt,
            cold=key[0] not in self.cuts_run,
        )
        self._answered(key, t.total_ms, t.edge_ms)
        return self._after_request()

    def _observe_link(
        self,
        *,
        residual_ms: float,
        bytes_up: int,
        bytes_down: int,
        queue_ms: float,
        probe_rtt: Callable[[], float] | None = None,
        cold: bool = False,
    ) -> None:
        """Feed one answered request's link share; probe the RTT now and then.

        ``cold``: the first request at its cut. What it paid beyond its components
        (the server's first decode and answer at that cut, the client's first
        message of that shape) is one-time, so a request too small to time a
        bandwidth teaches the RTT nothing.
        """
        if probe_rtt is not None and (self.requests + 1) % RTT_PROBE_EVERY == 0:
            try:
                self.estimator.observe_rtt(probe_rtt())
            except Exception as e:  # a failed probe must not fail the request
                logger.debug("rtt probe failed: %s", e)
        if cold and bytes_up < self.estimator.min_sample_bytes:
            return
        self.estimator.observe(residual_ms, bytes_up, bytes_down, queue_ms)

    def _answered(
        self, key: tuple[str, str], total_ms: float | None = None, edge_ms: float = 0.0
    ) -> None:
        """Count one answered request at ``key``; ``total_ms`` (None: not a sample) is
        its end-to-end time, a sample of the pair unless it ran its cut cold.
        """
        self.requests += 1
        self.last_sent[key] = self.requests
        link = self.estimator.estimate
        for pair in self.predictions:  # this cut's components were just learned
            if pair[0] == key[0]:
                self.predictions[pair] = self.planner.predict(*pair, link)
        if key[0] not in self.cuts_run:  # a cold first run: one-time costs
            self.cuts_run.add(key[0])
            return
        if total_ms is None or not math.isfinite(total_ms):
            return
        if not self.planner.table.learn_edge:  # a stated head: what the plan would cost
            total_ms += self.planner.edge_ms(key[0]) - edge_ms
        p = self.planner.predict(*key, link)
        self.samples.setdefault(key, deque(maxlen=MEASURED_WINDOW)).append(
            total_ms - self._link_ms(p)
        )
        if self.trial is not None and key == self._key():
            self.trial.samples += 1

    def _after_request(self) -> Prediction:
        """Re-plan if the link or a component moved; choose again in any case."""
        if self.estimator.should_replan():
            return self.replan("link")
        if self.planner.moved is not None:
            return self.replan(self.planner.moved)
        return self._decide()

    def observe_local(self, cut: str, edge_ms: float) -> None:
        """A request answered on the device (the plan said all-edge): learn its time;
        nothing to learn about the link.
        """
        self.planner.observe_edge(cut, edge_ms)
        self._answered((cut, "none"), edge_ms, edge_ms)
        self._after_request()

    def refresh(self, info: pb.ModelInfo) -> Prediction:
        """The server's table again (after a reconnect: it may have restarted, or be
        another machine): its profile is the cloud prior again, beside only the newest
        observation of each cut, so two more observations decide; of each split pair's
        end-to-end samples only the newest is kept. Then re-plan.
        """
        self.planner.refresh_cloud(server_profile(info))
        for pair, samples in self.samples.items():
            if pair[0] != OUTPUT:
                self.samples[pair] = deque(list(samples)[-1:], maxlen=samples.maxlen)
        return self.replan("reconnected: server table refreshed")
