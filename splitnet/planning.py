"""Planning: predict the latency of every (cut, codec) and choose the fastest allowed.

Neurosurgeon's latency model, extended with codecs and live measurements::

    T(cut, codec) = edge(cut) + encode(cut, codec) + bytes(cut, codec) * 8 / B_up + RTT
                    + queue + decode(cut, codec) + cloud(cut) + result_bytes * 8 / B_down

``edge`` is profiled on the device, ``cloud`` by the server (``GetModelInfo``),
``bytes``/``encode``/``decode`` are measured on real inputs, and ``B_up``, ``RTT`` and
``queue`` come from the link (a profile, or ``LinkEstimator`` fed by live requests).
The cut ``output`` runs everything on the device: T = edge(output), no network.
Lossy codecs are allowed only where their calibrated agreement with the unsplit model
loses at most ``accuracy_budget``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch

from splitnet.codecs import decode, encode, parse_codec
from splitnet.partition import OUTPUT, SplitGraph
from splitnet.profiling import profile_cuts

__all__ = [
    "CostTable",
    "LinkEstimate",
    "LinkEstimator",
    "Planner",
    "Prediction",
    "measure_costs",
]


@dataclass(frozen=True, kw_only=True)
class LinkEstimate:
    """What the planner assumes about the network."""

    up_mbit: float  # uplink bandwidth, Mbit/s
    down_mbit: float  # downlink bandwidth, Mbit/s
    rtt_ms: float  # round trip time without payload
    queue_ms: float = 0.0  # the server's batcher queue

    def __post_init__(self) -> None:
        if self.up_mbit <= 0 or self.down_mbit <= 0 or self.rtt_ms < 0 or self.queue_ms < 0:
            raise ValueError("bandwidths must be > 0, rtt and queue >= 0")


@dataclass(frozen=True, kw_only=True)
class PairCost:
    """Measured cost of one (cut, codec) on this device, batch 1."""

    cut: str
    codec: str
    bytes_up: int  # whole request message
    encode_ms: float  # on the device
    decode_ms: float  # on the server (measured here as a proxy)
    agreement: float | None = None  # top-1 agreement with the unsplit model; None: unknown


@dataclass
class CostTable:
    """Everything the latency model needs that does not depend on the network."""

    edge_ms: dict[str, float]  # head latency per cut, on the device (already slowed down)
    cloud_ms: dict[str, float]  # tail latency per cut, on the server
    pairs: dict[tuple[str, str], PairCost]  # per (cut, codec)
    result_bytes: int  # response size
    request_overhead_bytes: int = 120  # request fields besides the frontier
    edge_slowdown: float = 1.0  # factor already applied to edge_ms (1: real device)

    @property
    def codecs(self) -> list[str]:
        """Codecs measured, in order."""
        return list(dict.fromkeys(codec for _, codec in self.pairs))


@dataclass(frozen=True)
class Prediction:
    """Predicted latency of one choice, by component (ms)."""

    cut: str
    codec: str
    edge_ms: float
    encode_ms: float
    up_ms: float
    rtt_ms: float
    queue_ms: float
    decode_ms: float
    cloud_ms: float
    down_ms: float
    bytes_up: int

    @property
    def total_ms(self) -> float:
        """The sum of the components."""
        return (
            self.edge_ms
            + self.encode_ms
            + self.up_ms
            + self.rtt_ms
            + self.queue_ms
            + self.decode_ms
            + self.cloud_ms
            + self.down_ms
        )

    def describe(self) -> str:
        """One line: the choice and its breakdown."""
        if self.cut == OUTPUT:
            return f"all on the device: {self.total_ms:.2f} ms predicted (edge {self.edge_ms:.2f})"
        return (
            f"cut {self.cut} codec {self.codec}: {self.total_ms:.2f} ms predicted = edge "
            f"{self.edge_ms:.2f} + encode {self.encode_ms:.2f} + up {self.up_ms:.2f} "
            f"({self.bytes_up} B) + rtt {self.rtt_ms:.2f} + queue {self.queue_ms:.2f} + decode "
            f"{self.decode_ms:.2f} + cloud {self.cloud_ms:.2f} + down {self.down_ms:.2f}"
        )


class Planner:
    """Predicts every (cut, codec) on a link and picks the fastest one allowed."""

    def __init__(self, table: CostTable, *, accuracy_budget: float = 0.005) -> None:
        self.table = table
        self.accuracy_budget = accuracy_budget
        # Measured edge time / profiled edge time, learned from live requests. A head run
        # between network waits is slower than in a tight profiling loop (caches and
        # threads go cold), and more so than the whole model run back to back on the
        # device, so the two are calibrated apart: ``edge_scale`` for heads of split
        # requests, ``local_scale`` for the all-on-device choice.
        self.edge_scale = 1.0
        self.local_scale = 1.0

    def observe_edge(self, cut: str, measured_ms: float, alpha: float = 0.3) -> None:
        """Calibrate the edge scale (split or local) from one request at ``cut``."""
        profiled = self.table.edge_ms.get(cut, 0.0)
        if profiled > 0.05 and measured_ms > 0:
            ratio = min(max(measured_ms / profiled, 0.2), 20.0)
            if cut == OUTPUT:
                self.local_scale = (1 - alpha) * self.local_scale + alpha * ratio
            else:
                self.edge_scale = (1 - alpha) * self.edge_scale + alpha * ratio

    def allowed(self, cut: str, codec: str) -> bool:
        """Lossless always; lossy only where calibrated within the accuracy budget."""
        if parse_codec(codec).lossless:
            return True
        pair = self.table.pairs.get((cut, codec))
        return (
            pair is not None
            and pair.agreement is not None
            and (1.0 - pair.agreement <= self.accuracy_budget)
        )

    def predict(self, cut: str, codec: str, link: LinkEstimate) -> Prediction:
        """The latency model for one choice."""
        t = self.table
        if cut == OUTPUT:
            edge = t.edge_ms[OUTPUT] * self.local_scale
            return Prediction(OUTPUT, "none", edge, 0, 0, 0, 0, 0, 0, 0, 0)
        pair = t.pairs[(cut, codec)]
        return Prediction(
            cut=cut,
            codec=codec,
            edge_ms=t.edge_ms[cut] * self.edge_scale,
            encode_ms=pair.encode_ms,
            up_ms=pair.bytes_up * 8 / (link.up_mbit * 1e3),
            rtt_ms=link.rtt_ms,
            queue_ms=link.queue_ms,
            decode_ms=pair.decode_ms,
            cloud_ms=t.cloud_ms.get(cut, 0.0),
            down_ms=t.result_bytes * 8 / (link.down_mbit * 1e3),
            bytes_up=pair.bytes_up,
        )

    def candidates(self, link: LinkEstimate) -> list[Prediction]:
        """Every allowed choice (and all-on-device), fastest first."""
        preds = [self.predict(OUTPUT, "none", link)] if OUTPUT in self.table.edge_ms else []
        preds += [
            self.predict(cut, codec, link)
            for cut, codec in self.table.pairs
            if cut != OUTPUT and self.allowed(cut, codec)
        ]
        return sorted(preds, key=lambda p: p.total_ms)

    def plan(self, link: LinkEstimate) -> Prediction:
        """The fastest allowed choice on ``link``."""
        return self.candidates(link)[0]


# ------------------------------------------------------------------ measuring


def _median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def measure_costs(
    graph: SplitGraph,
    x: torch.Tensor,
    codecs: Sequence[str],
    cloud_ms: dict[str, float],
    *,
    result_bytes: int,
    runs: int = 5,
    edge_slowdown: float = 1.0,
    agreement: dict[tuple[str, str], float] | None = None,
    cuts: Iterable[str] | None = None,
) -> CostTable:
    """Profile ``graph`` on this device with input ``x`` (batch 1): head latency per cut
    (median of ``runs``), and per (cut, codec) the request bytes and encode/decode time.
    """
    edge = {p.cut: p.head_ms * edge_slowdown for p in profile_cuts(graph, (x,), runs=runs)}
    names = list(cuts) if cuts is not None else graph.names
    pairs: dict[tuple[str, str], PairCost] = {}
    for cut in names:
        if cut == OUTPUT:
            continue
        head, _ = graph.split(cut)
        frontier = head(x)
        for codec in codecs:
            msgs = [encode(t, codec) for t in frontier]
            enc = _median_ms(lambda: [encode(t, codec) for t in frontier], runs)  # noqa: B023
            dec = _median_ms(lambda: [decode(m) for m in msgs], runs)  # noqa: B023
            pairs[(cut, codec)] = PairCost(
                cut=cut,
                codec=str(parse_codec(codec)),
                bytes_up=sum(m.ByteSize() + 4 for m in msgs),
                encode_ms=enc,
                decode_ms=dec,
                agreement=(agreement or {}).get((cut, str(parse_codec(codec)))),
            )
    return CostTable(
        edge_ms=edge,
        cloud_ms=cloud_ms,
        pairs=pairs,
        result_bytes=result_bytes,
        edge_slowdown=edge_slowdown,
    )


# ------------------------------------------------------------ online estimates


@dataclass
class LinkEstimator:
    """Online estimates of bandwidth, RTT and queue from request timings.

    ``rtt_ms`` is the fixed cost of one request: the network round trip plus what the
    transport and the server spend on any request (measured by probes that carry
    almost nothing). ``observe`` takes each request's *residual*: its end-to-end time
    minus the parts the cost table prices (edge, encode, decode, cloud) and the queue,
    so the model stays calibrated to what requests really cost. Bandwidth samples come
    only from requests whose transfer is a real share of the residual. Estimates are
    exponentially weighted (bandwidth in log space).
    """

    prior: LinkEstimate
    alpha: float = 0.4  # weight of a new sample
    replan_ratio: float = 1.25  # re-plan when an estimate moves by this factor
    up_mbit: float = field(init=False)
    down_mbit: float = field(init=False)
    rtt_ms: float = field(init=False)
    queue_ms: float = field(init=False)
    _planned_on: LinkEstimate | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.up_mbit = self.prior.up_mbit
        self.down_mbit = self.prior.down_mbit
        self.rtt_ms = self.prior.rtt_ms
        self.queue_ms = self.prior.queue_ms

    def _ewma(self, old: float, new: float) -> float:
        return (1 - self.alpha) * old + self.alpha * new

    def observe_rtt(self, rtt_ms: float) -> None:
        """The round trip of a probe that carries almost nothing."""
        self.rtt_ms = self._ewma(self.rtt_ms, max(rtt_ms, 0.0))

    def observe(self, residual_ms: float, bytes_up: int, bytes_down: int, queue_ms: float) -> None:
        """One request: its residual time (see the class), its bytes, its server queue."""
        self.queue_ms = self._ewma(self.queue_ms, max(queue_ms, 0.0))
        if bytes_up <= 0:
            return
        down_ms = bytes_down * 8 / (self.down_mbit * 1e3)
        transfer_ms = residual_ms - self.rtt_ms - down_ms
        expected_ms = bytes_up * 8 / (self.up_mbit * 1e3)
        if transfer_ms > 0.25 * max(residual_ms, 1e-6) and transfer_ms > 0.5:
            sample = bytes_up * 8 / (transfer_ms * 1e3)  # the upload is measurable
        elif expected_ms > 2 * max(transfer_ms, 0.5):
            # Far faster than expected: the link got better; move up.
            sample = bytes_up * 8 / (max(transfer_ms, 0.5) * 1e3)
        elif transfer_ms < 0:
            # Small requests: the fixed cost itself moved (the RTT).
            self.rtt_ms = self._ewma(self.rtt_ms, max(residual_ms - expected_ms - down_ms, 0.0))
            return
        else:
            return
        self.up_mbit = math.exp(self._ewma(math.log(self.up_mbit), math.log(sample)))

    @property
    def estimate(self) -> LinkEstimate:
        """The current estimate."""
        return LinkEstimate(
            up_mbit=self.up_mbit,
            down_mbit=self.down_mbit,
            rtt_ms=self.rtt_ms,
            queue_ms=self.queue_ms,
        )

    def should_replan(self) -> bool:
        """True when an estimate moved by ``replan_ratio`` since the last plan."""
        if self._planned_on is None:
            return True
        p, r = self._planned_on, self.replan_ratio

        def moved(a: float, b: float, floor: float) -> bool:
            a, b = max(a, floor), max(b, floor)
            return max(a / b, b / a) >= r

        return (
            moved(p.up_mbit, self.up_mbit, 1e-3)
            or moved(p.rtt_ms, self.rtt_ms, 1.0)
            or moved(p.queue_ms, self.queue_ms, 1.0)
        )

    def planned(self) -> None:
        """Record that a plan was made on the current estimate."""
        self._planned_on = replace(self.estimate)
