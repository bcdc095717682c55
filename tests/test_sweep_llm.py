"""The generation sweep end to end on tiny:llama: real server, relay and Generator.

Checks the outputs' fields and that a lossless codec's tokens equal the unsplit model's;
nothing about time (a benchmark measures, it does not assert speed).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.sweep_llm import FIELDS, default_cuts

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def test_default_cuts_are_early_middle_late_and_u_shaped() -> None:
    assert default_cuts(30) == ["block.1", "block.15", "block.29", "block.1:block.29"]
    assert default_cuts(2) == ["block.1"]


def test_sweep_generation_on_tiny_llama(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "benchmarks.sweep", "--model", "tiny:llama",
        "--links", "100mbit/4ms", "--cuts", "block.1,block.1:block.3", "--codecs", "raw",
        "--requests", "1", "--new-tokens", "4", "--prompt-tokens", "8", "--out", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with (out / "generation.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == FIELDS
    got = [(r["cut"], r["codec"], r["baseline"]) for r in rows]
    assert got == [
        ("block.1", "raw", ""),
        ("block.1:block.3", "raw", ""),
        ("input", "raw", "all-cloud"),
        ("output", "", "all-device"),
    ]
    for r in rows:
        assert r["link"] == "100mbit/4ms" and r["prompt_tokens"] == "8" and r["new_tokens"] == "4"
        assert float(r["ttft_ms"]) > 0 and float(r["tokens_per_s"]) > 0
        assert r["same_tokens"] == "True"  # raw is lossless: split greedy == unsplit greedy
    split, u_shaped = rows[0], rows[1]
    # block.K: a hidden vector up, a token down; U-shaped: a hidden vector both ways.
    assert float(split["bytes_up_per_token"]) > float(split["bytes_down_per_token"])
    assert float(u_shaped["bytes_down_per_token"]) > float(split["bytes_down_per_token"])
    assert rows[3]["bytes_per_token"] == "0"
    # all in the cloud: token ids both ways, far fewer bytes than a hidden vector
    assert float(rows[2]["bytes_up_per_token"]) < float(split["bytes_up_per_token"]) / 10
    assert rows[2]["predicted_tokens_per_s"] not in ("", "None")
    data = json.loads((out / "generation.json").read_text())
    assert data["meta"]["cuts"] == ["block.1", "block.1:block.3"]
    assert len(data["rows"]) == 4
    (plan,) = data["plans"]
    assert plan["link"] == "100mbit/4ms" and plan["choice"]
    assert "baseline all on device" in plan["text"]
    assert (out / "generation.png").stat().st_size > 0
