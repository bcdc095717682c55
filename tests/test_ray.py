"""The cloud half on a real local Ray Serve: two replicas of half a CPU each, the gRPC
proxy as the EdgeClient's target, results compared with the unsplit local model.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from conftest import ROOT, ServerThread

with warnings.catch_warnings():  # Ray's own pydantic deprecations, at import
    warnings.simplefilter("ignore", DeprecationWarning)
    ray = pytest.importorskip(
        "ray", reason="the 'ray' extra is not installed (pip install -e '.[ray]'); CI installs it"
    )
    from ray import serve

from cloud.config import ModelEntry, ServerConfig  # noqa: E402
from cloud.ray_serve import APP_NAME, DEPLOYMENT_NAME, RayServeConfig, deploy, shutdown  # noqa: E402
from edge.client import EdgeClient  # noqa: E402
from splitnet import RemoteError, encode  # noqa: E402
from splitnet.data import load_digits  # noqa: E402
from splitnet.models import fingerprint, load_model  # noqa: E402
from splitnet.v1 import inference_pb2 as pb  # noqa: E402
from splitnet.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

TOKEN = secrets.token_urlsafe(24)  # the deployment requires it; checked in the replica
AUTH = (("authorization", f"Bearer {TOKEN}"),)
# Batched outputs differ from unbatched ones in the last bits (see test_serving).
BATCH_ATOL = 1e-5
RESNET_SHAPE = (1, 3, 32, 32)
RESNET_CUTS = ("input", "layer1.1.relu_1", "layer3.0.add", "layer4.1.relu_1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _replica_names() -> set[str]:
    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#")
    }


def _running() -> int:
    app = serve.status().applications[APP_NAME]
    return int(app.deployments[DEPLOYMENT_NAME].replica_states.get("RUNNING", 0))


@pytest.fixture(scope="module")
def ray_target(digits_weights: Path) -> Iterator[str]:
    """Local Ray (2 CPUs, no dashboard), Serve with our gRPC ingress, 2 replicas x 0.5 CPU."""
    # The Ray processes this starts must import this checkout's cloud/, as pytest does.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), old) if p)
    port = _free_port()
    config = RayServeConfig(
        server=ServerConfig(
            models=(  # several models (and cuts) per replica
                ModelEntry(name="digits-cnn", weights=str(digits_weights)),
                ModelEntry(name="torchvision:resnet18", input_shape=RESNET_SHAPE),
            ),
            profile_runs=1,
            workers=1,
            chunk_bytes=16,  # outputs (40 bytes) go back in chunks on streams
            tokens=frozenset({TOKEN}),
        ),
        num_cpus_cluster=2,
        grpc_port=port,
        http_port=_free_port(),
        replicas=2,
        num_cpus=0.5,
    )
    try:
        deploy(config)
        assert _running() == 2
        yield f"127.0.0.1:{port}"
    finally:
        shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def digits(digits_weights: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    return load_model("digits-cnn", digits_weights), load_digits()["test"].x[:32]


def test_edge_client_through_ray_equals_local(ray_target: str, digits_weights: Path, digits) -> None:
    local, xs = digits
    x = xs[:4]
    with torch.no_grad():
        want = local(x)
    with EdgeClient(ray_target, "digits-cnn", weights=digits_weights, token=TOKEN) as client:
        for cut in ("input", "stem.2", "block.conv1", "pool1", "fc1", "output"):
            for codec in ("raw", "zstd:1"):
                client.use(cut=cut, codec=codec)
                result = client.infer(x)
                assert torch.equal(result.output, want), (cut, codec)
                assert not result.fallback
                if cut != "output":
                    assert result.timing.batch_size >= 4 and result.timing.cloud_ms > 0
        client.use(cut="pool1", codec="int8+zstd:1")  # lossy: same top-1
        assert torch.equal(client.infer(x).output.argmax(1), want.argmax(1))
        # InferStream through Ray's bidirectional proxy, answers in order.
        client.use(cut="pool1", codec="raw")
        singles = [xs[i : i + 1] for i in range(len(xs))]
        results = list(client.infer_many(singles))
    assert len(results) == len(singles)
    for x1, r in zip(singles, results, strict=True):
        with torch.no_grad():
            torch.testing.assert_close(r.output, local(x1), atol=BATCH_ATOL, rtol=0)
    # Chunked payloads both ways: the frontier (2 KiB) in 256-byte chunks, outputs in 16.
    with EdgeClient(
        ray_target, "digits-cnn", weights=digits_weights, cut="pool1", chunk_bytes=256, token=TOKEN
    ) as client:
        results = list(client.infer_many(singles[:8]))
    for x1, r in zip(singles[:8], results, strict=True):
        with torch.no_grad():
            torch.testing.assert_close(r.output, local(x1), atol=BATCH_ATOL, rtol=0)
        assert r.timing.bytes_sent > 2048


def test_sixteen_clients_two_models_mixed_cuts(
    ray_target: str, digits_weights: Path, digits
) -> None:
    """Even clients: digits-cnn at pool1; odd ones: resnet18 at rotating cuts. Both
    models live in every replica; each output equals the local model's."""
    pytest.importorskip("torchvision")
    local, xs = digits
    resnet = load_model("torchvision:resnet18", input_shape=RESNET_SHAPE)
    images = torch.randn(8, *RESNET_SHAPE[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = local(xs)
        want_resnet = resnet(images)
    clients = [
        EdgeClient(ray_target, "digits-cnn", weights=digits_weights, cut="pool1", token=TOKEN)
        if k % 2 == 0
        else EdgeClient(
            ray_target,
            "torchvision:resnet18",
            input_shape=RESNET_SHAPE,
            cut=RESNET_CUTS[(k // 2) % len(RESNET_CUTS)],
            codec="zstd:1",
            token=TOKEN,
        )
        for k in range(16)
    ]  # built before the threads: tracing patches torch globally
    errors: list[BaseException] = []
    batches: list[int] = []
    served: Counter[str] = Counter()

    def run(k: int, client: EdgeClient) -> None:
        try:
            with client:
                for i in range(k, k + 10):
                    if k % 2 == 0:
                        r = client.infer(xs[i % 32 : i % 32 + 1])
                        expected = want[i % 32 : i % 32 + 1]
                    else:
                        r = client.infer(images[i % 8 : i % 8 + 1])
                        expected = want_resnet[i % 8 : i % 8 + 1]
                    # Tolerance relative to the logits' size: batching reorders sums.
                    scale = float(expected.abs().max())
                    torch.testing.assert_close(r.output, expected, atol=BATCH_ATOL * max(scale, 1), rtol=0)
                    batches.append(r.timing.batch_size)
                    served[f"{client.model_name}@{client.cut}"] += 1
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k, c)) for k, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert len(batches) == 160
    assert len(served) == 1 + len(RESNET_CUTS)
    assert max(batches) > 1  # @serve.batch grouped concurrent requests


def test_bad_requests_get_the_standalone_codes(
    ray_target: str, digits_server: ServerThread, digits_weights: Path
) -> None:
    fp = fingerprint(load_model("digits-cnn", digits_weights))
    good = encode(torch.zeros(1, 32, 4, 4))
    truncated = encode(torch.zeros(1, 32, 4, 4))
    truncated.payload = truncated.payload[:10]
    bad = {
        "unknown model": pb.InferRequest(model="nope", cut="input"),
        "unknown cut": pb.InferRequest(model="digits-cnn", cut="nope"),
        "fingerprint": pb.InferRequest(
            model="digits-cnn", cut="pool1", fingerprint="0" * 64, frontier=[good]
        ),
        "wrong shape": pb.InferRequest(
            model="digits-cnn", cut="pool1", frontier=[encode(torch.zeros(1, 3, 4, 4))]
        ),
        "malformed": pb.InferRequest(model="digits-cnn", cut="pool1", frontier=[truncated]),
        "output codec": pb.InferRequest(
            model="digits-cnn", cut="pool1", frontier=[good], output_codec="gzip"
        ),
    }
    want = {
        "unknown model": grpc.StatusCode.NOT_FOUND,
        "unknown cut": grpc.StatusCode.NOT_FOUND,
        "fingerprint": grpc.StatusCode.FAILED_PRECONDITION,
        "wrong shape": grpc.StatusCode.INVALID_ARGUMENT,
        "malformed": grpc.StatusCode.INVALID_ARGUMENT,
        "output codec": grpc.StatusCode.INVALID_ARGUMENT,
    }
    answers: dict[str, dict[str, tuple[grpc.StatusCode, str]]] = {}
    for host, address, auth in (
        ("ray", ray_target, AUTH),
        ("standalone", digits_server.address, None),
    ):
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.SplitInferenceStub(channel)
            answers[host] = {}
            for name, request in bad.items():
                with pytest.raises(grpc.RpcError) as info:
                    stub.Infer(request, timeout=20, metadata=auth)
                answers[host][name] = (info.value.code(), info.value.details())
            # Still serving, and correct, after all that.
            ok = pb.InferRequest(
                model="digits-cnn", cut="pool1", fingerprint=fp, frontier=[good]
            )
            assert len(stub.Infer(ok, timeout=20, metadata=auth).outputs) == 1
    for name, code in want.items():
        assert answers["ray"][name][0] == code, (name, answers["ray"][name])
        # Same code and message; the list of served models differs (Ray serves two).
        ray_answer, standalone = (
            (a[0], a[1].split("; this server serves")[0])
            for a in (answers["ray"][name], answers["standalone"][name])
        )
        assert ray_answer == standalone, name


def test_stream_errors_stay_in_band_through_ray(ray_target: str, digits_weights: Path) -> None:
    fp = fingerprint(load_model("digits-cnn", digits_weights))
    good = encode(torch.zeros(1, 32, 4, 4))
    requests = [
        pb.StreamRequest(
            request=pb.InferRequest(id=1, model="digits-cnn", cut="pool1", fingerprint=fp, frontier=[good])
        ),
        pb.StreamRequest(request=pb.InferRequest(id=2, model="digits-cnn", cut="nope")),
        pb.StreamRequest(
            request=pb.InferRequest(id=3, model="digits-cnn", cut="pool1", fingerprint=fp, frontier=[good])
        ),
    ]
    with grpc.insecure_channel(ray_target) as channel:
        stub = pb_grpc.SplitInferenceStub(channel)
        answers = list(stub.InferStream(iter(requests), timeout=30, metadata=AUTH))
        # Without the token: refused, on every RPC.
        for call in (
            lambda: stub.GetModelInfo(pb.ModelInfoRequest(), timeout=20),
            lambda: stub.Infer(requests[0].request, timeout=20),
            lambda: list(stub.InferStream(iter(requests), timeout=20)),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    answers = [a for a in answers if a.WhichOneof("kind") == "response"]  # not the chunks
    assert [a.response.id for a in answers] == [1, 2, 3]
    assert len(answers[0].response.outputs) == 1 and len(answers[2].response.outputs) == 1
    assert answers[1].response.error.code == grpc.StatusCode.NOT_FOUND.value[0]


def test_killed_replica_is_replaced_and_requests_stay_correct(
    ray_target: str, digits_weights: Path, digits
) -> None:
    local, xs = digits
    with torch.no_grad():
        want = [local(xs[i : i + 1]) for i in range(len(xs))]
    before = _replica_names()
    assert len(before) == 2
    outcomes: list[tuple[float, str]] = []
    stop = threading.Event()

    # Built here, not in the threads: tracing patches torch globally (README, Limits).
    clients = [
        EdgeClient(
            ray_target, "digits-cnn", weights=digits_weights, cut="pool1", retries=5, token=TOKEN
        )
        for _ in range(4)
    ]

    def run(k: int) -> None:
        with clients[k] as client:
            i = k
            while not stop.is_set():
                try:
                    r = client.infer(xs[i : i + 1])
                    good = torch.allclose(r.output, want[i], atol=BATCH_ATOL, rtol=0)
                    outcomes.append((time.monotonic(), "correct" if good else "WRONG"))
                except RemoteError as e:  # a clear gRPC status, never a wrong answer
                    outcomes.append((time.monotonic(), f"error {e.code}"))
                i = (i + 4) % len(xs)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        victim = sorted(before)[0]
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        # Serve notices the dead actor and starts a new replica in its place.
        deadline = killed_at + 60
        while time.monotonic() < deadline:
            names = _replica_names()
            if victim not in names and len(names) == 2 and _running() == 2:
                break
            time.sleep(0.25)
        replaced_at = time.monotonic()
        assert victim not in _replica_names() and len(_replica_names()) == 2
        assert _running() == 2
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    kinds = Counter(kind for _, kind in outcomes)
    assert "WRONG" not in kinds, kinds
    assert set(kinds) <= {"correct", "error UNAVAILABLE", "error INTERNAL"}, kinds
    during = [kind for at, kind in outcomes if killed_at <= at < replaced_at]
    after = [kind for at, kind in outcomes if at >= replaced_at + 0.5]
    assert during and after, kinds
    assert after.count("correct") == len(after) and len(after) >= 4, Counter(after)
