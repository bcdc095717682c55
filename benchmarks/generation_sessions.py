"""Aggregate generation throughput at 1, 4 and 8 concurrent sessions, with the server's
step batching on (decode steps waiting together run as one call) and off (batch 1).

python -m benchmarks.generation_sessions --model smollm2 --cut block.1 --new-tokens 32

The clients are threads of this process (one Generator each) and the server runs in a
thread too (BackgroundServer), all on this machine's CPUs: the figures say what batching
buys on the same hardware, not what a deployment gets. A cut near the input keeps the
edge's share small, so the server's blocks dominate. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

from cloud.config import ModelEntry, ServerConfig
from cloud.server import BackgroundServer
from edge.generate import GenerateConfig, GenerationResult, Generator
from splitnet.llm import load_lm


def _concurrently(
    gens: list[Generator], prompts: list[list[int]], new_tokens: int
) -> tuple[list[GenerationResult], float]:
    """Every generator at once (released together); their results and the wall time."""
    results: list[GenerationResult | None] = [None] * len(gens)
    barrier = threading.Barrier(len(gens) + 1)

    def one(i: int) -> None:
        barrier.wait()
        results[i] = gens[i].generate(prompts[i], new_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(gens))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = [r for r in results if r is not None]
    assert len(done) == len(gens), "a session failed"
    return done, wall


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    lm = load_lm(args.model)
    vocab = int(lm.model.config.vocab_size)
    rows = []
    for max_batch in (1, args.max_batch):
        config = ServerConfig(models=(ModelEntry(name=args.model),), port=0,
                              llm_max_batch=max_batch, device=args.device)  # fmt: skip
        server = BackgroundServer(config)
        try:
            assert server.server is not None and server.server.generation is not None
            batcher = server.server.generation.batcher
            for sessions in args.sessions:
                prompts = [
                    torch.randint(
                        0, vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(i)
                    ).tolist()  # fmt: skip
                    for i in range(sessions)
                ]
                gens = [
                    Generator(
                        server.address,
                        GenerateConfig(
                            model=args.model, cut=args.cut, codec=args.codec, stop_at_eos=False
                        ),
                        lm=lm,
                    )  # fmt: skip
                    for _ in range(sessions)
                ]
                gens[0].generate(prompts[0], 4)  # warm-up
                batcher.batches.clear()
                results, wall = _concurrently(gens, prompts, args.new_tokens)
                for g in gens:
                    g.close()
                tokens = sum(len(r.tokens) for r in results)
                steps = sum(len(r.steps) for r in results)
                batched = sum(batcher.batches)
                mean_batch = batched / len(batcher.batches) if batcher.batches else 1.0
                row = {
                    "model": args.model, "cut": args.cut, "codec": args.codec,
                    "device": args.device, "max_batch": max_batch, "sessions": sessions,
                    "new_tokens": args.new_tokens, "wall_s": round(wall, 3),
                    "aggregate_tokens_per_s": round(tokens / wall, 2),
                    "per_session_tokens_per_s": round(statistics.mean(
                        r.tokens_per_s for r in results), 2),
                    "steps_in_batches": f"{batched}/{steps}",
                    "mean_batch": round(mean_batch, 2),
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.stop()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--cut", default="block.1")
    p.add_argument("--codec", default="raw")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sessions", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    rows = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    print(f"{'batch':>5} {'sessions':>8} {'agg tok/s':>10} {'per-session':>11} {'batched':>9}")
    for r in rows:
        print(f"{r['max_batch']:>5} {r['sessions']:>8} {r['aggregate_tokens_per_s']:>10} "
              f"{r['per_session_tokens_per_s']:>11} {r['steps_in_batches']:>9}")  # fmt: skip


if __name__ == "__main__":
    main()
