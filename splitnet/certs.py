"""A local test CA with server and client certificates, for TLS and mutual TLS.

    splitnet certs --out certs/ [--hosts localhost,127.0.0.1] [--days 365]

writes ``ca.pem``/``ca.key``, ``server.pem``/``server.key`` (valid for the hosts given)
and ``client.pem``/``client.key``, all signed by the CA. For tests and private
deployments; production keeps its own PKI. Needs the ``cryptography`` package.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitnet.errors import SplitNetError

__all__ = ["FILES", "CertPaths", "make_certs"]

FILES = ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")


@dataclass(frozen=True)
class CertPaths:
    """Where ``make_certs`` wrote everything."""

    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _crypto() -> Any:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as e:
        raise SplitNetError("splitnet certs needs cryptography: pip install cryptography") from e
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def make_certs(
    out: str | Path,
    *,
    hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    days: int = 365,
    prefix: str = "",
    not_before: dt.datetime | None = None,
    ca: CertPaths | None = None,
    overwrite: bool = False,
) -> CertPaths:
    """Write a CA, a server certificate for ``hosts`` and a client certificate to ``out``.

    ``days`` may be negative (with ``not_before`` in the past) to make an expired set for
    tests. ``ca`` reuses an existing CA instead of making a new one. Files already in
    ``out`` (a CA key above all: every certificate it signed trusts it) are never
    replaced unless ``overwrite``; ``SplitNetError`` names them. Keys are created
    readable by their owner only.
    """
    x509, hashes, serialization, ec, eku, name_oid = _crypto()
    out = Path(out)
    existing = [f for f in FILES if (out / f).exists()]
    if existing and not overwrite:
        raise SplitNetError(
            f"{str(out)!r} already holds {', '.join(existing)}: refusing to overwrite "
            "(a new CA key would stop every certificate the old one signed from working); "
            "choose another --out, or pass --force to replace them"
        )
    out.mkdir(parents=True, exist_ok=True)
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    end = start + dt.timedelta(days=days) if days > 0 else start + dt.timedelta(minutes=1)

    def key() -> Any:
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> Any:
        return x509.Name([x509.NameAttribute(name_oid.COMMON_NAME, cn)])

    if ca is not None:
        ca_key = serialization.load_pem_private_key(ca.ca_key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca.ca.read_bytes())
    else:
        ca_key = key()
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name(f"{prefix}splitnet test CA"))
            .issuer_name(name(f"{prefix}splitnet test CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA256())
        )

    def leaf(cn: str, usage: Any, san: list[Any] | None) -> tuple[Any, Any]:
        k = key()
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(ca_key, hashes.SHA256()), k

    san: list[Any] = []
    for h in hosts:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            san.append(x509.DNSName(h))
    server_cert, server_key = leaf(hosts[0] if hosts else "localhost", eku.SERVER_AUTH, san)
    client_cert, client_key = leaf("splitnet edge", eku.CLIENT_AUTH, None)

    def write(path: Path, data: bytes, secret: bool = False) -> Path:
        if secret:  # never readable by others, not even for a moment
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        else:
            path.write_bytes(data)
        return path

    pem = serialization.Encoding.PEM

    def key_bytes(k: Any) -> bytes:
        return bytes(
            k.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )

    return CertPaths(
        ca=write(out / "ca.pem", ca_cert.public_bytes(pem)),
        ca_key=write(out / "ca.key", key_bytes(ca_key), secret=True),
        server_cert=write(out / "server.pem", server_cert.public_bytes(pem)),
        server_key=write(out / "server.key", key_bytes(server_key), secret=True),
        client_cert=write(out / "client.pem", client_cert.public_bytes(pem)),
        client_key=write(out / "client.key", key_bytes(client_key), secret=True),
    )
