"""``splitnet-edge generate --cut auto``: choose the cut and codec before generating.

The edge times the model here (``splitnet.llm.plan.auto_costs``), prices the cloud from
the profile the server published at start-up (``GenerationModel.profile``; or, with
``--cloud-speedup``, as that many times faster than this machine), measures the round
trip with ``GetGenerationInfo`` calls unless ``--rtt-ms`` is given, takes the bandwidth
from ``--link-mbit``, and asks ``splitnet.llm.plan`` for the fastest layout that meets
``--edge-memory-mb``, ``--min-edge-blocks`` and ``--u-shaped``. The plan (the choice,
the baselines and the faster layouts rejected, with why) is printed before the text.
``input`` (all in the cloud, token ids sent) runs like any cut; ``output`` (all on this
device) cannot run through a session: when it wins, the fastest layout that uses the
server runs and the plan says so.
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
    SideCost,
    auto_costs,
    plan_generation,
    profile_from_pb,
)
from splitnet.planning import LinkEstimate
from splitnet.v1 import generation_pb2 as gpb

__all__ = ["add_plan_arguments", "choose_cut", "server_profile"]


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
    g.add_argument("--cloud-speedup", type=float, default=None,
                   help="price the cloud this many times faster than this machine, instead "
                        "of from the profile the server publishes (1 if it publishes none)")


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


def server_profile(info: gpb.GenerationInfo, lm: LanguageModel) -> SideCost | None:
    """The compute profile the server published for ``lm`` (checked against its block
    count: ``ProtocolError`` if it does not fit), or None when it published none.
    """
    for m in info.models:
        if m.name == lm.name and m.HasField("profile"):
            return profile_from_pb(m.profile, lm.num_layers)
    return None


def choose_cut(
    args: argparse.Namespace,
    lm: LanguageModel,
    prompt_tokens: int,
    rtt_ms: float,
    cloud: SideCost | None = None,
) -> tuple[str, str, str]:
    """(cut, codec, the plan as text) for this generation; ``ConfigError`` if nothing fits.
    ``cloud`` is the server's published profile (``server_profile``); without it, or with
    ``args.cloud_speedup``, the cloud is priced as this machine sped up.
    """
    codecs = [args.codec] if args.codec else list(AUTO_CODECS)
    constraints = Constraints(edge_memory_mb=args.edge_memory_mb,
                              min_edge_blocks=args.min_edge_blocks, u_shaped=args.u_shaped)
    speedup = args.cloud_speedup
    costs = auto_costs(lm.model, lm.num_layers, lm.hidden_size, codecs=codecs,
                       cloud=cloud, cloud_speedup=speedup)
    if cloud is not None and speedup is None:
        source = "the server's published profile"
    else:
        source = f"this machine's timing / {speedup or 1:g} (--cloud-speedup)"
    step = costs.cloud.decode(0, lm.num_layers) + costs.cloud.lm_head_ms
    edge_step = costs.edge.decode(0, lm.num_layers) + costs.edge.lm_head_ms
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
    text = (f"compute per token, whole model: edge {edge_step:.1f} ms (timed here), cloud "
            f"{step:.1f} ms ({source})\n" + result.describe())
    if result.choice is not None and result.choice.cut == ALL_EDGE:
        text += (f"\n{result.choice.label} is predicted fastest, but a session needs the "
                 f"server: running the fastest layout that uses it, {best.label}")
    else:
        text += f"\nrunning {best.label}"
    return best.cut, best.codec or "raw", text
