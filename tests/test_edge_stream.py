"""EdgeClient.infer_many: lazy input, bounded memory, replay after a fault, and what a
misbehaving server gets (ProtocolError, DeadlineExceededError), against real servers.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent import futures
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
from conftest import ServerThread
from torch import nn

from cloud.config import ModelEntry, ServerConfig
from cloud.runtime import TailRuntime
from edge.client import EdgeClient
from splitnet.data import load_digits
from splitnet.errors import (
    CodecError,
    DeadlineExceededError,
    InvalidArgumentError,
    ProtocolError,
)
from splitnet.models import load_model
from splitnet.v1 import inference_pb2 as pb

AFFINE = "test_edge_stream:affine"  # this module's model, served by name


class Affine(nn.Module):
    """y = 2x + 1: exact in float32 for the integers used here, so every answer can be
    checked without running a model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0 + 1.0


def affine() -> nn.Module:
    return Affine()


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def affine_server() -> Iterator[ServerThread]:
    entry = ModelEntry(name=AFFINE, input_shape=(1, 4))
    server = ServerThread(ServerConfig(models=(entry,), port=0, profile_runs=1))
    yield server
    server.stop()


def test_a_generator_of_100000_inputs_holds_only_the_window(affine_server: ServerThread) -> None:
    """100,000 inputs from a generator: at most ``window`` of them are alive at any time
    (plus the two in hand; counted exactly, by finalizers), resident memory stays within 24 MiB of where it was
    after the first 2,000, and every answer is right. ``list(xs)`` would keep all
    100,000 tensors alive (about 50 MB of them).
    """
    n, window = 100_000, 32
    alive = [0]
    most_alive = [0]

    def gone() -> None:
        alive[0] -= 1

    def inputs() -> Iterator[torch.Tensor]:
        for i in range(n):
            x = torch.full((1, 4), float(i))
            alive[0] += 1
            most_alive[0] = max(most_alive[0], alive[0])
            weakref.finalize(x, gone)
            yield x

    with EdgeClient(
        affine_server.address, AFFINE, input_shape=(1, 4), cut="input", window=window
    ) as client:
        count = 0
        baseline = peak = 0
        for i, result in enumerate(client.infer_many(inputs())):
            assert result.output[0, 0].item() == 2.0 * i + 1.0, i
            count += 1
            if i == 2_000:
                baseline = _rss_bytes()
            elif i > 2_000 and i % 1_000 == 0:
                peak = max(peak, _rss_bytes())
    assert count == n
    # The window, the request answered last (still in hand) and the generator's own local.
    assert most_alive[0] <= window + 2, most_alive[0]
    grown = peak - baseline
    print(f"RSS after 2,000: {baseline / 2**20:.1f} MiB; grew {grown / 2**20:.1f} MiB after")
    assert grown < 24 << 20


def test_inputs_are_read_lazily(affine_server: ServerThread) -> None:
    pulled = [0]

    def inputs() -> Iterator[torch.Tensor]:
        for i in range(50):
            pulled[0] += 1
            yield torch.full((1, 4), float(i))

    with EdgeClient(
        affine_server.address, AFFINE, input_shape=(1, 4), cut="input", window=4
    ) as client:
        results = client.infer_many(inputs())
        assert pulled[0] == 0  # nothing happens before the first result is asked for
        first = next(results)
        assert first.output[0, 0].item() == 1.0
        assert pulled[0] <= 4 + 1  # the window, and one to refill it
        assert len(list(results)) == 49


@pytest.mark.parametrize(
    ("codec", "bad", "error"),
    [
        ("raw", torch.zeros(1, 5), InvalidArgumentError),  # the server refuses it
        ("int8", torch.full((1, 4), float("inf")), CodecError),  # int8 cannot carry inf
    ],
)
def test_an_inputs_own_error_comes_in_its_turn(
    affine_server: ServerThread, codec: str, bad: torch.Tensor, error: type[Exception]
) -> None:
    """A bad input is raised after the answers to the inputs before it, whether the
    server refused it (in-band) or it failed here."""

    def inputs() -> Iterator[torch.Tensor]:
        for i in range(5):
            yield torch.full((1, 4), float(i))
        yield bad
        yield torch.zeros(1, 4)

    with EdgeClient(
        affine_server.address, AFFINE, input_shape=(1, 4), cut="input", codec=codec, window=8
    ) as client:
        got = 0
        with pytest.raises(error):
            for _ in client.infer_many(inputs()):
                got += 1
        assert got == 5


def test_a_restarted_server_gets_the_unanswered_requests_again(
    digits_runtime: TailRuntime, digits_weights: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server stops while requests are in flight and comes back on the same port:
    the stream is opened again and only the unanswered inputs are sent again. Every
    input gets exactly one answer, in order, equal to the whole model's."""
    caplog.set_level(logging.INFO, logger="edge.client")
    config = ServerConfig(models=(ModelEntry(name="digits-cnn"),), port=0)
    server = ServerThread(config, digits_runtime)
    xs = load_digits()["test"].x[:300]
    local = load_model("digits-cnn", digits_weights)
    with torch.no_grad():
        want = local(xs)
    try:
        with EdgeClient(
            server.address,
            "digits-cnn",
            weights=digits_weights,
            cut="pool1",
            retries=5,
            backoff_s=0.05,
        ) as client:
            outs = []
            for r in client.infer_many(xs[i : i + 1] for i in range(300)):
                outs.append(r)
                if len(outs) == 100:  # requests 101.. are in flight now
                    port = server.port
                    server.stop(grace=0)
                    server = ServerThread(replace(config, port=port), digits_runtime)
    finally:
        server.stop()
    assert any("stream: UNAVAILABLE; retry" in m for m in caplog.messages), caplog.messages
    assert len(outs) == 300 and not any(r.fallback for r in outs)
    for i, r in enumerate(outs):
        torch.testing.assert_close(r.output, want[i : i + 1], rtol=0, atol=1e-5)
        assert r.output.argmax() == want[i].argmax()


# ------------------------------------------------------- a server that misbehaves


class RogueServer:
    """A real gRPC server that answers GetModelInfo like splitnet-cloud but breaks the
    stream protocol in the way it is told."""

    def __init__(self, info: pb.ModelInfoResponse, answer: str) -> None:
        self.info = info.SerializeToString()
        self.answer = answer
        self.release = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handlers = {
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: self.info),
            "InferStream": grpc.stream_stream_rpc_method_handler(self._stream),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("splitnet.v1.SplitInference", handlers),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        first = pb.StreamRequest.FromString(next(requests))
        rid = first.request.id
        if self.answer == "unannounced chunk":
            yield pb.StreamResponse(chunk=pb.Chunk(id=rid, data=b"x")).SerializeToString()
        elif self.answer == "wrong id":
            yield pb.StreamResponse(response=pb.InferResponse(id=rid + 7)).SerializeToString()
        elif self.answer == "garbage":
            yield b"\xff\xff\xff"
        elif self.answer == "silence":
            self.release.wait(30)

    def stop(self) -> None:
        self.release.set()
        self.server.stop(0)


@pytest.mark.parametrize(
    ("answer", "needle"),
    [
        ("unannounced chunk", "not announced"),
        ("wrong id", "expected"),
        ("garbage", "not a StreamResponse"),
    ],
)
def test_a_broken_stream_protocol_is_a_protocol_error(
    digits_runtime: TailRuntime, digits_weights: Path, answer: str, needle: str
) -> None:
    rogue = RogueServer(digits_runtime.model_info("digits-cnn"), answer)
    try:
        with EdgeClient(
            f"127.0.0.1:{rogue.port}", "digits-cnn", weights=digits_weights, cut="pool1"
        ) as client:
            with pytest.raises(ProtocolError, match=needle):
                list(client.infer_many([torch.zeros(1, 1, 8, 8)]))
    finally:
        rogue.stop()


def test_a_silent_server_runs_into_the_request_deadline(
    digits_runtime: TailRuntime, digits_weights: Path
) -> None:
    rogue = RogueServer(digits_runtime.model_info("digits-cnn"), "silence")
    try:
        with EdgeClient(
            f"127.0.0.1:{rogue.port}",
            "digits-cnn",
            weights=digits_weights,
            cut="pool1",
            deadline_s=0.5,
        ) as client:
            started = time.monotonic()
            with pytest.raises(DeadlineExceededError, match="within 0.5 s"):
                list(client.infer_many(iter([torch.zeros(1, 1, 8, 8)])))
            assert time.monotonic() - started < 10  # the deadline, not a hang
    finally:
        rogue.stop()
