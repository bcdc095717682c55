"""The generation sweep: block cuts x codecs x links for a language model.

    python -m benchmarks.sweep --model tiny:llama --links 4G,WiFi \
        [--cuts block.1,block.2] [--codecs raw,fp16,int8o:8] [--prompt-tokens 32]
        [--new-tokens 32] [--requests 3] [--out DIR]

``benchmarks.sweep`` calls ``run_llm`` when ``--model`` names a language model. A real
``splitnet-cloud`` process serves it, a link relay (benchmarks.link) sits between it and
the real edge ``Generator`` (edge.generate), and each (link, cut, codec) runs
``--requests`` greedy generations of ``--new-tokens`` tokens (end-of-sequence ignored)
after a ``--prompt-tokens`` prompt, one warm-up first. Per row: time to first token,
decode tokens/s, bytes per token (up + down, one decode step), the per-token breakdown
(edge, encode, network, cloud queue, cloud compute; medians over the runs), and what
``splitnet.llm.plan`` predicts for it from the edge's costs measured here
(``measure_side_cost``), the cloud's as the server published them at start-up
(``GenerationModel.profile``) and the link's figures. Whether every run's tokens equal the
float32 unsplit model's (``same_tokens``) is recorded too.

Baselines, in every link:

* ``output``: all on the device, no network (the unsplit model with its KV cache here;
  the link does not apply);
* ``input``: all in the cloud through the real session; the edge holds no weights and
  sends token ids, the server embeds them and answers with token ids.

Output in --out: ``generation.csv``, ``generation.json`` (rows + the planner's choice
per link) and ``generation.png`` (TTFT and tokens/s per link, cut and codec). It
measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.link import LinkProfile, LinkRelay, load_profiles, parse_link
from edge.generate import GenerateConfig, GenerationResult, Generator
from edge.generate_plan import server_profile
from splitnet.codecs import encode, parse_codec
from splitnet.llm import ALL_CLOUD_CUT, LanguageModel, load_lm, parse_block_cut
from splitnet.llm.plan import (
    ALL_EDGE,
    GenerationJob,
    ModelCosts,
    SideCost,
    measure_side_cost,
    model_sizes,
    plan_generation,
)
from splitnet.planning import LinkEstimate

DEFAULT_CODECS = "raw,fp16,int8o:8"
FIELDS = [
    "model", "link", "cut", "codec", "baseline", "runs", "prompt_tokens", "new_tokens",
    "ttft_ms", "tokens_per_s", "bytes_up_per_token", "bytes_down_per_token",
    "bytes_per_token", "prefill_bytes", "edge_ms", "encode_ms", "network_ms", "queue_ms",
    "compute_ms", "step_ms", "predicted_ttft_ms", "predicted_tokens_per_s", "same_tokens",
]


def default_cuts(num_layers: int) -> list[str]:
    """An early, a middle and a late cut, and one U-shaped (first and last block on the
    edge), without repeats."""
    ks = sorted({1, num_layers // 2, num_layers - 1})
    cuts = [f"block.{k}" for k in ks if 1 <= k < num_layers]
    if num_layers >= 3:
        cuts.append(f"block.1:block.{num_layers - 1}")
    return cuts


def prompt_ids(lm: LanguageModel, tokens: int) -> list[int]:
    """A deterministic prompt of exactly ``tokens`` ids: a real chat prompt where the model
    has a tokenizer (repeated or cut to length), seeded ids otherwise."""
    if lm.tokenizer is not None:
        base = lm.encode_text("Describe Paris for a first-time visitor, in detail.", chat=True)
        ids = (base * (tokens // len(base) + 1))[-tokens:]
    else:
        vocab = int(lm.model.config.vocab_size)
        ids = [(i * 7919 + 13) % vocab for i in range(tokens)]
    return ids


def device_only(lm: LanguageModel, ids: list[int], new_tokens: int) -> tuple[float, float,
                                                                             list[int]]:
    """All on the device: (TTFT ms, tokens/s, tokens) of greedy decoding with a KV cache."""
    from transformers import DynamicCache

    model = lm.model
    takes_cache = "cache" in inspect.signature(model.forward).parameters
    kw = {"cache" if takes_cache else "past_key_values": DynamicCache(config=model.config),
          "use_cache": True}
    tokens: list[int] = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(torch.tensor([ids]), logits_to_keep=1, **kw)
        nxt = int(out.logits[0, -1].argmax())
        ttft = time.perf_counter() - t0
        tokens.append(nxt)
        for _ in range(new_tokens - 1):
            out = model(torch.tensor([[nxt]]), **kw)
            nxt = int(out.logits[0, -1].argmax())
            tokens.append(nxt)
        total = time.perf_counter() - t0
    rate = (new_tokens - 1) / (total - ttft) if new_tokens > 1 and total > ttft else 0.0
    return 1000 * ttft, rate, tokens


@dataclass
class Setup:
    """What every link shares: the model, the prompt, the reference and the planner's costs."""

    lm: LanguageModel
    ids: list[int]
    reference: list[int]
    costs: ModelCosts


def measure_costs(lm: LanguageModel, codecs: list[str], prompt_tokens: int,
                  cloud: SideCost | None = None) -> ModelCosts:
    """The planner's costs: the edge measured here, the cloud from ``cloud`` (the server's
    published profile; without one, this machine's timing, since one machine plays both).
    """
    n = lm.num_layers
    side = measure_side_cost(lm.model, n, prompt_tokens=min(prompt_tokens, 64))
    if cloud is None:
        cloud = SideCost(decode_ms=side.decode_ms, prefill_ms=side.prefill_ms,
                         lm_head_ms=side.lm_head_ms)
    hidden = torch.zeros(1, 1, lm.hidden_size)
    hidden[..., 0] = 1.0
    codec_bytes = {c: encode(hidden, c).ByteSize() + 16 for c in codecs}  # + step fields
    return ModelCosts(sizes=model_sizes(lm.model.config), edge=side, cloud=cloud,
                      codec_bytes=codec_bytes)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def row_from(results: list[GenerationResult], **fields: Any) -> dict[str, Any]:
    """One row: medians over the runs of a (link, cut, codec)."""
    steps = [s for r in results for s in r.steps]
    row = {
        **fields,
        "runs": len(results),
        "ttft_ms": _median([1000 * r.ttft_s for r in results]),
        "tokens_per_s": _median([r.tokens_per_s for r in results]),
        "bytes_up_per_token": _median([s.bytes_up for s in steps]),
        "bytes_down_per_token": _median([s.bytes_down for s in steps]),
        "bytes_per_token": _median([r.bytes_per_token for r in results]),
        "prefill_bytes": _median([r.prefill_bytes for r in results]),
    }
    for key in ("edge_ms", "encode_ms", "network_ms", "queue_ms", "compute_ms"):
        row[key] = _median([getattr(s, key) for s in steps])
    row["step_ms"] = _median([s.total_ms for s in steps])
    return row


def sweep_link(
    setup: Setup, address: str, link: LinkProfile, cuts: list[str], codecs: list[str],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Every cut x codec through the relay, then both baselines."""
    lm, ids = setup.lm, setup.ids
    job = GenerationJob(prompt_tokens=len(ids), new_tokens=args.new_tokens)
    estimate = LinkEstimate(up_mbit=link.up.mbit, down_mbit=link.down.mbit, rtt_ms=link.rtt_ms)
    plan = plan_generation(setup.costs, job, estimate)
    priced = {(p.cut, p.codec): p for p in plan.candidates}
    pairs = [(cut, codec, "") for cut in cuts for codec in codecs]
    pairs.append((ALL_CLOUD_CUT, "raw", "all-cloud"))
    rows = []
    for cut, codec, baseline in pairs:
        config = GenerateConfig(model=args.model, cut=cut, codec=codec, stop_at_eos=False)
        with Generator(address, config, lm=lm) as gen:
            gen.generate(ids, 2)  # warm-up: connection, first session
            results = [gen.generate(ids, args.new_tokens) for _ in range(args.requests)]
        row = row_from(results, model=args.model, link=link.name, cut=cut, codec=codec,
                       baseline=baseline, prompt_tokens=len(ids), new_tokens=args.new_tokens)
        row["same_tokens"] = all(r.tokens == setup.reference for r in results)
        p = priced.get((cut, None if cut == ALL_CLOUD_CUT else codec))
        row["predicted_ttft_ms"] = p.ttft_ms if p else None
        row["predicted_tokens_per_s"] = p.tokens_per_s if p else None
        rows.append(row)
        print(f"  {link.name} {cut} {codec}: TTFT {row['ttft_ms']:.1f} ms, "
              f"{row['tokens_per_s']:.1f} tokens/s, {row['bytes_per_token']:.0f} B/token",
              flush=True)
    ttfts, rates = [], []
    for _ in range(args.requests):
        ttft, rate, tokens = device_only(lm, ids, args.new_tokens)
        ttfts.append(ttft)
        rates.append(rate)
    edge = priced[(ALL_EDGE, None)]
    rows.append({
        "model": args.model, "link": link.name, "cut": ALL_EDGE, "codec": "", "baseline":
        "all-device", "runs": args.requests, "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens, "ttft_ms": _median(ttfts),
        "tokens_per_s": _median(rates), "bytes_up_per_token": 0, "bytes_down_per_token": 0,
        "bytes_per_token": 0, "prefill_bytes": 0, "edge_ms": 1000 / _median(rates)
        if _median(rates) else None, "encode_ms": 0.0, "network_ms": 0.0, "queue_ms": 0.0,
        "compute_ms": 0.0, "step_ms": 1000 / _median(rates) if _median(rates) else None,
        "predicted_ttft_ms": edge.ttft_ms, "predicted_tokens_per_s": edge.tokens_per_s,
        "same_tokens": tokens == setup.reference,
    })
    return rows


def plan_summary(setup: Setup, link: LinkProfile, new_tokens: int) -> dict[str, Any]:
    """The planner's choice on this link, with no constraints, as text and fields."""
    job = GenerationJob(prompt_tokens=len(setup.ids), new_tokens=new_tokens)
    estimate = LinkEstimate(up_mbit=link.up.mbit, down_mbit=link.down.mbit, rtt_ms=link.rtt_ms)
    result = plan_generation(setup.costs, job, estimate)
    choice = result.choice
    return {
        "link": link.name,
        "choice": choice.label if choice else None,
        "predicted_ttft_ms": choice.ttft_ms if choice else None,
        "predicted_tokens_per_s": choice.tokens_per_s if choice else None,
        "text": result.describe(),
    }


def write_outputs(rows: list[dict[str, Any]], plans: list[dict[str, Any]], out: Path,
                  meta: dict[str, Any]) -> list[Path]:
    """generation.csv, generation.json and (with matplotlib) generation.png."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "generation.csv", out / "generation.json"]
    with paths[0].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    paths[1].write_text(json.dumps({"meta": meta, "rows": rows, "plans": plans}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    links = list(dict.fromkeys(r["link"] for r in rows))
    fig, axes = plt.subplots(len(links), 2, figsize=(11, 0.5 + 2.6 * len(links)), squeeze=False)
    for i, link in enumerate(links):
        sub = [r for r in rows if r["link"] == link]
        labels = [f"{r['cut']} {r['codec']}".strip() for r in sub]
        for j, (key, title) in enumerate((("ttft_ms", "time to first token (ms)"),
                                           ("tokens_per_s", "tokens/s"))):
            ax = axes[i][j]
            colors = ["tab:grey" if r["baseline"] else "tab:blue" for r in sub]
            ax.barh(range(len(sub)), [r[key] or 0 for r in sub], color=colors)
            ax.set_yticks(range(len(sub)), labels, fontsize=6)
            ax.invert_yaxis()
            ax.set_title(f"{link}: {title}", fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{meta['model']}: prompt {meta['prompt_tokens']}, {meta['new_tokens']} new "
                 "tokens (grey: baselines)", fontsize=9)
    fig.tight_layout()
    paths.append(out / "generation.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def run_llm(args: argparse.Namespace, cloud_factory: Any) -> dict[str, Any]:
    """The generation sweep (``benchmarks.sweep`` hands over its parsed arguments and
    the class that starts the cloud process)."""
    lm = load_lm(args.model)
    codecs = [str(parse_codec(c)) for c in (args.codecs or DEFAULT_CODECS).split(",") if c]
    cuts = args.cuts.split(",") if args.cuts else default_cuts(lm.num_layers)
    for cut in cuts:
        parse_block_cut(cut, lm.num_layers)  # PartitionError names the valid ones
    profiles = load_profiles()
    links = [parse_link(name, profiles) for name in args.links.split(",") if name]
    ids = prompt_ids(lm, args.prompt_tokens)
    _, _, reference = device_only(lm, ids, args.new_tokens)
    cloud = cloud_factory(args.model, None, None)
    rows: list[dict[str, Any]] = []
    plans = []
    try:
        with Generator(cloud.address, GenerateConfig(model=args.model), lm=lm) as gen:
            published = server_profile(gen.info(), lm)
        setup = Setup(lm=lm, ids=ids, reference=reference,
                      costs=measure_costs(lm, codecs, len(ids), published))
        relay = LinkRelay(cloud.address, links[0].up, links[0].down).start()
        try:
            for link in links:
                relay.set_links(up=link.up, down=link.down)
                print(f"link {link}", flush=True)
                rows += sweep_link(setup, relay.address, link, cuts, codecs, args)
                plans.append(plan_summary(setup, link, args.new_tokens))
                print(plans[-1]["text"], flush=True)
        finally:
            relay.stop()
    finally:
        cloud.stop()
    meta = {
        "model": args.model,
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "requests": args.requests,
        "links": [str(link) for link in links],
        "cuts": cuts,
        "codecs": codecs,
        "edge_threads": torch.get_num_threads(),
        "cloud_costs": "the server's published profile" if published else "timed here",
        "note": "edge and cloud on one machine; input (all in the cloud) sends token ids; "
        "the planner's edge costs were measured here, the cloud's published by the server",
    }
    paths = write_outputs(rows, plans, Path(args.out), meta)
    return {"rows": rows, "plans": plans, "paths": [str(p) for p in paths]}
