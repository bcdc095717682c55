"""Faults: the server is SIGKILLed under load and restarted on the same port."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.soak.load import edge_client
from benchmarks.soak.reference import MIX, Reference
from benchmarks.soak.server import Server
from splitnet.errors import RemoteError

__all__ = ["FaultReport", "faults"]


@dataclass
class FaultReport:
    """SIGKILL under load, then a restart on the same port."""

    clients: int = 0
    requests: int = 0
    correct: int = 0  # answered by the cloud and right
    fallback: int = 0  # computed on the device, marked, and right
    errors: int = 0  # a clear RemoteError
    wrong: int = 0  # must be 0
    lost: int = 0  # must be 0
    after_restart_correct: int = 0  # cloud answers after the restart
    kills: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)


def faults(
    server: Server,
    ref: Reference,
    weights: Path,
    *,
    clients: int = 8,
    requests: int = 60,
    kill_at: float = 0.3,
    down_s: float = 1.0,
) -> tuple[FaultReport, Server]:
    """Clients send ``requests`` each; the server is SIGKILLed once ``kill_at`` of them
    are done, and restarted on the same port ``down_s`` later.

    Half the clients fall back to local inference, half raise. The order of events is
    fixed by events, not by the machine's speed. "Paced" clients (``k % 4 < 2``: one of
    each fallback kind in every four) stop at ``kill_at`` of their requests until the
    kill; the restart waits until each of them has finished one request against the
    dead server (and at least ``down_s``); they stop again half-way through the rest
    until the restart. So requests are made while the server is down and after it is
    back, on any machine. The other clients run freely, so the kill lands on requests
    in flight. Returns the report and the restarted server (the caller stops it).
    """
    kill_index = int(kill_at * requests)
    restart_index = (kill_index + requests) // 2
    if not 0 < kill_index < restart_index - 1 < requests - 1:
        raise ValueError("faults needs 0 < kill_at < 1 and enough requests to span the phases")
    torch.set_num_threads(1)
    report = FaultReport(clients=clients, requests=clients * requests)
    edge = [
        edge_client(
            server,
            weights,
            *MIX[k % len(MIX)],
            deadline_s=3,
            retries=2,
            reconnect_wait_s=0.3,
            fallback="local" if k % 2 == 0 else "error",
        )
        for k in range(clients)
    ]
    for c in edge:
        c.connect()
    outcomes: list[Counter[str]] = [Counter() for _ in range(clients)]
    killed, restarted = threading.Event(), threading.Event()
    paced = [k for k in range(clients) if k % 4 < 2]
    at_barrier = threading.Semaphore(0)  # a paced client reached kill_index
    saw_outage = threading.Semaphore(0)  # a paced client finished a request after the kill
    n_inputs = len(ref.xs)

    def worker(k: int) -> None:
        c = edge[k]
        is_paced = k in paced
        for j in range(requests):
            if is_paced and j == kill_index:
                at_barrier.release()
                killed.wait(300)
            if is_paced and j == kill_index + 1:
                saw_outage.release()
            if is_paced and j == restart_index:
                restarted.wait(300)
            index = (k * 11 + j) % n_inputs
            after = restarted.is_set()
            try:
                r = c.infer(ref.xs[index : index + 1])
            except RemoteError as e:
                outcomes[k]["errors"] += 1
                outcomes[k][f"error {e.code}"] += 1
                time.sleep(0.05)  # pacing only: a client that backs off
                continue
            if r.fallback:
                ok = torch.equal(r.output, ref.expected[index : index + 1])
                outcomes[k]["fallback" if ok else "wrong"] += 1
            elif ref.check(r.output, index, c.codec):
                outcomes[k]["correct"] += 1
                outcomes[k]["after"] += after
            else:
                outcomes[k]["wrong"] += 1
            time.sleep(0.01)  # pacing only: a steady load rather than a burst

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for _ in paced:
        at_barrier.acquire(timeout=300)
    server.kill()
    report.kills = 1
    killed.set()
    down_until = time.monotonic() + down_s
    for _ in paced:
        saw_outage.acquire(timeout=300)
    time.sleep(max(0.0, down_until - time.monotonic()))  # the server stays down >= down_s
    server = server.restart()
    restarted.set()
    for t in threads:
        t.join(timeout=300)
    for c in edge:
        c.close()
    total: Counter[str] = Counter()
    for o in outcomes:
        total.update(o)
    report.correct, report.fallback = total["correct"], total["fallback"]
    report.errors, report.wrong = total["errors"], total["wrong"]
    report.after_restart_correct = total["after"]
    report.lost = report.requests - report.correct - report.fallback - report.errors - report.wrong
    report.error_kinds = {k[6:]: v for k, v in total.items() if k.startswith("error ")}
    return report, server
