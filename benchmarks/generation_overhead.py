"""Per-token overhead of a generation step against a bare gRPC round trip, in one run.

    python -m benchmarks.generation_overhead [--steps 400] [--model tiny:llama:...]

A step's round trip (the edge sends its hidden vector, the server answers with a token)
minus the server's compute (its blocks and head) is what splitnet adds on the wire and
in the server: protobuf, the codec, the session checks, the step batcher's queue and
its worker thread. It is compared with a bare grpc.aio bidirectional stream echoing
the same number of bytes (benchmarks.overhead's BareServer), measured interleaved in
this process. The default model has SmolLM2's width (576, so 2.3 KB a step) and two
small blocks, so the compute is small next to the overhead. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics

import grpc
import torch

from benchmarks.overhead import BareServer, _pingpong
from cloud.config import ModelEntry, ServerConfig
from cloud.server import BackgroundServer
from edge.generate import GenerateConfig, Generator
from splitnet.llm import load_lm

MODEL = "tiny:llama:layers=2,hidden=576,heads=9,kv_heads=3,intermediate=256,vocab=512"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--cut", default="block.1")
    p.add_argument("--steps", type=int, default=400, help="decode steps per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    lm = load_lm(args.model)
    server = BackgroundServer(ServerConfig(models=(ModelEntry(name=args.model),), port=0))
    bare = BareServer()
    payload = torch.zeros(1, 1, lm.hidden_size).numpy().tobytes()
    step_rtt: list[float] = []
    step_overhead: list[float] = []
    bare_rtt: list[float] = []
    try:
        gen = Generator(server.address, GenerateConfig(model=args.model, cut=args.cut,
                        stop_at_eos=False), lm=lm)  # fmt: skip
        with gen, grpc.insecure_channel(f"127.0.0.1:{bare.port}") as ch:
            gen.generate([1, 2, 3], 20)  # warm-up
            _pingpong(ch, "/bare.Bare/Echo", iter(lambda: [payload], None), 50)
            for _ in range(args.rounds):
                r = gen.generate([1, 2, 3], args.steps + 1)
                step_rtt += [s.round_trip_ms for s in r.steps]
                step_overhead += [s.round_trip_ms - s.server_blocks_ms for s in r.steps]
                times = _pingpong(ch, "/bare.Bare/Echo", iter(lambda: [payload], None), args.steps)
                bare_rtt += [t * 1e3 for t in times]
    finally:
        bare.stop()
        server.stop()
    med = statistics.median
    doc = {
        "model": args.model,
        "cut": args.cut,
        "payload_bytes": len(payload),
        "steps": len(step_rtt),
        "step_round_trip_ms_p50": round(med(step_rtt), 3),
        "step_overhead_ms_p50": round(med(step_overhead), 3),
        "bare_round_trip_ms_p50": round(med(bare_rtt), 3),
        "overhead_vs_bare_p50": round(med(step_overhead) / med(bare_rtt), 2),
        "goal": "overhead <= 1.3x the bare round trip",
    }
    print(json.dumps(doc, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
