"""``splitnet-edge generate --cut auto``: choose the cut and codec before generating.

The edge times the model here (``splitnet.llm.plan.auto_costs``), assumes the cloud
``--cloud-speedup`` times faster (the server publishes no compute profile), measures
the round trip with ``GetGenerationInfo`` calls unless ``--rtt-ms`` is given, takes the
bandwidth from ``--link-mbit``, and asks ``splitnet.llm.plan`` for the fastest layout
that meets ``--edge-memory-mb``, ``--min-edge-blocks`` and ``--u-shaped``. The plan
(the choice, the baselines and the faster layouts rejected, with why) is printed before
the text. ``input`` (all in the cloud, token ids sent) runs like any cut; ``output`` (all
on this device) cannot run through a session: when it wins, the fastest layout that uses
the server runs and the plan says so.
"""

from __future__ import annotations

import argparse
import statistics
import time

from splitnet.errors import ConfigError
from splitnet.llm import LanguageModel
from splitnet.llm.plan import (
    ALL_EDGE,
    AUTO_CODECS,
    Constraints,
    GenerationJob,
    auto_costs,
    plan_generation,
)
from splitnet.planning import LinkEstimate

__all__ = ["add_plan_arguments", "choose_cut"]


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that constrain ``--cut auto``."""
    g = p.add_argument_group("planning (--cut auto)")
    g.add_argument("--edge-memory-mb", type=float, default=None,
                   help="the edge's weights + KV cache must fit in this many MB (10^6 bytes)")
    g.add_argument("--min-edge-blocks", type=int, default=0,
                   help="blocks that run here before any hidden state leaves (privacy)")
    g.add_argument("--u-shaped", action="store_true",
                   help="token ids never leave the device: only block.K:block.M layouts")
    g.add_argument("--link-mbit", default="10",
                   help="link bandwidth in Mbit/s, UP or UP:DOWN (default 10)")
    g.add_argument("--rtt-ms", type=float, default=None,
                   help="round trip in ms (default: measured with GetGenerationInfo calls)")
    g.add_argument("--cloud-speedup", type=float, default=1.0,
                   help="how many times faster than this machine the cloud computes (1)")


def _link(args: argparse.Namespace, rtt_ms: float) -> LinkEstimate:
    up, _, down = str(args.link_mbit).partition(":")
    try:
        return LinkEstimate(up_mbit=float(up), down_mbit=float(down or up), rtt_ms=rtt_ms)
    except ValueError:
        raise ConfigError(
            f"--link-mbit {str(args.link_mbit)[:32]!r}: give Mbit/s > 0 as UP or UP:DOWN"
        ) from None


def measure_rtt_ms(info: object, runs: int = 5) -> float:
    """Median round trip of ``info()`` (a ``Generator.info``) after one warm-up call."""
    call = info  # a bound method; typed loosely so this module needs no grpc
    call()  # type: ignore[operator]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()  # type: ignore[operator]
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def choose_cut(
    args: argparse.Namespace, lm: LanguageModel, prompt_tokens: int, rtt_ms: float
) -> tuple[str, str, str]:
    """(cut, codec, the plan as text) for this generation; ``ConfigError`` if nothing fits."""
    codecs = [args.codec] if args.codec else list(AUTO_CODECS)
    constraints = Constraints(edge_memory_mb=args.edge_memory_mb,
                              min_edge_blocks=args.min_edge_blocks, u_shaped=args.u_shaped)
    costs = auto_costs(lm.model, lm.num_layers, lm.hidden_size, codecs=codecs,
                       cloud_speedup=args.cloud_speedup)
    job = GenerationJob(prompt_tokens=prompt_tokens, new_tokens=args.max_new_tokens)
    result = plan_generation(costs, job, _link(args, rtt_ms), constraints)
    runnable = [p for p in result.candidates if not p.rejected and p.cut != ALL_EDGE]
    if not runnable:
        raise ConfigError(
            "--cut auto: no split layout meets the constraints ("
            + ", ".join(f"{n} rejected by {k}" for k, n in sorted(result.rejections().items()))
            + "); relax --edge-memory-mb, --min-edge-blocks or --u-shaped"
        )
    best = runnable[0]
    text = result.describe()
    if result.choice is not None and result.choice.cut == ALL_EDGE:
        text += (f"\n{result.choice.label} is predicted fastest, but a session needs the "
                 f"server: running the fastest layout that uses it, {best.label}")
    else:
        text += f"\nrunning {best.label}"
    return best.cut, best.codec or "raw", text
