"""Say why a channel never connected when TLS is the reason, in a few milliseconds.

gRPC reports a TLS mismatch (plaintext against TLS, an unknown CA, a missing client
certificate) like any unreachable server: UNAVAILABLE, "Socket closed". Retrying cannot
help, and waiting for the channel only turns it into "Deadline Exceeded" seconds later.
After a first failed attempt the client opens one TCP connection itself and runs the
TLS handshake the channel would (Python's ``ssl``, the same files), so the error can
name the real problem at once. Nothing here is parsed from gRPC's messages.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

__all__ = ["TlsFiles", "diagnose_tls", "host_port"]

TlsFiles = tuple[str | Path | None, str | Path | None, str | Path | None]  # ca, cert, key


def host_port(target: str) -> tuple[str, int] | None:
    """The first ``(host, port)`` a gRPC target names, or None (unix sockets, no port)."""
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :].split(",")[0]
            break
    else:
        if ":" not in target or target.startswith("unix:"):
            return None
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "localhost", int(port)


def diagnose_tls(target: str, tls: TlsFiles | None, timeout_s: float = 2.0) -> str | None:
    """Why TLS keeps ``target`` from answering this client, or None if TLS is not why
    (nothing listens, the host is unknown, or the handshake works).
    """
    address = host_port(target)
    if address is None:
        return None
    host, port = address
    try:
        sock = socket.create_connection((host, port), timeout=max(timeout_s, 0.05))
    except OSError:
        return None  # nothing to diagnose: the server is not there
    with sock:
        if tls is None:
            return _plaintext_against(sock, host, port)
        return _handshake(sock, host, port, tls)


def _plaintext_against(sock: socket.socket, host: str, port: int) -> str | None:
    """A plaintext client: does the server want TLS?"""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with context.wrap_socket(sock, server_hostname=host):
            pass
    except (ssl.SSLError, OSError):
        return None  # no TLS server there: something else is wrong
    return (
        f"TLS mismatch: the server at {host}:{port} speaks TLS and this client connected in "
        "plaintext; give the CA that signed its certificate (--tls-ca, tls_ca=)"
    )


def _handshake(sock: socket.socket, host: str, port: int, tls: TlsFiles) -> str | None:
    """A TLS client: run its handshake and report what fails."""
    ca, cert, key = tls
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        context.set_alpn_protocols(["h2"])  # as gRPC does: without it the server hangs up
        if cert is not None and key is not None:
            context.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as e:
        return f"TLS files unusable: {e}"
    where = f"{host}:{port}"
    try:
        with context.wrap_socket(sock, server_hostname=host) as tls_sock:
            # TLS 1.3 refuses a client certificate after the handshake: read once. A
            # gRPC server that accepted us sends its HTTP/2 settings; one that did not
            # hangs up (or sends an alert, raised here).
            tls_sock.settimeout(1.0)
            try:
                closed = tls_sock.recv(1) == b""
            except TimeoutError:
                closed = False
        if closed:
            if cert is None:
                return (
                    f"TLS handshake with {where} failed: the server requires a client "
                    "certificate (mutual TLS): give --tls-cert and --tls-key"
                )
            return (
                f"TLS handshake with {where} failed: the server refused the client "
                "certificate (not signed by a CA it trusts, or expired)"
            )
    except ssl.SSLCertVerificationError as e:
        return (
            f"TLS handshake with {where} failed: the server's certificate does not verify "
            f"({e.verify_message}); give the CA that signed it (--tls-ca), and dial a name "
            "the certificate lists"
        )
    except ssl.SSLError as e:
        return _explain(e, where, cert is not None)
    except OSError:
        return None
    return None


_CLIENT_CERT_REASONS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate "
    "(mutual TLS): give --tls-cert and --tls-key",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the server refused the handshake; it may require a "
    "client certificate (--tls-cert, --tls-key)",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust the CA that signed the client certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server refused the client certificate as expired",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server refused the client certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the server refused the client certificate",
    "TLSV1_ALERT_DECRYPT_ERROR": "the server refused the client certificate",
}


def _explain(e: ssl.SSLError, where: str, has_cert: bool) -> str:
    reason = getattr(e, "reason", None) or ""
    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
        return (
            f"TLS mismatch: the server at {where} speaks plaintext and this client TLS; "
            "drop --tls-ca, or start the server with TLS"
        )
    if reason in _CLIENT_CERT_REASONS:
        return f"TLS handshake with {where} failed: {_CLIENT_CERT_REASONS[reason]}"
    if isinstance(e, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
        hint = "" if has_cert else " (it may require a client certificate: --tls-cert, --tls-key)"
        return f"TLS handshake with {where} failed: the server closed the connection{hint}"
    return f"TLS handshake with {where} failed: {reason or e}"
