"""What splitnet adds on top of gRPC, measured side by side in one run.

    python -m benchmarks.overhead [--requests 2000] [--transfers 20] [--out DIR]

1. Per-request overhead: a tiny tensor through a trivial model (cut "input", raw),
   one request at a time on one stream, against a bare gRPC bidirectional stream
   echoing a few bytes (grpc.aio server, raw bytes, no protobuf).
2. Bulk: a 16 MiB activation through splitnet (chunked on the stream) against bare
   gRPC streaming of the same bytes in 1 MiB messages, acknowledged at the end.
3. By hand: the trained digits-cnn at cut ``pool1``, raw float32, one request at a time:
   ``EdgeClient.infer`` against ``splitnet-cloud`` versus the split a user would write
   by hand (benchmarks/handsplit.py: ``nn.Sequential`` halves, raw bytes on a grpc.aio
   stream), each server in its own process, interleaved.

Goals the team set: splitnet <= 1.25x the hand-rolled split per request (p50); bulk
>= 0.9x bare throughput; and the overhead over a bare round trip reported beside them.
The benchmark measures and reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import torch
from torch import nn

from cloud.config import ModelEntry, ServerConfig
from cloud.server import BackgroundServer
from edge.client import EdgeClient

MiB = 1 << 20
BULK_SHAPE = (1, 4, 1024, 1024)  # 16 MiB of float32
TINY_SHAPE = (1, 4)
ROOT = Path(__file__).resolve().parents[1]


class Tiny(nn.Module):
    """A trivial model: one small linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Bulk(nn.Module):
    """A trivial model over a 16 MiB input: one pixel per channel (no pass over the
    data, so the figure is the transport's, not the tail's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, 0, 0] * 1.0


def tiny() -> nn.Module:
    return Tiny()


def bulk() -> nn.Module:
    return Bulk()


# ---------------------------------------------------------------- bare gRPC


class BareServer:
    """grpc.aio server with two raw-bytes bidirectional methods, in its own thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        async def echo(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
            async for _ in requests:
                yield b"ok"

        async def sink(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
            got = 0
            async for m in requests:
                got += len(m)
                if got >= BULK_BYTES:
                    got = 0
                    yield b"ok"

        async def main() -> None:
            self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * MiB)])
            handlers = {
                "Echo": grpc.stream_stream_rpc_method_handler(echo),
                "Sink": grpc.stream_stream_rpc_method_handler(sink),
            }
            self.server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler("bare.Bare", handlers),)
            )
            self.port = self.server.add_insecure_port("127.0.0.1:0")
            await self.server.start()
            ready.set()
            await self.server.wait_for_termination()

        self.thread = threading.Thread(
            target=lambda: self.loop.run_until_complete(main()), daemon=True
        )
        self.thread.start()
        ready.wait(30)

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        except TimeoutError:  # a cancelled stream can hold it; the thread is a daemon
            pass


BULK_BYTES = 16 * MiB


def _pingpong(
    channel: grpc.Channel, method: str, messages: Iterator[list[bytes]], n: int
) -> list[float]:
    """Send each group of messages on one stream, wait for one reply, time each round."""
    outbox: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[bytes]:
        while (m := outbox.get()) is not None:
            yield m

    call = channel.stream_stream(method)(requests())
    replies = iter(call)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()  # making the messages counts: a real sender must
        group = next(messages)
        for m in group:
            outbox.put(m)
        next(replies)
        times.append(time.perf_counter() - t0)
    outbox.put(None)
    call.cancel()
    return times


def bare_round_trip(port: int, n: int) -> list[float]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        payload = torch.zeros(TINY_SHAPE).numpy().tobytes()
        return _pingpong(ch, "/bare.Bare/Echo", iter(lambda: [payload], None), n)


def bare_bulk(port: int, n: int) -> list[float]:
    data = torch.randn(BULK_SHAPE).numpy().tobytes()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:

        def chunks() -> Iterator[list[bytes]]:
            while True:  # slicing bytes copies, as a real sender must
                yield [data[i : i + MiB] for i in range(0, len(data), MiB)]

        return _pingpong(ch, "/bare.Bare/Sink", chunks(), n)


# ---------------------------------------------------------------- splitnet


def splitnet_times(address: str, model: str, shape: tuple[int, ...], n: int) -> list[float]:
    x = torch.randn(shape)
    with EdgeClient(address, model, input_shape=shape, cut="input", window=1) as client:
        times = []
        start = time.perf_counter()
        for _ in client.infer_many([x] * n):
            now = time.perf_counter()
            times.append(now - start)
            start = now
        return times


# ------------------------------------------------- CPU per request, per side


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _switches(pid: int) -> int:
    """Context switches of all the process's threads so far."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if "ctxt_switches" in line:
                total += int(line.split()[1])
    return total


def _start(cmd: list[str], pattern: str) -> tuple[subprocess.Popen[str], str]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(pattern, line)
    if m is None:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, m.group(1)


def cpu_per_request(n: int) -> dict[str, dict[str, float]]:
    """Each server in its own process; CPU and context switches per request on both sides."""
    out: dict[str, dict[str, float]] = {}
    name = "benchmarks.overhead:tiny"
    setups = {
        "bare": (
            [sys.executable, "-c", "import time; from benchmarks.overhead import BareServer; "
             "b = BareServer(); print('port', b.port, flush=True); time.sleep(3600)"],
            r"port (\d+)",
            lambda where, k: bare_round_trip(int(where), k),
        ),
        "splitnet": (
            [sys.executable, "-m", "cloud.cli", "--model", name, "--port", "0",
             "--input-shape", f"{name}=1,4"],
            r"listening on (\S+)",
            lambda where, k: splitnet_times(where, name, TINY_SHAPE, k),
        ),
    }  # fmt: skip
    for label, (cmd, pattern, run) in setups.items():
        proc, where = _start(cmd, pattern)
        try:
            run(where, max(n // 10, 50))  # warm-up
            s0, w0, me0 = _cpu_seconds(proc.pid), _switches(proc.pid), time.process_time()
            t0 = time.perf_counter()
            run(where, n)
            wall = time.perf_counter() - t0
            s1, w1, me1 = _cpu_seconds(proc.pid), _switches(proc.pid), time.process_time()
        finally:
            proc.kill()
            proc.wait(30)
        out[label] = {
            "wall_us": wall / n * 1e6,
            "server_cpu_us": (s1 - s0) / n * 1e6,
            "client_cpu_us": (me1 - me0) / n * 1e6,
            "server_switches": (w1 - w0) / n,
        }
    return out


def by_hand(weights: str, n: int, rounds: int) -> dict[str, Any]:
    """Part 3: splitnet vs the hand-rolled split, servers in their own processes."""
    from benchmarks.handsplit import HandClient
    from splitnet.data import load_digits

    xs = load_digits()["test"].x
    hand_proc, hand_port = _start(
        [sys.executable, "-m", "benchmarks.handsplit", "serve", weights], r"port (\d+)"
    )
    split_proc, split_address = _start(
        [sys.executable, "-m", "cloud.cli", "--model", f"digits-cnn={weights}", "--port", "0"],
        r"listening on (\S+)",
    )
    times: dict[str, list[float]] = {"hand": [], "splitnet": []}
    cpu = {k: {"server_s": 0.0, "client_s": 0.0, "n": 0} for k in times}
    pids = {"hand": hand_proc.pid, "splitnet": split_proc.pid}
    equal = True
    try:
        hand = HandClient(f"127.0.0.1:{hand_port}", weights)
        edge = EdgeClient(split_address, "digits-cnn", weights=weights, cut="pool1", codec="raw")
        edge.connect()
        try:
            for i in range(50):  # warm-up, and the answers must agree
                x = xs[i : i + 1]
                equal &= torch.equal(hand.infer(x), edge.infer(x).output)
            per_round = max(n // rounds, 1)
            for _ in range(rounds):
                for label, call in (("hand", hand.infer), ("splitnet", edge.infer)):
                    s0, c0 = _cpu_seconds(pids[label]), time.process_time()
                    for i in range(per_round):
                        x = xs[i % len(xs) : i % len(xs) + 1]
                        t0 = time.perf_counter()
                        call(x)
                        times[label].append(time.perf_counter() - t0)
                    cpu[label]["server_s"] += _cpu_seconds(pids[label]) - s0
                    cpu[label]["client_s"] += time.process_time() - c0
                    cpu[label]["n"] += per_round
        finally:
            hand.close()
            edge.close()
    finally:
        for proc in (hand_proc, split_proc):
            proc.kill()
            proc.wait(30)
    summary = {k: summarize(v) for k, v in times.items()}
    cpu_us = {
        k: {
            "server_cpu_us": c["server_s"] / c["n"] * 1e6,
            "client_cpu_us": c["client_s"] / c["n"] * 1e6,
        }
        for k, c in cpu.items()
    }
    return {
        "summary": summary,
        "cpu": cpu_us,
        "ratio": summary["splitnet"]["p50_ms"] / summary["hand"]["p50_ms"],
        "outputs_equal": equal,
    }


def summarize(times: list[float]) -> dict[str, float]:
    times = times[max(1, len(times) // 10) :]  # drop warm-up
    s = sorted(times)
    return {
        "p50_ms": statistics.median(s) * 1e3,
        "p90_ms": s[int(0.9 * (len(s) - 1))] * 1e3,
        "mean_ms": statistics.fmean(s) * 1e3,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--transfers", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="alternate bare/splitnet this often")
    p.add_argument("--out", type=Path, default=Path("out/bench-overhead"))
    p.add_argument(
        "--weights",
        default=".cache/digits-cnn.safetensors",
        help="trained digits-cnn for the comparison by hand (make trains it)",
    )
    p.add_argument(
        "--cpu",
        action="store_true",
        help="instead: servers in their own processes, CPU per request on each side",
    )
    args = p.parse_args()
    if args.cpu:
        cpu = cpu_per_request(args.requests)
        print(f"CPU per request, one at a time on one stream ({args.requests} requests):")
        for label, row in cpu.items():
            print(
                f"  {label:<9} wall {row['wall_us']:5.0f} us  server CPU "
                f"{row['server_cpu_us']:5.0f} us  client CPU {row['client_cpu_us']:5.0f} us  "
                f"server context switches {row['server_switches']:.1f}"
            )
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cpu.json").write_text(json.dumps(cpu, indent=2))
        print(f"wrote {args.out / 'cpu.json'}")
        return

    bare = BareServer()
    config = ServerConfig(
        models=(
            ModelEntry(name="benchmarks.overhead:tiny", input_shape=TINY_SHAPE),
            ModelEntry(name="benchmarks.overhead:bulk", input_shape=BULK_SHAPE),
        ),
        port=0,  # default profiling: tiny tails then take the server's inline path
        max_message_bytes=64 * MiB,
    )
    server = BackgroundServer(config)
    results: dict[str, list[float]] = {
        "bare_rtt": [],
        "splitnet_rtt": [],
        "bare_bulk": [],
        "splitnet_bulk": [],
    }
    try:
        for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits both
            results["bare_rtt"] += bare_round_trip(bare.port, args.requests // args.rounds)
            results["splitnet_rtt"] += splitnet_times(
                server.address, "benchmarks.overhead:tiny", TINY_SHAPE, args.requests // args.rounds
            )
            results["bare_bulk"] += bare_bulk(bare.port, args.transfers // args.rounds + 1)
            results["splitnet_bulk"] += splitnet_times(
                server.address,
                "benchmarks.overhead:bulk",
                BULK_SHAPE,
                args.transfers // args.rounds + 1,
            )
    finally:
        server.stop()
        bare.stop()

    hand = by_hand(args.weights, args.requests, args.rounds)
    summary = {k: summarize(v) for k, v in results.items()}
    rtt_ratio = summary["splitnet_rtt"]["p50_ms"] / summary["bare_rtt"]["p50_ms"]
    bulk_bare = BULK_BYTES / MiB / (summary["bare_bulk"]["p50_ms"] / 1e3)
    bulk_split = BULK_BYTES / MiB / (summary["splitnet_bulk"]["p50_ms"] / 1e3)
    report = {
        "torch_threads": torch.get_num_threads(),
        "summary": summary,
        "overhead_ratio": rtt_ratio,
        "bulk_mib_per_s": {"bare": bulk_bare, "splitnet": bulk_split},
        "bulk_ratio": bulk_split / bulk_bare,
        "by_hand": hand,
    }
    print(f"per-request round trip, one at a time on one stream ({args.requests} requests):")
    print(
        f"  bare gRPC stream  p50 {summary['bare_rtt']['p50_ms']:.3f} ms  "
        f"p90 {summary['bare_rtt']['p90_ms']:.3f} ms"
    )
    print(
        f"  splitnet          p50 {summary['splitnet_rtt']['p50_ms']:.3f} ms  "
        f"p90 {summary['splitnet_rtt']['p90_ms']:.3f} ms"
    )
    print(f"  ratio {rtt_ratio:.2f}x")
    print(f"16 MiB activation ({args.transfers} transfers, 1 MiB chunks):")
    print(
        f"  bare gRPC stream  {bulk_bare:.0f} MiB/s  (p50 {summary['bare_bulk']['p50_ms']:.1f} ms)"
    )
    print(
        f"  splitnet          {bulk_split:.0f} MiB/s  "
        f"(p50 {summary['splitnet_bulk']['p50_ms']:.1f} ms)"
    )
    print(f"  ratio {bulk_split / bulk_bare:.2f}x (goal >= 0.9x)")
    hs = hand["summary"]
    print(f"digits-cnn at pool1, raw, one request at a time ({args.requests} each, servers in "
          "their own processes):")  # fmt: skip
    print(f"  by hand (nn.Sequential + raw bytes on a stream)  p50 {hs['hand']['p50_ms']:.3f} ms"
          f"  p90 {hs['hand']['p90_ms']:.3f} ms")  # fmt: skip
    print(f"  splitnet (EdgeClient.infer + splitnet-cloud)     p50 "
          f"{hs['splitnet']['p50_ms']:.3f} ms  p90 {hs['splitnet']['p90_ms']:.3f} ms")  # fmt: skip
    print(f"  ratio {hand['ratio']:.2f}x (goal <= 1.25x); outputs equal: {hand['outputs_equal']}")
    for label, c in hand["cpu"].items():
        print(f"  {label:<9} CPU per request: server {c['server_cpu_us']:.0f} us, "
              f"client {c['client_cpu_us']:.0f} us")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'overhead.json'}")


if __name__ == "__main__":
    main()
