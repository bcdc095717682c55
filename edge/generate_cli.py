r"""``splitnet-edge generate``: split text generation with a splitnet server.

splitnet-edge generate --server 127.0.0.1:50051 --model smollm2 --cut block.15 \\
    --prompt "What is the capital of France?" --max-new-tokens 32

Streams the text as it is generated, then prints time to first token, tokens/s, bytes
per token and the mean per-token breakdown; with ``--json`` the last line is one JSON
object (``tokens``, timings, per-step figures).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from edge.generate_plan import add_plan_arguments
from splitnet.errors import SplitNetError

if TYPE_CHECKING:
    from edge.generate import Generator

__all__ = ["add_generate_arguments", "cmd_generate"]

BREAKDOWN = [
    ("edge", "edge_ms"),
    ("encode", "encode_ms"),
    ("network", "network_ms"),
    ("cloud queue", "queue_ms"),
    ("cloud compute", "compute_ms"),
    ("total", "total_ms"),
]


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``generate``."""
    g = p.add_argument_group("server, model and cut")
    g.add_argument("--server", required=True, help="HOST:PORT of splitnet-cloud")
    g.add_argument(
        "--model", default=None, help="language model, as served: smollm2, hf:DIR, tiny:llama "
        "(or give --bundle)",
    )  # fmt: skip
    g.add_argument(
        "--cut", default=None, help="block.K (the server samples) or U-shaped "
        "block.K:block.M (default block.1, or the bundle's cut); auto: planned, see the "
        "planning flags",
    )  # fmt: skip
    g.add_argument("--bundle", default=None, help="an edge bundle from `splitnet export`: only "
                   "the edge half's weights and the tokenizer are here")  # fmt: skip
    g.add_argument("--bundle-key", default=None, help="key file of an encrypted bundle "
                   "(64 hex digits); $SPLITNET_BUNDLE_KEY otherwise")  # fmt: skip
    g.add_argument(
        "--codec",
        default=None,
        help="hidden-state codec: raw (default), fp16, bf16, int8o[:K]; with "
        "--cut auto, the planner chooses among raw, fp16, int8o:8 unless given",
    )
    q = p.add_argument_group("prompt and sampling")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", default=None, help="prompt text (a chat turn when the model "
                     "has a chat template; see --no-chat)")  # fmt: skip
    src.add_argument("--prompt-ids", default=None, help="prompt token ids, e.g. 1,2,3")
    q.add_argument("--no-chat", action="store_true", help="tokenize --prompt as plain text")
    q.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (64)")
    q.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    q.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0)")
    q.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    q.add_argument("--chunk-tokens", type=int, default=None,
                   help="prefill tokens per message (default: the server's maximum)")  # fmt: skip
    q.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    r = p.add_argument_group("faults and security")
    r.add_argument(
        "--reconnects", type=int, default=5,
        help="new sessions after a broken stream (default 5), replaying the prefix",
    )  # fmt: skip
    r.add_argument("--tls-ca", default=None, help="CA that signed the server certificate: TLS")
    r.add_argument("--tls-cert", default=None, help="client certificate, for mutual TLS")
    r.add_argument("--tls-key", default=None, help="client private key, for mutual TLS")
    r.add_argument("--token-file", default=None, help="bearer token for the server (first line "
                   "of the file); $SPLITNET_TOKEN is used when this is not given")  # fmt: skip
    add_plan_arguments(p)
    p.add_argument("--json", action="store_true", help="end with one JSON line: tokens, timings")


def _prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise SplitNetError(f"--prompt-ids {text[:40]!r}: give integers like 1,2,3") from None
    if not ids or min(ids) < 0:
        raise SplitNetError("--prompt-ids: give at least one non-negative token id")
    return ids


def cmd_generate(args: argparse.Namespace) -> int:
    """Run ``generate``; returns the exit status."""
    from edge.cli import read_token
    from edge.generate import GenerateConfig, Generator

    prompt_ids = _prompt_ids(args.prompt_ids) if args.prompt_ids is not None else None
    model, cut, codec, key, lm = args.model, args.cut, args.codec or "raw", None, None
    if args.bundle is not None:  # the manifest names the model and cut (and checks the key)
        from splitnet.bundle import Bundle, read_key

        if cut == "auto":
            raise SplitNetError("--cut auto plans from the whole model: give --model, not --bundle")
        key = read_key(args.bundle_key)
        bundle = Bundle.open(args.bundle, key)
        model, cut = model or bundle.model_name, cut or bundle.cut
    elif model is None:
        raise SplitNetError("give --model or --bundle")
    cut = cut or "block.1"
    if cut == "auto":  # edge/generate_plan.py: time the model here, plan, print the plan
        from edge.generate_plan import choose_cut, measure_rtt_ms, server_profile
        from splitnet.llm import load_lm

        lm = load_lm(model)
        if prompt_ids is None:
            prompt_ids = lm.encode_text(args.prompt, chat=not args.no_chat)
        probe = GenerateConfig(
            model=model,
            cut="block.1",
            token=read_token(args.token_file),
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
        with Generator(args.server, probe, lm=lm) as gen:  # the server's profile, the RTT
            cloud = server_profile(gen.info(), lm)
            rtt = args.rtt_ms if args.rtt_ms is not None else measure_rtt_ms(gen.info)
        cut, codec, plan = choose_cut(args, lm, len(prompt_ids), rtt, cloud)
        print(plan, flush=True)
    config = GenerateConfig(
        model=model, cut=cut, codec=codec, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, chunk_tokens=args.chunk_tokens,
        stop_at_eos=not args.ignore_eos, reconnects=args.reconnects,
        token=read_token(args.token_file), tls_ca=args.tls_ca, tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )  # fmt: skip
    with Generator(args.server, config, lm=lm, bundle=args.bundle, bundle_key=key) as gen:
        if prompt_ids is None:
            prompt_ids = gen.encode(args.prompt, chat=not args.no_chat)
        vocab = gen.vocab_size
        if max(prompt_ids) >= vocab:
            raise SplitNetError(f"--prompt-ids: ids must be below the vocabulary size {vocab}")
        out = _Streamer(gen)
        result = gen.generate(prompt_ids, args.max_new_tokens, on_token=out.token)
    out.end()
    b = result.breakdown()
    print(
        f"{result.prompt_tokens} prompt tokens, {len(result.tokens)} generated at "
        f"{config.cut} ({config.codec}); time to first token {result.ttft_s * 1e3:.1f} ms, "
        f"{result.tokens_per_s:.1f} tokens/s, {result.bytes_per_token:,.0f} bytes/token"
        + (f", {result.reconnects} reconnects" if result.reconnects else "")
    )
    print("per token (mean ms): " + " | ".join(f"{name} {b[key]:.2f}" for name, key in BREAKDOWN))
    if args.json:
        print(json.dumps(result.to_json(), separators=(",", ":")))
    return 0


class _Streamer:
    """Prints the text as tokens arrive (the decoded text's new characters)."""

    def __init__(self, gen: Generator) -> None:
        self.gen = gen
        self.ids: list[int] = []
        self.shown = 0

    def token(self, token: int) -> None:
        self.ids.append(token)
        text = self.gen.decode(self.ids)
        if len(text) > self.shown and not text.endswith("\ufffd"):  # no half a character
            sys.stdout.write(text[self.shown :])
            sys.stdout.flush()
            self.shown = len(text)

    def end(self) -> None:
        if self.shown:
            sys.stdout.write("\n")
