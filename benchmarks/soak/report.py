"""``python -m benchmarks.soak``: run the parts long, print a table, write JSON.

Each part is one function below: it starts its own server, runs, and returns its
results (for the JSON), its table rows and its failures (empty when every check held).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.soak.auth import auth
from benchmarks.soak.faults import faults
from benchmarks.soak.fuzz import fuzz
from benchmarks.soak.load import load
from benchmarks.soak.reference import Reference
from benchmarks.soak.server import Server
from benchmarks.soak.stall import MiB, stall

__all__ = ["PARTS", "main"]

DESCRIPTION = "The reliability suite: hostile input, load, faults, stalls and auth, for real."
Rows = list[tuple[str, Any]]
Outcome = tuple[dict[str, Any], Rows, list[str]]


def part_fuzz(args: argparse.Namespace, ref: Reference) -> Outcome:
    """Hostile messages against a server with small message limits."""
    mb = str(args.max_message_mb)
    server = Server(args.weights, "--max-message-mb", mb, "--max-decoded-mb", mb)
    try:
        fz = fuzz(
            server, ref, args.fuzz, seed=args.seed, max_message_bytes=args.max_message_mb * MiB
        )
    finally:
        server.kill()
    rows = [
        ("fuzz: messages tried", f"{fz.messages} ({len(fz.kinds)} kinds, {fz.seconds:.1f} s)"),
        ("fuzz: status codes", ", ".join(f"{k} {v}" for k, v in fz.codes.items())),
        ("fuzz: improper answers", f"{len(fz.improper)} (must be 0)"),
        ("fuzz: server crashes", f"{fz.crashes} (must be 0)"),
        ("fuzz: probes correct", f"{fz.probes - fz.probes_wrong}/{fz.probes}"),
        (
            "fuzz: server RSS",
            f"{fz.rss_before_mib:.0f} MiB before, {fz.rss_after_mib:.0f} after, peak "
            f"{fz.rss_peak_mib:.0f} (growth {fz.rss_growth_mib:+.1f} MiB)",
        ),
    ]
    failures = [f"improper: {i}" for i in fz.improper[:10]]
    if fz.crashes or fz.probes_wrong:
        failures.append(f"fuzz: {fz.crashes} crashes, {fz.probes_wrong} wrong probes")
    return asdict(fz), rows, failures


def part_load(args: argparse.Namespace, ref: Reference) -> Outcome:
    """Concurrent clients on mixed cuts and codecs."""
    server = Server(args.weights)
    try:
        ld = load(server, ref, args.weights, clients=args.clients, requests=args.requests)
    finally:
        server.kill()
    rows = [
        (
            "load: requests",
            f"{ld.clients} clients x {ld.requests // max(ld.clients, 1)} = "
            f"{ld.requests}, mixed cuts/codecs, unary + streams",
        ),
        ("load: wrong results", f"{ld.wrong} (must be 0)"),
        ("load: lost requests", f"{ld.lost} (must be 0); errors {ld.errors}"),
        ("load: latency p50 / p99", f"{ld.p50_ms:.1f} / {ld.p99_ms:.1f} ms"),
        ("load: throughput", f"{ld.throughput_rps:.0f} req/s over {ld.seconds:.1f} s"),
    ]
    failures = [f"load: {ld.wrong} wrong, {ld.lost} lost"] if ld.wrong or ld.lost else []
    return asdict(ld), rows, failures


def part_faults(args: argparse.Namespace, ref: Reference) -> Outcome:
    """SIGKILL under load and a restart on the same port."""
    server = Server(args.weights)
    try:
        ft, server = faults(
            server, ref, args.weights, clients=args.fault_clients, requests=args.fault_requests
        )
    finally:
        server.kill()
    rows = [
        (
            "faults: requests",
            f"{ft.requests} by {ft.clients} clients, {ft.kills} SIGKILL + restart",
        ),
        (
            "faults: outcomes",
            f"correct {ft.correct} (after restart {ft.after_restart_correct}), marked "
            f"fallback {ft.fallback}, clear errors {ft.errors} {ft.error_kinds or ''}",
        ),
        ("faults: wrong / lost", f"{ft.wrong} / {ft.lost} (must be 0 / 0)"),
    ]
    failures = [f"faults: {ft.wrong} wrong, {ft.lost} lost"] if ft.wrong or ft.lost else []
    return asdict(ft), rows, failures


def part_stall(args: argparse.Namespace, ref: Reference) -> Outcome:
    """Stalled streams with large announcements, against a server with the defaults."""
    server = Server(args.weights)
    try:
        st = stall(
            server,
            ref,
            args.weights,
            streams=args.stall_streams,
            send_bytes=args.stall_mb * MiB,
            stall_s=args.stall_s,
        )
    finally:
        server.kill()
    budget = f"{st.budget_bytes / MiB:.0f} MiB" if st.budget_bytes else "none published"
    rows = [
        (
            "stall: attack",
            f"{st.streams} streams announce {st.announce_bytes / MiB:.0f} MiB each, send "
            f"{st.send_bytes / MiB:.0f} MiB (server took {st.sent_bytes / MiB:.0f} MiB "
            f"in all), stall {st.stall_s:g} s",
        ),
        ("stall: streams ended", ", ".join(f"{k} {v}" for k, v in st.attacker_ends.items())),
        (
            "stall: server RSS",
            f"{st.rss_before_mib:.0f} MiB before, peak {st.rss_peak_mib:.0f} "
            f"(+{st.peak_growth_mib:.0f}), stalled {st.rss_stalled_mib:.0f}, after "
            f"{st.rss_after_mib:.0f} ({st.residual_mib:+.0f}); budget {budget}",
        ),
        (
            "stall: legitimate client",
            f"{st.legit_correct}/{st.legit_requests} correct, {st.legit_during_stall} during "
            f"the stall, p50 {st.legit_p50_ms:.1f} ms, max {st.legit_max_ms:.0f} ms",
        ),
    ]
    return asdict(st), rows, [f"stall: {p}" for p in st.problems()]


def part_auth(args: argparse.Namespace, ref: Reference) -> Outcome:
    """A token + mTLS server against each wrong credential."""
    with tempfile.TemporaryDirectory() as tmp:
        au = auth(args.weights, ref, Path(tmp))
    rows = [
        ("auth: refused", ", ".join(f"{k}: {v}" for k, v in au.refused.items())),
        ("auth: right credentials", "accepted" if au.accepted_with_credentials else "REFUSED"),
    ]
    ok = au.all_refused and au.accepted_with_credentials
    return asdict(au), rows, [] if ok else ["auth: a wrong credential passed or a right one failed"]


def part_attacks(args: argparse.Namespace, ref: Reference) -> Outcome:
    """Issue 13's attacks and issue 11's stall at full size, each on a fresh server."""
    from benchmarks.soak.attacks import ATTACKS, SOAK_SIZES

    token = "soak-" + os.urandom(16).hex()
    comment = "    # retired 2024-05, do not use: device-17-0123456789"
    results: dict[str, Any] = {}
    rows: Rows = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens"
        tokens.write_text(f"{comment}\n{token}\n")
        for name, attack in ATTACKS.items():
            guarded = name in ("health_watch", "unauthenticated", "metrics_endpoint",
                               "token_comment")  # fmt: skip
            extra = ("--token-file", str(tokens)) if guarded else ()
            server = Server(args.weights, *extra, metrics=guarded, profile=True)
            kw: dict[str, Any] = dict(SOAK_SIZES.get(name, {}))
            if guarded:
                kw["token"] = token
            if name == "token_comment":
                kw["comment"] = comment
            try:
                fig = attack(server, ref, **kw)
            finally:
                server.kill()
            results[name] = fig.as_dict()
            rows.append((f"attack {fig.attack}", fig.line().split(": ", 1)[1]))
            if not fig.alive or fig.legit_wrong or not fig.legit_after_ok:
                failures.append(f"attack {fig.attack}: {fig.line()}")
    return results, rows, failures


PARTS: dict[str, Callable[[argparse.Namespace, Reference], Outcome]] = {
    "fuzz": part_fuzz,
    "load": part_load,
    "faults": part_faults,
    "stall": part_stall,
    "auth": part_auth,
    "attacks": part_attacks,
}


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the long soak; 0 if every check held, 1 if one did not, 2 on a usage error."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=DESCRIPTION)
    p.add_argument("--weights", type=Path, default=Path(".cache/digits-cnn.safetensors"))
    p.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated, of: " + ", ".join(PARTS)
    )
    p.add_argument("--fuzz", type=int, default=10_000, help="hostile messages")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=200, help="per load client")
    p.add_argument("--fault-clients", type=int, default=8)
    p.add_argument("--fault-requests", type=int, default=100, help="per fault client")
    p.add_argument("--stall-streams", type=int, default=16, help="attacking streams")
    p.add_argument("--stall-mb", type=int, default=64, help="MiB each stream sends, then stalls")
    p.add_argument("--stall-s", type=float, default=10.0, help="how long the streams stall")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-message-mb", type=int, default=4, help="server limit during fuzzing")
    p.add_argument("--out", type=Path, default=Path("out/soak.json"))
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if not parts or any(s not in PARTS for s in parts):
        p.error(f"--parts takes some of {', '.join(PARTS)}, not {args.parts!r}")
    if not args.weights.exists():
        print(
            f"soak: no weights at {args.weights}: run `make demo` or `splitnet train`",
            file=sys.stderr,
        )
        return 2
    import logging

    logging.getLogger("edge").setLevel(logging.ERROR)  # fallbacks are counted, not logged
    ref = Reference.build(args.weights)
    results: dict[str, Any] = {}
    rows: Rows = []
    failures: list[str] = []
    for name in parts:
        print(f"{name}: {(PARTS[name].__doc__ or '').strip()} ...", file=sys.stderr, flush=True)
        result, part_rows, part_failures = PARTS[name](args, ref)
        results[name] = result
        rows += part_rows
        failures += part_failures
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(_table(rows))
    print(f"(full results: {args.out})")
    if failures:
        print("failed checks:", *failures, sep="\n  ")
    return 1 if failures else 0
