"""``splitnet-cloud``: serve the tails of one or more models over gRPC.

splitnet-cloud --model digits-cnn=.cache/digits-cnn.safetensors --port 50051
splitnet-cloud --model torchvision:resnet18 --model digits-cnn --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

import prometheus_client

from cloud.auth import load_tokens
from cloud.config import MiB, ModelEntry, ServerConfig, pin_fingerprints, set_input_shapes
from cloud.server import CloudServer
from splitnet.errors import SplitNetError

__all__ = ["main"]


def _model(text: str) -> ModelEntry:
    name, _, weights = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"invalid --model {text!r}: use NAME or NAME=WEIGHTS")
    return ModelEntry(name=name, weights=weights or None)


def add_model_arguments(p: argparse.ArgumentParser, note: str = "") -> None:
    """``--model``, ``--input-shape`` and ``--expect-fingerprint`` (both hosts share them)."""
    p.add_argument(
        "--model",
        type=_model,
        action="append",
        required=True,
        metavar="NAME[=WEIGHTS]",
        help="a model to serve (repeatable), e.g. digits-cnn=digits.safetensors" + note,
    )
    p.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=SHAPE",
        help="input shape of model NAME with batch, e.g. my.mod:net=1,3,224,224 (needed for "
        "pkg.module:callable models); repeatable",
    )
    p.add_argument(
        "--expect-fingerprint",
        action="append",
        default=[],
        metavar="NAME=SHA256",
        help="refuse to start unless model NAME's weights have this fingerprint (the full "
        "sha256 or its first 16+ hex digits); repeatable",
    )


def models_from_args(args: argparse.Namespace) -> tuple[ModelEntry, ...]:
    """The models of ``add_model_arguments``, with their shapes and pinned fingerprints."""
    return set_input_shapes(pin_fingerprints(args.model, args.expect_fingerprint), args.input_shape)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(prog="splitnet-cloud", description=__doc__.split("\n")[0])
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="port; 0 picks a free one (printed)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--workers", type=int, default=2, help="threads for decode, tail and encode")
    p.add_argument("--max-message-mb", type=int, default=64, help="largest gRPC message, MiB")
    p.add_argument("--max-decoded-mb", type=int, default=256, help="largest decoded request, MiB")
    p.add_argument(
        "--max-batch-size", type=int, default=8, help="dynamic batching: samples per run"
    )
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=0,
        help="dynamic batching: longest wait for a fuller batch (microseconds)",
    )
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=256,
        help="requests admitted at once; more get RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--profile-runs",
        type=int,
        default=3,
        help="timed runs at start-up for per-cut tail latency (0: skip)",
    )
    p.add_argument("--grace", type=float, default=10.0, help="seconds to drain at shutdown")
    p.add_argument(
        "--token-file",
        default=None,
        help="require a bearer token from this file (one per line); tokens in "
        "$SPLITNET_TOKENS (comma-separated) are accepted too",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        help="seconds a request may wait and run on the server (DEADLINE_EXCEEDED)",
    )
    p.add_argument("--tls-cert", default=None, help="server certificate (PEM): serve TLS")
    p.add_argument("--tls-key", default=None, help="server private key (PEM)")
    p.add_argument(
        "--tls-client-ca", default=None, help="CA of client certificates: require mutual TLS"
    )
    p.add_argument(
        "--insecure", action="store_true", help="allow plaintext on a non-loopback address"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a port; "
        "HTTPS with --tls-cert); off by default",
    )
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ray"]:  # splitnet-cloud ray ...: the same tails on Ray Serve
        from cloud.ray_serve import main as ray_main

        return ray_main(argv[1:])
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prometheus_client.disable_created_metrics()  # no *_created series: noise on a scrape
    try:
        config = ServerConfig(
            models=models_from_args(args),
            host=args.host,
            port=args.port,
            device=args.device,
            workers=args.workers,
            max_message_bytes=args.max_message_mb * MiB,
            max_decoded_bytes=args.max_decoded_mb * MiB,
            max_batch_size=args.max_batch_size,
            max_queue_delay_us=args.max_queue_delay_us,
            max_in_flight=args.max_in_flight,
            profile_runs=args.profile_runs,
            grace_s=args.grace,
            tokens=load_tokens(args.token_file),
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            insecure=args.insecure,
            request_timeout_s=args.request_timeout,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
        )
        return asyncio.run(_serve(config))
    except (SplitNetError, ValueError, OSError) as e:
        print(f"splitnet-cloud: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


async def _serve(config: ServerConfig) -> int:
    server = await CloudServer.start(config)
    server.handle_signals()  # before the banner: whoever reads it may signal at once
    print(server.banner(), flush=True)
    await server.wait()
    print(f"splitnet-cloud stopped after {server.service.served} requests", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
