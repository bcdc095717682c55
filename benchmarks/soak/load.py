"""Load: concurrent ``EdgeClient``s on mixed cuts and codecs, every output checked."""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.soak.reference import MIX, MODEL, Reference
from benchmarks.soak.server import Server
from edge.client import EdgeClient
from splitnet.errors import RemoteError

__all__ = ["LoadReport", "edge_client", "load"]


@dataclass
class LoadReport:
    """Concurrent clients on mixed cuts and codecs."""

    clients: int = 0
    requests: int = 0  # asked for
    correct: int = 0
    wrong: int = 0
    errors: int = 0
    lost: int = 0
    fallbacks: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    throughput_rps: float = 0.0
    seconds: float = 0.0
    error_examples: list[str] = field(default_factory=list)
    wrong_examples: list[str] = field(default_factory=list)


def edge_client(server: Server, weights: Path, cut: str, codec: str, **kwargs: Any) -> EdgeClient:
    """An ``EdgeClient`` for digits-cnn on ``server`` at ``cut`` with ``codec``."""
    return EdgeClient(server.address, MODEL, weights=weights, cut=cut, codec=codec, **kwargs)


def load(
    server: Server,
    ref: Reference,
    weights: Path,
    *,
    clients: int = 32,
    requests: int = 200,
    stream_window: int = 10,
) -> LoadReport:
    """``clients`` threads with an ``EdgeClient`` each send ``requests`` requests each.

    Even clients call ``infer`` per input; odd ones stream ``stream_window`` inputs at a
    time with ``infer_many``. Clients rotate through ``MIX``.
    """
    torch.set_num_threads(1)
    report = LoadReport(clients=clients, requests=clients * requests)
    edge = [
        edge_client(server, weights, *MIX[k % len(MIX)], deadline_s=60, retries=3)
        for k in range(clients)
    ]  # built before the threads: tracing patches torch globally
    for c in edge:
        c.connect()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    outcomes: list[Counter[str]] = [Counter() for _ in range(clients)]
    examples: list[list[str]] = [[] for _ in range(clients)]
    n_inputs = len(ref.xs)

    def record(k: int, index: int, output: torch.Tensor, codec: str, ms: float) -> None:
        latencies[k].append(ms)
        if ref.check(output, index, codec):
            outcomes[k]["correct"] += 1
        else:
            outcomes[k]["wrong"] += 1
            examples[k].append(f"client {k} input {index} {codec}")

    def worker(k: int) -> None:
        c = edge[k]
        done = 0
        while done < requests:
            try:
                if k % 2 == 0:
                    index = (k * 7 + done) % n_inputs
                    t0 = time.perf_counter()
                    r = c.infer(ref.xs[index : index + 1])
                    record(k, index, r.output, c.codec, (time.perf_counter() - t0) * 1e3)
                    done += 1
                else:
                    m = min(stream_window, requests - done)
                    idx = [(k * 7 + done + j) % n_inputs for j in range(m)]
                    t0 = time.perf_counter()
                    results = list(c.infer_many([ref.xs[i : i + 1] for i in idx]))
                    each = (time.perf_counter() - t0) * 1e3
                    for i, r in zip(idx, results, strict=True):
                        record(k, i, r.output, c.codec, r.timing.total_ms or each)
                    done += m
            except RemoteError as e:
                outcomes[k]["errors"] += 1
                examples[k].append(f"client {k}: {e}")
                done += 1

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    report.seconds = time.perf_counter() - started
    for c in edge:
        c.close()
    total: Counter[str] = Counter()
    for o in outcomes:
        total.update(o)
    report.correct, report.wrong, report.errors = total["correct"], total["wrong"], total["errors"]
    report.lost = report.requests - report.correct - report.wrong - report.errors
    all_ms = sorted(ms for lat in latencies for ms in lat)
    if all_ms:
        report.p50_ms = statistics.median(all_ms)
        report.p99_ms = all_ms[min(len(all_ms) - 1, int(0.99 * len(all_ms)))]
    report.throughput_rps = (report.correct + report.wrong) / report.seconds
    flat = [e for ex in examples for e in ex]
    report.error_examples = [e for e in flat if ":" in e][:5]
    report.wrong_examples = [e for e in flat if ":" not in e][:5]
    return report
