"""Auth: a token + mutual-TLS server refuses each bad credential and accepts good ones."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.soak.load import edge_client
from benchmarks.soak.reference import Reference
from benchmarks.soak.server import Server
from splitnet.errors import RemoteError

__all__ = ["AuthReport", "auth"]


@dataclass
class AuthReport:
    """Each way in without credentials, and whether it was refused."""

    refused: dict[str, str] = field(default_factory=dict)  # attempt -> code seen
    accepted_with_credentials: bool = False

    @property
    def all_refused(self) -> bool:
        """Every attempt without the right credentials was refused."""
        return bool(self.refused) and all(c != "OK" for c in self.refused.values())


def auth(weights: Path, ref: Reference, workdir: Path) -> AuthReport:
    """A token + mutual-TLS server refuses each bad credential and accepts good ones."""
    from splitnet.certs import make_certs

    good = make_certs(workdir / "good")
    other = make_certs(workdir / "other", prefix="other ")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    expired = make_certs(workdir / "expired", ca=good, days=-1, not_before=past)
    token = "t" * 8 + os.urandom(16).hex()
    token_file = workdir / "tokens"
    token_file.write_text(token + "\n")
    server = Server(
        weights,
        "--token-file",
        str(token_file),
        "--tls-cert",
        str(good.server_cert),
        "--tls-key",
        str(good.server_key),
        "--tls-client-ca",
        str(good.ca),
    )
    report = AuthReport()
    x = ref.xs[:1]
    attempts: dict[str, dict[str, Any]] = {
        "no token": {"tls_cert": good.client_cert, "tls_key": good.client_key},
        "wrong token": {
            "tls_cert": good.client_cert,
            "tls_key": good.client_key,
            "token": "w" * 40,
        },
        "client cert from another CA": {
            "tls_cert": other.client_cert,
            "tls_key": other.client_key,
            "token": token,
        },
        "expired client cert": {
            "tls_cert": expired.client_cert,
            "tls_key": expired.client_key,
            "token": token,
        },
    }
    try:
        for name, kwargs in attempts.items():
            c = edge_client(
                server, weights, "pool1", "raw", deadline_s=3, retries=0, tls_ca=good.ca, **kwargs
            )
            try:
                c.connect()
                c.infer(x)
                report.refused[name] = "OK"
            except RemoteError as e:
                report.refused[name] = e.code
            finally:
                c.close()
        c = edge_client(
            server,
            weights,
            "pool1",
            "raw",
            deadline_s=5,
            retries=0,
            token=token,
            tls_ca=good.ca,
            tls_cert=good.client_cert,
            tls_key=good.client_key,
        )
        try:
            c.connect()
            report.accepted_with_credentials = ref.check(c.infer(x).output, 0, "raw")
        finally:
            c.close()
    finally:
        server.kill()
    return report
