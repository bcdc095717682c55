"""Pictures of a sweep: latency per cut on one link, and bytes per cut for the model.

Cuts run down the page in execution order (input at the top), so every cut name is
printed horizontally and stays readable for resnet18's 70 cuts or more.

- ``latency_plot``: for each cut, the codec predicted fastest at that cut, as a bar
  stacked by predicted component; the codec's name at the end of the bar; measured
  p50 as a black dot where the pair was measured; the planner's choice outlined in
  red, its cut name in bold red, and named in the title.
- ``bytes_plot``: bytes sent up per request against the cut, one line per codec. It
  does not depend on the link, so a sweep draws it once per model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from splitnet.partition import OUTPUT

__all__ = ["COMPONENTS", "bytes_plot", "latency_plot"]

COMPONENTS = [
    "edge_ms",
    "encode_ms",
    "up_ms",
    "rtt_ms",
    "queue_ms",
    "decode_ms",
    "cloud_ms",
    "down_ms",
]
ROW_IN = 0.16  # inches of figure height per cut


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cuts(rows: list[dict[str, Any]]) -> list[str]:
    ordered = sorted(rows, key=lambda r: r["cut_index"])
    return list(dict.fromkeys(r["cut"] for r in ordered))


def latency_plot(rows: list[dict[str, Any]], link: str, path: Path, slowdown: float) -> Path:
    """Draw one link's latency picture (see the module docstring) to ``path``."""
    plt = _pyplot()
    mine = [r for r in rows if r["link"] == link]
    cuts = _cuts(mine)
    best: dict[str, dict[str, Any]] = {}
    for r in mine:
        if r["cut"] not in best or r["predicted_ms"] < best[r["cut"]]["predicted_ms"]:
            best[r["cut"]] = r
    chosen = next((r for r in mine if r["planner_choice"]), None)
    if chosen is not None:  # the choice is drawn even where another codec is faster there
        best[chosen["cut"]] = chosen
    totals = [sum(best[c][f"pred_{k}"] for k in COMPONENTS) for c in cuts]
    measured = [best[c].get("measured_p50_ms") if best[c]["measured"] else None for c in cuts]
    # Keep the interesting range readable: clip at 3x the median bar or just past the
    # largest measured dot, unless everything fits in twice that; clipped bars print
    # their total beside the codec.
    top_measured = max((m for m in measured if m), default=0.0)
    clip = max(3 * sorted(totals)[len(totals) // 2], 1.1 * top_measured)
    limit = max(max(totals), top_measured) if max(totals) <= 2 * clip else clip
    fig, ax = plt.subplots(figsize=(11, max(4.0, ROW_IN * len(cuts) + 1.6)))
    ys = range(len(cuts))
    left = [0.0] * len(cuts)
    for comp in COMPONENTS:
        vals = [best[c][f"pred_{comp}"] for c in cuts]
        ax.barh(ys, vals, left=left, height=0.75, label=comp.removesuffix("_ms"))
        left = [a + v for a, v in zip(left, vals, strict=True)]
    mx = [(m, y) for y, m in enumerate(measured) if m is not None]
    ax.scatter(
        [min(m, limit) for m, _ in mx],
        [y for _, y in mx],
        color="black",
        zorder=4,
        s=14,
        label="measured p50",
    )
    for y, c in enumerate(cuts):
        end = min(max(totals[y], measured[y] or 0.0), limit)
        text = best[c]["codec"] if totals[y] <= limit else f"{best[c]['codec']} ({totals[y]:.0f})"
        ax.text(end + 0.005 * limit, y, text, va="center", fontsize=5.5, color="0.3")
    if chosen is not None:
        y = cuts.index(chosen["cut"])
        ax.barh(
            [y],
            [min(totals[y], limit)],
            height=0.9,
            fill=False,
            edgecolor="red",
            linewidth=1.4,
            zorder=5,
            label="planner's choice",
        )
    ax.set_yticks(list(ys))
    ax.set_yticklabels(cuts, fontsize=6.5)
    if chosen is not None:
        label = ax.get_yticklabels()[cuts.index(chosen["cut"])]
        label.set_fontweight("bold")
        label.set_color("red")
    ax.set_ylim(len(cuts) - 0.5, -0.5)  # execution order, top to bottom
    ax.set_xlim(0, limit * 1.12)
    ax.set_xlabel("latency per request (ms): bars predicted, dots measured")
    note = f", edge slowed {slowdown:g}x (emulated)" if slowdown > 1 else ""
    pick = f"\nplanner's choice (red): {chosen['cut']} {chosen['codec']}" if chosen else ""
    ax.set_title(
        f"{mine[0]['model']} on {link}: latency by cut, fastest predicted codec per cut"
        f"{note}{pick}",
        fontsize=9,
    )
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bytes_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Draw the model's bytes-per-cut picture (one line per codec) to ``path``."""
    plt = _pyplot()
    first = rows[0]["link"]
    mine = [r for r in rows if r["link"] == first and r["cut"] != OUTPUT]
    cuts = _cuts(mine)
    fig, ax = plt.subplots(figsize=(8, max(4.0, ROW_IN * len(cuts) + 1.4)))
    for codec in dict.fromkeys(r["codec"] for r in mine):
        pts = sorted((cuts.index(r["cut"]), r["bytes_up"]) for r in mine if r["codec"] == codec)
        ax.plot([b for _, b in pts], [y for y, _ in pts], marker=".", label=codec)
    ax.set_xscale("log")
    ax.set_yticks(range(len(cuts)))
    ax.set_yticklabels(cuts, fontsize=6.5)
    ax.set_ylim(len(cuts) - 0.5, -0.5)
    ax.set_xlabel("bytes sent up per request (log)")
    ax.set_title(f"{rows[0]['model']}: bytes crossing each cut (any link)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="x", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
