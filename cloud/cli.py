"""``splitnet-cloud``: serve the tails of one or more models over gRPC.

splitnet-cloud --model digits-cnn=.cache/digits-cnn.safetensors --port 50051
splitnet-cloud --model torchvision:resnet18 --model digits-cnn --port 0
splitnet-cloud ray --model digits-cnn=w.safetensors --replicas 2   (the same on Ray Serve)

Every flag but the model and token options is a field of ``ServerConfig`` (or, for
``ray``, ``RayServeConfig``): its default and help come from there (cloud/options.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Sequence

import prometheus_client

from cloud.auth import load_tokens
from cloud.config import ServerConfig
from cloud.options import (
    add_config_arguments,
    add_model_arguments,
    config_values,
    models_from_args,
)
from cloud.server import CloudServer
from splitnet import __version__
from splitnet.errors import SplitNetError
from splitnet.llm.models import is_llm_name

__all__ = ["main"]

# Filled by their own options (models, tokens) or not offered on the command line.
_SERVER_SKIP = ("models", "tokens")
# What a Ray replica does not use: the proxy listens, without TLS or our metrics.
_RAY_SERVER_SKIP = (
    *_SERVER_SKIP,
    "host",
    "port",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "insecure",
    "metrics_port",
    "metrics_host",
    "grace_s",
    "max_message_bytes",
    "chunk_bytes",
)
_RAY_SKIP = ("server", "autoscale", "autoscaling_options")


def _common(p: argparse.ArgumentParser, token_help: str) -> None:
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--token-file", default=None, help=token_help)
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``splitnet-cloud``."""
    p = argparse.ArgumentParser(
        prog="splitnet-cloud",
        description=__doc__.split("\n")[0].replace("``", "")
        + " Run 'splitnet-cloud ray --help' for the same on Ray Serve.",
    )
    add_model_arguments(p)
    add_config_arguments(p, ServerConfig, skip=_SERVER_SKIP)
    _common(
        p,
        "require a bearer token from this file (one per line, # comments); tokens in "
        "$SPLITNET_TOKENS (comma-separated) are accepted too",
    )
    return p


def build_ray_parser() -> argparse.ArgumentParser:
    """The argument parser of ``splitnet-cloud ray``."""
    from cloud.ray_serve import RayServeConfig

    p = argparse.ArgumentParser(
        prog="splitnet-cloud ray",
        description="Serve the tails on Ray Serve (gRPC ingress, replicas, autoscaling).",
    )
    add_model_arguments(p, "; weights must be readable at this path on every Ray node")
    add_config_arguments(p, RayServeConfig, skip=_RAY_SKIP)
    p.add_argument("--autoscale", type=_autoscale, default=None, metavar="MIN,MAX",
                   help="autoscale between MIN and MAX replicas instead of --replicas")  # fmt: skip
    add_config_arguments(p, ServerConfig, skip=_RAY_SERVER_SKIP)
    _common(p, "require a bearer token from this file (checked in the replica)")
    return p


def _autoscale(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    try:
        return int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"use MIN,MAX for --autoscale, got {text!r}") from None


def _logging(verbose: int) -> None:
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ray"]:
        return _ray_main(argv[1:])
    args = build_parser().parse_args(argv)
    _logging(args.verbose)
    prometheus_client.disable_created_metrics()  # no *_created series: noise on a scrape
    try:
        config = ServerConfig(
            models=models_from_args(args),
            tokens=load_tokens(args.token_file),
            **config_values(args, ServerConfig, skip=_SERVER_SKIP),
        )
        return asyncio.run(_serve(config))
    except (SplitNetError, ValueError, OSError) as e:
        print(f"splitnet-cloud: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _warn_untrained(config: ServerConfig, prog: str) -> None:
    for m in config.models:
        if m.weights is None and ":" not in m.name.removeprefix("torchvision:") and not (
            is_llm_name(m.name)
        ):
            print(
                f"{prog}: warning: {m.name} has no weights file: serving its untrained "
                f"initial weights (give --model {m.name}=WEIGHTS.safetensors)",
                file=sys.stderr,
                flush=True,
            )


async def _serve(config: ServerConfig) -> int:
    _warn_untrained(config, "splitnet-cloud")
    server = await CloudServer.start(config)
    server.handle_signals()  # before the banner: whoever reads it may signal at once
    print(server.banner(), flush=True)
    await server.wait()
    sessions = (
        f" and {server.generation.sessions_opened} generation sessions"
        if server.generation is not None
        else ""
    )
    print(f"splitnet-cloud stopped after {server.service.served} requests{sessions}", flush=True)
    return 0


def _ray_main(argv: Sequence[str]) -> int:
    """``splitnet-cloud ray ...``; returns the exit status."""
    try:
        from cloud.ray_serve import RayServeConfig, banner, deploy, shutdown
    except ImportError:  # pragma: no cover - the ray extra is missing
        print("splitnet-cloud ray: error: Ray is not installed: pip install 'splitnet[ray]'",
              file=sys.stderr)  # fmt: skip
        return 2
    args = build_ray_parser().parse_args(argv)
    _logging(args.verbose)
    try:
        server = ServerConfig(
            models=models_from_args(args),
            tokens=load_tokens(args.token_file),
            **config_values(args, ServerConfig, skip=_RAY_SERVER_SKIP),
        )
        config = RayServeConfig(
            server=server,
            autoscale=args.autoscale,
            **config_values(args, RayServeConfig, skip=_RAY_SKIP),
        )
        deploy(config)
    except (SplitNetError, ValueError, OSError) as e:
        print(f"splitnet-cloud ray: error: {e}", file=sys.stderr)
        return 2
    print(banner(config), flush=True)
    if config.address is not None:  # deployed on a cluster: it keeps serving without us
        print("deployed; remove it with: serve shutdown (or serve delete splitnet)", flush=True)
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    shutdown()
    print("splitnet-cloud ray stopped", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
