"""The latency model, the planner, online estimates, and cut="auto" against a real link."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ServerThread

from benchmarks.link import Link, LinkRelay
from edge.client import EdgeClient
from splitnet.codecs import encode
from splitnet.data import load_digits
from splitnet.models import load_model
from splitnet.partition import trace
from splitnet.planning import CostTable, LinkEstimate, LinkEstimator, PairCost, Planner


def _table() -> CostTable:
    pairs = {
        ("input", "raw"): PairCost(
            cut="input", codec="raw", bytes_up=100_000, encode_ms=0.1, decode_ms=0.1
        ),
        ("mid", "raw"): PairCost(
            cut="mid", codec="raw", bytes_up=10_000, encode_ms=0.1, decode_ms=0.1
        ),
        ("mid", "int8"): PairCost(
            cut="mid", codec="int8", bytes_up=2_500, encode_ms=0.2, decode_ms=0.1, agreement=0.99
        ),
    }
    return CostTable(
        edge_ms={"input": 0.0, "mid": 5.0, "output": 20.0},
        cloud_ms={"input": 2.0, "mid": 1.0},
        pairs=pairs,
        result_bytes=100,
    )


def test_prediction_is_the_sum_of_its_parts() -> None:
    planner = Planner(_table())
    link = LinkEstimate(up_mbit=8.0, down_mbit=8.0, rtt_ms=10.0, queue_ms=1.0)
    p = planner.predict("mid", "raw", link)
    assert p.up_ms == pytest.approx(10_000 * 8 / 8e3)  # 10 ms
    assert p.down_ms == pytest.approx(100 * 8 / 8e3)
    assert p.total_ms == pytest.approx(5 + 0.1 + 10 + 10 + 1 + 0.1 + 1 + 0.1)
    assert planner.predict("output", "none", link).total_ms == 20.0


def test_plan_follows_the_link_and_the_accuracy_budget() -> None:
    planner = Planner(_table(), accuracy_budget=0.005)
    fast = LinkEstimate(up_mbit=1000.0, down_mbit=1000.0, rtt_ms=1.0)
    slow = LinkEstimate(up_mbit=0.5, down_mbit=0.5, rtt_ms=50.0)
    assert planner.plan(fast).cut == "input"
    assert planner.plan(slow).cut == "output"
    # int8 loses 1% agreement: over a 0.5% budget it is never chosen, within 2% it is.
    medium = LinkEstimate(up_mbit=4.0, down_mbit=4.0, rtt_ms=1.0)
    assert all(p.codec != "int8" for p in planner.candidates(medium))
    assert Planner(_table(), accuracy_budget=0.02).plan(medium).codec == "int8"


def test_estimator_follows_a_bandwidth_drop() -> None:
    est = LinkEstimator(LinkEstimate(up_mbit=100.0, down_mbit=100.0, rtt_ms=10.0))
    est.planned()
    n = 0
    while est.up_mbit > 1.2 and n < 20:  # the link is now 1 Mbit/s: 10 kB take 80 ms
        est.observe(residual_ms=10 + 80, bytes_up=10_000, bytes_down=0, queue_ms=0)
        n += 1
    assert est.up_mbit == pytest.approx(1.0, rel=0.2) and n < 15
    assert est.should_replan()


def _device_profile(x: torch.Tensor, weights: Path) -> CostTable:
    """A device whose profile is stated, not measured: heads cost 0 ms (input), 40 ms
    (pool1) and 100 ms (the whole model); the server's tails 1 and 0.5 ms. Request sizes
    are real (the frontier encoded as it is sent). Nothing in it depends on how fast
    this machine happens to be, so the plan depends only on the link (``learn_edge``
    False: the client's timings of the heads do not replace the stated figures).
    """
    graph = trace(load_model("digits-cnn", weights), (x,))
    pairs = {}
    for cut in ("input", "pool1"):
        frontier = graph.split(cut)[0](x)
        nbytes = sum(encode(t, "raw").ByteSize() + 4 for t in frontier)
        pairs[(cut, "raw")] = PairCost(
            cut=cut, codec="raw", bytes_up=nbytes, encode_ms=0.01, decode_ms=0.01
        )
    return CostTable(
        edge_ms={"input": 0.0, "pool1": 40.0, "output": 100.0},
        cloud_ms={"input": 1.0, "pool1": 0.5},
        pairs=pairs,
        result_bytes=96,
        learn_edge=False,
    )


def test_auto_moves_to_the_new_best_cut_when_bandwidth_drops(
    digits_server: ServerThread, digits_weights: Path
) -> None:
    """On a 50 Mbit/s link everything goes to the cloud (input: ~1 ms of work against
    100 ms on the device); at 10 kbit/s one request takes ~300 ms on the wire alone, so
    the device keeps it all. The profile is injected (``costs=``), so only the link
    (emulated, and learned from live requests) decides: margins of 30x and 3x, far
    beyond what a loaded machine adds.
    """
    fast, slow = Link(50.0, 1.0), Link(0.01, 1.0)
    x = load_digits()["test"].x[:1]
    table = _device_profile(x, digits_weights)
    with (
        LinkRelay(digits_server.address, fast, fast).start() as relay,
        EdgeClient(
            relay.address, "digits-cnn", weights=digits_weights, cut="auto", costs=table
        ) as client,
    ):
        assert client.auto is not None and client.auto.planner.table.pairs is table.pairs
        assert client.auto.planner.table.cloud_ms["pool1"] == 0.5  # the given table wins
        for _ in range(10):
            client.infer(x)
        before = client.cut
        assert before == "input"  # a 100x slower device sends its work to the cloud
        relay.set_links(up=slow, down=slow)
        moved_at = None
        for i in range(20):
            client.infer(x)
            if client.cut != before and moved_at is None:
                moved_at = i + 1
        truth = LinkEstimate(
            up_mbit=slow.mbit, down_mbit=slow.mbit, rtt_ms=client.auto.estimator.rtt_ms
        )
        best = client.auto.planner.plan(truth)
        assert moved_at is not None and moved_at <= 20
        assert best.cut == "output"  # what the profile says for this link
        assert (client.cut, client.codec if client.cut != "output" else "none") == (
            best.cut,
            best.codec,
        )
        assert client.auto.history[-1][1].cut == client.cut


def test_small_sweep_writes_csv_json_png(digits_weights: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.sweep",
            "--model",
            "digits-cnn",
            "--weights",
            str(digits_weights),
            "--links",
            "WiFi,4G",
            "--codecs",
            "raw,int8+zstd:1",
            "--requests",
            "2",
            "--sample",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "regret" in out.stdout
    rows = (tmp_path / "sweep.csv").read_text().splitlines()
    assert len(rows) > 10 and "predicted_ms" in rows[0] and "measured" in rows[0]
    doc = json.loads((tmp_path / "sweep.json").read_text())
    assert {r["link"] for r in doc["rows"]} == {"WiFi", "4G"}
    assert any(r["measured"] for r in doc["rows"]) and any(not r["measured"] for r in doc["rows"])
    summary = json.loads((tmp_path / "summary.json").read_text())["links"]
    assert all(s["regret"] >= 1.0 for s in summary)
    # One latency picture per link, one bytes picture per model (bytes do not depend on it).
    for png in [tmp_path / f"latency-{link}.png" for link in ("WiFi", "4G")] + [tmp_path / "bytes.png"]:
        assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
