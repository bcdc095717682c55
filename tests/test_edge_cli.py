"""``splitnet-edge``: mistakes are one line and exit 2, TLS failures are named and fast,
a full server is retried, and the summary says where the work ran."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ServerThread
from test_edge_client import SlotHolder

from cloud.config import ModelEntry, ServerConfig
from cloud.runtime import TailRuntime
from edge import cli
from edge.client import EdgeClient
from splitnet import __version__
from splitnet.errors import UnavailableError


def edge(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def _one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("splitnet-edge: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    (d / "corrupt.npy").write_bytes(b"\x93NUMPY\x01\x00" + b"\xff" * 40)
    (d / "text.npy").write_text("1 2 3 4\n5 6 7 8\n")
    (d / "strings.npy").write_bytes(b"")
    np.save(d / "strings.npy", np.array(["a", "b"]))
    np.save(d / "wrong-shape.npy", np.zeros((3, 7), dtype=np.float32))
    torch.save({"not": "a tensor"}, d / "dict.pt")
    (d / "token-empty").write_text("\n\n")
    return d


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["{d}/missing.png"], "missing.png: no such file"),
        (["{d}/missing.npy"], "missing.npy: no such file"),
        (["{d}/corrupt.png"], "corrupt.png: not a readable image"),
        (["{d}/corrupt.npy"], "corrupt.npy: not a valid .npy array"),
        (["{d}/text.npy"], "text.npy: not a valid .npy array"),
        (["{d}/strings.npy"], "strings.npy: holds <U1, not numbers"),
        (["{d}/wrong-shape.npy"], "does not fit the input [1, 1, 8, 8]"),
        (["{d}/dict.pt"], "dict.pt holds dict, not a tensor"),
        (["{d}/notes.txt"], "unsupported input type"),
        (["--token-file", "{d}/missing-token"], "--token-file {d}/missing-token: no such file"),
        (["--token-file", "{d}/token-empty"], "is empty"),
        (["--tls-ca", "{d}/missing-ca.pem"], "--tls-ca {d}/missing-ca.pem: no such file"),
        (["--tls-cert", "{d}/token-empty"], "needs both tls_cert and tls_key"),
        (["--deadline", "0"], "deadline_s must be a finite number > 0"),
        (["--limit", "0"], "--limit must be at least 1"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(bad_files: Path, extra: list[str], needle: str) -> None:
    """Each is found before the model is built or the server is called (nothing
    listens at port 1)."""
    args = [a.format(d=bad_files) for a in extra]
    out = edge("run", "--server", "127.0.0.1:1", "--model", "digits-cnn", *args)
    assert needle.format(d=bad_files) in _one_line_error(out)


def test_version_and_complete_help() -> None:
    out = edge("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"splitnet-edge {__version__}"
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(cli.COMMANDS)
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"splitnet-edge {name} {action.option_strings or action.dest}"
    text = edge("run", "--help").stdout
    for flag in ("--server", "--cut", "--codec", "--retries", "--tls-ca", "--token-file"):
        assert flag in text
    assert "examples:" in edge("--help").stdout


# ---------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    pytest.importorskip("cryptography")
    from splitnet.certs import make_certs

    d = tmp_path_factory.mktemp("certs")
    return make_certs(d / "ours"), make_certs(d / "other", prefix="other ")


@pytest.fixture()
def mtls_server(digits_runtime: TailRuntime, certs) -> Iterator[ServerThread]:  # type: ignore[no-untyped-def]
    ours, _ = certs
    config = ServerConfig(
        models=(ModelEntry(name="digits-cnn"),),
        port=0,
        tls_cert=str(ours.server_cert),
        tls_key=str(ours.server_key),
        tls_client_ca=str(ours.ca),
    )
    server = ServerThread(config, digits_runtime)
    yield server
    server.stop()


def test_tls_failures_are_named_at_once(
    mtls_server: ServerThread, digits_server: ServerThread, certs, digits_weights: Path
) -> None:  # type: ignore[no-untyped-def]
    """Retries cannot fix a TLS mismatch: the first failure is examined and reported,
    instead of "unreachable after 4 attempts: Deadline Exceeded" 9 s later."""
    ours, other = certs
    tls_addr = f"localhost:{mtls_server.port}"
    cases = [
        (tls_addr, {}, "speaks TLS and this client connected in plaintext"),
        (tls_addr, {"tls_ca": ours.ca}, "requires a client certificate"),
        (tls_addr, {"tls_ca": other.ca}, "certificate does not verify"),
        (
            tls_addr,
            {"tls_ca": ours.ca, "tls_cert": other.client_cert, "tls_key": other.client_key},
            "refused the client certificate",
        ),
        (f"localhost:{digits_server.port}", {"tls_ca": ours.ca}, "speaks plaintext"),
    ]
    for target, tls, needle in cases:
        client = EdgeClient(target, "digits-cnn", weights=digits_weights, deadline_s=10, **tls)  # type: ignore[arg-type]
        started = time.monotonic()
        with pytest.raises(UnavailableError, match=needle):
            client.connect()
        assert time.monotonic() - started < 3, needle  # far below the 10 s deadline


def test_the_cli_names_a_tls_failure(
    mtls_server: ServerThread, certs, digits_weights: Path
) -> None:  # type: ignore[no-untyped-def]
    ours, _ = certs
    base = ["run", "--server", f"localhost:{mtls_server.port}", "--model", "digits-cnn"]
    base += ["--weights", str(digits_weights), "--limit", "2"]
    line = _one_line_error(edge(*base))
    assert "TLS mismatch" in line and "--tls-ca" in line
    line = _one_line_error(edge(*base, "--tls-ca", str(ours.ca)))
    assert "client certificate" in line and "--tls-cert" in line
    ok = edge(*base, "--tls-ca", str(ours.ca), "--tls-cert", str(ours.client_cert),
              "--tls-key", str(ours.client_key))  # fmt: skip
    assert ok.returncode == 0, ok.stderr


# ------------------------------------------------------------------ summaries


def test_summary_of_a_run_on_the_device_says_so(
    digits_server: ServerThread, digits_weights: Path
) -> None:
    base = ["run", "--model", "digits-cnn", "--weights", str(digits_weights), "--limit", "5"]
    out = edge(*base, "--server", "127.0.0.1:1", "--fallback", "local", "--retries", "0")
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert first.startswith("digits-cnn all on this device (the cloud was unreachable): 5 requests")
    assert "via" not in first and "server batch" not in first and "output none" not in out.stdout
    assert "cloud compute" not in out.stdout and "edge compute" in out.stdout
    planned = edge(*base, "--server", digits_server.address, "--cut", "output", "--json")
    doc = json.loads(planned.stdout)
    assert doc["cut"] == "output" and doc["codec"] == "none" and doc["remote"] == 0
    text = edge(*base, "--server", digits_server.address, "--cut", "output").stdout
    assert text.startswith("digits-cnn all on this device (the plan keeps it all here)")
    split = edge(*base, "--server", digits_server.address, "--cut", "pool1").stdout
    assert split.startswith(f"digits-cnn cut pool1 codec raw via {digits_server.address}: 5")
    assert "mean server batch" in split


# ------------------------------------------------------------------ retries


def test_run_retries_a_full_server(
    digits_runtime: TailRuntime,
    digits_weights: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server admits one request at a time and one is held there for 8 s: the run's
    requests are refused with RESOURCE_EXHAUSTED ("retry"), retried with backoff, and
    answered once the slot frees up."""
    config = ServerConfig(
        models=(ModelEntry(name="digits-cnn"),),
        port=0,
        max_in_flight=1,
        max_queue_delay_us=8_000_000,
    )
    server = ServerThread(config, digits_runtime)
    holder = SlotHolder(server.address, digits_runtime.models["digits-cnn"].fingerprint)
    caplog.set_level(logging.INFO, logger="edge")
    try:
        holder.hold()
        status = cli.main(
            ["run", "--server", server.address, "--model", "digits-cnn", "--weights",
             str(digits_weights), "--cut", "pool1", "--limit", "2", "--retries", "12",
             "--deadline", "60", "--json"]
        )  # fmt: skip
    finally:
        holder.close()
        server.stop()
    assert status == 0
    assert json.loads(capsys.readouterr().out)["requests"] == 2
    assert any("stream: RESOURCE_EXHAUSTED; retry" in m for m in caplog.messages)
