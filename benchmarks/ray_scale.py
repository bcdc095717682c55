"""Throughput and tail latency: standalone splitnet-cloud vs Ray Serve with 1 and 2 replicas.

    python -m benchmarks.ray_scale --weights .cache/digits-cnn.safetensors \
        [--clients 16] [--requests 40] [--cut input] [--out out/ray-scale]

Each setup serves the same model with the same batching (max batch 8, no queue delay)
and answers 16 concurrent EdgeClients (threads of this process), each sending unary
Infer requests one after another. The standalone server runs as a subprocess
(`splitnet-cloud`); Ray runs locally with as many CPUs as this machine has, each replica
reserving ``--replica-cpus``. Everything shares this machine's cores, clients included:
on a 2-core machine expect little from a second replica. The benchmark measures and
reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from edge.client import EdgeClient
from splitnet.data import load_digits

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load(target: str, args: argparse.Namespace, requests: int | None = None) -> dict[str, Any]:
    """``args.clients`` clients x ``requests`` (default ``args.requests``) requests each."""
    n_requests = requests or args.requests
    xs = load_digits()["test"].x
    # Built before the threads start: tracing patches torch globally.
    clients = [
        EdgeClient(target, "digits-cnn", weights=args.weights, cut=args.cut, deadline_s=30)
        for _ in range(args.clients)
    ]
    for c in clients:
        c.connect()
        for i in range(args.warmup):
            c.infer(xs[i : i + 1])
    latencies: list[float] = []
    batches: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(args.clients + 1)

    def run(k: int, client: EdgeClient) -> None:
        mine: list[float] = []
        sizes: list[int] = []
        start.wait()
        for i in range(n_requests):
            x = xs[(k * n_requests + i) % len(xs)].unsqueeze(0)
            t0 = time.perf_counter()
            try:
                r = client.infer(x)
            except Exception as e:  # reported in the results
                with lock:
                    errors.append(str(e)[:200])
                continue
            mine.append(time.perf_counter() - t0)
            sizes.append(r.timing.batch_size)
        with lock:
            latencies.extend(mine)
            batches.extend(sizes)

    threads = [threading.Thread(target=run, args=(k, c)) for k, c in enumerate(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for c in clients:
        c.close()
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "seconds": elapsed,
        "throughput_rps": n / elapsed,
        "p50_ms": latencies[n // 2] * 1e3 if n else None,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1e3 if n else None,
        "mean_batch": statistics.fmean(batches) if batches else None,
    }


def standalone(args: argparse.Namespace) -> dict[str, Any]:
    """``splitnet-cloud`` in a subprocess on a free port."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    cmd = [sys.executable, "-m", "cloud.cli", "--model", f"digits-cnn={args.weights}",
           "--port", "0", "--max-batch-size", "8", "--workers", "2"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"listening on (\S+)", line)
        if m is None:
            raise RuntimeError(f"splitnet-cloud did not start: {line}{proc.stdout.read()}")
        return load(m.group(1), args)
    finally:
        proc.terminate()
        proc.wait(30)


def _replicas_running() -> int:
    from ray import serve

    app = serve.status().applications.get("splitnet")
    if app is None:
        return 0
    states: list[Any] = [d.replica_states for d in app.deployments.values()]
    return sum(int(st.get("RUNNING", 0)) for st in states)  # keyed by ReplicaState (a str)


def _watch(done: threading.Event, counts: list[tuple[float, int]], started: float) -> None:
    """Record (seconds, running replicas) every half second until ``done``."""
    while not done.wait(0.5):
        counts.append((time.perf_counter() - started, _replicas_running()))


def on_ray(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One local Ray; the app deployed with 1, then 2 replicas, then autoscaling 1..2
    (upscale after 1 s of demand), watching the replica count while the clients run."""
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    from cloud.config import ModelEntry, ServerConfig
    from cloud.ray_serve import RayServeConfig, deploy, shutdown

    port = _free_port()
    http = _free_port()
    rows: list[dict[str, Any]] = []
    try:
        for replicas, autoscale in ((1, None), (2, None), (1, (1, 2))):
            config = RayServeConfig(
                server=ServerConfig(
                    models=(ModelEntry(name="digits-cnn", weights=str(args.weights)),),
                    max_batch_size=8,
                    workers=1,
                    profile_runs=1,
                ),
                grpc_port=port,
                http_port=http,
                replicas=replicas,
                autoscale=autoscale,
                target_ongoing_requests=4,
                upscale_delay_s=1.0,
                # Serve decides on a 30 s look-back of metrics by default; a short run
                # needs faster metrics to see the scaling at all.
                autoscaling_options={"metrics_interval_s": 0.5, "look_back_period_s": 2.0},
                num_cpus=args.replica_cpus,
            )
            if rows:  # each setup starts from nothing (autoscaling from 1 replica)
                from ray import serve

                serve.delete("splitnet")
            t0 = time.perf_counter()
            deploy(config)
            ready = time.perf_counter() - t0
            counts: list[tuple[float, int]] = []
            done = threading.Event()

            watcher = threading.Thread(
                target=_watch, args=(done, counts, time.perf_counter()), daemon=True
            )
            watcher.start()
            try:
                result = load(
                    f"127.0.0.1:{port}",
                    args,
                    requests=args.requests * (args.autoscale_factor if autoscale else 1),
                )
            finally:
                done.set()
                watcher.join()
            scaled = next((t for t, n in counts if n > counts[0][1]), None) if counts else None
            row = {
                "setup": f"ray autoscale {autoscale[0]}..{autoscale[1]}"
                if autoscale
                else f"ray {replicas} replica(s)",
                "deploy_s": ready,
                "replicas_start": counts[0][1] if counts else None,
                "replicas_max": max((n for _, n in counts), default=None),
                "scaled_up_after_s": scaled,
                **result,
            }
            rows.append(row)
            print(_line(row), flush=True)
    finally:
        shutdown()
    return rows


def _line(row: dict[str, Any]) -> str:
    return (
        f"{row['setup']:<20} {row['throughput_rps']:8.1f} req/s  p50 {row['p50_ms']:6.1f} ms  "
        f"p99 {row['p99_ms']:6.1f} ms  mean batch {row['mean_batch']:.2f}  "
        f"errors {row['errors']}"
        + (
            f"  replicas {row['replicas_start']}->{row['replicas_max']}"
            + (f" (after {row['scaled_up_after_s']:.1f} s)" if row["scaled_up_after_s"] else "")
            if row.get("replicas_start") is not None
            else ""
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", type=Path, required=True, help="digits-cnn weights")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=40, help="per client")
    p.add_argument("--warmup", type=int, default=3, help="per client, not measured")
    p.add_argument("--autoscale-factor", type=int, default=5,
                   help="the autoscaling run sends this many times more requests")  # fmt: skip
    p.add_argument("--cut", default="input", help="input: the whole model runs in the cloud")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each replica reserves")
    p.add_argument("--out", type=Path, default=Path("out/ray-scale"))
    args = p.parse_args()
    torch.set_num_threads(1)  # the clients' heads; leave the cores to the servers
    print(f"{os.cpu_count()} CPUs, {args.clients} clients x {args.requests} unary requests, "
          f"digits-cnn cut {args.cut}, max batch 8", flush=True)  # fmt: skip
    row = {"setup": "standalone", **standalone(args)}
    print(_line(row), flush=True)
    rows = [row, *on_ray(args)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ray_scale.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out / 'ray_scale.json'}")


if __name__ == "__main__":
    main()
