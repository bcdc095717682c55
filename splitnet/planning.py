"""Planning: predict the latency of every (cut, codec) and choose the fastest allowed.

Neurosurgeon's latency model, extended with codecs and live measurements::

    T(cut, codec) = edge(cut) + encode(cut, codec) + bytes(cut, codec) * 8 / B_up + RTT
                    + queue + decode(cut, codec) + cloud(cut) + result_bytes * 8 / B_down

Every component starts from a prior and is then learned from live requests:

* ``edge``: the device's profile (``measure_costs``), then the client's own timing of
  the head at each cut it runs. Cuts not yet run keep the profile, mapped by how heads
  run between network waits compare with the profiling loop (``edge_fixed`` +
  ``edge_scale`` x profile, ``fit_profile``; ``local_scale`` for the all-on-device
  choice), and never above the whole model as measured here (a head is a prefix of it).
* ``cloud``: the server's start-up profile (``GetModelInfo``), then the ``compute_ms``
  every response reports at that cut, per batch size. Cuts not yet served keep the
  profile, mapped by how tails served ran against their back-to-back profile
  (``cloud_fixed`` + ``cloud_scale`` x profile, ``fit_profile``): a short tail run after
  an idle network wait is inflated more than a long one.
* ``fit_profile``, for both: cuts profiled at ``SCALE_FLOOR_MS`` or more teach the scale
  (the median ratio, within bounds; once three or more whose profiles differ twofold
  are measured, a least-squares line with a fixed cost); shorter ones are mostly what
  any call costs, so they teach the fixed cost instead (digits-cnn's heads and tails are
  all under a millisecond: a 0.1 ms tail served in 0.5 ms says nothing of a scale).
* Both halves are bounded by the cuts around them: a later cut's tail is a suffix of
  an earlier cut's tail, and its head contains the earlier head. So a tail not yet
  served is priced at most the tail measured at any earlier cut and at least any
  measured at a later one, and a head the other way round.
* ``encode``/``decode``: per codec, a throughput measured on two frontiers and scaled
  to each cut's size, plus what a call costs beside it (learned per codec from the
  pairs measured), then the client's encode timing and the server's ``decode_ms``.
* ``bytes``: ``splitnet.codecs.estimate_nbytes`` on each cut's frontier (no encoding),
  then what requests of the pair really sent: a compressed frontier's size follows its
  input (resnet18's ``maxpool`` under zstd:1: 407 KB on one input, 339 KB on another).
* ``B_up``, ``RTT``, ``queue``: a link prior, then ``LinkEstimator`` (as before).

A learned value (``learned``) is the median of the last ``WINDOW`` observations, the
very first left out once there is a second (a first run pays one-time costs: a tail or
head built and run cold). Until there are ``TRUST_AFTER``, it is the lower median of
them and the prior: an observation below the prior replaces it at once, and a prior
too low is gone by the fourth observation.
The cut ``output`` runs everything on the device: T = edge(output), no network.
Lossy codecs are allowed only where their calibrated agreement with the unsplit model
loses at most ``accuracy_budget``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from splitnet.codecs import decode, encode, estimate_nbytes, parse_codec
from splitnet.partition import INPUT, OUTPUT, SplitGraph
from splitnet.profiling import profile_cuts

__all__ = [
    "CodecSpeed",
    "CostTable",
    "LinkEstimate",
    "LinkEstimator",
    "Planner",
    "Prediction",
    "fit_profile",
    "frontier_bytes",
    "learned",
    "measure_costs",
    "slowed_ms",
    "table_from_frontiers",
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
    learn_edge: bool = True  # False: edge_ms are stated (a test's device); timings do not move them

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


WINDOW = 16  # observations a learned component keeps
TRUST_AFTER = 3  # observations after which the prior no longer counts
REPLAN_RATIO = 1.25  # re-plan when a learned component moves by this factor...
REPLAN_FLOOR_MS = 0.5  # ...and by at least this much
SCALE_FLOOR_MS = 1.0  # heads and tails profiled shorter teach a fixed cost, not a scale
SPREAD_FLOOR = 0.05  # the least doubt left in a head or tail never run, as a fraction
FIT_POINTS = 3  # tails served before the cloud prior gets a fixed cost beside its scale...
FIT_RANGE = 2.0  # ...and how much their profiles must differ (the longest / the shortest)


def learned(prior: float, samples: Sequence[float] | None, trust_after: int = TRUST_AFTER) -> float:
    """The median of ``samples`` (the first left out once there is a second); until
    there are ``trust_after`` of them, the lower median of them and ``prior`` (see the
    module docstring). No samples: the prior.
    """
    values = list(samples or ())
    if len(values) > 1:  # the first observation pays one-time costs (a first run)
        values = values[1:]
    if len(values) >= trust_after:
        return statistics.median(values)  # what a request will most likely see
    values.append(prior)
    values.sort()
    return values[(len(values) - 1) // 2]


def fit_profile(
    points: Sequence[tuple[float, float]],
    *,
    floor: float = SCALE_FLOOR_MS,
    scale_range: tuple[float, float] = (0.25, 4.0),
) -> tuple[float, float]:
    """(fixed ms, scale) mapping profiled ``x`` to measured ``y``, so that a cut not yet
    measured is priced ``fixed + scale * x``.

    Points profiled at ``floor`` or more teach the scale: with ``FIT_POINTS`` or more
    whose ``x`` spans ``FIT_RANGE``, the least-squares line in relative error (weights
    ``1 / y**2``) where its fixed cost is at least 0 and its scale within
    ``scale_range``; otherwise the median ratio. Points under ``floor`` are too short
    to say anything about a scale (their time is mostly what any call costs): beside
    the median ratio they teach the fixed cost, the median of ``y - scale * x``
    (at least 0), and the ratio is then taken on what is left of the longer points.
    """
    lo, hi = scale_range
    big = [(x, y) for x, y in points if x >= floor]
    small = [(x, y) for x, y in points if 0 < x < floor]
    xs = [x for x, _ in big]
    if len(big) >= FIT_POINTS and max(xs) >= FIT_RANGE * min(xs):
        w = [1.0 / (y * y) for _, y in big]
        sw = sum(w)
        sx = sum(wi * x for wi, (x, _) in zip(w, big, strict=True))
        sy = sum(wi * y for wi, (_, y) in zip(w, big, strict=True))
        sxx = sum(wi * x * x for wi, (x, _) in zip(w, big, strict=True))
        sxy = sum(wi * x * y for wi, (x, y) in zip(w, big, strict=True))
        det = sw * sxx - sx * sx
        if det > 0:
            slope = (sw * sxy - sx * sy) / det
            fixed = (sy - slope * sx) / sw
            if fixed >= 0 and lo <= slope <= hi:
                return fixed, slope

    def ratio(fixed: float) -> float:
        return min(max(statistics.median(max(y - fixed, 0.0) / x for x, y in big), lo), hi)

    scale = ratio(0.0) if big else 1.0
    if not small:
        return 0.0, scale
    fixed = max(statistics.median(y - scale * x for x, y in small), 0.0)
    return fixed, (ratio(fixed) if big else scale)


def _between(
    order: Mapping[str, int], cut: str, prior: float, seen: dict[str, deque[float]], *, rising: bool
) -> float:
    """``prior`` for ``cut``, kept between what was measured (two or more times: the
    median, the first left out) at the cuts before and after it in ``order``: at least
    the largest before and at most the least after where the quantity ``rising`` with
    the cut (a head), the other way round where it falls (a tail).
    """
    at = order.get(cut)
    if at is None:
        return prior
    before: list[float] = []
    after: list[float] = []
    for c, s in seen.items():
        i = order.get(c)
        if i is None or i == at or len(s) < 2:
            continue
        (before if i < at else after).append(statistics.median(list(s)[1:]))
    low, high = (before, after) if rising else (after, before)
    if high:
        prior = min(prior, min(high))
    if low:
        prior = max(prior, max(low))
    return prior


class Planner:
    """Predicts every (cut, codec) on a link from learned components and picks the
    fastest one allowed.
    """

    def __init__(self, table: CostTable, *, accuracy_budget: float = 0.005) -> None:
        self.table = table
        self.accuracy_budget = accuracy_budget
        # Cut order (execution order, as the profiles list the cuts): the bounds on
        # heads and tails not yet measured come from the cuts around them.
        self._edge_order = {c: i for i, c in enumerate(table.edge_ms)}
        self._cloud_order = {c: i for i, c in enumerate(table.cloud_ms)}
        # Measured edge time / profiled edge time, learned from live requests: the prior
        # of cuts not yet run. A head run between network waits is slower than in a tight
        # profiling loop (caches and threads go cold), and more so than the whole model
        # run back to back on the device, so the two are calibrated apart: ``edge_scale``
        # for heads of split requests, ``local_scale`` for the all-on-device choice.
        self.edge_scale = 1.0
        self.edge_fixed = 0.0  # ms each head costs beside the scaled profile
        self.local_scale = 1.0
        # Measured tail compute / the server's profile, over the cuts served twice or
        # more: the prior of cuts not yet served. The profile runs tails back to back,
        # warm; a request's tail runs after the idle wait for the network, and on this
        # 2-core machine resnet18's tails took 1.4-3x their profile when served.
        self.cloud_scale = 1.0
        self.cloud_fixed = 0.0  # ms each request's tail costs beside the scaled profile
        self.batch = 1  # the server batch requests are predicted to meet (the last seen)
        self.edge_seen: dict[str, deque[float]] = {}  # cut -> head times measured here
        self.cloud_seen: dict[tuple[str, int], deque[float]] = {}  # (cut, batch) -> compute
        self.encode_seen: dict[tuple[str, str], deque[float]] = {}  # (cut, codec) -> encode
        self.decode_seen: dict[tuple[str, str], deque[float]] = {}  # (cut, codec) -> server
        self.bytes_seen: dict[tuple[str, str], deque[float]] = {}  # (cut, codec) -> sent
        # Value of each component the last plan used, recorded when it first changes.
        self._basis: dict[tuple[str, object], float] = {}
        self.moved: str | None = None  # which component moved enough to re-plan, if any
        # Derived from the observations until the next one: the spreads, the fixed
        # costs of encoding and decoding per codec.
        self._derived: dict[Any, float] = {}

    # ------------------------------------------------------------ components
    def edge_ms(self, cut: str) -> float:
        """The head at ``cut`` on this device (``output``: the whole model)."""
        x = self.table.edge_ms[cut]
        if cut == OUTPUT:
            prior = x * self.local_scale
        else:
            prior = self.edge_fixed + self.edge_scale * x if x > 0 else 0.0
        seen = self.edge_seen.get(cut)
        if cut != OUTPUT and not seen and len(self.edge_seen.get(OUTPUT, ())) > 1:
            # A head is a prefix of the model: never priced above the whole model here.
            prior = min(prior, self.edge_ms(OUTPUT))
        if cut != OUTPUT:
            steady = {c: s for c, s in self.edge_seen.items() if c != OUTPUT}
            prior = _between(self._edge_order, cut, prior, steady, rising=True)
        return learned(prior, seen)

    def cloud_ms(self, cut: str, batch: int | None = None) -> float:
        """The tail at ``cut`` on the server, for a batch of ``batch`` samples (default:
        the batch requests meet now). The prior of a batch not yet seen is the
        profile (batch 1) times the batch, mapped like the tails served (``cloud_fixed``
        + ``cloud_scale`` x it): an upper bound, as batching only saves. It lies
        between the tails served at the cuts around it (see the module docstring).
        """
        b = self.batch if batch is None else batch
        x = self.table.cloud_ms.get(cut, 0.0) * b
        prior = self.cloud_fixed + self.cloud_scale * x if x > 0 else 0.0
        steady = {c: s for (c, n), s in self.cloud_seen.items() if n == b}
        prior = _between(self._cloud_order, cut, prior, steady, rising=False)
        return learned(prior, self.cloud_seen.get((cut, b)))

    def encode_ms(self, cut: str, codec: str) -> float:
        """Encoding the frontier of ``cut`` with ``codec`` on the device: the table's
        throughput estimate plus what a call costs beside it (``_call_cost``), then what
        this pair's requests took.
        """
        prior = self.table.pairs[(cut, codec)].encode_ms
        prior += self._call_cost("encode", self.encode_seen, codec)
        return learned(prior, self.encode_seen.get((cut, codec)))

    def bytes_up(self, cut: str, codec: str) -> int:
        """The request at ``(cut, codec)``: the median of what its requests sent, else
        the table's estimate.
        """
        seen = self.bytes_seen.get((cut, codec))
        if seen:
            return round(statistics.median(seen))
        return self.table.pairs[(cut, codec)].bytes_up

    def decode_ms(self, cut: str, codec: str) -> float:
        """Decoding it on the server (priced like ``encode_ms``)."""
        prior = self.table.pairs[(cut, codec)].decode_ms
        prior += self._call_cost("decode", self.decode_seen, codec)
        return learned(prior, self.decode_seen.get((cut, codec)))

    def _call_cost(self, kind: str, seen: dict[tuple[str, str], deque[float]], codec: str) -> float:
        """What a request's encode (decode) costs beside the table's estimate, which
        scales a warm loop's throughput to the frontier and so prices a small frontier
        at almost nothing: the median excess of the pairs measured twice or more with
        ``codec`` (with any codec, until one is), at least 0. digits-cnn's frontiers
        encode in 0.01 ms in the loop and 0.1 ms in a request.
        """
        key = (kind, codec)
        if key not in self._derived:
            excess: dict[str, list[float]] = {}
            for (c, k), s in seen.items():
                if len(s) > 1 and (c, k) in self.table.pairs:
                    base = getattr(self.table.pairs[(c, k)], f"{kind}_ms")
                    excess.setdefault(k, []).append(statistics.median(list(s)[1:]) - base)
            pool = excess.get(codec) or [e for es in excess.values() for e in es]
            self._derived[key] = max(statistics.median(pool), 0.0) if pool else 0.0
        return self._derived[key]

    # ------------------------------------------------------------ learning
    def _add(
        self,
        kind: str,
        seen: dict[Any, deque[float]],
        key: Any,
        value: float,
        current: Callable[[], float],
    ) -> None:
        """Record one observation of a component; note it if it moved since the plan."""
        if not math.isfinite(value) or value < 0:
            return
        basis = self._basis.setdefault((kind, key), current())
        seen.setdefault(key, deque(maxlen=WINDOW)).append(value)
        self._derived.clear()
        now = current()
        hi, lo = max(now, basis), min(now, basis)
        if hi - lo >= REPLAN_FLOOR_MS and hi >= REPLAN_RATIO * lo:
            unit = "B" if kind == "bytes" else "ms"
            self.moved = self.moved or f"{kind} {key}: {basis:.2f} -> {now:.2f} {unit}"

    def observe_edge(self, cut: str, measured_ms: float, alpha: float = 0.3) -> None:
        """The client's own timing of the head at ``cut`` (``output``: the whole model)."""
        if not self.table.learn_edge or cut not in self.table.edge_ms:
            return
        profiled = self.table.edge_ms[cut]
        if cut == OUTPUT and profiled > 0.05 and measured_ms > 0:
            ratio = min(max(measured_ms / profiled, 0.2), 20.0)
            self.local_scale = (1 - alpha) * self.local_scale + alpha * ratio
        self._add("edge", self.edge_seen, cut, measured_ms, lambda: self.edge_ms(cut))
        if cut not in (INPUT, OUTPUT):  # input's head is nothing: nothing to learn
            fit = self._refit("edge", self._edge_points(), (self.edge_fixed, self.edge_scale),
                              (0.2, 20.0))  # fmt: skip
            self.edge_fixed, self.edge_scale = fit

    def observe_request(
        self,
        cut: str,
        codec: str,
        *,
        edge_ms: float,
        encode_ms: float,
        decode_ms: float,
        cloud_ms: float,
        batch: int,
        bytes_up: int = 0,
    ) -> None:
        """One answered split request: the device's head and encode timings, the
        server's decode and compute (for its whole batch of ``batch`` samples), and the
        bytes it sent (0: not known).
        """
        self.observe_edge(cut, edge_ms)
        b = max(int(batch), 1)
        self._add("cloud", self.cloud_seen, (cut, b), cloud_ms, lambda: self.cloud_ms(cut, b))
        fit = self._refit("cloud", self._cloud_points(), (self.cloud_fixed, self.cloud_scale),
                          (0.25, 4.0))  # fmt: skip
        self.cloud_fixed, self.cloud_scale = fit
        if b != self.batch:
            self.moved = self.moved or f"server batch {self.batch} -> {b}"
            self.batch = b
        if (cut, codec) in self.table.pairs:
            pair = (cut, codec)
            self._add("encode", self.encode_seen, pair, encode_ms, lambda: self.encode_ms(*pair))
            self._add("decode", self.decode_seen, pair, decode_ms, lambda: self.decode_ms(*pair))
            if bytes_up > 0:
                self._add("bytes", self.bytes_seen, pair, bytes_up, lambda: self.bytes_up(*pair))

    def _edge_points(self) -> list[tuple[float, float]]:
        """Per head run twice or more (not ``input``'s, which is nothing, nor the whole
        model's): (its profile, its median here with the first run left out, as that
        pays one-time costs).
        """
        return [
            (self.table.edge_ms[c], statistics.median(list(seen)[1:]))
            for c, seen in self.edge_seen.items()
            if c not in (INPUT, OUTPUT) and self.table.edge_ms[c] > 0.05 and len(seen) > 1
        ]

    def _cloud_points(self) -> list[tuple[float, float]]:
        """Per (cut, batch) served twice or more: (profile x batch, its median with
        the first left out).
        """
        return [
            (self.table.cloud_ms[c] * b, statistics.median(list(seen)[1:]))
            for (c, b), seen in self.cloud_seen.items()
            if len(seen) > 1 and self.table.cloud_ms.get(c, 0.0) > 0
        ]

    def _refit(
        self,
        kind: str,
        points: list[tuple[float, float]],
        current: tuple[float, float],
        scale_range: tuple[float, float],
    ) -> tuple[float, float]:
        """(fixed, scale) of ``kind``'s prior: ``fit_profile`` on ``points``, noting it
        as moved when it moves a typical cut's price enough to re-plan (it prices every
        cut not yet measured). No points: ``current``.
        """
        if not points:
            return current
        typical = statistics.median(x for x, _ in points)
        basis = self._basis.setdefault((f"{kind} fit", None), current[0] + current[1] * typical)
        fixed, scale = fit_profile(points, scale_range=scale_range)
        now = fixed + scale * typical
        hi, lo = max(basis, now), min(basis, now)
        if hi - lo >= REPLAN_FLOOR_MS and hi >= REPLAN_RATIO * lo:
            self.moved = self.moved or f"{kind} fit: {fixed:.2f} ms + {scale:.2f} x profile"
        return fixed, scale

    def _spread(
        self,
        kind: str,
        measured: Callable[[], list[tuple[float, float]]],
        fit: tuple[float, float],
    ) -> float:
        """How far the fitted prior ``fixed + scale x profile`` has been off on the cuts
        measured: the largest miss as a fraction of the prior, over the cuts profiled at
        ``SCALE_FLOOR_MS`` or more where two are (else over all, a miss counted against
        at least that floor), at least ``SPREAD_FLOOR``; 1 (the whole component in
        doubt) until two cuts are measured.
        """
        if kind not in self._derived:  # kept until the next observation
            points = measured()
            fixed, scale = fit
            big = [(x, y) for x, y in points if x >= SCALE_FLOOR_MS]
            if len(big) >= 2:
                misses = [abs(y / (fixed + scale * x) - 1.0) for x, y in big]
            else:
                misses = [
                    abs(y - fixed - scale * x) / max(fixed + scale * x, SCALE_FLOOR_MS)
                    for x, y in points
                ]
            spread = min(max(max(misses), SPREAD_FLOOR), 1.0) if len(misses) > 1 else 1.0
            self._derived[kind] = spread
        return self._derived[kind]

    @property
    def edge_spread(self) -> float:
        """The doubt in a head never run, as a fraction of its price (``_spread``)."""
        return self._spread("edge spread", self._edge_points, (self.edge_fixed, self.edge_scale))

    @property
    def cloud_spread(self) -> float:
        """The doubt in a tail never served, as a fraction of its price (``_spread``)."""
        fit = (self.cloud_fixed, self.cloud_scale)
        return self._spread("cloud spread", self._cloud_points, fit)

    def refresh_cloud(self, profile: dict[str, float]) -> None:
        """A server's start-up table again (after a reconnect): the cloud prior, beside
        only the newest observation of each cut, so two more observations decide.
        """
        self.table = replace(self.table, cloud_ms={**self.table.cloud_ms, **profile})
        self._cloud_order = {c: i for i, c in enumerate(self.table.cloud_ms)}
        for key, seen in self.cloud_seen.items():
            self.cloud_seen[key] = deque(list(seen)[-1:], maxlen=seen.maxlen)
        self._derived.clear()

    def planned(self) -> None:
        """A plan was made on the current components: movement is measured from here."""
        self._basis.clear()
        self.moved = None

    def unobserved_ms(self, p: Prediction) -> float:
        """The part of prediction ``p`` that rests on priors alone: each component of
        its cut and codec (edge, encode, decode, cloud at the current batch) with no
        observation past a first run. What a cut never run is priced from: a profile
        scaled by heads run elsewhere (``edge_scale``), the server's start-up table
        (``cloud_scale``). Once two heads (tails) are measured, a head (tail) counts
        only by how far the scaled profile has been off on them (``edge_spread``,
        ``cloud_spread``): a profile that has predicted well is not doubted whole.
        """

        def doubt(seen: dict[Any, deque[float]], key: Any, ms: float, spread: float) -> float:
            return ms * spread if len(seen.get(key, ())) < 2 else 0.0

        edge = 0.0
        if self.table.learn_edge:
            spread = 1.0 if p.cut == OUTPUT else self.edge_spread
            edge = doubt(self.edge_seen, p.cut, p.edge_ms, spread)
        if p.cut == OUTPUT:
            return edge
        pair = (p.cut, p.codec)
        return (
            edge
            + doubt(self.encode_seen, pair, p.encode_ms, 1.0)
            + doubt(self.decode_seen, pair, p.decode_ms, 1.0)
            + doubt(self.cloud_seen, (p.cut, self.batch), p.cloud_ms, self.cloud_spread)
        )

    # ------------------------------------------------------------ predicting
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
        """The latency model for one choice, on the learned components."""
        t = self.table
        if cut == OUTPUT:
            return Prediction(OUTPUT, "none", self.edge_ms(OUTPUT), 0, 0, 0, 0, 0, 0, 0, 0)
        bytes_up = self.bytes_up(cut, codec)
        return Prediction(
            cut=cut,
            codec=codec,
            edge_ms=self.edge_ms(cut),
            encode_ms=self.encode_ms(cut, codec),
            up_ms=bytes_up * 8 / (link.up_mbit * 1e3),
            rtt_ms=link.rtt_ms,
            queue_ms=link.queue_ms,
            decode_ms=self.decode_ms(cut, codec),
            cloud_ms=self.cloud_ms(cut),
            down_ms=t.result_bytes * 8 / (link.down_mbit * 1e3),
            bytes_up=bytes_up,
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


@dataclass(frozen=True)
class CodecSpeed:
    """Encode and decode time of one codec as a line in the frontier's raw bytes,
    fitted on two frontiers (the smallest and the largest): what a cut not timed costs.
    """

    encode_fixed_ms: float
    encode_ms_per_mb: float
    decode_fixed_ms: float
    decode_ms_per_mb: float

    @classmethod
    def fit(
        cls, codec: str, small: Sequence[torch.Tensor], large: Sequence[torch.Tensor], runs: int
    ) -> CodecSpeed:
        """Time ``codec`` on both frontiers; a line through the two points."""
        points = []
        for frontier in (small, large):
            msgs = [encode(t, codec) for t in frontier]
            enc = _median_ms(lambda f=frontier: [encode(t, codec) for t in f], runs)  # type: ignore[misc]
            dec = _median_ms(lambda m=msgs: [decode(x) for x in m], runs)  # type: ignore[misc]
            points.append((_raw_mb(frontier), enc, dec))
        (s_mb, s_enc, s_dec), (l_mb, l_enc, l_dec) = points
        span = l_mb - s_mb
        enc_slope = max((l_enc - s_enc) / span, 0.0) if span > 0 else 0.0
        dec_slope = max((l_dec - s_dec) / span, 0.0) if span > 0 else 0.0
        return cls(
            encode_fixed_ms=max(s_enc - enc_slope * s_mb, 0.0),
            encode_ms_per_mb=enc_slope if span > 0 else l_enc / max(l_mb, 1e-9),
            decode_fixed_ms=max(s_dec - dec_slope * s_mb, 0.0),
            decode_ms_per_mb=dec_slope if span > 0 else l_dec / max(l_mb, 1e-9),
        )

    def times(self, frontier: Sequence[torch.Tensor]) -> tuple[float, float]:
        """(encode_ms, decode_ms) predicted for ``frontier``."""
        mb = _raw_mb(frontier)
        return (
            self.encode_fixed_ms + self.encode_ms_per_mb * mb,
            self.decode_fixed_ms + self.decode_ms_per_mb * mb,
        )


def _raw_mb(frontier: Sequence[torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in frontier) / 1e6


def frontier_bytes(frontier: Sequence[torch.Tensor], codec: str) -> int:
    """Wire bytes of ``frontier`` in a request (each ``Tensor`` message and its field
    framing), from ``estimate_nbytes`` on the tensors themselves: no encoding.
    """
    return sum(
        estimate_nbytes(codec, tuple(t.shape), t.dtype, sample=t).nbytes + 4 for t in frontier
    )


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
    warm_ms: Mapping[str, float] | None = None,
) -> CostTable:
    """Profile ``graph`` on this device with input ``x`` (batch 1): head latency per cut
    (``profile_cuts``), and per (cut, codec) the request bytes (``estimate_nbytes``)
    and encode/decode time (``CodecSpeed``: each codec timed on two frontiers only).
    A head's time on a device ``edge_slowdown`` times slower is priced as that device
    runs it (``slowed_ms``).
    """
    edge = {
        p.cut: slowed_ms(p.head_ms, edge_slowdown, (warm_ms or {}).get(p.cut))
        for p in profile_cuts(graph, (x,), runs=runs)
    }
    names = [c for c in (list(cuts) if cuts is not None else graph.names) if c != OUTPUT]
    frontiers = {cut: list(graph.split(cut)[0](x)) for cut in names}
    return table_from_frontiers(
        frontiers,
        edge,
        codecs,
        cloud_ms,
        result_bytes=result_bytes,
        runs=runs,
        edge_slowdown=edge_slowdown,
        agreement=agreement,
    )


def slowed_ms(run_ms: float, slowdown: float, warm_ms: float | None = None) -> float:
    """A head timed at ``run_ms`` here, on a device ``slowdown`` times slower. An
    emulated one (``edge.model.SlowerDevice``) stretches each run by ``slowdown - 1``
    times the head's warm compute (``warm_ms``, timed when it started): the run plus
    that. Otherwise ``slowdown`` times the run.
    """
    if warm_ms is None:
        return run_ms * slowdown
    return run_ms + (slowdown - 1.0) * warm_ms


def table_from_frontiers(
    frontiers: dict[str, list[torch.Tensor]],
    edge_ms: dict[str, float],
    codecs: Sequence[str],
    cloud_ms: dict[str, float],
    *,
    result_bytes: int,
    runs: int = 5,
    edge_slowdown: float = 1.0,
    agreement: dict[tuple[str, str], float] | None = None,
) -> CostTable:
    """The cost table from each cut's frontier on a real input and the head times."""
    pairs: dict[tuple[str, str], PairCost] = {}
    if frontiers:
        by_size = sorted(frontiers.values(), key=_raw_mb)
        small, large = by_size[0], by_size[-1]
        for codec in codecs:
            name = str(parse_codec(codec))
            speed = CodecSpeed.fit(name, small, large, runs)
            for cut, frontier in frontiers.items():
                enc, dec = speed.times(frontier)
                pairs[(cut, name)] = PairCost(
                    cut=cut,
                    codec=name,
                    bytes_up=frontier_bytes(frontier, name),
                    encode_ms=enc,
                    decode_ms=dec,
                    agreement=(agreement or {}).get((cut, name)),
                )
    return CostTable(
        edge_ms=edge_ms,
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
    only from requests of at least ``min_sample_bytes`` whose transfer is a real share
    of the residual; smaller ones move the RTT. Bandwidth and queue are exponentially
    weighted (bandwidth in log space); the RTT is the median of the last
    ``rtt_window`` samples (the prior the first of them). A request's fixed cost is
    skewed (now and then a stall of a few ms), and a weighted mean follows the stalls:
    on digits-cnn over WiFi it read 18.4-19.7 ms where the median request took 17.5-17.9.
    """

    prior: LinkEstimate
    alpha: float = 0.4  # weight of a new sample
    replan_ratio: float = 1.25  # re-plan when an estimate moves by this factor
    min_sample_bytes: int = 8192  # smaller requests teach the RTT, not the bandwidth
    rtt_window: int = 5  # RTT samples kept: a step in the RTT is followed after 3
    up_mbit: float = field(init=False)
    down_mbit: float = field(init=False)
    rtt_ms: float = field(init=False)
    queue_ms: float = field(init=False)
    _planned_on: LinkEstimate | None = field(default=None, init=False)
    _rtts: deque[float] = field(init=False)

    def __post_init__(self) -> None:
        self.up_mbit = self.prior.up_mbit
        self.down_mbit = self.prior.down_mbit
        self.rtt_ms = self.prior.rtt_ms
        self.queue_ms = self.prior.queue_ms
        self._rtts = deque([self.prior.rtt_ms], maxlen=max(self.rtt_window, 1))

    def _rtt_sample(self, rtt_ms: float) -> None:
        self._rtts.append(max(rtt_ms, 0.0))
        self.rtt_ms = statistics.median(self._rtts)

    def _ewma(self, old: float, new: float) -> float:
        return (1 - self.alpha) * old + self.alpha * new

    def observe_rtt(self, rtt_ms: float) -> None:
        """The round trip of a probe that carries almost nothing."""
        self._rtt_sample(rtt_ms)

    def observe(self, residual_ms: float, bytes_up: int, bytes_down: int, queue_ms: float) -> None:
        """One request: its residual time (see the class), its bytes, its server queue."""
        self.queue_ms = self._ewma(self.queue_ms, max(queue_ms, 0.0))
        if bytes_up <= 0:
            return
        down_ms = bytes_down * 8 / (self.down_mbit * 1e3)
        transfer_ms = residual_ms - self.rtt_ms - down_ms
        expected_ms = bytes_up * 8 / (self.up_mbit * 1e3)
        if bytes_up < self.min_sample_bytes:
            # Too small to time a bandwidth: a few ms of noise would read as a link of
            # a few hundred kbit/s. What it took beyond its transfer is fixed cost.
            self._rtt_sample(residual_ms - expected_ms - down_ms)
            return
        if transfer_ms > 0.25 * max(residual_ms, 1e-6) and transfer_ms > 0.5:
            sample = bytes_up * 8 / (transfer_ms * 1e3)  # the upload is measurable
        elif expected_ms > 2 * max(transfer_ms, 0.5):
            # Far faster than expected: the link got better; move up.
            sample = bytes_up * 8 / (max(transfer_ms, 0.5) * 1e3)
        elif transfer_ms < 0:
            # Small requests: the fixed cost itself moved (the RTT).
            self._rtt_sample(residual_ms - expected_ms - down_ms)
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
