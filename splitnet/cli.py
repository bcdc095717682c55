"""The ``splitnet`` command: train, eval, cuts, certs and export.

splitnet train digits-cnn --out digits.safetensors
splitnet eval digits-cnn --weights digits.safetensors [--codecs raw,int8+zstd:1]
splitnet cuts torchvision:resnet18 [--codecs ...] [--json]
splitnet certs --out certs/ [--force]
splitnet export digits-cnn --weights digits.safetensors --cut pool1 --out bundle [--encrypt key]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch

from splitnet import __version__
from splitnet.codecs import parse_codec
from splitnet.errors import SplitNetError
from splitnet.examples import example_input
from splitnet.llm.models import is_llm_name
from splitnet.models import fingerprint, load_model, resolve, save_weights, untrained_warning
from splitnet.partition import trace
from splitnet.report import codec_accuracy, cut_table, format_table

__all__ = ["main"]

DEFAULT_CODECS = "raw,zstd:1,fp16,int8,int8+zstd:1"
DESCRIPTION = (
    "Train, evaluate and inspect models for split inference, export a device's half, and "
    "make test certificates."
)
EPILOG = """examples:
  splitnet train digits-cnn --out digits.safetensors
  splitnet eval digits-cnn --weights digits.safetensors --codecs raw,int8+zstd:1
  splitnet cuts torchvision:resnet18 --json
  splitnet certs --out certs/
  splitnet export digits-cnn --weights digits.safetensors --cut pool1 --out bundle

The halves run with splitnet-cloud (the server) and splitnet-edge (the device)."""


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid shape {text!r}: give dimensions like 1,3,224,224"
        ) from None
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"invalid shape {text!r}: dimensions must be positive")
    return shape


def parse_codecs(text: str) -> list[str]:
    """``"raw,int8+zstd:1"`` -> canonical codec names (validated)."""
    try:
        return [str(parse_codec(c)) for c in text.split(",") if c.strip()]
    except SplitNetError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    p = argparse.ArgumentParser(
        prog="splitnet",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.add_argument("--version", action="version", version=f"splitnet {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,eval,cuts,certs,export}")

    t = sub.add_parser("train", help="train a model on the digits data set")
    t.add_argument("model", help="digits-cnn, or your own package.module:callable")
    t.add_argument("--out", required=True, help="where to write the weights (.safetensors)")
    t.add_argument("--epochs", type=int, default=40)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--input-shape", type=parse_shape, default=None)
    t.add_argument(
        "--native",
        action="store_true",
        help="train in this process with this CPU's fastest kernels: the same weights only "
        "on the same machine and torch build (default: the same on any x86-64 machine)",
    )

    e = sub.add_parser("eval", help="test accuracy, whole or per cut and codec")
    e.add_argument("model")
    e.add_argument("--weights", required=True, help="a .safetensors file from splitnet train")
    e.add_argument(
        "--codecs",
        type=parse_codecs,
        default=None,
        help=f"report every cut with these codecs (e.g. {DEFAULT_CODECS})",
    )
    e.add_argument("--cuts", default=None, help="comma-separated cut names (default: all)")
    e.add_argument("--seed", type=int, default=0, help="data split seed")
    e.add_argument("--input-shape", type=parse_shape, default=None)
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")

    c = sub.add_parser("cuts", help="list every cut: frontier, bytes per codec, parameters")
    c.add_argument(
        "model",
        help="digits-cnn, torchvision:NAME, package.module:callable, or a language model: "
        "smollm2, hf:DIR, tiny:llama",
    )
    c.add_argument("--weights", default=None)
    c.add_argument(
        "--input-shape",
        type=parse_shape,
        default=None,
        help="example input shape, e.g. 1,3,224,224 (default: the model's)",
    )
    c.add_argument("--codecs", type=parse_codecs, default=parse_codecs(DEFAULT_CODECS))
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    k = sub.add_parser("certs", help="make a local test CA with server and client certificates")
    k.add_argument("--out", required=True, help="folder for ca.pem, server.pem/key, client.pem/key")
    k.add_argument(
        "--hosts",
        default="localhost,127.0.0.1,::1",
        help="names and addresses the server certificate is valid for",
    )
    k.add_argument("--days", type=int, default=365)
    k.add_argument(
        "--force", action="store_true", help="replace certificates and keys already in --out"
    )
    x = sub.add_parser("export", help="write an edge bundle: only the head's weights, for a device")
    x.add_argument(
        "model",
        help="digits-cnn, torchvision:NAME, package.module:callable, or a language model "
        "(smollm2, hf:DIR, tiny:llama) with --cut block.K or block.K:block.M",
    )
    x.add_argument("--weights", default=None, help="the weights to export (default: the model's)")
    x.add_argument("--input-shape", type=parse_shape, default=None)
    x.add_argument(
        "--cut", required=True, help="deepest cut the device may run (it serves every earlier one)"
    )
    x.add_argument("--out", required=True, help="folder for manifest.json and the weights")
    x.add_argument("--tail", action="store_true", help="also write the tail, for the cloud")
    x.add_argument(
        "--whole", action="store_true", help="also write every weight (lets the device fall back)"
    )
    x.add_argument(
        "--encrypt",
        metavar="KEYFILE",
        default=None,
        help="encrypt with AES-256-GCM under the key in KEYFILE (64 hex digits; made if missing)",
    )
    x.add_argument(
        "--codecs",
        type=parse_codecs,
        default=None,
        help="codecs the device may send (default raw,zstd:1,int8+zstd:1; for a language "
        "model raw,fp16,bf16,int8o:4)",
    )
    x.add_argument("--force", action="store_true", help="replace a bundle already in --out")
    return p


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from splitnet.bundle import export_bundle, new_key, read_key

    key = None
    if args.encrypt is not None:
        made = not Path(args.encrypt).exists()
        key = new_key(args.encrypt) if made else read_key(args.encrypt)
        if made:
            print(f"wrote a new key to {args.encrypt}: keep it off the device's disk")
    from splitnet.llm.models import is_llm_name

    if is_llm_name(args.model):
        return _export_lm(args, key)
    m = export_bundle(
        args.model,
        args.out,
        cut=args.cut,
        weights=args.weights,
        input_shape=args.input_shape,
        codecs=args.codecs or parse_codecs("raw,zstd:1,int8+zstd:1"),
        tail=args.tail,
        whole=args.whole,
        key=key,
        force=args.force,
    )
    parts = ", ".join(
        f"{name} {p['params']:,} parameters ({p['bytes'] / 2**20:.2f} MiB)"
        for name, p in m["parts"].items()
    )
    print(
        f"wrote {args.out}: {m['model']['name']} up to cut {m['split']['cut']} "
        f"({len(m['split']['cuts'])} cuts), {parts}, fingerprint "
        f"{m['model']['fingerprint'][:16]}{', encrypted' if key else ''}"
    )
    return 0


def _export_lm(args: argparse.Namespace, key: bytes | None) -> int:
    """``splitnet export smollm2 --cut block.15``: the edge half of a block cut."""
    from splitnet.llm.bundle import export_lm_bundle

    for flag, given in (("--weights", args.weights), ("--input-shape", args.input_shape),
                        ("--tail", args.tail), ("--whole", args.whole)):  # fmt: skip
        if given:
            raise SplitNetError(
                f"{flag} is not for language models: the name says which weights "
                "(hf:DIR), and a bundle holds the edge half only"
            )
    m = export_lm_bundle(args.model, args.out, cut=args.cut, codecs=args.codecs, key=key,
                         force=args.force)  # fmt: skip
    part = m["parts"]["edge"]
    blocks = " and ".join(f"[{a}, {b})" for a, b in m["split"]["edge_blocks"] if b > a) or "none"
    tok = m["tokenizer"]
    print(
        f"wrote {args.out}: {m['model']['name']} at cut {m['split']['cut']}, edge "
        f"{part['params']:,} parameters ({part['bytes'] / 2**20:.2f} MiB; blocks {blocks} of "
        f"{m['model']['num_layers']}), "
        + (f"tokenizer ({len(tok['files'])} files), " if tok else "no tokenizer, ")
        + f"fingerprint {m['model']['fingerprint'][:16]}{', encrypted' if key else ''}"
    )
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from splitnet.certs import make_certs

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    paths = make_certs(args.out, hosts=hosts, days=args.days, overwrite=args.force)
    print(
        f"wrote {paths.ca}, {paths.server_cert} (+ key, valid for {', '.join(hosts)}) and "
        f"{paths.client_cert} (+ key), valid {args.days} days"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from splitnet.training import TrainConfig, train_digits, train_portable

    spec = resolve(args.model, args.input_shape)
    if spec.input_shape[1:] != (1, 8, 8):
        raise SplitNetError(
            f"{args.model} takes input {spec.input_shape}; training uses the 1x8x8 digits data "
            "(give --input-shape 1,1,8,8 for your own digits model)"
        )
    config = TrainConfig(epochs=args.epochs, seed=args.seed)
    with tqdm(total=args.epochs, desc="train", unit="epoch", file=sys.stderr) as bar:

        def progress(epoch: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)

        if args.native:
            model = load_model(args.model, input_shape=spec.input_shape).train()
            result: dict[str, Any] = dict(train_digits(model, config, progress=progress))
            save_weights(model, args.out)
            result["fingerprint"] = fingerprint(model)
        else:
            result = dict(
                train_portable(
                    args.model, args.out, config, input_shape=spec.input_shape, progress=progress
                )
            )
    print(f"test accuracy {result['test']:.2%} (validation {result['val']:.2%})")
    print(f"saved {args.out} (fingerprint {str(result['fingerprint'])[:16]})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from splitnet.data import load_digits
    from splitnet.training import accuracy

    model = load_model(args.model, args.weights, input_shape=args.input_shape)
    test = load_digits(args.seed)["test"]
    if args.codecs is None:
        acc = accuracy(model, test)
        if args.json:
            print(json.dumps({"model": args.model, "test_accuracy": acc, "n": len(test)}))
        else:
            print(f"{args.model}: test accuracy {acc:.2%} on {len(test)} images")
        return 0
    graph = trace(model, (test.x[:1],))
    cuts = [graph.cut(n.strip()) for n in args.cuts.split(",")] if args.cuts else None
    rows = codec_accuracy(model, graph, test, args.codecs, cuts)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    base = rows[0]["model_accuracy"] if rows else 0.0
    print(
        f"{args.model}: unsplit test accuracy {base:.2%} on {len(test)} images; each image "
        "encoded on its own. Cells: top-1 % (agreement with the unsplit model %, "
        "compression vs float32)"
    )
    by = {(r["cut"], r["codec"]): r for r in rows}
    names = list(dict.fromkeys(r["cut"] for r in rows))
    table = [
        [cut]
        + [
            f"{100 * by[(cut, c)]['accuracy']:.2f} ({100 * by[(cut, c)]['agreement']:.1f}, "
            f"{by[(cut, c)]['ratio']:.1f}x)"
            for c in args.codecs
        ]
        for cut in names
    ]
    print(format_table(table, ["cut", *args.codecs]))
    worst = {c: min(by[(cut, c)]["accuracy"] for cut in names) for c in args.codecs}
    print(
        "largest drop in top-1 vs unsplit (points): "
        + ", ".join(f"{c} {100 * (base - w):.2f}" for c, w in worst.items())
    )
    return 0


def warn_untrained(command: str, model: str, weights: str | None) -> None:
    """Say on stderr, in one line, that ``model`` runs untrained (if it does)."""
    message = untrained_warning(model, weights)
    if message is not None:
        print(f"splitnet {command}: warning: {message}", file=sys.stderr)


def cmd_cuts(args: argparse.Namespace) -> int:
    if is_llm_name(args.model):
        return _llm_cuts(args)
    spec = resolve(args.model, args.input_shape)
    warn_untrained("cuts", args.model, args.weights)
    model = load_model(args.model, args.weights, input_shape=spec.input_shape)
    x = example_input(spec)
    graph = trace(model, (x,))
    rows = cut_table(graph, x, args.codecs)
    if args.json:
        doc: dict[str, Any] = {
            "model": args.model,
            "input_shape": list(spec.input_shape),
            "fingerprint": fingerprint(model),
            "trace": graph.method,
            "cuts": rows,
        }
        print(json.dumps(doc, indent=2))
        return 0
    print(
        f"{args.model}: {len(rows)} cuts, input {list(spec.input_shape)}, "
        f"traced with {graph.method}; bytes are whole wire messages for one real input"
    )
    header = [
        "cut",
        "n",
        "shapes",
        "float32 B",
        *[f"{c} B" for c in args.codecs],
        "head params",
        "tail params",
    ]
    table = [
        [
            r["cut"],
            r["tensors"],
            _shapes(r["shapes"]),
            r["float32_bytes"],
            *[r["bytes"][c] for c in args.codecs],
            r["head_params"],
            r["tail_params"],
        ]
        for r in rows
    ]
    print(format_table(table, header))
    return 0


def _llm_cuts(args: argparse.Namespace) -> int:
    """``splitnet cuts smollm2``: block cuts, parameters and bytes per token per codec."""
    from splitnet.llm import load_lm
    from splitnet.llm.table import LLM_CODECS, llm_cut_rows

    codecs = list(LLM_CODECS) if args.codecs == parse_codecs(DEFAULT_CODECS) else args.codecs
    lm = load_lm(args.model)
    rows = llm_cut_rows(lm, codecs)
    if args.json:
        doc = {"model": args.model, "num_layers": lm.num_layers, "hidden_size": lm.hidden_size,
               "tied_embeddings": lm.tied_embeddings, "cuts": rows}  # fmt: skip
        print(json.dumps(doc, indent=2))
        return 0
    tied = ", tied embeddings (both sides hold the matrix at block.K)" if lm.tied_embeddings else ""
    print(
        f"{args.model}: {lm.num_layers} blocks, hidden {lm.hidden_size}{tied}; block.K sends a "
        "hidden vector up and gets a token id back; bytes are one token's wire message. "
        "U-shaped block.K:block.M also runs blocks [M, n) and the LM head on the edge; "
        "input runs everything in the cloud and sends token ids (no codec applies)."
    )
    header = ["cut", "edge params", "cloud params", "edge KV B/token", "cloud KV B/token",
              *[f"{c} B/token" for c in rows[0]["bytes_per_token"]]]  # fmt: skip
    table = [
        [r["cut"], r["edge_params"], r["cloud_params"], r["edge_kv_bytes_per_token"],
         r["cloud_kv_bytes_per_token"], *r["bytes_per_token"].values()]  # fmt: skip
        for r in rows
    ]
    print(format_table(table, header))
    return 0


def _shapes(shapes: list[list[int]]) -> str:
    return " ".join("x".join(str(d) for d in s) for s in shapes)


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "cuts": cmd_cuts,
    "certs": cmd_certs,
    "export": cmd_export,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    torch.set_grad_enabled(args.command == "train")  # the other commands never train
    try:
        return COMMANDS[args.command](args)
    except SplitNetError as e:
        print(f"splitnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
