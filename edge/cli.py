r"""``splitnet-edge run``: run a split model against a splitnet server and report.

splitnet-edge run --server 127.0.0.1:50051 --model digits-cnn --weights w.safetensors \\
        --cut pool1 --codec int8+zstd:1
splitnet-edge run --server ... --model digits-cnn --weights w.safetensors digit.png x.npy
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge.client import EdgeClient, InferResult
from splitnet.cli import parse_shape
from splitnet.errors import SplitNetError

__all__ = ["main"]

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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(prog="splitnet-edge", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run inputs (default: the digits test set) through the split")
    r.add_argument("inputs", nargs="*", help=".npy, .pt or .png files (default: digits test set)")
    r.add_argument("--server", required=True, help="HOST:PORT of splitnet-cloud")
    r.add_argument("--model", required=True, help="model name, as the server serves it")
    r.add_argument("--weights", default=None, help="the same weights the server loaded")
    r.add_argument(
        "--input-shape",
        type=parse_shape,
        default=None,
        help="input shape with batch, e.g. 1,3,224,224 (needed for pkg.module:callable models)",
    )
    r.add_argument(
        "--cut",
        default="input",
        help="where to cut (see `splitnet cuts MODEL`), or auto: planned from "
        "measurements and re-planned as the link changes",
    )
    r.add_argument("--codec", default="raw", help="frontier codec, e.g. int8+zstd:1")
    r.add_argument("--limit", type=int, default=None, help="use only the first N test images")
    r.add_argument("--deadline", type=float, default=10.0, help="seconds per request")
    r.add_argument(
        "--fallback",
        choices=["error", "local"],
        default="error",
        help="when the cloud is unreachable: fail, or run the whole model here",
    )
    r.add_argument(
        "--accuracy-budget",
        type=float,
        default=0.005,
        help="cut auto: largest top-1 agreement loss allowed for a lossy codec",
    )
    r.add_argument(
        "--edge-slowdown",
        type=float,
        default=1.0,
        help="emulate a device F times slower than this machine (stretches edge compute)",
    )
    r.add_argument("--tls-ca", default=None, help="CA that signed the server certificate: TLS")
    r.add_argument("--tls-cert", default=None, help="client certificate, for mutual TLS")
    r.add_argument("--tls-key", default=None, help="client private key, for mutual TLS")
    r.add_argument(
        "--token-file",
        default=None,
        help="bearer token for the server (first line of the file); "
        "$SPLITNET_TOKEN is used when this is not given",
    )
    r.add_argument("--json", action="store_true", help="print a JSON summary")
    r.add_argument("-v", "--verbose", action="store_true")
    return p


def load_input(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    """Read one input file as a batch of the model's input shape."""
    if path.suffix == ".npy":
        x = torch.from_numpy(np.load(path, allow_pickle=False)).float()
    elif path.suffix == ".pt":
        x = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(x, torch.Tensor):
            raise SplitNetError(f"{path} holds {type(x).__name__}, not a tensor")
        x = x.float()
    elif path.suffix == ".png":
        try:
            from PIL import Image
        except ImportError as e:
            raise SplitNetError("reading .png needs Pillow: pip install pillow") from e
        c, h, w = shape[1:]
        img = Image.open(path).convert("L" if c == 1 else "RGB").resize((w, h))
        arr = np.asarray(img, dtype=np.float32) / 255.0
        if c == 1 and arr.mean() > 0.5:  # dark ink on light paper: invert, as in the data set
            arr = 1.0 - arr
        x = torch.from_numpy(arr).reshape(1, h, w, c).permute(0, 3, 1, 2).contiguous()
    else:
        raise SplitNetError(f"{path}: unsupported input type (use .npy, .pt or .png)")
    if tuple(x.shape[1:]) != tuple(shape[1:]):
        x = x.reshape(-1, *shape[1:]) if x.numel() % int(np.prod(shape[1:])) == 0 else x
    if tuple(x.shape[1:]) != tuple(shape[1:]):
        raise SplitNetError(f"{path}: shape {list(x.shape)} does not fit the input {list(shape)}")
    return x


def _token(path: str | None) -> str | None:
    if path is not None:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
        if not lines:
            raise SplitNetError(f"token file {path} is empty")
        return lines[0]
    return os.environ.get("SPLITNET_TOKEN") or None


def _percentiles(results: Sequence[InferResult]) -> dict[str, dict[str, float]]:
    out = {}
    for label, attr in COMPONENTS:
        values = sorted(getattr(r.timing, attr) for r in results)
        if not values:
            continue
        out[label] = {
            "p50": statistics.median(values),
            "p90": values[min(len(values) - 1, int(0.9 * len(values)))],
        }
    return out


def cmd_run(args: argparse.Namespace) -> int:
    with EdgeClient(
        args.server,
        args.model,
        weights=args.weights,
        input_shape=args.input_shape,
        cut=args.cut,
        codec=args.codec,
        deadline_s=args.deadline,
        fallback=args.fallback,
        accuracy_budget=args.accuracy_budget,
        edge_slowdown=args.edge_slowdown,
        token=_token(args.token_file),
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    ) as client:
        labels: torch.Tensor | None = None
        if args.inputs:
            xs = [load_input(Path(p), client.input_shape) for p in args.inputs]
        else:
            from splitnet.data import load_digits

            if client.input_shape[1:] != (1, 8, 8):
                raise SplitNetError(f"{args.model} does not take digits: give input files")
            test = load_digits()["test"]
            n = len(test) if args.limit is None else min(args.limit, len(test))
            xs = [test.x[i : i + 1] for i in range(n)]
            labels = test.y[:n]
        with torch.no_grad():
            local = [client.model(x).argmax(dim=1) for x in xs]
        t0 = time.perf_counter()
        results = list(client.infer_many(xs))
        elapsed = time.perf_counter() - t0
    preds = [r.output.argmax(dim=1) for r in results]
    summary: dict[str, Any] = {
        "server": args.server,
        "model": args.model,
        "cut": client.cut,
        "codec": client.codec,
        "requests": len(results),
        "fallbacks": sum(r.fallback for r in results),
        "agreement": float(
            np.mean([bool(torch.equal(p, q)) for p, q in zip(preds, local, strict=True)])
        ),
        "throughput_per_s": len(results) / elapsed if elapsed > 0 else 0.0,
        "bytes_sent_mean": statistics.fmean(r.timing.bytes_sent for r in results) if results else 0,
        "batch_size_mean": statistics.fmean(r.timing.batch_size for r in results) if results else 0,
        "latency_ms": _percentiles(results),
    }
    if client.auto is not None:
        summary["plans"] = [
            {
                "from_request": i,
                "cut": p.cut,
                "codec": p.codec,
                "predicted_ms": p.total_ms,
                "breakdown": p.describe(),
            }
            for i, p in client.auto.history
        ]
        est = client.auto.estimator
        summary["link_estimate"] = {
            "up_mbit": est.up_mbit,
            "rtt_ms": est.rtt_ms,
            "queue_ms": est.queue_ms,
        }
    if labels is not None:
        pred = torch.cat(preds)
        summary["accuracy"] = float((pred == labels).float().mean())
        summary["local_accuracy"] = float((torch.cat(local) == labels).float().mean())
    else:
        summary["predictions"] = [p.tolist() for p in preds]
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"{summary['model']} cut {summary['cut']} codec {summary['codec']} via {args.server}: "
        f"{summary['requests']} requests, {summary['throughput_per_s']:.1f}/s, "
        f"{summary['bytes_sent_mean']:.0f} B sent per request, "
        f"mean server batch {summary['batch_size_mean']:.2f}"
    )
    if "accuracy" in summary:
        print(
            f"accuracy {summary['accuracy']:.2%} (local model {summary['local_accuracy']:.2%}), "
            f"agreement with local {summary['agreement']:.2%}"
        )
    else:
        print(
            f"predictions {summary['predictions']}; agreement with local {summary['agreement']:.2%}"
        )
    for plan in summary.get("plans", []):
        print(f"plan from request {plan['from_request']}: {plan['breakdown']}")
    if "link_estimate" in summary:
        le = summary["link_estimate"]
        print(
            f"link estimate: uplink {le['up_mbit']:.2f} Mbit/s, fixed cost per request "
            f"{le['rtt_ms']:.2f} ms, queue {le['queue_ms']:.2f} ms"
        )
    if summary["fallbacks"]:
        print(f"{summary['fallbacks']} requests ran locally (cloud unreachable)")
    print("latency (ms)      p50      p90")
    for label, v in summary["latency_ms"].items():
        print(f"  {label:<14}{v['p50']:>7.2f}  {v['p90']:>7.2f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return cmd_run(args)
    except SplitNetError as e:
        print(f"splitnet-edge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
