"""``python -m benchmarks.soak``: run every part long, print a table, write JSON."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.soak.auth import auth
from benchmarks.soak.faults import faults
from benchmarks.soak.fuzz import fuzz
from benchmarks.soak.load import load
from benchmarks.soak.reference import Reference
from benchmarks.soak.server import Server

__all__ = ["main"]

DESCRIPTION = "The reliability suite: hostile input, load, faults and auth against a real server."


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the long soak; 0 if every check held, 1 if one did not, 2 on a usage error."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description=DESCRIPTION,
    )
    p.add_argument("--weights", type=Path, default=Path(".cache/digits-cnn.safetensors"))
    p.add_argument("--fuzz", type=int, default=10_000, help="hostile messages")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=200, help="per load client")
    p.add_argument("--fault-clients", type=int, default=8)
    p.add_argument("--fault-requests", type=int, default=100, help="per fault client")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-message-mb", type=int, default=4, help="server limit during fuzzing")
    p.add_argument("--out", type=Path, default=Path("out/soak.json"))
    args = p.parse_args(argv)
    if not args.weights.exists():
        print(
            f"soak: no weights at {args.weights}: run `make demo` or `splitnet train`",
            file=sys.stderr,
        )
        return 2
    import logging

    logging.getLogger("edge").setLevel(logging.ERROR)  # fallbacks are counted, not logged
    ref = Reference.build(args.weights)
    limit = args.max_message_mb << 20
    results: dict[str, Any] = {}

    print(f"fuzz: {args.fuzz} hostile messages ...", file=sys.stderr, flush=True)
    server = Server(
        args.weights,
        "--max-message-mb",
        str(args.max_message_mb),
        "--max-decoded-mb",
        str(args.max_message_mb),
    )
    try:
        fz = fuzz(server, ref, args.fuzz, seed=args.seed, max_message_bytes=limit)
    finally:
        server.kill()
    results["fuzz"] = asdict(fz)

    print(
        f"load: {args.clients} clients x {args.requests} requests ...", file=sys.stderr, flush=True
    )
    server = Server(args.weights)
    try:
        ld = load(server, ref, args.weights, clients=args.clients, requests=args.requests)
    finally:
        server.kill()
    results["load"] = asdict(ld)

    print("faults: SIGKILL under load, restart ...", file=sys.stderr, flush=True)
    server = Server(args.weights)
    try:
        ft, server = faults(
            server, ref, args.weights, clients=args.fault_clients, requests=args.fault_requests
        )
    finally:
        server.kill()
    results["faults"] = asdict(ft)

    print("auth: token + mTLS refusals ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        au = auth(args.weights, ref, Path(tmp))
    results["auth"] = asdict(au)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    codes = ", ".join(f"{k} {v}" for k, v in fz.codes.items())
    rows = [
        ("fuzz: messages tried", f"{fz.messages} ({len(fz.kinds)} kinds, {fz.seconds:.1f} s)"),
        ("fuzz: status codes", codes),
        ("fuzz: improper answers", f"{len(fz.improper)} (must be 0)"),
        ("fuzz: server crashes", f"{fz.crashes} (must be 0)"),
        ("fuzz: probes correct", f"{fz.probes - fz.probes_wrong}/{fz.probes}"),
        (
            "fuzz: server RSS",
            f"{fz.rss_before_mib:.0f} MiB before, {fz.rss_after_mib:.0f} "
            f"after, peak {fz.rss_peak_mib:.0f} "
            f"(growth {fz.rss_growth_mib:+.1f} MiB)",
        ),
        (
            "load: requests",
            f"{ld.clients} clients x {ld.requests // max(ld.clients, 1)} = "
            f"{ld.requests}, mixed cuts/codecs, unary + streams",
        ),
        ("load: wrong results", f"{ld.wrong} (must be 0)"),
        ("load: lost requests", f"{ld.lost} (must be 0); errors {ld.errors}"),
        ("load: latency p50 / p99", f"{ld.p50_ms:.1f} / {ld.p99_ms:.1f} ms"),
        ("load: throughput", f"{ld.throughput_rps:.0f} req/s over {ld.seconds:.1f} s"),
        (
            "faults: requests",
            f"{ft.requests} by {ft.clients} clients, {ft.kills} SIGKILL + restart",
        ),
        (
            "faults: outcomes",
            f"correct {ft.correct} (after restart {ft.after_restart_correct}), "
            f"marked fallback {ft.fallback}, clear errors {ft.errors} "
            f"{ft.error_kinds or ''}",
        ),
        ("faults: wrong / lost", f"{ft.wrong} / {ft.lost} (must be 0 / 0)"),
        ("auth: refused", ", ".join(f"{k}: {v}" for k, v in au.refused.items())),
        ("auth: right credentials", "accepted" if au.accepted_with_credentials else "REFUSED"),
    ]
    print(_table(rows))
    print(f"(full results: {args.out})")
    bad = (
        fz.improper
        or fz.crashes
        or fz.probes_wrong
        or ld.wrong
        or ld.lost
        or ft.wrong
        or ft.lost
        or not au.all_refused
        or not au.accepted_with_credentials
    )
    if fz.improper:
        print("improper answers, first 10:", *fz.improper[:10], sep="\n  ")
    return 1 if bad else 0
