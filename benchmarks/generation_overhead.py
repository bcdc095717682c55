"""Per-token overhead of a generation step, against a bare gRPC round trip and against
the split a user would write by hand, in one run.

    python -m benchmarks.generation_overhead [--steps 300] [--rounds 3] [--model ...]

Three servers, each in its own process (as deployed: in one process the edge's and the
server's Python would share one interpreter lock), measured in alternating rounds:

* **splitnet**: ``splitnet-cloud`` and the edge ``Generator`` (a session, positions,
  the codec, the step batcher). A step's round trip minus the server's compute (its
  blocks, head and sampling, as the server reports it) is splitnet's overhead.
* **by hand**: a grpc.aio stream of raw bytes; the server rebuilds the hidden vector
  with ``torch.frombuffer``, runs the same blocks with its own cache, and answers with
  the token id and its compute time; the client runs the same edge blocks between
  steps. Its round trip minus its compute is the hand-rolled overhead: the same
  measure, with the same compute around it.
* **bare**: a grpc.aio stream echoing the same number of bytes (benchmarks.overhead's
  BareServer), with no compute on either side.
* **bare, paused**: the same echo, but the server busy-waits as long as splitnet's
  server computes before it answers, and the client busy-waits as long as the edge
  computes before each send (both medians of the warm-up). Its round trip minus the
  server's pause is the floor with the same rhythm of work and messages and no model.

Compute around a message costs something even by hand (caches go cold, an idle core
must wake up): the by-hand and paused columns show how much. The default model has SmolLM2's width
(576, so 2.3 KB a step) and two small blocks. Measures; asserts nothing.

    python -m benchmarks.generation_overhead serve-hand MODEL CUT   # prints "port N"
    python -m benchmarks.generation_overhead serve-paused SECONDS   # prints "port N"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import statistics
import struct
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import torch

from benchmarks.overhead import _pingpong, _start
from edge.generate import GenerateConfig, Generator
from splitnet.llm import load_lm, parse_block_cut
from splitnet.llm.halves import CloudHalf, EdgeHalf

MODEL = "tiny:llama:layers=2,hidden=576,heads=9,kv_heads=3,intermediate=256,vocab=512"
_REPLY = struct.Struct("<Id")  # token id, compute seconds


def _serve(step: Any) -> None:
    """Serve ``step`` as the stream method /hand.Hand/Step on a free port; print it."""

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        handlers = {"Step": grpc.stream_stream_rpc_method_handler(step)}
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("hand.Hand", handlers),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print("port", port, flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def serve_hand(model: str, cut: str) -> None:
    """The hand-rolled server: one cache per stream, raw float32 bytes in, a token out."""
    lm = load_lm(model)
    half = CloudHalf(lm, parse_block_cut(cut, lm.num_layers))
    hidden = lm.hidden_size

    async def step(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        state = half.new_state()
        async for data in requests:
            with torch.inference_mode():
                x = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(1, -1, hidden)
                t0 = time.perf_counter()  # compute as splitnet's server counts it
                logits = half.segment(x, state)
                token = int(torch.argmax(logits[0, -1]))
            yield _REPLY.pack(token, time.perf_counter() - t0)

    _serve(step)


def _busy_wait(seconds: float) -> None:
    """Keep the core busy for ``seconds``, as compute would (a sleep lets it idle)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def serve_paused(seconds: float) -> None:
    """The paused echo: busy-waits ``seconds`` per message, answers with the time it took."""

    async def step(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for _ in requests:
            t0 = time.perf_counter()
            _busy_wait(seconds)
            yield _REPLY.pack(0, time.perf_counter() - t0)

    _serve(step)


def paused_steps(port: int, payload: bytes, edge_s: float, steps: int) -> list[tuple[float, float]]:
    """The paused echo's rounds: (round trip, server pause) seconds, after ``edge_s`` of
    busy-waiting where the edge would compute.
    """
    out: list[tuple[float, float]] = []
    outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        replies = ch.stream_stream("/hand.Hand/Step")(iter(outbox.get, None))
        for _ in range(steps):
            _busy_wait(edge_s)
            t0 = time.perf_counter()
            outbox.put(payload)
            _, pause_s = _REPLY.unpack(next(replies))
            out.append((time.perf_counter() - t0, pause_s))
        outbox.put(None)
        replies.cancel()
    return out


def hand_steps(
    port: int, model: str, cut: str, prompt: list[int], steps: int
) -> list[tuple[float, float]]:
    """One hand-rolled generation: (round trip, server compute) seconds per decode step."""
    lm = load_lm(model)
    edge = EdgeHalf(lm, parse_block_cut(cut, lm.num_layers))
    state = edge.new_state()
    out: list[tuple[float, float]] = []
    outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, torch.inference_mode():
        replies = ch.stream_stream("/hand.Hand/Step")(iter(outbox.get, None))
        h = edge.front(torch.tensor([prompt]), state.front)
        outbox.put(h.numpy().tobytes())
        token, _ = _REPLY.unpack(next(replies))
        for _ in range(steps):
            h = edge.front(torch.tensor([[token]]), state.front)
            data = h.numpy().tobytes()
            t0 = time.perf_counter()
            outbox.put(data)
            token, compute_s = _REPLY.unpack(next(replies))
            out.append((time.perf_counter() - t0, compute_s))
        outbox.put(None)
        replies.cancel()
    return out


def main() -> None:
    if sys.argv[1:2] == ["serve-hand"]:
        serve_hand(sys.argv[2], sys.argv[3])
        return
    if sys.argv[1:2] == ["serve-paused"]:
        serve_paused(float(sys.argv[2]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--cut", default="block.1")
    p.add_argument("--steps", type=int, default=300, help="decode steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of each")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    lm = load_lm(args.model)
    prompt = [1, 2, 3]
    procs = {}
    procs["splitnet"], address = _start(
        [sys.executable, "-m", "cloud.cli", "--model", args.model, "--port", "0"],
        r"listening on (\S+)",
    )
    procs["hand"], hand_port = _start(
        [
            sys.executable,
            "-m",
            "benchmarks.generation_overhead",
            "serve-hand",
            args.model,
            args.cut,
        ],
        r"port (\d+)",
    )
    procs["bare"], bare_port = _start(
        [sys.executable, "-c", "import time; from benchmarks.overhead import BareServer; "
         "b = BareServer(); print('port', b.port, flush=True); time.sleep(3600)"],
        r"port (\d+)",
    )  # fmt: skip
    payload = torch.zeros(1, 1, lm.hidden_size).numpy().tobytes()
    names = ("splitnet", "hand", "bare", "paused")
    rtt: dict[str, list[float]] = {k: [] for k in names}
    overhead: dict[str, list[float]] = {k: [] for k in names}
    pauses = {"server_ms": 0.0, "edge_ms": 0.0}
    try:
        gen = Generator(address, GenerateConfig(model=args.model, cut=args.cut,
                        stop_at_eos=False), lm=lm)  # fmt: skip
        with gen, grpc.insecure_channel(f"127.0.0.1:{bare_port}") as ch:
            warm = gen.generate(prompt, 50)  # warm-up, each
            pauses["server_ms"] = statistics.median(s.server_blocks_ms for s in warm.steps)
            pauses["edge_ms"] = statistics.median(s.edge_ms for s in warm.steps)
            procs["paused"], paused_port = _start(
                [sys.executable, "-m", "benchmarks.generation_overhead", "serve-paused",
                 str(pauses["server_ms"] / 1e3)],
                r"port (\d+)",
            )  # fmt: skip
            edge_s = pauses["edge_ms"] / 1e3
            hand_steps(int(hand_port), args.model, args.cut, prompt, 20)
            _pingpong(ch, "/bare.Bare/Echo", iter(lambda: [payload], None), 50)
            paused_steps(int(paused_port), payload, edge_s, 20)
            for _ in range(args.rounds):
                r = gen.generate(prompt, args.steps + 1)
                rtt["splitnet"] += [s.round_trip_ms for s in r.steps]
                overhead["splitnet"] += [s.round_trip_ms - s.server_blocks_ms for s in r.steps]
                for round_s, compute_s in hand_steps(int(hand_port), args.model, args.cut,
                                                     prompt, args.steps):  # fmt: skip
                    rtt["hand"].append(round_s * 1e3)
                    overhead["hand"].append((round_s - compute_s) * 1e3)
                times = _pingpong(ch, "/bare.Bare/Echo", iter(lambda: [payload], None), args.steps)
                rtt["bare"] += [t * 1e3 for t in times]
                overhead["bare"] += [t * 1e3 for t in times]
                for round_s, pause_s in paused_steps(int(paused_port), payload, edge_s,
                                                     args.steps):  # fmt: skip
                    rtt["paused"].append(round_s * 1e3)
                    overhead["paused"].append((round_s - pause_s) * 1e3)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(30)
    med = statistics.median
    ours, hand, bare, paused = (med(overhead[k]) for k in names)
    doc = {
        "model": args.model,
        "cut": args.cut,
        "payload_bytes": len(payload),
        "steps": len(rtt["splitnet"]),
        "servers": "each in its own process",
        "step_round_trip_ms_p50": {k: round(med(v), 3) for k, v in rtt.items()},
        "overhead_ms_p50": {k: round(med(v), 3) for k, v in overhead.items()},
        "splitnet_vs_bare": round(ours / bare, 2),
        "splitnet_vs_hand": round(ours / hand, 2),
        "hand_vs_bare": round(hand / bare, 2),
        "splitnet_vs_paused": round(ours / paused, 2),
        "hand_vs_paused": round(hand / paused, 2),
        "paused_vs_bare": round(paused / bare, 2),
        "pauses_ms": {k: round(v, 3) for k, v in pauses.items()},
        "goal": "splitnet's overhead <= 1.3x the bare round trip",
    }
    print(json.dumps(doc, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
