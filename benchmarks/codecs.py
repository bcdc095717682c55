"""Codec speed, size and error on real activations, next to the bare library calls.

    python -m benchmarks.codecs [--out DIR] [--repeat N] [--quick]

For a few cuts of digits-cnn and torchvision resnet18 (early, middle, late), the
frontier tensors a head really produces are encoded and decoded with each codec; and
synthetic language-model hidden states (``[1, 128, 576]`` prefill and ``[1, 1, 576]``
decode step, ~N(0, 2) with three channels 10^4x the rest, as SmolLM2 shows) with the
hidden-state codecs. Each row reports, for that codec on that cut:

* ``ratio``: float32 bytes / serialized message bytes (payload, shape, scales...);
* ``max_err``: the largest absolute error after a round trip;
* encode and decode throughput in MB/s of float32 input (1 MB = 10^6 bytes), the
  median of ``--repeat`` samples after warm-up;
* the same work done by bare library calls (a torch cast, the int8 arithmetic written
  inline, ``zstandard.ZstdCompressor(level).compress``, ``ZstdDecompressor().decompress``),
  measured in the same run, interleaved with the codec, and ``x bare`` = codec time /
  bare time (the median of the ratios of back-to-back samples). Bare decodes, like
  ``splitnet.decode``, return a writable tensor that owns its memory;
* ``est err``: ``estimate_nbytes`` given the tensor as its sample, against the real
  message size (0 for every codec without zstd: exact); ``blind``: the same without a
  sample (the bound a planner gets from shapes alone); ``est/enc``: the estimate's
  time over the encode's.

The team's goal is ``int8+zstd:1`` within 1.25x of the bare calls both ways. This
script only measures and reports; it asserts nothing about time. It leaves
``torch.set_num_threads`` as it is and prints the thread count it ran with.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import zstandard

import splitnet
from splitnet.codecs import decode, encode, estimate_nbytes, parse_codec
from splitnet.data import load_digits
from splitnet.errors import SplitNetError
from splitnet.models import load_model

CODECS = [
    "raw",
    "zstd:1",
    "zstd:3",
    "fp16",
    "bf16",
    "int8",
    "int8c",
    "int8+zstd:1",
    "int8c+zstd:1",
    "fp16+zstd:1",
]
# For the synthetic hidden states: what a language model can use, and int8 to compare.
LLM_CODECS = ["fp16", "bf16", "int8", "int8o:4", "int8o:4+zstd:1"]
LLM_SHAPES = [(1, 128, 576), (1, 1, 576)]
LLM_OUTLIERS = [7, 100, 400]
GOAL_CODEC = "int8+zstd:1"
GOAL_RATIO = 1.25
# (model, input shape, preferred cuts: early, middle, late). Missing names fall back to
# cuts at a quarter, half and three quarters of the way through the model.
MODELS: list[tuple[str, tuple[int, ...], list[str]]] = [
    ("digits-cnn", (1, 1, 8, 8), ["stem.2", "block.relu", "pool2"]),
    (
        "torchvision:resnet18",
        (1, 3, 224, 224),
        ["maxpool", "layer2.1.relu_1", "layer3.0.relu", "layer4.1.relu_1"],
    ),
]
MIN_SAMPLE_S = 3e-3  # each timing sample loops until it lasts at least this long

Tensors = Sequence[torch.Tensor]


@dataclass(frozen=True)
class Row:
    """One codec on one cut."""

    model: str
    cut: str
    tensors: int  # frontier tensors
    mb: float  # float32 megabytes crossing the cut
    codec: str
    ratio: float  # float32 bytes / serialized message bytes
    max_err: float  # largest absolute round-trip error
    enc_mbps: float
    bare_enc_mbps: float
    enc_x_bare: float  # codec encode time / bare encode time (median of paired samples)
    dec_mbps: float
    bare_dec_mbps: float
    dec_x_bare: float  # codec decode time / bare decode time
    est_err: float  # estimate_nbytes(sample=tensor) / real bytes - 1
    blind_err: float  # estimate_nbytes without a sample / real bytes - 1
    est_x_enc: float  # estimate (with sample) time / encode time


# ---------------------------------------------------------------------- activations


def example_input(model: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A real digit for digits-cnn (if scikit-learn is there), else a seeded normal image."""
    if model == "digits-cnn":
        try:
            return load_digits()["test"].x[:1].clone()
        except SplitNetError:  # scikit-learn missing: fall back to noise
            pass
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen)


def pick_cuts(names: list[str], preferred: list[str]) -> list[str]:
    chosen = [n for n in preferred if n in names]
    if len(chosen) == len(preferred):
        return chosen
    inner = [n for n in names if n not in ("input", "output")]
    return [inner[int(len(inner) * f)] for f in (0.25, 0.5, 0.75)]


def hidden_states(shape: tuple[int, ...]) -> torch.Tensor:
    """Synthetic language-model hidden states: ~N(0, 2), three channels 10^4x, one ~22,000."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 2
    x[..., LLM_OUTLIERS] *= 1e4
    x[..., 100] = 22000.0
    return x


def frontiers(quick: bool) -> list[tuple[str, str, tuple[torch.Tensor, ...]]]:
    """``(model, cut, frontier tensors)`` for each selected cut."""
    out = []
    for name, shape, preferred in MODELS[:1] if quick else MODELS:
        model = load_model(name)
        x = example_input(name, shape)
        graph = splitnet.trace(model, (x,))
        for cut in pick_cuts([c.name for c in graph.cuts], preferred):
            head, _ = graph.split(cut)
            with torch.no_grad():
                tensors = tuple(t.detach().contiguous() for t in head(x))
            out.append((name, cut, tensors))
    return out


def llm_frontiers() -> list[tuple[str, str, tuple[torch.Tensor, ...]]]:
    """The synthetic hidden states: a 128-token prefill and one decode step."""
    return [
        ("synthetic-llm", "x".join(map(str, shape)), (hidden_states(shape),))
        for shape in LLM_SHAPES
    ]


# ---------------------------------------------------------------------- bare calls


def bare_calls(
    codec: str, xs: Tensors
) -> tuple[Callable[[], list[bytes]], Callable[[list[bytes]], list[torch.Tensor]]]:
    """The same work as ``codec`` done with plain torch / numpy / zstandard calls."""
    spec = parse_codec(codec)
    cctx = zstandard.ZstdCompressor(level=spec.zstd_level or 1)
    dctx = zstandard.ZstdDecompressor()
    zstd = spec.zstd_level is not None

    def pack(a: np.ndarray) -> bytes:
        return cctx.compress(a.data) if zstd else a.tobytes()

    def unpack(blob: bytes) -> bytes:
        return dctx.decompress(blob) if zstd else blob

    def to_tensor(blob: bytes, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
        return torch.frombuffer(bytearray(unpack(blob)), dtype=dtype).reshape(shape)

    if spec.precision in ("none", "fp16", "bf16"):
        narrow = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        dtype = narrow[spec.precision]

        def enc_cast() -> list[bytes]:
            out = []
            for x in xs:
                y = x.to(dtype)
                out.append(pack((y.view(torch.int16) if dtype == torch.bfloat16 else y).numpy()))
            return out

        def dec_cast(blobs: list[bytes]) -> list[torch.Tensor]:
            return [to_tensor(b, dtype, x.shape).float() for b, x in zip(blobs, xs, strict=True)]

        return enc_cast, dec_cast

    if spec.precision == "int8o":
        return bare_int8o(spec.precision_param or 4, xs, pack, unpack)

    per_channel = spec.precision == "int8c"
    params: list[tuple[np.ndarray, np.ndarray]] = []  # scale, zero point per tensor

    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if per_channel and x.dim() >= 2:
            dims = [d for d in range(x.dim()) if d != 1]
            view = [1] * x.dim()
            view[1] = -1
            lo = x.amin(dim=dims).clamp(max=0).view(view)
            hi = x.amax(dim=dims).clamp(min=0).view(view)
            scale = ((hi - lo) / 255).clamp(min=1e-30)
            zero = torch.round(-128 - lo / scale)
        else:
            lo_f, hi_f = (float(v) for v in torch.aminmax(x))
            s = max((max(hi_f, 0.0) - min(lo_f, 0.0)) / 255, 1e-30)
            scale = torch.tensor(s)
            zero = torch.tensor(float(round(-128 - min(lo_f, 0.0) / s)))
        q = torch.clamp(torch.round(x / scale + zero), -128, 127).to(torch.int8)
        return q, scale, zero

    def enc_int8() -> list[bytes]:
        out = []
        for x in xs:
            q, scale, zero = quantize(x)
            scale.tolist(), zero.tolist()  # what would travel beside the codes
            out.append(pack(q.numpy()))
        return out

    for x in xs:
        _, scale, zero = quantize(x)
        params.append((scale.numpy(), zero.numpy()))

    def dec_int8(blobs: list[bytes]) -> list[torch.Tensor]:
        out = []
        for blob, x, (scale, zero) in zip(blobs, xs, params, strict=True):
            codes = np.frombuffer(unpack(blob), dtype=np.int8).reshape(x.shape)
            out.append(torch.from_numpy((codes.astype(np.float32) - zero) * scale))
        return out

    return enc_int8, dec_int8


def bare_int8o(
    k: int, xs: Tensors, pack: Callable[[np.ndarray], bytes], unpack: Callable[[bytes], bytes]
) -> tuple[Callable[[], list[bytes]], Callable[[list[bytes]], list[torch.Tensor]]]:
    """int8o's work written inline: top-k channels in fp16, the rest int8 per row."""
    meta: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def quantize(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rows = x.reshape(-1, x.shape[-1]).numpy()
        channels = np.sort(np.argpartition(np.abs(rows).max(axis=0), -k)[-k:])
        outliers = rows[:, channels].astype(np.float16)
        rest = rows.copy()
        rest[:, channels] = 0
        scale = np.maximum(np.abs(rest).max(axis=1) / 127, 1e-30).astype(np.float32)
        codes = np.clip(np.rint(rest / scale[:, None]), -127, 127).astype(np.int8)
        return codes, scale, outliers, channels

    def enc() -> list[bytes]:
        out = []
        for x in xs:
            codes, scale, outliers, channels = quantize(x)
            channels.tolist()  # what would travel beside the payload
            parts = [a.reshape(-1).view(np.uint8) for a in (scale, outliers, codes)]
            out.append(pack(np.concatenate(parts)))
        return out

    for x in xs:
        _, scale, outliers, channels = quantize(x)
        meta.append((scale, outliers, channels))

    def dec(blobs: list[bytes]) -> list[torch.Tensor]:
        out = []
        for blob, x, (scale, outliers, channels) in zip(blobs, xs, meta, strict=True):
            r, h = scale.size, x.shape[-1]
            raw = unpack(blob)
            codes = np.frombuffer(raw, np.int8, offset=4 * r + outliers.nbytes).reshape(r, h)
            y = codes.astype(np.float32) * scale[:, None]
            y[:, channels] = outliers
            out.append(torch.from_numpy(y).reshape(x.shape))
        return out

    return enc, dec


# ---------------------------------------------------------------------- timing


def _loops(fn: Callable[[], object]) -> int:
    """How many calls make one sample last at least MIN_SAMPLE_S."""
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, math.ceil(MIN_SAMPLE_S / max(once, 1e-9)))


def _sample(fn: Callable[[], object], loops: int) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        fn()
    return (time.perf_counter() - start) / loops


def time_pairs(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
    """Seconds per call of each function, one sample per round; rounds go round-robin
    over the functions so that slow spells hit all of them alike.
    """
    for fn in fns.values():  # warm-up: caches, thread pools, zstd contexts
        for _ in range(3):
            fn()
    loops = {k: _loops(fn) for k, fn in fns.items()}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            for k, fn in fns.items():
                samples[k].append(_sample(fn, loops[k]))
    finally:
        if enabled:
            gc.enable()
    return samples


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num/den, each pair measured back to back."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def bench(model: str, cut: str, xs: Tensors, codec: str, repeat: int) -> Row:
    mb = sum(x.numel() * 4 for x in xs) / 1e6
    msgs = [encode(x, codec) for x in xs]
    err = max(float((decode(m).float() - x).abs().max()) for m, x in zip(msgs, xs, strict=True))
    wire_bytes = sum(m.ByteSize() for m in msgs)
    bare_enc, bare_dec = bare_calls(codec, xs)
    blobs = bare_enc()
    bare_err = max(float((y - x).abs().max()) for y, x in zip(bare_dec(blobs), xs, strict=True))
    if bare_err > 2 * err + 1e-6:  # the bare calls must be doing the same work
        print(f"  note: bare {codec} error {bare_err:.3g} vs codec {err:.3g}", file=sys.stderr)

    def estimate(sample: bool) -> int:
        return sum(
            estimate_nbytes(codec, x.shape, x.dtype, sample=x if sample else None).nbytes
            for x in xs
        )

    s = time_pairs(
        {
            "enc": lambda: [encode(x, codec) for x in xs],
            "bare_enc": bare_enc,
            "dec": lambda: [decode(m) for m in msgs],
            "bare_dec": lambda: bare_dec(blobs),
            "est": lambda: estimate(True),
        },
        repeat,
    )
    t = {k: statistics.median(v) for k, v in s.items()}
    return Row(
        model=model,
        cut=cut,
        tensors=len(xs),
        mb=round(mb, 4),
        codec=codec,
        ratio=round(mb * 1e6 / wire_bytes, 3),
        max_err=float(f"{err:.4g}"),
        enc_mbps=round(mb / t["enc"], 1),
        bare_enc_mbps=round(mb / t["bare_enc"], 1),
        enc_x_bare=round(paired_ratio(s["enc"], s["bare_enc"]), 3),
        dec_mbps=round(mb / t["dec"], 1),
        bare_dec_mbps=round(mb / t["bare_dec"], 1),
        dec_x_bare=round(paired_ratio(s["dec"], s["bare_dec"]), 3),
        est_err=round(estimate(True) / wire_bytes - 1, 4),
        blind_err=round(estimate(False) / wire_bytes - 1, 4),
        est_x_enc=round(paired_ratio(s["est"], s["enc"]), 3),
    )


# ---------------------------------------------------------------------- output


COLUMNS = [
    ("model", "model", "{}"),
    ("cut", "cut", "{}"),
    ("mb", "MB", "{:.3f}"),
    ("codec", "codec", "{}"),
    ("ratio", "ratio", "{:.2f}"),
    ("max_err", "max err", "{:.3g}"),
    ("enc_mbps", "enc MB/s", "{:.0f}"),
    ("bare_enc_mbps", "bare", "{:.0f}"),
    ("enc_x_bare", "x bare", "{:.2f}"),
    ("dec_mbps", "dec MB/s", "{:.0f}"),
    ("bare_dec_mbps", "bare", "{:.0f}"),
    ("dec_x_bare", "x bare", "{:.2f}"),
    ("est_err", "est err", "{:+.1%}"),
    ("blind_err", "blind", "{:+.1%}"),
    ("est_x_enc", "est/enc", "{:.2f}"),
]


def table(rows: list[Row]) -> str:
    cells = [[h for _, h, _ in COLUMNS]]
    previous = ("", "")
    for r in rows:
        d = asdict(r)
        line = [fmt.format(d[k]) for k, _, fmt in COLUMNS]
        if (r.model, r.cut) == previous:
            line[0] = line[1] = line[2] = ""
        previous = (r.model, r.cut)
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    text = []
    for i, line in enumerate(cells):
        if i and line[0] + line[1]:
            text.append("")
        text.append(
            "  ".join(
                c.ljust(w) if j in (0, 1, 3) else c.rjust(w)
                for j, (c, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )
    return "\n".join(text)


def load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not available on this platform
        return None


def environment() -> dict[str, object]:
    return {
        "load_1min_at_start": load(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "zstandard": zstandard.__version__,
        "zstd_library": ".".join(str(v) for v in zstandard.ZSTD_VERSION),
    }


def estimate_summary(rows: list[Row]) -> str:
    """How close estimate_nbytes came, over the rows whose codec has zstd."""
    zstd = [abs(r.est_err) for r in rows if "zstd" in r.codec]
    fixed = [abs(r.est_err) for r in rows if "zstd" not in r.codec]
    blind = [abs(r.blind_err) for r in rows if "zstd" not in r.codec]
    parts = []
    if fixed:
        parts.append(
            f"estimate_nbytes without zstd: exact in {sum(e == 0 for e in fixed)} of "
            f"{len(fixed)} rows with a sample; without one at most {max(blind):.2%} over"
        )
    if zstd:
        parts.append(
            f"with zstd (sample given): median |error| {statistics.median(zstd):.1%}, "
            f"max {max(zstd):.1%} over {len(zstd)} rows"
        )
    return "; ".join(parts)


def summary(rows: list[Row]) -> str:
    goal = [r for r in rows if r.codec == GOAL_CODEC and r.model != "synthetic-llm"]
    if not goal:
        return ""
    enc = statistics.median(r.enc_x_bare for r in goal)
    dec = statistics.median(r.dec_x_bare for r in goal)
    worst_enc = max(goal, key=lambda r: r.enc_x_bare)
    worst_dec = max(goal, key=lambda r: r.dec_x_bare)
    return (
        f"{GOAL_CODEC} vs bare calls (goal <= {GOAL_RATIO}x): median encode {enc:.2f}x, "
        f"decode {dec:.2f}x; worst encode {worst_enc.enc_x_bare:.2f}x "
        f"({worst_enc.model} {worst_enc.cut}), worst decode {worst_dec.dec_x_bare:.2f}x "
        f"({worst_dec.model} {worst_dec.cut})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.codecs", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out/bench-codecs"), help="output folder")
    parser.add_argument("--repeat", type=int, default=15, help="timing samples per measurement")
    parser.add_argument("--quick", action="store_true", help="digits-cnn only (a smoke run)")
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated codec specs")
    parser.add_argument(
        "--llm-codecs",
        default=",".join(LLM_CODECS),
        help="codecs for the synthetic hidden states (not in --quick runs; empty: skip them)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    codecs = [str(parse_codec(c)) for c in args.codecs.split(",") if c.strip()]
    llm_codecs = [str(parse_codec(c)) for c in args.llm_codecs.split(",") if c.strip()]

    env = environment()
    print(
        f"torch {env['torch']} with {env['torch_threads']} intra-op thread(s) "
        f"(torch.set_num_threads left unchanged), {env['cpu_count']} CPU(s); "
        f"numpy {env['numpy']}; zstandard {env['zstandard']} (libzstd {env['zstd_library']})"
    )
    print(
        f"median of {args.repeat} samples per figure (each >= {MIN_SAMPLE_S * 1e3:.0f} ms) "
        "after warm-up; MB = 10^6 bytes of float32 input; random weights, seeded inputs"
    )
    busy = env["load_1min_at_start"]
    if isinstance(busy, float) and busy > 0.5:
        print(f"note: 1-minute load average {busy} at start; other work may add noise")
    rows = []
    for model, cut, xs in frontiers(args.quick):
        for codec in codecs:
            rows.append(bench(model, cut, xs, codec, args.repeat))
    for model, cut, xs in [] if args.quick or not llm_codecs else llm_frontiers():
        for codec in llm_codecs:
            rows.append(bench(model, cut, xs, codec, args.repeat))
    print()
    print(table(rows))
    line = summary(rows)
    estimates = estimate_summary(rows)
    for text in (line, estimates):
        if text:
            print()
            print(text)

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "codecs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    report = {
        "environment": env,
        "repeat": args.repeat,
        "min_sample_s": MIN_SAMPLE_S,
        "goal": {"codec": GOAL_CODEC, "max_x_bare": GOAL_RATIO},
        "summary": line,
        "estimate_summary": estimates,
        "load_1min_at_end": load(),
        "rows": [asdict(r) for r in rows],
    }
    (args.out / "codecs.json").write_text(json.dumps(report, indent=2) + "\n")
    end = report["load_1min_at_end"]
    print(f"\n1-minute load average {busy} at start, {end} at end, on {env['cpu_count']} CPU(s)")
    print(f"wrote {args.out / 'codecs.csv'} and {args.out / 'codecs.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
