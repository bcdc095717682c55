"""End to end against real servers on 127.0.0.1, port 0."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from conftest import ServerThread
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.soak import Server
from cloud.config import ModelEntry, ServerConfig
from cloud.runtime import TailRuntime
from edge.client import EdgeClient
from splitnet import RemoteError, decode, encode
from splitnet.data import load_digits
from splitnet.models import load_model
from splitnet.v1 import inference_pb2 as pb
from splitnet.v1 import inference_pb2_grpc as pb_grpc

# Batching concatenates requests, and CPU kernels sum in a different order for a
# different batch size: batched outputs match unbatched ones to this tolerance (and
# in top-1), while unbatched ones are bit-exact.
BATCH_ATOL = 1e-5


@pytest.fixture(scope="module")
def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    test = load_digits()["test"]
    return test.x, test.y


@pytest.fixture()
def local(digits_weights: Path) -> torch.nn.Module:
    return load_model("digits-cnn", digits_weights)


def _stub(address: str) -> pb_grpc.SplitInferenceStub:
    return pb_grpc.SplitInferenceStub(grpc.insecure_channel(address))


def test_every_digits_cut_is_exact(
    digits_server: ServerThread, digits_weights: Path, local, test_split
) -> None:
    x = test_split[0][:3]
    want = local(x)
    with EdgeClient(digits_server.address, "digits-cnn", weights=digits_weights) as client:
        for cut in client.graph.names:
            for codec in ("raw", "zstd:1"):
                client.use(cut=cut, codec=codec)
                result = client.infer(x)
                assert torch.equal(result.output, want), (cut, codec)
                assert result.cut == cut and not result.fallback
                t = result.timing
                if cut == "output":  # all on the device: nothing is sent
                    assert t.bytes_sent == 0 and t.total_ms > 0
                else:
                    assert t.total_ms > 0 and t.cloud_ms >= 0 and t.batch_size == 3
        # The server serves the "output" cut too (its tail returns what it is sent).
        fp = client.fingerprint
        request = pb.InferRequest(
            model="digits-cnn", cut="output", fingerprint=fp, frontier=[encode(want)]
        )
        out = _stub(digits_server.address).Infer(request, timeout=10).outputs[0]
        assert torch.equal(decode(out), want)
        client.use(cut="pool1", codec="int8+zstd:1")
        lossy = client.infer(x).output
        assert torch.equal(lossy.argmax(1), want.argmax(1))


def test_every_resnet18_cut_is_exact() -> None:
    pytest.importorskip("torchvision")
    shape = (1, 3, 64, 64)
    entry = ModelEntry(name="torchvision:resnet18", input_shape=shape)
    server = ServerThread(ServerConfig(models=(entry,), port=0, profile_runs=1))
    try:
        from splitnet.report import sample_input

        x = sample_input(shape)
        with EdgeClient(server.address, "torchvision:resnet18", input_shape=shape) as client:
            want = client.model(x)
            info = client.server_info
            assert info is not None and len(info.cuts) == len(client.graph.cuts)
            assert any(c.tail_latency_ms > 0 for c in info.cuts)
            for i, cut in enumerate(client.graph.names):  # both codecs, alternately
                client.use(cut=cut, codec="zstd:1" if i % 2 else "raw")
                assert torch.equal(client.infer(x).output, want), cut
    finally:
        server.stop()


def test_model_info(digits_server: ServerThread, digits_runtime: TailRuntime) -> None:
    info = _stub(digits_server.address).GetModelInfo(pb.ModelInfoRequest())
    (model,) = info.models
    assert model.name == "digits-cnn"
    assert model.fingerprint == digits_runtime.models["digits-cnn"].fingerprint
    cuts = {c.name: c for c in model.cuts}
    assert len(cuts["block.conv1"].frontier) == 2
    assert list(cuts["pool1"].frontier[0].shape) == [1, 32, 4, 4]
    assert info.limits.max_batch_size == 8 and "raw" in info.codecs
    assert list(model.outputs[0].shape) == [1, 10]
    assert not info.HasField("generation")  # no language model served here


def test_sixteen_clients_fifty_requests(
    digits_server: ServerThread, digits_weights: Path, local, test_split
) -> None:
    xs = test_split[0]
    with torch.no_grad():
        want = local(xs)
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    cuts = ["stem.2", "block.relu", "pool1", "conv.2", "fc1", "input"]

    # Clients are built (traced) first: torch.fx patches torch globally while tracing.
    clients = [
        EdgeClient(
            digits_server.address,
            "digits-cnn",
            weights=digits_weights,
            cut=cuts[k % len(cuts)],
            codec="zstd:1" if k % 2 else "raw",
        )
        for k in range(16)
    ]

    def worker(k: int) -> None:
        try:
            with clients[k] as c:
                for i in range(50):
                    j = (k * 50 + i) % len(xs)
                    results[(k, i)] = c.infer(xs[j : j + 1]).output
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 16 * 50  # none lost
    for (k, i), out in results.items():
        j = (k * 50 + i) % len(xs)
        torch.testing.assert_close(out, want[j : j + 1], rtol=0, atol=BATCH_ATOL)
        assert out.argmax() == want[j].argmax()


def test_stream_of_200_in_order(
    digits_server: ServerThread, digits_weights: Path, local, test_split
) -> None:
    xs = [test_split[0][i % 360 : i % 360 + 1] for i in range(200)]
    with EdgeClient(digits_server.address, "digits-cnn", weights=digits_weights, cut="pool1") as c:
        results = list(c.infer_many(xs))
    assert len(results) == 200
    for x, r in zip(xs, results, strict=True):
        torch.testing.assert_close(r.output, local(x), rtol=0, atol=BATCH_ATOL)
        assert r.output.argmax() == local(x).argmax()


def test_large_activations_travel_in_chunks(
    digits_runtime: TailRuntime, digits_weights: Path, local
) -> None:
    config = ServerConfig(
        models=(ModelEntry(name="digits-cnn"),), port=0, chunk_bytes=4096, max_batch_size=64
    )
    server = ServerThread(config, digits_runtime)
    try:
        x = load_digits()["test"].x[:48]  # block.conv1 sends 2 x 48 x 32 x 8 x 8 floats: 786 KB
        with EdgeClient(
            server.address,
            "digits-cnn",
            weights=digits_weights,
            cut="block.conv1",
            chunk_bytes=4096,
        ) as c:
            results = list(c.infer_many([x, x[:5], x]))
        for r, batch in zip(results, [x, x[:5], x], strict=True):
            assert torch.equal(r.output, local(batch))
    finally:
        server.stop()


def _good_request(fp: str, x: torch.Tensor, cut: str = "input") -> pb.InferRequest:
    return pb.InferRequest(id=1, model="digits-cnn", cut=cut, fingerprint=fp, frontier=[encode(x)])


def test_error_codes_and_server_keeps_serving(
    digits_server: ServerThread, digits_runtime: TailRuntime, test_split
) -> None:
    stub = _stub(digits_server.address)
    fp = digits_runtime.models["digits-cnn"].fingerprint
    x = test_split[0][:1]

    def expect(code: grpc.StatusCode, request: pb.InferRequest, needle: str) -> None:
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(request, timeout=10)
        assert err.value.code() == code, err.value.details()
        assert needle in (err.value.details() or "")
        assert stub.Infer(_good_request(fp, x), timeout=10).outputs  # still serving

    bad = _good_request(fp, x)
    bad.model = "nope"
    expect(grpc.StatusCode.NOT_FOUND, bad, "serves: digits-cnn")
    bad = _good_request(fp, x, cut="nope")
    expect(grpc.StatusCode.NOT_FOUND, bad, "valid cuts: input, stem.0")
    bad = _good_request("0" * 64, x)
    expect(grpc.StatusCode.FAILED_PRECONDITION, bad, "fingerprint")
    bad = _good_request(fp, x)
    bad.frontier[0].raw_nbytes += 4
    expect(grpc.StatusCode.INVALID_ARGUMENT, bad, "malformed tensor")
    bad = _good_request(fp, torch.zeros(1, 1, 9, 9))
    expect(grpc.StatusCode.INVALID_ARGUMENT, bad, "must be (n, 1, 8, 8)")
    bad = _good_request(fp, x)
    bad.frontier[0].payload = b"\x00" * 3
    expect(grpc.StatusCode.INVALID_ARGUMENT, bad, "payload")
    bad = _good_request(fp, torch.zeros(9, 1, 8, 8))
    expect(grpc.StatusCode.INVALID_ARGUMENT, bad, "max batch size")
    bad = _good_request(fp, x)
    bad.output_codec = "int4"
    expect(grpc.StatusCode.INVALID_ARGUMENT, bad, "codec")
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModelInfo(pb.ModelInfoRequest(model="nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_stream_errors_are_in_band(
    digits_server: ServerThread, digits_runtime: TailRuntime, test_split
) -> None:
    stub = _stub(digits_server.address)
    fp = digits_runtime.models["digits-cnn"].fingerprint
    x = test_split[0][:1]
    reqs = [_good_request(fp, x), _good_request(fp, x, cut="nope"), _good_request(fp, x)]
    for i, r in enumerate(reqs):
        r.id = i + 1
    out = list(stub.InferStream(iter(pb.StreamRequest(request=r) for r in reqs), timeout=10))
    assert [m.response.id for m in out] == [1, 2, 3]
    assert out[0].response.outputs and out[2].response.outputs
    assert out[1].response.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    # A chunk nobody announced breaks the protocol: the stream ends INVALID_ARGUMENT.
    with pytest.raises(grpc.RpcError) as err:
        list(
            stub.InferStream(iter([pb.StreamRequest(chunk=pb.Chunk(id=9, data=b"x"))]), timeout=10)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A request declaring huge chunked payloads is refused in-band before anything is
    # allocated, and the stream goes on.
    big = _good_request(fp, x)
    big.frontier[0].payload = b""
    big.chunked_payload_bytes.append(1 << 40)
    after = _good_request(fp, x)
    after.id = 2
    out = list(stub.InferStream(iter([pb.StreamRequest(request=r) for r in (big, after)]), timeout=10))
    assert out[0].response.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert out[1].response.outputs
    assert stub.Infer(_good_request(fp, x), timeout=10).outputs


def test_resource_exhausted_instead_of_queueing(digits_runtime: TailRuntime, test_split) -> None:
    config = ServerConfig(
        models=(ModelEntry(name="digits-cnn"),), port=0, max_in_flight=1, max_queue_delay_us=400_000
    )
    server = ServerThread(config, digits_runtime)
    try:
        stub = _stub(server.address)
        fp = digits_runtime.models["digits-cnn"].fingerprint
        first = stub.Infer.future(_good_request(fp, test_split[0][:1]), timeout=10)
        time.sleep(0.1)  # the first request now waits in the batcher
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(_good_request(fp, test_split[0][:1]), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert first.result().outputs
    finally:
        server.stop()


def test_server_side_deadline(digits_runtime: TailRuntime, test_split) -> None:
    # The batcher would wait 0.5 s for a fuller batch; the server allows 0.05 s of work.
    config = ServerConfig(
        models=(ModelEntry(name="digits-cnn"),),
        port=0,
        max_queue_delay_us=500_000,
        request_timeout_s=0.05,
    )
    server = ServerThread(config, digits_runtime)
    try:
        stub = _stub(server.address)
        fp = digits_runtime.models["digits-cnn"].fingerprint
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(_good_request(fp, test_split[0][:1]), timeout=10)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "limit of 0.05 s" in (err.value.details() or "")
    finally:
        server.stop()


def test_dynamic_batching(
    digits_runtime: TailRuntime, digits_weights: Path, local, test_split
) -> None:
    config = ServerConfig(
        models=(ModelEntry(name="digits-cnn"),), port=0, max_batch_size=8, max_queue_delay_us=20_000
    )
    server = ServerThread(config, digits_runtime)
    xs = test_split[0]
    sizes: list[int] = []
    outs: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(8)
    clients = [
        EdgeClient(server.address, "digits-cnn", weights=digits_weights, cut="pool1")
        for _ in range(8)
    ]
    try:

        def worker(k: int) -> None:
            with clients[k] as c:
                for i in range(10):
                    barrier.wait(30)
                    r = c.infer(xs[k * 10 + i : k * 10 + i + 1])
                    sizes.append(r.timing.batch_size)
                    outs[k * 10 + i] = r.output

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        server.stop()
    assert len(outs) == 80
    assert max(sizes) > 1, sizes
    with torch.no_grad():
        for j, out in outs.items():
            want = local(xs[j : j + 1])  # unbatched
            torch.testing.assert_close(out, want, rtol=0, atol=BATCH_ATOL)
            assert out.argmax() == want.argmax()


def test_health_and_graceful_stop(digits_runtime: TailRuntime, test_split) -> None:
    config = ServerConfig(
        models=(ModelEntry(name="digits-cnn"),), port=0, max_queue_delay_us=300_000
    )
    server = ServerThread(config, digits_runtime)
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    check = health.Check(
        health_pb2.HealthCheckRequest(service="splitnet.v1.SplitInference"), timeout=5
    )
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    fp = digits_runtime.models["digits-cnn"].fingerprint
    in_flight = pb_grpc.SplitInferenceStub(channel).Infer.future(
        _good_request(fp, test_split[0][:1]), timeout=10
    )
    time.sleep(0.1)
    server.stop(grace=5)
    assert in_flight.result().outputs  # finished although the server was stopping


def test_reflection_lists_the_service(digits_server: ServerThread) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(digits_server.address))
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    (resp,) = list(stub.ServerReflectionInfo(iter([req]), timeout=5))
    names = {s.name for s in resp.list_services_response.service}
    assert "splitnet.v1.SplitInference" in names and "grpc.health.v1.Health" in names


# ----------------------------------------------------------- a real process


class ServerProcess(Server):
    """``splitnet-cloud`` in a subprocess, so it can be SIGKILLed (the soak's, no metrics)."""

    def __init__(self, weights: Path, port: int = 0) -> None:
        super().__init__(weights, port=port, metrics=False)


@pytest.fixture()
def server_process(digits_weights: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(digits_weights)
    yield server
    server.kill()


def test_killed_mid_stream_raises_or_falls_back(
    server_process: ServerProcess, digits_weights: Path, local, test_split
) -> None:
    xs = [test_split[0][i : i + 1] for i in range(300)]
    with EdgeClient(
        server_process.address,
        "digits-cnn",
        weights=digits_weights,
        cut="pool1",
        fallback="local",
        deadline_s=5,
        retries=1,
        reconnect_wait_s=0.2,
    ) as c:
        results = []
        started = time.monotonic()
        for r in c.infer_many(xs):
            results.append(r)
            if len(results) == 30:
                server_process.kill()
        assert time.monotonic() - started < 60  # never hangs
    assert len(results) == 300
    assert sum(r.fallback for r in results) > 0 and not any(r.fallback for r in results[:30])
    for x, r in zip(xs, results, strict=True):
        assert r.output.argmax() == local(x).argmax()
        if r.fallback:
            assert torch.equal(r.output, local(x))  # computed here, marked so


def test_dead_server_raises_clearly_then_restart_is_picked_up(
    digits_weights: Path, local, test_split
) -> None:
    server = ServerProcess(digits_weights)
    x = test_split[0][:2]
    try:
        with EdgeClient(
            server.address,
            "digits-cnn",
            weights=digits_weights,
            cut="pool1",
            deadline_s=5,
            retries=2,
            reconnect_wait_s=0.2,
        ) as c:
            assert torch.equal(c.infer(x).output, local(x))
            server.kill()
            started = time.monotonic()
            with pytest.raises(RemoteError) as err:
                c.infer(x)
            assert err.value.code == "UNAVAILABLE" and "unreachable" in str(err.value)
            assert time.monotonic() - started < 10
            with pytest.raises(RemoteError):
                list(c.infer_many([x, x]))
            server = ServerProcess(digits_weights, port=server.port)  # same port
            c.configure(deadline_s=30, retries=5, reconnect_wait_s=1.0)
            assert torch.equal(c.infer(x).output, local(x))
            assert [torch.equal(r.output, local(x)) for r in c.infer_many([x, x])] == [True, True]
    finally:
        server.kill()


def test_sigterm_stops_cleanly(server_process: ServerProcess) -> None:
    assert server_process.terminate() == 0
    assert "stopped after" in server_process.output()


def test_edge_cli_test_set_and_files(
    digits_server: ServerThread, digits_weights: Path, local, tmp_path: Path, test_split
) -> None:
    import json

    import numpy as np

    base = [
        sys.executable,
        "-m",
        "edge.cli",
        "run",
        "--server",
        digits_server.address,
        "--model",
        "digits-cnn",
        "--weights",
        str(digits_weights),
    ]
    out = subprocess.run(
        base + ["--cut", "pool1", "--codec", "int8+zstd:1", "--limit", "40"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "accuracy" in out.stdout and "cloud compute" in out.stdout and "p90" in out.stdout

    x = test_split[0][:3]
    np.save(tmp_path / "three.npy", x.numpy())
    pil = pytest.importorskip("PIL.Image")
    pixels = (x[0, 0].numpy() * 255).astype("uint8")
    pil.fromarray(pixels).resize((32, 32)).save(tmp_path / "digit.png")
    out = subprocess.run(
        base + ["--json", str(tmp_path / "three.npy"), str(tmp_path / "digit.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["predictions"][0] == local(x).argmax(1).tolist()
    assert doc["agreement"] == 1.0 and doc["requests"] == 2

    bad = subprocess.run(
        base + [str(tmp_path / "nope.txt")], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "unsupported input type" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_own_model_through_both_commands(tmp_path: Path) -> None:
    """A pkg.module:callable model needs --input-shape on both commands; with it, the
    split result equals the model run locally."""
    import json

    import numpy as np

    from splitnet.models import load_model

    name = "benchmarks.overhead:tiny"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloud.cli",
            "--model",
            name,
            "--port",
            "0",
            "--profile-runs",
            "0",
            "--input-shape",
            f"{name}=1,4",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert "listening on" in line, line + server.stdout.read()
        address = line.split("listening on ")[1].split()[0]
        x = torch.randn(2, 4)
        np.save(tmp_path / "x.npy", x.numpy())
        base = [sys.executable, "-m", "edge.cli", "run", "--server", address, "--model", name]
        missing = subprocess.run(base + [str(tmp_path / "x.npy")], capture_output=True, text=True)
        assert missing.returncode == 2 and "--input-shape" in missing.stderr
        assert "Traceback" not in missing.stderr
        out = subprocess.run(
            base + ["--input-shape", "1,4", "--json", str(tmp_path / "x.npy")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        with torch.no_grad():  # the registry builds it seeded: the same weights everywhere
            want = load_model(name, input_shape=(1, 4))(x).argmax(1).tolist()
        assert json.loads(out.stdout)["predictions"][0] == want
    finally:
        server.terminate()
        server.wait(30)


def test_input_shape_for_an_unserved_model_is_refused() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cloud.cli", "--model", "digits-cnn", "--input-shape", "x:y=1,4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "--input-shape names x:y, which no --model serves" in out.stderr
