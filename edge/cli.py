r"""``splitnet-edge``: run a split model against a splitnet server and report.

Commands are registered in ``COMMANDS`` (name -> ``Command``); each adds its own flags
and runs with the parsed arguments. ``add_connection_arguments`` and ``edge_config``
give every command the same server, model, security and retry flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc loads: no C-core log lines

import numpy as np  # noqa: E402
import torch  # noqa: E402

from edge.client import EdgeClient, InferResult  # noqa: E402
from edge.config import EdgeConfig  # noqa: E402
from edge.generate_cli import add_generate_arguments, cmd_generate  # noqa: E402
from edge.inputs import load_input  # noqa: E402
from splitnet import __version__  # noqa: E402
from splitnet.cli import parse_shape  # noqa: E402
from splitnet.errors import SplitNetError  # noqa: E402
from splitnet.models import resolve  # noqa: E402

__all__ = ["COMMANDS", "Command", "add_connection_arguments", "edge_config", "main"]

EXAMPLES = """\
examples:
  splitnet-edge run --server 127.0.0.1:50051 --model digits-cnn --weights w.safetensors \\
      --cut pool1 --codec int8+zstd:1
  splitnet-edge run --server HOST:PORT --model digits-cnn --weights w.safetensors --cut auto
  splitnet-edge run --server HOST:PORT --model digits-cnn --weights w.safetensors digit.png x.npy
  splitnet-edge run --server HOST:443 --tls-ca ca.pem --token-file token ...
  splitnet-edge run --server HOST:PORT --bundle bundle/ --bundle-key key --cut pool1
  splitnet-edge generate --server HOST:PORT --model smollm2 --cut block.15 \\
      --prompt "What is the capital of France?" --max-new-tokens 32

Exit status: 0 done; 2 with one line saying what went wrong (the command, a file, the
server's answer, or a server that stayed unreachable); 130 interrupted.
"""

COMPONENTS = [
    ("edge compute", "edge_ms"),
    ("encode", "encode_ms"),
    ("network", "network_ms"),
    ("cloud queue", "queue_ms"),
    ("cloud decode", "server_decode_ms"),
    ("cloud compute", "cloud_ms"),
    ("cloud encode", "server_encode_ms"),
    ("decode", "decode_ms"),
    ("total", "total_ms"),
]
LOCAL_COMPONENTS = {"edge compute", "total"}  # what a run on the device measures


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, its flags, and what it runs."""

    help: str  # one line, shown in ``splitnet-edge --help``
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""  # longer text for ``splitnet-edge COMMAND --help``


# ------------------------------------------------------------ shared flags


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    """The flags every command that talks to a server takes."""
    g = p.add_argument_group("server and model")
    g.add_argument("--server", required=True, help="HOST:PORT of splitnet-cloud")
    g.add_argument(
        "--model", default=None, help="model name, as the server serves it (or give --bundle)"
    )
    g.add_argument("--weights", default=None, help="the same weights file the server loaded")
    g.add_argument(
        "--bundle",
        default=None,
        help="an edge bundle from `splitnet export` instead of --model/--weights: "
        "only the head's weights are loaded",
    )
    g.add_argument(
        "--bundle-key",
        metavar="KEYFILE",
        default=None,
        help="key of an encrypted bundle (64 hex digits); $SPLITNET_BUNDLE_KEY otherwise",
    )
    g.add_argument(
        "--input-shape",
        type=parse_shape,
        default=None,
        help="input shape with batch, e.g. 1,3,224,224 (needed for pkg.module:callable models)",
    )
    r = p.add_argument_group("deadlines and retries")
    r.add_argument("--deadline", type=float, default=10.0, help="seconds per request (default 10)")
    r.add_argument(
        "--retries",
        type=int,
        default=5,
        help="further attempts when the server is unreachable or full (default 5), "
        "with exponential backoff and jitter",
    )
    s = p.add_argument_group("security")
    s.add_argument("--tls-ca", default=None, help="CA that signed the server certificate: TLS")
    s.add_argument("--tls-cert", default=None, help="client certificate, for mutual TLS")
    s.add_argument("--tls-key", default=None, help="client private key, for mutual TLS")
    s.add_argument(
        "--token-file",
        default=None,
        help="bearer token for the server (first line of the file); "
        "$SPLITNET_TOKEN is used when this is not given",
    )


def edge_config(args: argparse.Namespace, **fields: Any) -> EdgeConfig:
    """The ``EdgeConfig`` the shared flags ask for (plus ``fields``); files are checked
    here, so a mistake is one line before anything is loaded.
    """
    for flag in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            raise SplitNetError(f"--{flag.replace('_', '-')} {path}: no such file")
    if args.model is None and args.bundle is None:
        raise SplitNetError("give --model (with --weights) or --bundle")
    if args.bundle is not None and args.weights is not None:
        raise SplitNetError("give --weights or --bundle, not both: a bundle carries its weights")
    key = None
    if args.bundle is not None:
        from splitnet.bundle import read_key

        key = read_key(args.bundle_key)
    return EdgeConfig(
        weights=args.weights,
        bundle=args.bundle,
        bundle_key=key,
        input_shape=args.input_shape,
        deadline_s=args.deadline,
        retries=args.retries,
        retry_busy=True,  # the server's RESOURCE_EXHAUSTED says "retry": we do, with backoff
        token=read_token(args.token_file),
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        **fields,
    )


def read_token(path: str | None) -> str | None:
    """The bearer token: the first non-empty line of ``path``, else ``$SPLITNET_TOKEN``."""
    if path is None:
        return os.environ.get("SPLITNET_TOKEN", "").strip() or None
    file = Path(path)
    if not file.is_file():
        raise SplitNetError(f"--token-file {path}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SplitNetError(f"--token-file {path}: cannot read it ({e})") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise SplitNetError(f"token file {path} is empty")
    return lines[0]


# ------------------------------------------------------------------- run


def _add_run_arguments(r: argparse.ArgumentParser) -> None:
    r.add_argument("inputs", nargs="*", help=".npy, .pt or .png files (default: digits test set)")
    add_connection_arguments(r)
    c = r.add_argument_group("the split")
    c.add_argument(
        "--cut",
        default="input",
        help="where to cut (see `splitnet cuts MODEL`; default input: all in the cloud), or "
        "auto: planned from measurements and re-planned as the link changes",
    )
    c.add_argument("--codec", default="raw", help="frontier codec, e.g. int8+zstd:1 (default raw)")
    c.add_argument(
        "--accuracy-budget",
        type=float,
        default=0.005,
        help="cut auto: largest top-1 agreement loss allowed for a lossy codec (default 0.005)",
    )
    c.add_argument(
        "--edge-slowdown",
        type=float,
        default=1.0,
        help="emulate a device F times slower than this machine (stretches edge compute)",
    )
    c.add_argument(
        "--fallback",
        choices=["error", "local"],
        default="error",
        help="when the cloud is unreachable: fail (default), or run the whole model here",
    )
    o = r.add_argument_group("output")
    o.add_argument("--limit", type=int, default=None, help="use only the first N test images")
    o.add_argument("--json", action="store_true", help="print a JSON summary")


def cmd_run(args: argparse.Namespace) -> int:
    """``splitnet-edge run``."""
    if args.limit is not None and args.limit < 1:
        raise SplitNetError("--limit must be at least 1")
    config = edge_config(
        args,
        cut=args.cut,
        codec=args.codec,
        fallback=args.fallback,
        accuracy_budget=args.accuracy_budget,
        edge_slowdown=args.edge_slowdown,
    )
    if config.bundle is not None:  # the manifest says what the model is (and checks the key)
        from splitnet.bundle import Bundle

        bundle = Bundle.open(config.bundle, config.bundle_key)
        args.model = args.model or bundle.model_name
        shape = bundle.input_shape
    else:
        shape = resolve(args.model, args.input_shape).input_shape
    labels: torch.Tensor | None = None
    if args.inputs:  # read before anything is loaded: a bad file costs nothing
        xs = [load_input(Path(p), shape) for p in args.inputs]
    else:
        from splitnet.data import load_digits

        if shape[1:] != (1, 8, 8):
            raise SplitNetError(f"{args.model} does not take digits: give input files")
        test = load_digits()["test"]
        n = len(test) if args.limit is None else min(args.limit, len(test))
        xs = [test.x[i : i + 1] for i in range(n)]
        labels = test.y[:n]
    with EdgeClient(args.server, args.model, config=config) as client:
        local: list[torch.Tensor] | None = None  # a device with only heads cannot compare
        if client.device.can_run_whole:
            with torch.no_grad():
                local = [client.model(x).argmax(dim=1) for x in xs]
        t0 = time.perf_counter()
        results = list(client.infer_many(xs))
        elapsed = time.perf_counter() - t0
    summary = _summary(args, client, results, local, labels, elapsed)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print("\n".join(_report(summary)))
    return 0


def _summary(
    args: argparse.Namespace,
    client: EdgeClient,
    results: Sequence[InferResult],
    local: Sequence[torch.Tensor] | None,
    labels: torch.Tensor | None,
    elapsed: float,
) -> dict[str, Any]:
    preds = [r.output.argmax(dim=1) for r in results]
    remote = [r for r in results if r.cut != "output"]
    summary: dict[str, Any] = {
        "server": args.server,
        "model": args.model,
        "cut": client.cut,
        "codec": client.codec if client.cut != "output" else "none",
        "requests": len(results),
        "remote": len(remote),  # answered by the server
        "fallbacks": sum(r.fallback for r in results),
        "agreement": (
            float(np.mean([bool(torch.equal(p, q)) for p, q in zip(preds, local, strict=True)]))
            if local is not None
            else None
        ),
        "throughput_per_s": len(results) / elapsed if elapsed > 0 else 0.0,
        "bytes_sent_mean": statistics.fmean(r.timing.bytes_sent for r in remote) if remote else 0,
        "batch_size_mean": statistics.fmean(r.timing.batch_size for r in remote) if remote else 0,
        "latency_ms": _percentiles(results, remote),
    }
    if client.auto is not None:
        summary["plans"] = [
            {
                "from_request": i,
                "cut": p.cut,
                "codec": p.codec,
                "predicted_ms": p.total_ms,
                "breakdown": p.describe(),
                "why": why,
            }
            for i, p, why in client.auto.history
        ]
        est = client.auto.estimator
        summary["link_estimate"] = {
            "up_mbit": est.up_mbit,
            "rtt_ms": est.rtt_ms,
            "queue_ms": est.queue_ms,
        }
    if client.device.source != "weights":
        summary["bundle"] = client.device.source.removeprefix("bundle ")
    if labels is not None:
        summary["accuracy"] = float((torch.cat(preds) == labels).float().mean())
        if local is not None:
            summary["local_accuracy"] = float((torch.cat(list(local)) == labels).float().mean())
    else:
        summary["predictions"] = [p.tolist() for p in preds]
    return summary


def _percentiles(
    results: Sequence[InferResult], remote: Sequence[InferResult]
) -> dict[str, dict[str, float]]:
    out = {}
    for label, attr in COMPONENTS:
        rows = results if label in LOCAL_COMPONENTS else remote  # local runs have no network
        values = sorted(getattr(r.timing, attr) for r in rows)
        if not values:
            continue
        out[label] = {
            "p50": statistics.median(values),
            "p90": values[min(len(values) - 1, int(0.9 * len(values)))],
        }
    return out


def _report(s: dict[str, Any]) -> list[str]:
    """The human summary of a run."""
    where = "all on the device" if s["cut"] == "output" else f"cut {s['cut']} codec {s['codec']}"
    n, remote = s["requests"], s["remote"]
    if remote:
        first = (
            f"{s['model']} {where} via {s['server']}: {n} requests, "
            f"{s['throughput_per_s']:.1f}/s, {s['bytes_sent_mean']:.0f} B sent per request, "
            f"mean server batch {s['batch_size_mean']:.2f}"
        )
        if remote < n:
            first += f"; {n - remote} ran on this device"
    else:
        why = "the cloud was unreachable" if s["fallbacks"] else "the plan keeps it all here"
        first = (
            f"{s['model']} all on this device ({why}): {n} requests, "
            f"{s['throughput_per_s']:.1f}/s, nothing sent"
        )
    lines = [first]
    agree = (
        f"agreement with local {s['agreement']:.2%}"
        if s["agreement"] is not None
        else "only the head is here (bundle): no local comparison"
    )
    if "accuracy" in s:
        local = f" (local model {s['local_accuracy']:.2%})" if "local_accuracy" in s else ""
        lines.append(f"accuracy {s['accuracy']:.2%}{local}, {agree}")
    else:
        lines.append(f"predictions {s['predictions']}; {agree}")
    for plan in s.get("plans", []):
        lines.append(f"plan from request {plan['from_request']}: {plan['breakdown']}")
    if "link_estimate" in s:
        le = s["link_estimate"]
        lines.append(
            f"link estimate: uplink {le['up_mbit']:.2f} Mbit/s, fixed cost per request "
            f"{le['rtt_ms']:.2f} ms, queue {le['queue_ms']:.2f} ms"
        )
    if s["fallbacks"]:
        lines.append(f"{s['fallbacks']} requests ran on this device (cloud unreachable)")
    lines.append("latency (ms)      p50      p90")
    for label, v in s["latency_ms"].items():
        lines.append(f"  {label:<14}{v['p50']:>7.2f}  {v['p90']:>7.2f}")
    return lines


COMMANDS: dict[str, Command] = {
    "run": Command(
        help="run inputs (default: the digits test set) through the split and report",
        add_arguments=_add_run_arguments,
        run=cmd_run,
        description="Run inputs through the head here and the tail on the server; print "
        "accuracy (digits test set) or predictions (files), agreement with the whole model "
        "run here, throughput, and the latency breakdown (p50, p90).",
    ),
    "generate": Command(
        help="generate text with a language model split between here and the server",
        add_arguments=add_generate_arguments,
        run=cmd_generate,
        description="Split text generation: the edge runs the embeddings and the first "
        "blocks (and, U-shaped, the last blocks and the LM head), the server the rest; one "
        "session with a KV cache on each side. Streams the text, then prints time to first "
        "token, tokens/s, bytes per token and the per-token breakdown.",
    ),
}


# ------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subparser per entry of ``COMMANDS``."""
    p = argparse.ArgumentParser(
        prog="splitnet-edge",
        description="Run a model's head on this device and its tail on a splitnet server.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"splitnet-edge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        c = sub.add_parser(
            name,
            help=command.help,
            description=command.description or command.help,
            epilog=EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        c.add_argument("-v", "--verbose", action="store_true", help="log what the client does")
        command.add_arguments(c)
        c.set_defaults(handler=command.run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        status: int = args.handler(args)
        return status
    except SplitNetError as e:
        print(f"splitnet-edge: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def entry() -> NoReturn:
    """The ``splitnet-edge`` command: ``main()``, then leave without interpreter teardown.

    Once the output is flushed and the client closed, nothing is left to do; tearing
    down gRPC's and torch's C++ threads at interpreter exit sometimes aborted an
    otherwise finished run ("terminate called without an active exception", exit -6).
    """
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":  # pragma: no cover
    entry()
