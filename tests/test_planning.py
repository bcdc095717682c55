"""The latency model, the planner, online estimates, and cut="auto" against a real link."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import ServerThread

from benchmarks.link import Link, LinkRelay
from cloud.config import ModelEntry, ServerConfig
from cloud.runtime import TailRuntime
from edge.auto import AutoPlan, is_probe_point
from edge.client import EdgeClient
from edge.results import InferResult, Timing
from splitnet.codecs import encode
from splitnet.data import load_digits
from splitnet.models import load_model
from splitnet.partition import trace
from splitnet.planning import (
    CostTable,
    LinkEstimate,
    LinkEstimator,
    PairCost,
    Planner,
    fit_profile,
    frontier_bytes,
    learned,
)
from splitnet.v1 import inference_pb2 as pb


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


# ------------------------------------------------------------ learning every component


def test_a_learned_value_replaces_its_prior() -> None:
    """One observation below the prior replaces it; a prior too low goes at the fourth
    (the first observation is left out once there is a second: it ran cold)."""
    assert learned(30.0, []) == 30.0
    assert learned(30.0, [0.3]) == 0.3  # the profile was too slow: trusted at once
    assert learned(30.0, [45.0, 0.3]) == 0.3  # a cold first run is left out
    assert learned(0.5, [5.0]) == 0.5  # one slow observation moves nothing
    assert learned(0.5, [5.0, 6.0, 5.5]) == 5.5  # the lower median of prior, 6 and 5.5
    assert learned(0.5, [9.0, 6.0, 5.5, 5.0]) == 5.5  # three: the prior no longer counts


def _request(
    cut: str, codec: str, *, cloud: float, batch: int = 1, edge: float = 0.0, sent: int = 200
) -> InferResult:
    """An answered request as the client reports it (what the planner learns from)."""
    t = Timing(edge_ms=edge, encode_ms=0.1, cloud_ms=cloud, server_decode_ms=0.1,
               batch_size=batch, total_ms=edge + 0.2 + cloud + 10.0, bytes_sent=sent,
               bytes_received=100)  # fmt: skip
    return InferResult(output=None, cut=cut, codec=codec, timing=t)


def test_cloud_compute_is_learned_per_cut_and_batch() -> None:
    planner = Planner(_table())
    assert planner.cloud_ms("input") == 2.0 and planner.cloud_ms("input", 4) == 8.0
    planner.observe_request(
        "input", "raw", edge_ms=0, encode_ms=0.1, decode_ms=0.1, cloud_ms=0.2, batch=1
    )
    assert planner.cloud_ms("input") == 0.2 and planner.moved is not None
    planner.planned()
    for ms in (3.0, 3.0, 3.1, 2.9):  # batches of 4 cost what they cost, apart from batch 1
        planner.observe_request(
            "input", "raw", edge_ms=0, encode_ms=0.1, decode_ms=0.1, cloud_ms=ms, batch=4
        )
    assert planner.cloud_ms("input", 4) == 3.0 and planner.cloud_ms("input", 1) == 0.2
    assert planner.batch == 4 and planner.moved is not None  # requests now meet batches of 4


def test_request_bytes_are_learned_from_what_requests_sent() -> None:
    """A compressed frontier's size follows its input: the table's estimate, made on
    one input, gives way to the median of what the pair's requests really sent."""
    planner = Planner(_table())
    link = LinkEstimate(up_mbit=8.0, down_mbit=8.0, rtt_ms=10.0)
    assert planner.predict("mid", "raw", link).bytes_up == 10_000
    for sent in (8_000, 9_000, 8_500):
        planner.observe_request("mid", "raw", edge_ms=5.0, encode_ms=0.1, decode_ms=0.1,
                                cloud_ms=1.0, batch=1, bytes_up=sent)  # fmt: skip
    p = planner.predict("mid", "raw", link)
    assert p.bytes_up == 8_500 and p.up_ms == pytest.approx(8_500 * 8 / 8e3)
    assert planner.predict("mid", "int8", link).bytes_up == 2_500  # another pair: its estimate


def test_edge_compute_is_learned_from_the_clients_timing() -> None:
    planner = Planner(_table())
    planner.observe_edge("mid", 40.0)  # the first run pays one-time costs
    for _ in range(3):
        planner.observe_edge("mid", 12.0)  # the head runs 12 ms here, not the profiled 5
    assert planner.edge_ms("mid") == 12.0 and planner.edge_scale == pytest.approx(12 / 5)
    # A cut not yet run keeps its profile, scaled like the heads that were run.
    assert planner.edge_ms("input") == 0.0 and planner.edge_scale > 1.5
    stated = Planner(replace(_table(), learn_edge=False))
    stated.observe_edge("mid", 12.0)
    assert stated.edge_ms("mid") == 5.0


def test_doubt_in_a_cut_never_run_shrinks_to_what_the_scaled_profile_missed() -> None:
    """Until two heads (tails) are measured, a head (tail) never run is doubted whole;
    after, only by the largest error the scaled profile made on the measured ones."""
    table = replace(
        _table(),
        edge_ms={"input": 0.0, "a": 5.0, "b": 10.0, "mid": 20.0, "output": 40.0},
        cloud_ms={"input": 2.0, "a": 4.0, "b": 3.0, "mid": 2.0},
        pairs={
            **_table().pairs,
            **{(c, "raw"): PairCost(cut=c, codec="raw", bytes_up=10_000, encode_ms=0.1,
                                    decode_ms=0.1) for c in ("a", "b")},
        },
    )  # fmt: skip
    planner = Planner(table)
    link = LinkEstimate(up_mbit=8.0, down_mbit=8.0, rtt_ms=10.0)
    whole = planner.unobserved_ms(planner.predict("mid", "raw", link))
    assert whole == pytest.approx(20.0 + 0.1 + 0.1 + 2.0)  # every component on its prior
    for edge, cloud in ((12.0, 8.0), (10.0, 8.0), (10.0, 8.0)):  # head a at 2x its profile
        planner.observe_request("a", "raw", edge_ms=edge, encode_ms=0.1, decode_ms=0.1,
                                cloud_ms=cloud, batch=1)  # fmt: skip
    assert planner.edge_spread == 1.0 and planner.cloud_spread == 1.0  # one cut says nothing
    for edge, cloud in ((30.0, 7.8), (24.0, 7.8), (24.0, 7.8)):  # head b at 2.4x, tail 2.6x
        planner.observe_request("b", "raw", edge_ms=edge, encode_ms=0.1, decode_ms=0.1,
                                cloud_ms=cloud, batch=1)  # fmt: skip
    assert planner.edge_scale == pytest.approx(2.2) and planner.cloud_scale == pytest.approx(2.3)
    assert planner.edge_spread == pytest.approx(0.2 / 2.2)  # both heads 0.2 off the median
    assert planner.cloud_spread == pytest.approx(0.3 / 2.3)
    p = planner.predict("mid", "raw", link)
    assert p.edge_ms == pytest.approx(44.0) and p.cloud_ms == pytest.approx(4.6)
    assert planner.unobserved_ms(p) == pytest.approx(
        44.0 * 0.2 / 2.2 + 0.1 + 0.1 + 4.6 * 0.3 / 2.3
    )
    # A head or tail measured itself carries no doubt; all on the device stays whole.
    assert planner.unobserved_ms(planner.predict("b", "raw", link)) == 0.0
    assert planner.unobserved_ms(planner.predict("output", "none", link)) == 40.0


def test_tails_not_served_are_priced_by_a_fixed_cost_and_a_scale_between_their_neighbours() -> (
    None
):
    """A host that adds a fixed cost to every served tail inflates short tails more than
    long ones: one scale overprices a long tail never served. With three tails served
    whose profiles span twofold, the prior is fixed + scale x profile; and a tail is
    never priced above one measured at an earlier cut (which contains it), nor below
    one measured at a later cut."""
    # Served = 4 ms + 1.0 x profile, exactly: ratios 5.0, 3.0, 1.4 (median 3.0).
    points = [(1.0, 5.0), (2.0, 6.0), (10.0, 14.0)]
    assert fit_profile(points) == pytest.approx((4.0, 1.0))
    assert fit_profile(points[:2]) == (0.0, 4.0)  # two points: the median ratio alone
    assert fit_profile([(1.0, 5.0), (1.2, 6.0), (1.5, 6.5)])[0] == 0.0  # profiles too alike
    assert fit_profile([(1.0, 1.0), (2.0, 3.0), (4.0, 7.0)])[0] == 0.0  # fixed < 0: a scale

    cuts = ["input", "a", "b", "c", "d"]
    profile = {"input": 40.0, "a": 30.0, "b": 10.0, "c": 2.0, "d": 1.0}
    table = CostTable(
        edge_ms={"input": 0.0, **{c: 5.0 for c in cuts[1:]}, "output": 50.0},
        cloud_ms=profile,
        pairs={(c, "raw"): PairCost(cut=c, codec="raw", bytes_up=1_000, encode_ms=0.1,
                                    decode_ms=0.1) for c in cuts},
        result_bytes=100,
    )  # fmt: skip
    planner = Planner(table)
    for cut in ("b", "c", "d"):  # served at 4 ms + its profile
        for _ in range(3):
            planner.observe_request(cut, "raw", edge_ms=5.0, encode_ms=0.1, decode_ms=0.1,
                                    cloud_ms=4.0 + profile[cut], batch=1)  # fmt: skip
    assert (planner.cloud_fixed, planner.cloud_scale) == pytest.approx((4.0, 1.0))
    assert planner.cloud_ms("a") == pytest.approx(34.0)  # one scale (3.0) would say 90
    assert planner.cloud_spread == pytest.approx(0.05)  # the fit missed nothing: the floor
    # Two tails served, input's (28 ms, 0.7x) and d's (5 ms, 5x): one scale, the median
    # 2.85, prices a at 85 ms, above input's tail that contains it: a is 28.
    bounded = Planner(table)
    for cut, ms in (("input", 28.0), ("d", 5.0)):
        for _ in range(3):
            bounded.observe_request(cut, "raw", edge_ms=5.0, encode_ms=0.1, decode_ms=0.1,
                                    cloud_ms=ms, batch=1)  # fmt: skip
    assert (bounded.cloud_fixed, bounded.cloud_scale) == pytest.approx((0.0, 2.85))
    assert bounded.cloud_ms("a") == pytest.approx(28.0)
    assert bounded.cloud_ms("c") == pytest.approx(2.0 * 2.85)  # between d and input

    # Heads the other way round: a head never run is at least one measured before it.
    heads = Planner(replace(table, edge_ms={"input": 0.0, "a": 5.0, "b": 6.0, "c": 30.0,
                                            "d": 31.0, "output": 50.0}))  # fmt: skip
    for cut, ms in (("a", 5.0), ("c", 40.0)):  # at 1.0x and 1.33x their profiles
        for _ in range(3):
            heads.observe_edge(cut, ms)
    assert heads.edge_scale == pytest.approx((1.0 + 40.0 / 30.0) / 2)
    assert heads.edge_ms("d") == pytest.approx(40.0)  # 31 x 1.17 = 36 is under head c
    assert heads.edge_ms("b") == pytest.approx(6.0 * heads.edge_scale)  # between a and c


def test_heads_tails_and_codecs_measured_under_a_millisecond_teach_a_fixed_cost() -> None:
    """A head or tail profiled under ``SCALE_FLOOR_MS`` runs mostly what any call costs:
    served 0.3-0.4 ms over its profile, it says nothing of a scale. Taken as a ratio (a
    0.2 ms head run in 0.5 ms: 2.5x) it overprices every longer head; taken as a fixed
    cost it prices them as they run. So does an encode (decode) the table prices at a
    warm loop's throughput, per codec (any codec's until one of its own is measured)."""
    assert fit_profile([(0.1, 0.5), (0.2, 0.6)]) == pytest.approx((0.4, 1.0))
    # Beside a long cut, the short one teaches the fixed cost; the ratio is what is left.
    fixed, scale = fit_profile([(0.5, 1.5), (10.0, 21.0)])
    assert fixed == pytest.approx(1.5 - 0.5 * 2.1) and scale == pytest.approx((21.0 - fixed) / 10)

    pairs = {
        (c, k): PairCost(cut=c, codec=k, bytes_up=1_000, encode_ms=0.01, decode_ms=0.01)
        for c in ("input", "a", "b") for k in ("raw", "zstd:1")
    }  # fmt: skip
    table = CostTable(
        edge_ms={"input": 0.0, "a": 0.2, "b": 1.5, "output": 3.0},
        cloud_ms={"input": 0.4, "a": 0.3, "b": 0.1},
        pairs=pairs,
        result_bytes=100,
    )
    planner = Planner(table)
    for _ in range(3):  # head a 0.3 ms over its profile, tail a 0.4 ms over
        planner.observe_request("a", "zstd:1", edge_ms=0.5, encode_ms=0.11, decode_ms=0.06,
                                cloud_ms=0.7, batch=1)  # fmt: skip
    assert (planner.edge_fixed, planner.edge_scale) == pytest.approx((0.3, 1.0))
    assert (planner.cloud_fixed, planner.cloud_scale) == pytest.approx((0.4, 1.0))
    assert planner.edge_ms("b") == pytest.approx(1.8)  # a ratio of 2.5 would say 3.75
    assert planner.cloud_ms("b") == pytest.approx(0.5)  # the profile alone: 0.1
    assert planner.cloud_ms("input") == pytest.approx(0.8)
    assert planner.encode_ms("b", "zstd:1") == pytest.approx(0.11)  # 0.01 + 0.1 a call
    assert planner.decode_ms("b", "zstd:1") == pytest.approx(0.06)
    assert planner.encode_ms("b", "raw") == pytest.approx(0.11)  # no raw pair yet: zstd's
    for _ in range(3):
        planner.observe_request("a", "raw", edge_ms=0.5, encode_ms=0.05, decode_ms=0.06,
                                cloud_ms=0.7, batch=1)  # fmt: skip
    assert planner.encode_ms("b", "raw") == pytest.approx(0.05)  # now its own
    assert planner.encode_ms("b", "zstd:1") == pytest.approx(0.11)


def test_exploration_is_a_doubling_schedule_and_costs_log_n_requests() -> None:
    """Probes go out at requests 8, 16, 32, ... and the one after each (by count, so
    deterministically), in turn to the best all-cloud choice, all on the device, and
    the runner-up."""
    link = LinkEstimate(up_mbit=20.0, down_mbit=20.0, rtt_ms=1.0)  # the plan: cut mid
    plan = AutoPlan.from_table(_table(), prior=link)
    chosen = (plan.prediction.cut, plan.prediction.codec) if plan.prediction else None
    sent = []
    for _ in range(1000):
        cut, codec = plan.next_choice()
        sent.append((cut, codec))
        if cut == "output":
            plan.observe_local(cut, 20.0)  # what the table says: nothing moves
        else:
            pair = plan.planner.table.pairs[(cut, codec)]
            plan.learn(
                _request(cut, codec, cloud=plan.planner.table.cloud_ms[cut],
                         edge=plan.planner.table.edge_ms[cut], sent=pair.bytes_up),
                link=False, probe_rtt=None,
            )  # fmt: skip
    assert [n for n, _, _ in plan.probes] == [8, 16, 32, 64, 128, 256, 512]
    assert all(is_probe_point(n) for n, _, _ in plan.probes)
    # Two requests per probe: 14 of 1000 requests (1.4%) went elsewhere than the plan.
    assert sum(k != chosen for k in sent) == 2 * len(plan.probes) == 14
    assert all(sent[n - 1] == sent[n] != chosen for n, _, _ in plan.probes)
    targets = [(c, k) for _, c, k in plan.probes]
    assert chosen == ("mid", "raw") and set(targets) == {("input", "raw"), ("output", "none")}
    # On a link where sending the input alone takes over 4x the plan, it is not probed.
    slow = AutoPlan.from_table(_table(), prior=replace(link, up_mbit=8.0))
    assert slow.prediction is not None and slow.prediction.cut == "mid"
    assert slow.probe_targets() == [("output", "none")]


def test_a_refreshed_server_table_is_the_prior_again() -> None:
    link = LinkEstimate(up_mbit=8.0, down_mbit=8.0, rtt_ms=10.0)
    plan = AutoPlan.from_table(_table(), prior=link)
    for ms in (0.4, 0.5, 0.5, 0.6):
        plan.learn(_request("mid", "raw", cloud=ms, edge=5.0), link=False, probe_rtt=None)
    assert plan.planner.cloud_ms("mid") == 0.5
    info = pb.ModelInfo(name="m")
    info.cuts.add(name="mid", tail_latency_ms=9.0)
    plan.refresh(info)  # a restarted (slower) server: its profile counts beside the newest
    assert plan.planner.table.cloud_ms["mid"] == 9.0 and plan.planner.cloud_ms("mid") == 0.6
    assert plan.replans[-1][1].startswith("reconnected")


def test_request_bytes_are_estimated_not_encoded() -> None:
    x = load_digits()["test"].x[:1]
    graph = trace(load_model("digits-cnn"), (x,))
    for cut in ("input", "pool1", "block.relu"):
        frontier = graph.split(cut)[0](x)
        for codec in ("raw", "int8", "zstd:1"):
            real = sum(encode(t, codec).ByteSize() + 4 for t in frontier)
            est = frontier_bytes(frontier, codec)
            assert est == real if codec != "zstd:1" else abs(est - real) <= 0.05 * real


WRONG_MS = 100.0  # the start-up profile of cut input: far more than 10x what it costs


def test_auto_corrects_a_wrong_server_profile_from_responses(digits_weights: Path) -> None:
    """The server's start-up profile says the whole model (cut ``input``) takes 100 ms;
    its responses report what it really takes (about 0.3 ms here; under 10 ms on any
    machine this runs on). The device's figures are stated (``learn_edge`` False: head
    at pool1 20 ms, whole model 200 ms), so only the learned cloud compute decides. The
    planner starts at pool1 (20 ms beats 100), probes input at requests 8 and 9 (the
    schedule), learns its compute from those responses, and moves: by request 9.
    """
    x = load_digits()["test"].x[:1]
    model = load_model("digits-cnn", digits_weights)
    with torch.no_grad():
        want = model(x)
    graph = trace(model, (x,))
    pairs = {}
    for cut in ("input", "pool1"):
        frontier = graph.split(cut)[0](x)
        pairs[(cut, "raw")] = PairCost(
            cut=cut, codec="raw", bytes_up=frontier_bytes(frontier, "raw"), encode_ms=0.01,
            decode_ms=0.01,
        )  # fmt: skip
    table = CostTable(
        edge_ms={"input": 0.0, "pool1": 20.0, "output": 200.0},
        cloud_ms={},  # from the server's GetModelInfo
        pairs=pairs,
        result_bytes=96,
        learn_edge=False,
    )
    profile = {c.name: 0.1 for c in graph.cuts} | {"input": WRONG_MS}
    runtime = TailRuntime(
        [ModelEntry(name="digits-cnn", weights=str(digits_weights))],
        profile={"digits-cnn": profile},
    )
    server = ServerThread(ServerConfig(models=(ModelEntry(name="digits-cnn"),), port=0), runtime)
    link = LinkEstimate(up_mbit=1000.0, down_mbit=1000.0, rtt_ms=1.0)
    try:
        with EdgeClient(
            server.address, "digits-cnn", weights=digits_weights, cut="auto", costs=table,
            link=link,
        ) as client:  # fmt: skip
            auto = client.auto
            assert auto is not None and auto.planner.cloud_ms("input") == WRONG_MS
            assert client.cut == "pool1"  # the wrong start: the profile prices input at 100 ms
            results = [client.infer(x) for _ in range(40)]
    finally:
        server.stop()
    assert all(torch.equal(r.output, want) for r in results)  # probes answer correctly too
    assert auto.probes[0] == (8, "input", "raw")
    # Moved by the probe's second request at the latest (its first may run cold).
    assert auto.history[0][1].cut == "pool1" and auto.history[1][1].cut == "input"
    assert auto.history[1][0] in (8, 9)
    # The final choice is the cheapest on the learned components...
    best = auto.planner.plan(auto.estimator.estimate)
    assert (client.cut, client.codec) == (best.cut, best.codec) == ("input", "raw")
    assert [r.cut for r in results[7:15]] == ["input"] * 8  # the probe (8, 9), then the plan
    # ...and the learned compute is what the responses at input reported.
    reported = [r.timing.cloud_ms for r in results if r.cut == "input"]
    assert min(reported) <= auto.planner.cloud_ms("input") <= max(reported) < WRONG_MS


def test_the_rtt_is_what_a_request_most_likely_pays_not_its_stalls() -> None:
    """A request's fixed cost is skewed: 17.5 ms, and now and then a 4 ms stall. A
    weighted mean would sit above what most requests pay; the median of the last few
    does not, and still follows a step in the link within three samples."""
    est = LinkEstimator(LinkEstimate(up_mbit=10.0, down_mbit=10.0, rtt_ms=17.5))
    for residual in (17.5, 21.5, 17.5, 17.5, 21.5, 17.5, 21.5, 17.5):  # 300-byte requests
        est.observe(residual_ms=residual + 0.24, bytes_up=300, bytes_down=0, queue_ms=0)
        assert est.rtt_ms == pytest.approx(17.5)
    for _ in range(3):  # the link is now 10 ms slower
        est.observe(residual_ms=27.5 + 0.24, bytes_up=300, bytes_down=0, queue_ms=0)
    assert est.rtt_ms == pytest.approx(27.5)
    est.observe_rtt(27.0)  # a probe is a sample like any other
    assert est.rtt_ms == pytest.approx(27.5)


def test_small_requests_teach_the_rtt_not_the_bandwidth() -> None:
    """3 ms of noise on a 300-byte request would read as 0.8 Mbit/s: it moves the RTT."""
    est = LinkEstimator(LinkEstimate(up_mbit=10.0, down_mbit=10.0, rtt_ms=40.0))
    for _ in range(10):
        est.observe(residual_ms=43.0, bytes_up=300, bytes_down=0, queue_ms=0)
    assert est.up_mbit == 10.0 and est.rtt_ms == pytest.approx(43.0 - 0.24, abs=0.1)
