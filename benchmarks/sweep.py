"""The split-point sweep: where should this model be cut on this network?

    python -m benchmarks.sweep --model digits-cnn --weights W --links 4G,WiFi \
        --codecs raw,int8+zstd:1 [--edge-slowdown 10] [--requests 5] [--out DIR]

A real ``splitnet-cloud`` process serves the model; a link relay (benchmarks.link) sits
between it and a real ``EdgeClient``. For each link profile the planner predicts every
(cut, codec); the sweep measures the baselines (all on the device, all in the cloud
with raw input, all in the cloud with losslessly compressed input), the planner's
choice, every pair predicted within ``--factor`` of the best, and a seeded sample of
the rest that can finish within ``--max-request-s``, each with ``--requests`` requests
spread over ``--measure-rounds`` passes through all of them. Pairs only predicted are marked
``measured = false`` everywhere. The planner is the real one: per link a fresh
``cut="auto"`` client runs ``--auto-requests`` requests (learning the link, the cloud
compute and its own edge timings, exploring on its schedule); its choice and its
predictions after those requests are what the rows and the summary report. Per link:
the choice, its measured latency, the measured best, the regret (choice / best), and
the prediction error of every measured pair (median, maximum, and the best baseline's).
Where the best is not the choice, the two are measured again in turn in one window
(``--confirm-requests`` each): ``regret_head_to_head``, free of the low bias of taking
the least of many pairs' noisy medians.

Output in --out: sweep.csv and sweep.json (one row per link x cut x codec), summary.json
(one entry per link, with the prediction error of every measured pair, and its median
and maximum), per link ``latency-LINK.png`` (see benchmarks.sweep_plots) and one
``bytes.png`` per model. Link names are kept as given in the CSV and JSON; in file names
they are made safe (``10mbit/40ms`` -> ``latency-10mbit_40ms.png``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.link import LinkProfile, LinkRelay, load_profiles, parse_link
from benchmarks.sweep_llm import run_llm
from benchmarks.sweep_plots import bytes_plot, latency_plot
from edge.auto import AutoPlan, calibrate_agreement
from edge.client import EdgeClient, InferResult
from splitnet.codecs import parse_codec
from splitnet.data import Split, load_digits
from splitnet.examples import example_input
from splitnet.llm.models import is_llm_name
from splitnet.models import resolve
from splitnet.partition import INPUT, OUTPUT
from splitnet.planning import CostTable, LinkEstimate, Prediction, measure_costs
from splitnet.report import codec_accuracy


class CloudProcess:
    """``splitnet-cloud`` in a process of its own (edge and cloud must not share a GIL)."""

    def __init__(self, model: str, weights: str | None, input_shape: tuple[int, ...] | None):
        spec = model if weights is None else f"{model}={weights}"
        cmd = [
            sys.executable,
            "-m",
            "cloud.cli",
            "--model",
            spec,
            "--port",
            "0",
            "--profile-runs",
            "5",
            "--max-message-mb",
            "64",
        ]
        if input_shape is not None:
            raise SystemExit("--input-shape is not supported by the sweep yet")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert self.proc.stdout is not None
        line = ""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line or "listening on" in line:
                break
        if "listening on" not in line:
            self.stop()
            raise SystemExit(f"splitnet-cloud did not start: {line}")
        self.address = line.split("listening on ")[1].split()[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def choose_measured(
    preds: list[Prediction], factor: float, sample: int, max_ms: float, seed: int
) -> set[tuple[str, str]]:
    """Baselines, the best, pairs within ``factor`` of the best, and a sample of the rest."""
    best = preds[0].total_ms
    keys = {(p.cut, p.codec) for p in preds if p.total_ms <= factor * best}
    for p in preds:  # baselines
        if p.cut == OUTPUT or (p.cut == INPUT and p.codec in ("raw", "zstd:1")):
            keys.add((p.cut, p.codec))
    # The sample is drawn from the pairs that can be measured in time.
    rest = [
        (p.cut, p.codec) for p in preds if (p.cut, p.codec) not in keys and p.total_ms <= max_ms
    ]
    rng = random.Random(seed)
    keys |= set(rng.sample(rest, min(sample, len(rest))))
    by_key = {(p.cut, p.codec): p for p in preds}
    return {k for k in keys if by_key[k].total_ms <= max_ms}


def measure(client: EdgeClient, xs: list[torch.Tensor], cut: str, codec: str) -> list[InferResult]:
    client.use(cut=cut, codec=None if codec == "none" else codec)
    client.infer(xs[0])  # warm-up: the first request on a new cut builds its tail
    return [client.infer(x) for x in xs]


def head_to_head(
    client: EdgeClient,
    xs: list[torch.Tensor],
    chosen: tuple[str, str],
    measured: dict[tuple[str, str], dict[str, float]],
    requests: int,
) -> dict[str, Any]:
    """The choice and the measured best again, side by side: ``requests`` each, in turn.

    The best is the least of many pairs' medians of a few requests each, so when pairs
    are near-equal it is the one this machine happened to favour in its window (the
    least of noisy estimates is biased low). Measured in turn, in one window, the two
    give an unbiased ratio: ``regret_head_to_head``, beside the sweep's ``regret``.
    """
    best = min(measured, key=lambda k: measured[k]["measured_p50_ms"])
    if best == chosen or requests < 1:
        return {"regret_head_to_head": 1.0 if best == chosen else None, "head_to_head": None}
    times: dict[tuple[str, str], list[float]] = {chosen: [], best: []}
    for key in (chosen, best):  # a warm-up each: a new cut builds its tail
        client.use(cut=key[0], codec=None if key[1] == "none" else key[1])
        client.infer(xs[0])
    for i in range(requests):
        for key in (chosen, best) if i % 2 == 0 else (best, chosen):
            client.use(cut=key[0], codec=None if key[1] == "none" else key[1])
            times[key].append(client.infer(xs[i % len(xs)]).timing.total_ms)
    choice_ms, best_ms = statistics.median(times[chosen]), statistics.median(times[best])
    return {
        "regret_head_to_head": choice_ms / best_ms,
        "head_to_head": {
            "requests_each": requests,
            "choice_ms": choice_ms,
            "best": f"{best[0]} {best[1]}",
            "best_ms": best_ms,
        },
    }


def summarize(results: list[InferResult]) -> dict[str, float]:
    totals = sorted(r.timing.total_ms for r in results)
    med = {
        f"measured_{k}": statistics.median(getattr(r.timing, k) for r in results)
        for k in ("edge_ms", "encode_ms", "network_ms", "queue_ms", "cloud_ms", "decode_ms")
    }
    med["measured_p50_ms"] = statistics.median(totals)
    med["measured_p90_ms"] = totals[min(len(totals) - 1, int(0.9 * len(totals)))]
    return med


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    profiles = load_profiles()
    links: list[LinkProfile] = [parse_link(t, profiles) for t in args.links.split(",")]
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    spec = resolve(args.model)
    x_test: torch.Tensor
    test_split: Split | None = None
    if spec.input_shape[1:] == (1, 8, 8):
        data = load_digits()
        test_split = data["test"]
        x_test = test_split.x
        calibration = data["val"].x
    else:
        x_test = torch.cat([example_input(spec, seed=s) for s in range(4)])
        calibration = None
    xs = [x_test[i % len(x_test) : i % len(x_test) + 1] for i in range(args.requests)]

    cloud = CloudProcess(args.model, args.weights, None)
    first = links[0]
    relay = LinkRelay(cloud.address, first.up, first.down).start()
    rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    try:
        with EdgeClient(
            relay.address,
            args.model,
            weights=args.weights,
            cut=INPUT,
            edge_slowdown=args.edge_slowdown,
            deadline_s=args.max_request_s * 4,
            retries=0,
        ) as client:
            info = client.server_info
            assert info is not None
            agreement = (
                calibrate_agreement(client.model, client.graph, calibration, codecs)
                if calibration is not None
                else None
            )
            accuracy: dict[tuple[str, str], float] = {}
            lossy = [str(parse_codec(c)) for c in codecs if not parse_codec(c).lossless]
            if test_split is not None and lossy:
                for r in codec_accuracy(client.model, client.graph, test_split, lossy):
                    accuracy[(r["cut"], r["codec"])] = r["accuracy"]
            table = measure_costs(
                client.graph,
                example_input(spec),
                codecs,
                {c.name: c.tail_latency_ms for c in info.cuts},
                result_bytes=40 + sum(4 * math.prod(o.shape) + 16 for o in info.outputs),
                edge_slowdown=args.edge_slowdown,
                agreement=agreement,
                warm_ms=client.emulated_warm_ms(),
            )
            for link in links:
                relay.set_links(up=link.up, down=link.down)
                client.refresh_info()
                rtt = statistics.median(client.probe_rtt() for _ in range(5))
                # The planner as a user runs it: a fresh cut="auto" client on this link.
                # Its priors: the device profile measured above, the server's table, and
                # the link's nominal figures with the probed RTT (a device knows roughly
                # what network it is on); it learns all of them from its own requests.
                # What the rows call "predicted" is what it believes after those requests.
                prior = LinkEstimate(up_mbit=link.up.mbit, down_mbit=link.down.mbit, rtt_ms=rtt)
                auto = run_auto(relay.address, args, table, prior, xs)
                plan = auto.plan
                est = plan.estimator.estimate
                preds = plan.planner.candidates(est)
                assert plan.prediction is not None
                chosen = (plan.prediction.cut, plan.prediction.codec)
                choice = next(p for p in preds if (p.cut, p.codec) == chosen)
                keys = choose_measured(
                    preds, args.factor, args.sample, args.max_request_s * 1e3, args.seed
                )
                keys.add(chosen)
                # Each pair's requests are spread over --measure-rounds passes through
                # all pairs, so a passing stall of this machine touches a few of a
                # pair's samples, not all of them (one pair's head once measured slower
                # than the whole model, which contains it).
                order = sorted(keys, key=lambda k: table_index(client, k))
                runs: dict[tuple[str, str], list[InferResult]] = {k: [] for k in order}
                rounds = max(1, min(args.measure_rounds, len(xs)))
                with tqdm(total=rounds * len(order), desc=f"{link.name}", unit="pair",
                          file=sys.stderr) as bar:  # fmt: skip
                    for turn in range(rounds):
                        for cut, codec in order:
                            runs[(cut, codec)] += measure(client, xs[turn::rounds], cut, codec)
                            bar.update()
                measured = {k: summarize(v) for k, v in runs.items()}
                again = head_to_head(client, xs, chosen, measured, args.confirm_requests)
                client.use(cut=INPUT)
                for p in preds:
                    row: dict[str, Any] = {
                        "model": args.model,
                        "link": link.name,
                        "link_spec": link.spec,
                        "cut": p.cut,
                        "cut_index": table_index(client, (p.cut, p.codec)),
                        "codec": p.codec,
                        "bytes_up": p.bytes_up,
                        "edge_slowdown": args.edge_slowdown,
                        "edge_emulated": args.edge_slowdown > 1,
                        "predicted_ms": p.total_ms,
                        **{f"pred_{k}": v for k, v in asdict(p).items() if k.endswith("_ms")},
                        "measured": (p.cut, p.codec) in measured,
                        "calibration": False,  # the planner fits nothing to these rows
                        "planner_requests": auto.visits.get((p.cut, p.codec), 0),
                        "planner_choice": (p.cut, p.codec) == chosen,
                        "accuracy": accuracy.get((p.cut, p.codec)),
                    }
                    row.update(measured.get((p.cut, p.codec), {}))
                    rows.append(row)
                summary.append(link_summary(link, choice, measured, rtt))
                summary[-1].update(again)
                summary[-1].update(auto.summary())
    finally:
        relay.stop()
        cloud.stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pictures = write_outputs(rows, summary, out, args)
    return {"rows": rows, "summary": summary, "pictures": pictures}


@dataclass
class AutoRun:
    """What the cut="auto" client did on one link."""

    plan: AutoPlan
    results: list[InferResult]

    @property
    def visits(self) -> Counter[tuple[str, str]]:
        """Requests it sent per (cut, codec)."""
        return Counter((r.cut, r.codec) for r in self.results)

    def summary(self) -> dict[str, Any]:
        """Its plans, probes and own steady latency (the last 10 requests at its choice)."""
        plan = self.plan
        assert plan.prediction is not None
        chosen = (plan.prediction.cut, plan.prediction.codec)
        tail = [r.timing.total_ms for r in self.results[-10:] if (r.cut, r.codec) == chosen]
        return {
            "planner_requests": len(self.results),
            "planner_probes": len(plan.probes),
            "planner_plans": [f"{n}: {p.cut} {p.codec}" for n, p, _ in plan.history],
            "planner_switches": max(len(plan.history) - 1, 0),
            "planner_why": [f"{n}: {why}" for n, _, why in plan.history],
            "planner_rejected": [f"{n}: {c} {k}" for n, (c, k) in plan.rejected],
            "planner_replans": len(plan.replans),
            "planner_own_p50_ms": statistics.median(tail) if tail else None,
            "edge_scale": plan.planner.edge_scale,
            "edge_fixed_ms": plan.planner.edge_fixed,
            "local_scale": plan.planner.local_scale,
            "cloud_scale": plan.planner.cloud_scale,
            "cloud_fixed_ms": plan.planner.cloud_fixed,
            "link_estimate": asdict(plan.estimator.estimate),
        }


def run_auto(
    address: str,
    args: argparse.Namespace,
    table: CostTable,
    prior: LinkEstimate,
    xs: list[torch.Tensor],
) -> AutoRun:
    """``--auto-requests`` requests through a fresh cut="auto" client on ``address``."""
    with EdgeClient(
        address,
        args.model,
        weights=args.weights,
        cut="auto",
        costs=table,
        link=prior,
        accuracy_budget=args.accuracy_budget,
        edge_slowdown=args.edge_slowdown,
        deadline_s=args.max_request_s * 4,
        retries=0,
    ) as auto:
        results = [auto.infer(xs[i % len(xs)]) for i in range(args.auto_requests)]
        assert auto.auto is not None
        return AutoRun(auto.auto, results)


def table_index(client: EdgeClient, key: tuple[str, str]) -> int:
    """Position of the pair's cut in execution order."""
    return client.graph.names.index(key[0])


def link_summary(
    link: LinkProfile,
    choice: Prediction,
    measured: dict[tuple[str, str], dict[str, float]],
    rtt: float,
) -> dict[str, Any]:
    p50 = {k: v["measured_p50_ms"] for k, v in measured.items()}
    best_key = min(p50, key=lambda k: p50[k])
    chosen = p50[(choice.cut, choice.codec)]
    all_edge = p50.get((OUTPUT, "none"))
    cloud_raw = p50.get((INPUT, "raw"))
    cloud_zstd = p50.get((INPUT, "zstd:1"))
    baseline = (
        min(v for v in (all_edge, cloud_zstd) if v is not None)
        if (all_edge is not None or cloud_zstd is not None)
        else None
    )
    return {
        "link": link.name,
        "link_spec": link.spec,
        "probe_rtt_ms": rtt,
        "choice": f"{choice.cut} {choice.codec}",
        "choice_predicted_ms": choice.total_ms,
        "choice_measured_ms": chosen,
        "best": f"{best_key[0]} {best_key[1]}",
        "best_measured_ms": p50[best_key],
        "regret": chosen / p50[best_key],
        "all_edge_ms": all_edge,
        "all_cloud_raw_ms": cloud_raw,
        "all_cloud_zstd_ms": cloud_zstd,
        "speedup_vs_best_baseline": (baseline / chosen) if baseline else None,
        "pairs_measured": len(measured),
    }


BASELINES = {
    (OUTPUT, "none"): "all_edge",
    (INPUT, "raw"): "all_cloud_raw",
    (INPUT, "zstd:1"): "all_cloud_zstd",
}


def file_safe(name: str) -> str:
    """A link name as part of a file name: ``5.85mbit:20mbit/60ms`` -> ``5.85mbit-20mbit_60ms``.

    ``/`` becomes ``_``, ``:`` becomes ``-``, anything else outside ``[A-Za-z0-9._-]``
    becomes ``_``; a leading dot is dropped (no hidden files, no ``..``).
    """
    out = "".join(
        c if c.isascii() and (c.isalnum() or c in "._-") else "-" if c == ":" else "_" for c in name
    )
    return out.lstrip(".") or "link"


def file_names(links: list[str]) -> dict[str, str]:
    """A distinct, safe file-name part per link name (``-2``, ``-3``... on a clash)."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for link in links:
        base = stem = file_safe(link)
        n = 1
        while stem.lower() in taken:
            n += 1
            stem = f"{base}-{n}"
        taken.add(stem.lower())
        names[link] = stem
    return names


def prediction_errors(rows: list[dict[str, Any]], link: str) -> dict[str, Any]:
    """Prediction error of every measured pair on ``link``, and their median and maximum.

    The error of a pair is (predicted - measured p50) / measured p50; the median and
    maximum are of its absolute value, over every measured pair, baselines included
    (a row marked ``calibration``, whose prediction was fitted to that very
    measurement, would be listed but not scored; the planner fits none today).
    """
    pairs = [
        {
            "cut": r["cut"],
            "codec": r["codec"],
            "predicted_ms": r["predicted_ms"],
            "measured_ms": r["measured_p50_ms"],
            "error": (r["predicted_ms"] - r["measured_p50_ms"]) / r["measured_p50_ms"],
            "baseline": BASELINES.get((r["cut"], r["codec"])),
            "calibration": r["calibration"],
            "planner_choice": r["planner_choice"],
        }
        for r in rows
        if r["link"] == link and r["measured"]
    ]
    scored = [p for p in pairs if not p["calibration"]]
    worst = max(scored, key=lambda p: abs(p["error"]), default=None)
    # The baseline a user would otherwise pick (fastest measured): a planner that
    # mispredicts it can lose to it without knowing.
    best_base = min(
        (p for p in pairs if p["baseline"] is not None),
        key=lambda p: p["measured_ms"],
        default=None,
    )
    return {
        "prediction_error_median": (
            statistics.median(abs(p["error"]) for p in scored) if scored else None
        ),
        "prediction_error_max": abs(worst["error"]) if worst else None,
        "prediction_error_worst": f"{worst['cut']} {worst['codec']}" if worst else None,
        "prediction_errors_scored": len(scored),
        "baseline_prediction_errors": {
            p["baseline"]: p["error"] for p in pairs if p["baseline"] is not None
        },
        "best_baseline": best_base["baseline"] if best_base else None,
        "best_baseline_measured_ms": best_base["measured_ms"] if best_base else None,
        "best_baseline_prediction_error": best_base["error"] if best_base else None,
        "prediction_errors": pairs,
    }


def write_outputs(
    rows: list[dict[str, Any]], summary: list[dict[str, Any]], out: Path, args: argparse.Namespace
) -> list[Path]:
    """Write the CSV, JSON, summary and pictures; returns the pictures' paths.

    Link names stay as given in every CSV and JSON field; only file names use
    ``file_names`` (each link's ``latency_png`` in the summary says which file is its).
    """
    stems = file_names([s["link"] for s in summary])
    for s in summary:
        s.update(prediction_errors(rows, s["link"]))
        s["latency_png"] = f"latency-{stems[s['link']]}.png"
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    meta = {
        "model": args.model,
        "edge_slowdown": args.edge_slowdown,
        "edge_emulated": args.edge_slowdown > 1,
        "requests_per_pair": args.requests,
        "confirm_requests": args.confirm_requests,
        "measure_rounds": args.measure_rounds,
        "factor": args.factor,
        "sample": args.sample,
        "codecs": args.codecs,
        "bytes_png": "bytes.png",
    }
    (out / "sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "summary.json").write_text(json.dumps({"meta": meta, "links": summary}, indent=1))
    pictures = [
        latency_plot(rows, s["link"], out / s["latency_png"], args.edge_slowdown) for s in summary
    ]
    pictures.append(bytes_plot(rows, out / "bytes.png"))
    return pictures


def _pct(x: float | None) -> str:
    return f"{100 * x:.1f}%" if x is not None else "n/a"


def print_summary(summary: list[dict[str, Any]], slowdown: float) -> None:
    """Per link: the choice against the measured best, and the prediction error."""
    note = f" (edge slowed {slowdown:g}x, emulated)" if slowdown > 1 else ""
    print(f"per link{note}: planner choice vs the measured best")
    width = max((len(s["link"]) for s in summary), default=6)
    for s in summary:
        speed = s["speedup_vs_best_baseline"]
        speed_text = f"speedup vs best baseline {speed:.2f}x" if speed else ""
        print(
            f"  {s['link']:<{width}} choice {s['choice']:<28} {s['choice_measured_ms']:9.2f} ms  "
            f"best {s['best']:<28} {s['best_measured_ms']:9.2f} ms  regret {s['regret']:.2f}  "
            f"{speed_text}"
        )
        if s.get("head_to_head"):
            h = s["head_to_head"]
            print(
                f"  {'':<{width}} side by side ({h['requests_each']} requests each, in turn): "
                f"choice {h['choice_ms']:.2f} ms, {h['best']} {h['best_ms']:.2f} ms, "
                f"regret {s['regret_head_to_head']:.2f}"
            )
        base = ", ".join(f"{k} {100 * v:+.1f}%" for k, v in s["baseline_prediction_errors"].items())
        print(
            f"  {'':<{width}} pred err median {_pct(s['prediction_error_median'])} "
            f"max {_pct(s['prediction_error_max'])} ({s['prediction_error_worst']}) over "
            f"{s['prediction_errors_scored']} measured pairs; baselines: {base or 'none measured'}"
        )
        if s.get("best_baseline") is not None:
            print(
                f"  {'':<{width}} best baseline {s['best_baseline']} "
                f"{s['best_baseline_measured_ms']:.2f} ms, pred err "
                f"{100 * s['best_baseline_prediction_error']:+.1f}%"
            )
        if "planner_requests" in s:
            own = s["planner_own_p50_ms"]
            print(
                f"  {'':<{width}} cut=auto client: {s['planner_requests']} requests, "
                f"{s['planner_probes']} probes, plans {'; '.join(s['planner_plans'])}"
                + (f", own p50 {own:.2f} ms" if own is not None else "")
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.sweep", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", default="digits-cnn")
    p.add_argument("--weights", default=None)
    p.add_argument("--links", default="CAT1,3G,4G,WiFi,5G", help="profile names or 10mbit/40ms")
    p.add_argument(
        "--codecs", default=None, help="default raw,zstd:1,int8+zstd:1 (LMs: raw,fp16,int8o:8)"
    )
    # Language models only (benchmarks.sweep_llm): block cuts, prompt and generation length.
    p.add_argument("--cuts", default=None, help="LMs: block.K[,block.K:block.M...]")
    p.add_argument("--prompt-tokens", type=int, default=32, help="LMs: prompt length")
    p.add_argument("--new-tokens", type=int, default=32, help="LMs: tokens generated")
    p.add_argument(
        "--edge-slowdown",
        type=float,
        default=1.0,
        help="emulate an edge device F times slower (stretches edge compute)",
    )
    p.add_argument("--requests", type=int, default=5, help="measured requests per pair")
    p.add_argument(
        "--measure-rounds",
        type=int,
        default=2,
        help="passes through the measured pairs, each with its share of --requests "
        "(and its own warm-up request)",
    )
    p.add_argument(
        "--factor", type=float, default=1.5, help="measure pairs within this of the best"
    )
    p.add_argument("--sample", type=int, default=3, help="and this many other pairs per link")
    p.add_argument(
        "--max-request-s",
        type=float,
        default=3.0,
        help="pairs predicted slower than this are only predicted",
    )
    p.add_argument(
        "--auto-requests",
        type=int,
        default=40,
        help="requests the cut=auto client runs per link before its choice is read",
    )
    p.add_argument(
        "--confirm-requests",
        type=int,
        default=6,
        help="where the measured best is not the choice, measure both again in turn, "
        "this many requests each (regret_head_to_head); 0: no",
    )
    p.add_argument("--accuracy-budget", type=float, default=0.005)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--edge-threads",
        type=int,
        default=1,
        help="torch threads on the edge side (the server process keeps its own)",
    )
    p.add_argument("--out", default="out/sweep")
    args = p.parse_args(argv)
    # One edge thread: with two OpenMP threads sharing two cores with the server and the
    # relay, every wake-up after an idle gap cost milliseconds and the profile lied.
    torch.set_num_threads(args.edge_threads)
    t0 = time.time()
    if is_llm_name(args.model):  # generation: block cuts x codecs x links
        llm = run_llm(args, CloudProcess)
        print(f"wrote {', '.join(llm['paths'])} in {time.time() - t0:.0f} s")
        return 0
    args.codecs = args.codecs or "raw,zstd:1,int8+zstd:1"
    result = run(args)
    print_summary(result["summary"], args.edge_slowdown)
    print(
        f"wrote {args.out}/sweep.csv, sweep.json, summary.json and PNGs in {time.time() - t0:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
