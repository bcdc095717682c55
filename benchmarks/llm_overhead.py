"""Per-token overhead of split generation, against a bare gRPC stream, in one run.

    python -m benchmarks.llm_overhead [--model tiny:llama:hidden=576] [--tokens 64]
        [--rounds 5] [--cut block.1] [--out out/llm-overhead]

A decode step's round trip minus both sides' compute (the edge's blocks run before the
step is sent, so its round trip is the network time the edge measures, the server's
queue and the server's compute; the last is subtracted) is what splitnet's session
path costs per token: the step message, position
checks, the session lookup, the step batcher, encoding the hidden state and the
answer. It is compared with a bare grpc.aio bidirectional stream echoing a message of
the same size as the step request (a hidden vector of the model's width up, a few bytes
down), interleaved round by round so drift on a shared machine hits both. The default
model is a small random Llama as wide as SmolLM2 (576), so the bytes on the wire are
SmolLM2's while the compute, which is subtracted anyway, stays small.

Goal (issue 12): overhead <= 1.3x the bare round trip. The benchmark measures and
reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import grpc
import torch

from benchmarks.overhead import BareServer, _pingpong
from cloud.config import ModelEntry, ServerConfig
from cloud.server import BackgroundServer
from edge.generate import GenerateConfig, Generator
from splitnet.llm import load_lm


def bare_times(port: int, nbytes: int, n: int) -> list[float]:
    payload = bytes(nbytes)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return _pingpong(ch, "/bare.Bare/Echo", iter(lambda: [payload], None), n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny:llama:hidden=576,heads=9,kv_heads=3")
    p.add_argument("--cut", default="block.1")
    p.add_argument("--codec", default="raw")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("out/llm-overhead"))
    args = p.parse_args()
    torch.set_num_threads(1)
    lm = load_lm(args.model)
    server = BackgroundServer(ServerConfig(models=(ModelEntry(name=args.model),), port=0))
    bare = BareServer()
    prompt = list(range(1, 17))
    split_ms: list[float] = []
    bare_ms: list[float] = []
    steps_ms: list[float] = []
    parts: dict[str, list[float]] = {"edge_ms": [], "encode_ms": [], "network_ms": [],
                                     "queue_ms": [], "compute_ms": []}  # fmt: skip
    bytes_up: list[int] = []
    try:
        config = GenerateConfig(model=args.model, cut=args.cut, codec=args.codec,
                                stop_at_eos=False)  # fmt: skip
        with Generator(server.address, config, lm=lm) as gen:
            gen.generate(prompt, 8)  # warm-up
            for _ in range(args.rounds):
                result = gen.generate(prompt, args.tokens)
                for s in result.steps[1:]:  # the first step follows the prefill
                    steps_ms.append(s.total_ms)
                    # the round trip (network_ms is it minus the server's time) minus the
                    # server's compute: what the wire, the session path and its queue cost
                    split_ms.append(s.network_ms + s.queue_ms)
                    bytes_up.append(s.bytes_up)
                    for k, v in parts.items():
                        v.append(getattr(s, k))
                size = int(statistics.median(bytes_up))
                bare_ms += [t * 1e3 for t in bare_times(bare.port, size, args.tokens)[1:]]
    finally:
        server.stop()
        bare.stop()
    report = {
        "model": args.model,
        "cut": args.cut,
        "codec": args.codec,
        "hidden_size": lm.hidden_size,
        "step_request_bytes": int(statistics.median(bytes_up)),
        "steps": len(split_ms),
        "step_p50_ms": statistics.median(steps_ms),
        "overhead_p50_ms": statistics.median(split_ms),
        "bare_p50_ms": statistics.median(bare_ms),
    }
    report["breakdown_p50_ms"] = {k: statistics.median(v) for k, v in parts.items()}
    report["ratio"] = report["overhead_p50_ms"] / report["bare_p50_ms"]
    print(
        f"{args.model} at {args.cut} ({args.codec}), {report['steps']} decode steps, "
        f"{report['step_request_bytes']} B up per step:"
    )
    print(f"  step round trip            p50 {report['step_p50_ms']:.3f} ms")
    print(
        "  per step p50 ms: "
        + ", ".join(f"{k[:-3]} {v:.3f}" for k, v in report["breakdown_p50_ms"].items())
    )
    print(f"  round trip minus compute   p50 {report['overhead_p50_ms']:.3f} ms")
    print(f"  bare gRPC stream, same size p50 {report['bare_p50_ms']:.3f} ms")
    print(f"  ratio {report['ratio']:.2f}x (goal <= 1.3x)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'overhead.json'}")


if __name__ == "__main__":
    main()
