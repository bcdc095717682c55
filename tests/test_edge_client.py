"""EdgeClient: its config, the request bytes it writes, the errors it raises, and the
server limits it follows, against real servers on 127.0.0.1."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import get_type_hints

import grpc
import pytest
import torch
from conftest import ServerThread

from cloud.config import ModelEntry, ServerConfig
from cloud.runtime import TailRuntime
from edge.client import EdgeClient
from edge.config import EdgeConfig, EdgeOptions
from edge.model import SlowerDevice
from edge.route import Route
from edge.transport import RetryPolicy
from splitnet.codecs import decode, encode, encode_parts
from splitnet.data import load_digits
from splitnet.errors import (
    ConfigError,
    FailedPreconditionError,
    ModelMismatchError,
    NotFoundError,
    RemoteError,
    RemoteModelMismatchError,
    ResourceExhaustedError,
    UnavailableError,
)
from splitnet.models import load_model
from splitnet.planning import slowed_ms
from splitnet.v1 import inference_pb2 as pb

# ------------------------------------------------------------------ config


def test_keywords_fill_an_edge_config(digits_weights: Path) -> None:
    assert set(EdgeOptions.__annotations__) == {f.name for f in fields(EdgeConfig)}
    hints = get_type_hints(EdgeConfig)
    assert all(get_type_hints(EdgeOptions)[k] == hints[k] for k in hints)
    by_keyword = EdgeClient("127.0.0.1:1", "digits-cnn", weights=digits_weights, cut="pool1")
    config = EdgeConfig(weights=digits_weights, cut="pool1")
    assert by_keyword.config == config
    assert EdgeClient("127.0.0.1:1", "digits-cnn", config=config).config == config
    # Keywords beside config= replace those fields of it.
    both = EdgeClient("127.0.0.1:1", "digits-cnn", config=config, cut="fc1", retries=0)
    assert both.config == replace(config, cut="fc1", retries=0) and both.cut == "fc1"
    with pytest.raises(TypeError, match="unknown settings: colour"):
        EdgeClient("127.0.0.1:1", "digits-cnn", colour="red")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("deadline_s", 0, "deadline_s must be a finite number > 0"),
        ("deadline_s", float("nan"), "deadline_s"),
        ("retries", -1, "retries must be an integer >= 0"),
        ("retries", 1.5, "retries must be an integer"),
        ("window", 0, "window must be an integer >= 1"),
        ("chunk_bytes", 0, "chunk_bytes"),
        ("chunk_bytes", 1 << 30, "chunk_bytes must be at most"),
        ("edge_slowdown", 0.5, "edge_slowdown"),
        ("accuracy_budget", 2.0, "accuracy_budget"),
        ("fallback", "maybe", "fallback must be 'error' or 'local'"),
        ("lb_policy", "random", "lb_policy"),
        ("codec", "int4", "codec: invalid codec spec"),
        ("output_codec", "zstd:99", "output_codec"),
        ("codecs", (), "codecs must be a non-empty"),
        ("input_shape", (1, 0, 8), "input_shape"),
        ("token", "two\nlines", "token must be one non-empty line"),
        ("token", "", "token"),
        ("tls_cert", "c.pem", "needs both tls_cert and tls_key"),
        ("backoff_s", -1, "backoff_s"),
        ("max_backoff_s", 0.01, "max_backoff_s must be a finite number >= 0.05"),
    ],
)
def test_bad_settings_are_config_errors(field: str, value: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")) as err:
        EdgeConfig(**{field: value})  # type: ignore[arg-type]
    assert isinstance(err.value, ValueError)


def test_settings_are_normalised_and_frozen() -> None:
    config = EdgeConfig(codec="INT8+zstd", codecs=["raw", "raw", "zstd"], input_shape=[1, 4])  # type: ignore[arg-type]
    assert config.codec == "int8+zstd:3" and config.codecs == ("raw", "zstd:3")
    assert config.input_shape == (1, 4)
    with pytest.raises(AttributeError):
        config.cut = "fc1"  # type: ignore[misc]


def test_a_live_client_changes_only_what_it_can(digits_weights: Path) -> None:
    client = EdgeClient("127.0.0.1:1", "digits-cnn", weights=digits_weights)
    client.configure(deadline_s=30, retries=5, reconnect_wait_s=2.0)
    assert client.transport.policy == RetryPolicy.from_config(client.config)
    assert client.transport.policy.deadline_s == 30 and client.config.retries == 5
    with pytest.raises(ConfigError, match="cannot change on a live client"):
        client.configure(weights="other.safetensors")
    with pytest.raises(ConfigError, match=r"use client.configure\(retries=...\)"):
        client.retries = 5  # the old attributes: an error, never silently ignored


def test_retry_pauses_back_off_with_bounded_jitter() -> None:
    import random

    policy = RetryPolicy(
        deadline_s=10, retries=8, backoff_s=0.05, max_backoff_s=1.0, reconnect_wait_s=1.0
    )
    rng = random.Random(0)
    for attempt in range(8):
        base = min(0.05 * 2**attempt, 1.0)
        for _ in range(50):
            assert 0.5 * base <= policy.pause_s(attempt, rng) <= 1.5 * base
    assert policy.retryable("UNAVAILABLE") and not policy.retryable("RESOURCE_EXHAUSTED")
    assert replace(policy, busy=True).retryable("RESOURCE_EXHAUSTED")
    assert policy.attempt_timeout_s(0, 7.0) == 7.0
    assert policy.attempt_timeout_s(3, 7.0) == 4.0  # reconnect wait 1 s, doubled twice


# ------------------------------------------------------------ request bytes


@pytest.mark.parametrize("codec", ["raw", "zstd:1", "int8+zstd:1", "fp16"])
def test_request_bytes_are_what_protobuf_writes(codec: str) -> None:
    frontier = (
        torch.randn(2, 3, 4),
        torch.arange(6, dtype=torch.int64).reshape(2, 3),
        torch.zeros(0, 5),  # an empty tensor: no payload field at all
    )
    route = Route.build(
        model="m", cut="layer1.relu", fingerprint="f" * 64, output_codec="zstd:1", codec=codec,
        head=torch.nn.Identity(),
    )  # fmt: skip
    parts = route.encode(frontier)
    for rid in (1, 300, 1 << 40):  # one-, two- and six-byte varints
        want = pb.InferRequest(
            id=rid, model="m", cut="layer1.relu", fingerprint="f" * 64, output_codec="zstd:1"
        )
        want.frontier.extend(encode(t, codec) for t in frontier)
        got = pb.InferRequest.FromString(route.request(rid, parts))
        assert got == want
        assert pb.StreamRequest.FromString(route.stream_request(rid, parts)).request == want
        header = pb.StreamRequest.FromString(route.chunked_header(rid, parts)).request
        assert list(header.chunked_payload_bytes) == [
            len(encode_parts(t, codec)[1]) for t in frontier
        ]
        assert all(not t.payload for t in header.frontier)
        for t, original in zip(got.frontier, frontier, strict=True):
            if codec in ("raw", "zstd:1"):
                assert torch.equal(decode(t), original)


# ------------------------------------------------------------------ errors


def test_remote_errors_arrive_as_their_subclass(
    digits_server: ServerThread, digits_weights: Path
) -> None:
    with pytest.raises(NotFoundError, match="serves: digits-cnn"):
        EdgeClient(
            digits_server.address, "digits-cnn", weights=digits_weights, model_name="nope"
        ).connect()
    # The edge finds other weights at connect: a ModelMismatchError, not a RemoteError.
    with pytest.raises(ModelMismatchError) as err:
        EdgeClient(digits_server.address, "digits-cnn").connect()  # untrained weights
    assert not isinstance(err.value, RemoteError)


def test_nothing_listening_is_unavailable_from_connect_and_probe(digits_weights: Path) -> None:
    with pytest.raises(UnavailableError, match="unreachable after 2 attempts"):
        EdgeClient(
            "127.0.0.1:1", "digits-cnn", weights=digits_weights, retries=1, deadline_s=2
        ).connect()


def test_probe_after_the_server_left_is_unavailable(
    digits_runtime: TailRuntime, digits_weights: Path
) -> None:
    server = ServerThread(
        ServerConfig(models=(ModelEntry(name="digits-cnn"),), port=0), digits_runtime
    )
    client = EdgeClient(
        server.address, "digits-cnn", weights=digits_weights, retries=0, deadline_s=2
    )
    with client:
        assert client.probe_rtt() > 0  # a unary call: no stream is open yet
        client.use(cut="pool1", codec="raw")
        client.infer(torch.zeros(1, 1, 8, 8))  # opens the stream requests go on
        assert client.probe_rtt() > 0  # on that stream now
        server.stop()
        with pytest.raises(UnavailableError):  # never a bare grpc.RpcError
            client.probe_rtt()  # the stream broke: the unary way, which fails cleanly


def test_a_server_with_other_weights_answers_failed_precondition(
    digits_runtime: TailRuntime, digits_weights: Path
) -> None:
    """The server is replaced, on the same port, by one with other weights: the edge's
    requests are refused by the server, and that too is a ModelMismatchError."""
    server = ServerThread(
        ServerConfig(models=(ModelEntry(name="digits-cnn"),), port=0), digits_runtime
    )
    other = TailRuntime([ModelEntry(name="digits-cnn")], profile_runs=0)  # untrained
    x = torch.zeros(1, 1, 8, 8)
    try:
        with EdgeClient(server.address, "digits-cnn", weights=digits_weights, cut="pool1") as c:
            c.infer(x)
            port = server.port
            server.stop()
            server = ServerThread(
                ServerConfig(models=(ModelEntry(name="digits-cnn"),), port=port), other
            )
            with pytest.raises(RemoteModelMismatchError, match="fingerprint") as err:
                c.infer(x)
            assert isinstance(err.value, ModelMismatchError)
            assert isinstance(err.value, FailedPreconditionError)
            with pytest.raises(RemoteModelMismatchError):  # in-band, on a stream
                list(c.infer_many([x, x]))
    finally:
        server.stop()


# ------------------------------------------------------------------ limits


def test_the_servers_limits_are_followed(digits_runtime: TailRuntime, digits_weights: Path) -> None:
    config = ServerConfig(
        models=(ModelEntry(name="digits-cnn"),),
        port=0,
        max_in_flight=3,
        max_batch_size=4,
        chunk_bytes=8192,
        max_message_bytes=64 << 10,
    )
    server = ServerThread(config, digits_runtime)
    xs = load_digits()["test"].x[:10]
    local = load_model("digits-cnn", digits_weights)
    try:
        with EdgeClient(
            server.address, "digits-cnn", weights=digits_weights, cut="block.conv1", window=16
        ) as c:
            assert c.limits is not None and c.limits.max_batch_size == 4
            assert c._window == 3  # the server admits 3 at once
            assert c._chunk_bytes == 8192
            # 10 samples, 4 at most per request: three requests, one result.
            r = c.infer(xs)
            torch.testing.assert_close(r.output, local(xs), rtol=0, atol=1e-5)
            assert r.timing.batch_size <= 4
            # 4 samples at block.conv1 are 64 KiB of frontier, over the message limit:
            # sent in chunks on a stream instead of refused.
            r = c.infer(xs[:4])
            assert r.timing.bytes_sent > 64 << 10
            torch.testing.assert_close(r.output, local(xs[:4]), rtol=0, atol=1e-5)
            outs = list(c.infer_many([xs[:2], xs, xs[:1]]))
            assert [o.output.shape[0] for o in outs] == [2, 10, 1]
            torch.testing.assert_close(outs[1].output, local(xs), rtol=0, atol=1e-5)
    finally:
        server.stop()


class SlotHolder:
    """Holds the one slot of a server with ``max_in_flight=1``: a request admitted there
    waits out the batcher's queue delay (its batch never fills), so the slot stays taken
    for that long. ``hold()`` returns once a request is known to be admitted: a second
    request sent after it was refused. No timing decides it: if the second one got the
    slot instead, it becomes the holder's first request, and so on.
    """

    def __init__(self, address: str, fingerprint: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.infer = self.channel.unary_unary("/splitnet.v1.SplitInference/Infer")
        self.request = pb.InferRequest(
            model="digits-cnn", cut="input", fingerprint=fingerprint,
            frontier=[encode(torch.zeros(1, 1, 8, 8))],
        ).SerializeToString()  # fmt: skip
        self.held: list[grpc.Future] = []

    def hold(self) -> None:
        first = self.infer.future(self.request, timeout=60)
        while True:
            try:
                self.infer(self.request, timeout=60)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.held.append(first)  # refused: ``first`` holds the slot
                    return
                raise
            first.exception()  # the second got the slot and is done; start over
            first = self.infer.future(self.request, timeout=60)

    def close(self) -> None:
        for f in self.held:
            f.result()
        self.channel.close()


def test_a_full_server_is_retried_with_retry_busy(
    digits_runtime: TailRuntime, digits_weights: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = ServerConfig(
        models=(ModelEntry(name="digits-cnn"),),
        port=0,
        max_in_flight=1,
        max_queue_delay_us=2_000_000,
    )
    server = ServerThread(config, digits_runtime)
    holder = SlotHolder(server.address, digits_runtime.models["digits-cnn"].fingerprint)
    x = torch.zeros(1, 1, 8, 8)
    caplog.set_level(logging.INFO, logger="edge")
    try:
        with EdgeClient(server.address, "digits-cnn", weights=digits_weights, cut="pool1") as c:
            holder.hold()  # taken for the next ~2 s
            with pytest.raises(ResourceExhaustedError, match="retry"):
                c.infer(x)  # retry_busy is off: the server's answer is raised
            # Retried for 0.5 x (0.05 + 0.1 + ... + 1.6 + 2 + 2) s = 3.2 s at least.
            c.configure(retry_busy=True, retries=9, deadline_s=60)
            assert c.infer(x).output.shape == (1, 10)
            holder.hold()
            assert [r.output.shape for r in c.infer_many([x, x])] == [(1, 10)] * 2  # in-band
    finally:
        holder.close()
        server.stop()
    retried = [m for m in caplog.messages if "RESOURCE_EXHAUSTED; retry" in m]
    assert any(m.startswith("Infer:") for m in retried), caplog.messages
    assert any(m.startswith("stream:") for m in retried), caplog.messages


def test_emulated_device_stretches_warm_compute_and_pays_a_stall_once() -> None:
    """--edge-slowdown: the stretch is (factor - 1) x the head's warm compute, the least
    of its back-to-back calibration runs, so a stall of one request here is paid once
    and the emulated device keeps its speed when this host's drifts. A fake clock:
    nothing here depends on this machine's speed.
    """
    now = [0.0]
    slept: list[float] = []
    slower = SlowerDevice(10.0, runs=3, clock=lambda: now[0], sleep=slept.append)
    durations = iter([0.050, 0.012, 0.011, 0.013])  # a cold warm-up, then three runs

    def run() -> None:
        now[0] += next(durations)

    assert slower.warm_s("a") is None
    assert slower.calibrate("a", run) == pytest.approx(0.011)
    assert slower.calibrate("a", run) == pytest.approx(0.011)  # once per head: `run` is not called again
    for took in (0.011, 0.030, 0.022):  # a steady run, a stall, the host 2x slower
        started = now[0]
        now[0] += took
        slower.stretch("a", started)
    assert slept == pytest.approx([0.099] * 3)  # 9 x 11 ms each time: the device's own
    started = now[0]
    now[0] += 0.5
    slower.stretch("b", started)  # never calibrated: its own run is the figure
    assert slept[-1] == pytest.approx(4.5)
    # Many heads at once, in interleaved rounds; a head already known is not run again.
    order: list[str] = []

    def timed(name: str, took: float) -> Callable[[], None]:
        def run() -> None:
            order.append(name)
            now[0] += took

        return run

    def known() -> None:
        raise AssertionError("a calibrated head is not timed again")

    warm = slower.calibrate_many({"a": known, "c": timed("c", 0.002), "d": timed("d", 0.003)})
    assert warm == pytest.approx({"a": 0.011, "c": 0.002, "d": 0.003})
    assert order == ["c", "d"] * 4  # a warm-up round, then three interleaved rounds
    # Nested runs (heads in cut order, then the model): none is kept above a later one.
    nested = slower.calibrate_many(
        {"h1": timed("h1", 0.004), "h2": timed("h2", 0.009), "whole": timed("whole", 0.007)},
        nested=True,
    )
    assert nested == pytest.approx({"h1": 0.004, "h2": 0.007, "whole": 0.007})
    assert SlowerDevice.of(10.0) is SlowerDevice.of(10.0)  # every client of the process
    assert SlowerDevice.of(10.0) is not SlowerDevice.of(4.0)


def test_the_planner_prices_an_emulated_device_as_it_runs(digits_weights: Path) -> None:
    """--edge-slowdown: the client states each head's warm compute (what its runs are
    stretched by), and the cost table prices a head as the run plus (factor - 1) x
    that, not factor x the profiled run: they differ by as much as a profiled run is
    over the warm one (resnet18's deep heads were overpriced by 10%)."""
    slow = EdgeClient("127.0.0.1:1", "digits-cnn", weights=digits_weights, edge_slowdown=10)
    warm = slow.emulated_warm_ms()
    assert set(warm) == set(slow.graph.names)  # every head, and output: the whole model
    assert all(ms >= 0 for ms in warm.values()) and warm["output"] >= warm["pool1"] > 0
    assert slowed_ms(2.0, 10.0, warm["pool1"]) == pytest.approx(2.0 + 9 * warm["pool1"])
    assert slowed_ms(2.0, 10.0) == pytest.approx(20.0)  # a head not calibrated
    assert EdgeClient("127.0.0.1:1", "digits-cnn", weights=digits_weights).emulated_warm_ms() == {}
