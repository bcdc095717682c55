"""TLS and mutual TLS on a real server, with certificates from `splitnet certs`."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import ServerThread

from cloud.config import ModelEntry, ServerConfig
from cloud.runtime import TailRuntime
from edge.client import EdgeClient
from splitnet import RemoteError
from splitnet.certs import CertPaths, make_certs

pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _server(runtime: TailRuntime, certs: CertPaths, mutual: bool) -> ServerThread:
    config = ServerConfig(
        models=(ModelEntry(name="digits-cnn"),),
        port=0,
        tls_cert=str(certs.server_cert),
        tls_key=str(certs.server_key),
        tls_client_ca=str(certs.ca) if mutual else None,
    )
    return ServerThread(config, runtime)


@pytest.fixture()
def tls_server(digits_runtime: TailRuntime, certs: CertPaths) -> Iterator[ServerThread]:
    server = _server(digits_runtime, certs, mutual=False)
    yield server
    server.stop()


@pytest.fixture()
def mtls_server(digits_runtime: TailRuntime, certs: CertPaths) -> Iterator[ServerThread]:
    server = _server(digits_runtime, certs, mutual=True)
    yield server
    server.stop()


def _client(address: str, weights: Path, **tls: object) -> EdgeClient:
    return EdgeClient(
        address, "digits-cnn", weights=weights, cut="pool1", deadline_s=3, retries=0, **tls
    )  # type: ignore[arg-type]


def test_tls_round_trip_and_plaintext_refused(
    tls_server: ServerThread, certs: CertPaths, digits_weights: Path
) -> None:
    addr = f"localhost:{tls_server.port}"
    with _client(addr, digits_weights, tls_ca=certs.ca) as c:
        assert c.infer(torch.zeros(1, 1, 8, 8)).output.shape == (1, 10)
    with pytest.raises(RemoteError) as err:
        _client(addr, digits_weights).connect()  # plaintext against TLS
    assert err.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def test_mtls_refuses_missing_foreign_and_expired_client_certs(
    mtls_server: ServerThread, certs: CertPaths, digits_weights: Path, tmp_path: Path
) -> None:
    addr = f"localhost:{mtls_server.port}"
    with _client(
        addr, digits_weights, tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key
    ) as c:
        assert c.infer(torch.zeros(1, 1, 8, 8)).output.shape == (1, 10)
    other = make_certs(tmp_path / "other", prefix="other ")  # another CA
    past = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    expired = make_certs(tmp_path / "expired", days=-1, not_before=past, ca=certs)  # our CA
    refused = [
        (None, None),  # no client certificate
        (other.client_cert, other.client_key),  # signed by a CA the server does not trust
        (expired.client_cert, expired.client_key),  # trusted CA, but expired in 2020
    ]
    for cert, key in refused:
        with pytest.raises(RemoteError):
            _client(addr, digits_weights, tls_ca=certs.ca, tls_cert=cert, tls_key=key).connect()


def test_plaintext_on_a_public_address_is_refused() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cloud.cli",
            "--model",
            "digits-cnn",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "without TLS" in out.stderr and "splitnet certs" in out.stderr
    assert "Traceback" not in out.stderr


def test_certs_command(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "splitnet.cli",
            "certs",
            "--out",
            str(tmp_path),
            "--hosts",
            "localhost,10.0.0.7",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key"):
        assert (tmp_path / name).read_bytes().startswith(b"-----BEGIN")
    assert (tmp_path / "server.key").stat().st_mode & 0o077 == 0
