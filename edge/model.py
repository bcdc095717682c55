"""What the device holds: the traced model, a head per cut, and (maybe) the whole model.

``DeviceModel.load`` builds it from a model name and weights (the whole model on the
device) or from an edge bundle (``splitnet export``: only the heads up to the bundle's
deepest cut, built on the meta device and materialized from the bundle's weights).
Heads are built once per cut and kept: switching cuts (``cut="auto"``) costs nothing.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from splitnet.errors import ConfigError, PartitionError
from splitnet.models import fingerprint, load_model, resolve
from splitnet.partition import INPUT, Cut, SplitGraph, trace
from splitnet.report import sample_input

__all__ = ["DeviceModel", "SlowerDevice"]


@dataclass
class DeviceModel:
    """The model as the device has it."""

    name: str  # the server's name for it
    input_shape: tuple[int, ...]  # example input with batch
    fingerprint: str  # the whole model's (what requests carry)
    graph: SplitGraph  # every cut, traced once
    whole: nn.Module | None  # the whole model; None when only heads were shipped
    deepest: int  # index of the deepest cut whose head the device holds
    source: str = "weights"  # "weights" or "bundle DIR"
    codecs: tuple[str, ...] | None = None  # codecs a bundle allows; None: any

    def __post_init__(self) -> None:
        self._heads: dict[str, nn.Module] = {}
        self._lock = threading.Lock()
        self._state: dict[str, torch.Tensor] | None = None  # a bundle's head weights

    @classmethod
    def from_bundle(cls, path: str | Path, key: bytes | None, model: str | None) -> DeviceModel:
        """Only the heads a bundle serves: the model is built and traced on the meta
        device, and just the head's weights are materialized (no tail weight is ever
        allocated). A bundle exported with ``--whole`` gives the whole model instead.
        """
        from splitnet.bundle import Bundle

        bundle = Bundle.open(path, key)
        if model is not None and model != bundle.model_name:
            raise ConfigError(f"bundle {str(path)!r} holds {bundle.model_name}, not {model}")
        source = f"bundle {path}"
        if bundle.has("whole"):
            whole = bundle.whole_model()
            graph = trace(whole, (sample_input(bundle.input_shape),))
            deepest = len(graph.cuts) - 1
            device = cls(bundle.model_name, bundle.input_shape, bundle.fingerprint, graph,
                         whole, deepest, source)  # fmt: skip
        else:
            graph = bundle.meta_graph()
            deepest = graph.cut(bundle.cut).index
            device = cls(bundle.model_name, bundle.input_shape, bundle.fingerprint, graph,
                         None, deepest, source)  # fmt: skip
            device._state = bundle.state("head")
            device.head(bundle.cut)  # materialize the deepest head now: it holds them all
        device.codecs = tuple(bundle.codecs)
        return device

    @classmethod
    def load(
        cls,
        model: str | nn.Module,
        *,
        model_name: str | None,
        input_shape: tuple[int, ...] | None,
        weights: str | Path | None,
    ) -> DeviceModel:
        """The whole model on the device: built by name (or given), traced on a real input."""
        if isinstance(model, str):
            spec = resolve(model, input_shape)
            module = load_model(model, weights, input_shape=spec.input_shape)
            name, shape = model_name or model, spec.input_shape
        else:
            if input_shape is None or model_name is None:
                raise ConfigError("a module needs input_shape and model_name (the server's name)")
            if weights is not None:
                raise ConfigError(
                    "weights= is for a model given by name; load them into the module"
                )
            module, name, shape = model.eval(), model_name, tuple(input_shape)
        graph = trace(module, (sample_input(shape),))
        return cls(
            name=name,
            input_shape=shape,
            fingerprint=fingerprint(module),
            graph=graph,
            whole=module,
            deepest=len(graph.cuts) - 1,
        )

    # ---------------------------------------------------------------- cuts
    @property
    def names(self) -> list[str]:
        """The cuts this device can run, in execution order."""
        return [c.name for c in self.graph.cuts[: self.deepest + 1]]

    def cut(self, name: str) -> Cut:
        """The cut ``name``; ``PartitionError`` if unknown or deeper than the device holds."""
        cut = self.graph.cut(name)
        if cut.index > self.deepest:
            raise PartitionError(
                f"cut {name!r} is deeper than this device's {self.source} reaches "
                f"(its deepest cut is {self.graph.cuts[self.deepest].name!r}); "
                f"valid cuts: {', '.join(self.names)}"
            )
        return cut

    def head(self, name: str) -> nn.Module:
        """The head of cut ``name`` (built once, then kept)."""
        head = self._heads.get(name)
        if head is None:
            with self._lock:
                head = self._heads.get(name)
                if head is None:
                    head = self._heads[name] = self._build_head(name)
        return head

    def _build_head(self, name: str) -> nn.Module:
        head = self.graph.split(self.cut(name).name)[0]
        if self._state is not None:
            from splitnet.bundle import materialize

            materialize(head, self._state)
        return head

    @property
    def can_run_whole(self) -> bool:
        """True if the device can compute the whole model (``output``, local fallback)."""
        return self.whole is not None

    def run_whole(self, x: torch.Tensor) -> torch.Tensor:
        """The whole model on ``x``."""
        if self.whole is None:
            raise ConfigError(
                f"this device holds only heads up to {self.graph.cuts[self.deepest].name!r} "
                f"({self.source}): it cannot run the whole model"
            )
        with torch.no_grad():
            out: torch.Tensor = self.whole(x)
        return out

    def first_cut(self) -> str:
        """The shallowest cut (``input``)."""
        return self.graph.cuts[0].name if self.graph.cuts else INPUT


def precise_sleep(seconds: float, spin_s: float = 0.001) -> None:
    """Sleep ``seconds``, the last ``spin_s`` of it busy-waiting: ``time.sleep`` here
    wakes up to a millisecond late, a third of a small model's emulated time.
    """
    end = time.perf_counter() + seconds
    if seconds > spin_s:
        time.sleep(seconds - spin_s)
    while time.perf_counter() < end:
        pass


class SlowerDevice:
    """Emulates a device ``factor`` times slower than this machine (``--edge-slowdown``).

    A head's (or the whole model's) time on the emulated device is its run here plus
    ``factor - 1`` times its *warm* compute here: the least of ``runs`` back-to-back
    runs, timed for every head at once when the first client of the model starts
    (``calibrate_many``). So the emulated device has a speed of its own, as a real one
    does:

    * Whatever a run takes over its warm time (a cold cache, a core waking after the
      idle wait for the network) is paid once, as a real slow device pays it, instead
      of being multiplied by the factor. On this 2-core machine resnet18 runs in
      43-44 ms back to back but in 44-60 ms after a 400 ms idle wait; multiplied by
      10, that stall alone put 10-20% of noise on every emulated time.
    * A drift of this shared host's speed reaches the emulated device only through
      the real run, 1/factor of its time. When the stretch followed the host, two
      clients measuring the same all-on-device pair a minute apart differed by 13%,
      and a head measured slower than the whole model that contains it.

    One process is one device: ``SlowerDevice.of(factor)`` is shared by every client
    of the process. A head is named by its model, input shape and cut. A head never
    calibrated is stretched by its own run.
    """

    _devices: dict[float, SlowerDevice] = {}
    _devices_lock = threading.Lock()

    def __init__(
        self,
        factor: float,
        runs: int = 5,
        *,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = precise_sleep,
    ) -> None:
        self.factor = factor
        self.runs = runs
        self.clock = clock
        self.sleep = sleep
        self._warm: dict[str, float] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, factor: float) -> SlowerDevice:
        """The emulated device ``factor`` times slower, one per process."""
        with cls._devices_lock:
            device = cls._devices.get(factor)
            if device is None:
                device = cls._devices[factor] = cls(factor)
            return device

    def warm_s(self, key: str) -> float | None:
        """The warm compute of ``key`` here (None: not calibrated)."""
        return self._warm.get(key)

    def calibrate(self, key: str, run: Callable[[], object]) -> float:
        """Time ``run`` back to back (one warm-up, then ``runs``); keep the least as the
        warm compute of ``key``. Once per key: later calls return the kept figure.
        """
        return self.calibrate_many({key: run})[key]

    def calibrate_many(
        self, runs: Mapping[str, Callable[[], object]], *, nested: bool = False
    ) -> dict[str, float]:
        """``calibrate`` every key not yet known, in ``self.runs`` interleaved rounds
        (each round runs every head once), so that all of them are timed in the same
        minutes: this shared host's speed drifts by 10-20% over minutes, and heads timed
        at different moments would disagree with each other.

        ``nested``: each run contains the ones before it (a device's heads in cut order,
        then the whole model), so none is kept above a later one: a head's warm compute
        is the least of its own and every later run's. A real device never runs a head
        slower than the model that contains it; timed alone, resnet18's `flatten` head
        once came out 20% over the whole model here, and the emulated device kept it.
        """
        with self._lock:
            new = {k: run for k, run in runs.items() if k not in self._warm}
            for run in new.values():  # warm-up
                run()
            best = dict.fromkeys(new, math.inf)
            for _ in range(self.runs):
                for key, run in new.items():
                    t0 = self.clock()
                    run()
                    best[key] = min(best[key], self.clock() - t0)
            if nested:
                least = math.inf
                for key in reversed(list(runs)):
                    least = min(least, best.get(key, self._warm.get(key, math.inf)))
                    if key in best:
                        best[key] = least
            self._warm.update(best)
            return {k: self._warm[k] for k in runs}

    def stretch(self, key: str, started: float) -> None:
        """Sleep so that the run of ``key`` begun at ``started`` (``clock``) takes what
        it would on the slower device.
        """
        warm = self._warm.get(key)
        if warm is None:
            warm = self.clock() - started
        self.sleep(warm * (self.factor - 1))
