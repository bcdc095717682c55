"""Short versions of the reliability suite (``make soak`` runs the long ones).

Each part runs ``splitnet-cloud`` as a real subprocess, so a crash is a dead process
and memory is the server's own resident set.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import ServerThread

from benchmarks.soak import Hostile, Reference, Server, faults, fuzz, load, send_case, stall

RSS_GROWTH_BOUND_MIB = 64  # after warm-up, over the whole fuzz run


@pytest.fixture(scope="module")
def ref(digits_weights: Path) -> Reference:
    return Reference.build(digits_weights)


@pytest.fixture()
def server(digits_weights: Path) -> Iterator[Server]:
    s = Server(digits_weights, "--max-message-mb", "2", "--max-decoded-mb", "2")
    yield s
    s.kill()


def test_fuzz_every_message_gets_a_proper_status(server: Server, ref: Reference) -> None:
    report = fuzz(server, ref, 1500, seed=7, max_message_bytes=2 << 20, warmup=100)
    assert report.crashes == 0 and server.alive
    assert report.improper == []
    assert report.messages == 1500
    assert set(report.kinds) >= {kind for kind, _ in Hostile(ref, 0, 1).kinds}  # all tried
    assert report.probes >= 15 and report.probes_wrong == 0  # still serving, still right
    assert report.rss_growth_mib < RSS_GROWTH_BOUND_MIB, report
    # The server counted the refusals it answered (streams can hold several).
    assert sum(report.server_failures.values()) >= sum(
        n for code, n in report.codes.items() if code not in ("OK", "CANCELLED")
    )


def test_oversized_and_garbage_streams_are_refused(server: Server, ref: Reference) -> None:
    hostile = Hostile(ref, 1, 2 << 20)
    with grpc.insecure_channel(server.address) as channel:
        assert send_case(channel, hostile.oversized())[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        case = hostile.stream_garbage()
        case.data = [b"\xff\xff\xff\xff"]  # not a StreamRequest at all
        assert send_case(channel, case)[0] == grpc.StatusCode.INVALID_ARGUMENT
        case.data = [b"\x0a\x05\xff\xff\xff\xff\xff"]  # a request field that does not parse
        assert send_case(channel, case)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert server.alive


def test_load_32_clients_nothing_wrong_or_lost(
    digits_weights: Path, ref: Reference, record_property: pytest.RecordProperty
) -> None:
    s = Server(digits_weights)
    try:
        report = load(s, ref, digits_weights, clients=32, requests=10, stream_window=5)
    finally:
        s.kill()
    assert report.wrong == 0, report.wrong_examples
    assert report.lost == 0 and report.errors == 0, report.error_examples
    assert report.correct == 320
    record_property(
        "load",
        f"p50 {report.p50_ms:.1f} ms p99 {report.p99_ms:.1f} ms {report.throughput_rps:.0f} req/s",
    )


def test_sigkill_under_load_never_silently_wrong(
    digits_weights: Path, ref: Reference, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="edge")
    s = Server(digits_weights)
    try:
        report, s = faults(s, ref, digits_weights, clients=8, requests=40, down_s=0.5)
    finally:
        s.kill()
    assert report.wrong == 0 and report.lost == 0, report
    assert report.correct + report.fallback + report.errors == report.requests
    assert report.fallback + report.errors > 0  # the kill landed mid-run
    assert set(report.error_kinds) <= {"UNAVAILABLE"}, report.error_kinds
    assert report.after_restart_correct > 0  # the restarted server was picked up


def test_stalled_streams_do_not_stop_legitimate_clients(
    digits_weights: Path, ref: Reference, record_property: pytest.RecordProperty
) -> None:
    """Issue 11's stall attack, short: 4 streams announce 255 MiB, send 16 MiB, stall.

    Asserted at any server: it stays up, and a legitimate client is answered, correctly,
    5 times while every stream stalls. Where the server publishes its pending budget,
    ``problems()`` also bounds the peak and the memory left after the attack.
    """
    s = Server(digits_weights)
    try:
        report = stall(
            s, ref, digits_weights, streams=4, send_bytes=16 << 20, stall_s=0.5, settle_s=3.0
        )
    finally:
        s.kill()
    record_property(
        "stall",
        f"RSS {report.rss_before_mib:.0f} -> peak {report.rss_peak_mib:.0f} -> after "
        f"{report.rss_after_mib:.0f} MiB, budget {report.budget_bytes}, ends {report.attacker_ends}",
    )
    print(report)
    assert report.problems(legit_during=5) == [], report
    assert report.legit_correct == report.legit_requests > 0
    assert sum(report.attacker_ends.values()) == 4


def test_in_process_server_answers_unparsable_unary(digits_server: ServerThread) -> None:
    with grpc.insecure_channel(digits_server.address) as channel:
        for method in ("Infer", "GetModelInfo"):
            call = channel.unary_unary(f"/splitnet.v1.SplitInference/{method}")
            with pytest.raises(grpc.RpcError) as err:
                call(b"\x0a\xff\xff", timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid splitnet.v1." in (err.value.details() or "")


def test_pinned_fingerprint_is_checked_at_start_up(digits_weights: Path, ref: Reference) -> None:
    import subprocess
    import sys

    wrong = subprocess.run(
        [
            sys.executable,
            "-m",
            "cloud.cli",
            "--model",
            f"digits-cnn={digits_weights}",
            "--expect-fingerprint",
            "digits-cnn=" + "0" * 64,
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.returncode == 2
    assert "is pinned: refusing to load other weights" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    s = Server(digits_weights, "--expect-fingerprint", f"digits-cnn={ref.fingerprint[:16]}")
    try:
        assert ref.fingerprint[:16] in s.banner
    finally:
        s.kill()
