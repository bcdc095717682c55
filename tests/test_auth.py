"""Bearer-token authentication on a real server: no valid token, no answer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from conftest import ServerThread
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud.auth import load_tokens
from cloud.config import ModelEntry, ServerConfig
from cloud.runtime import TailRuntime
from edge.client import EdgeClient
from splitnet import RemoteError, encode
from splitnet.v1 import inference_pb2 as pb
from splitnet.v1 import inference_pb2_grpc as pb_grpc

TOKEN = "s3cret-token-0123456789abcdef"


@pytest.fixture()
def guarded(digits_runtime: TailRuntime) -> Iterator[ServerThread]:
    config = ServerConfig(
        models=(ModelEntry(name="digits-cnn"),), port=0, tokens=frozenset({TOKEN})
    )
    server = ServerThread(config, digits_runtime)
    yield server
    server.stop()


def _code(fn) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code()


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        (("authorization", "Bearer wrong-token-000000000000"),),
        (("authorization", f"Basic {TOKEN}"),),
        (("authorization", TOKEN),),
    ],
)
def test_refused_without_a_valid_token(guarded: ServerThread, metadata) -> None:  # type: ignore[no-untyped-def]
    channel = grpc.insecure_channel(guarded.address)
    stub = pb_grpc.SplitInferenceStub(channel)
    request = pb.InferRequest(
        model="digits-cnn", cut="input", frontier=[encode(torch.zeros(1, 1, 8, 8))]
    )
    assert (
        _code(lambda: stub.GetModelInfo(pb.ModelInfoRequest(), metadata=metadata, timeout=5))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert (
        _code(lambda: stub.Infer(request, metadata=metadata, timeout=5))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    stream = stub.InferStream(
        iter([pb.StreamRequest(request=request)]), metadata=metadata, timeout=5
    )
    assert _code(lambda: list(stream)) == grpc.StatusCode.UNAUTHENTICATED
    # Authentication comes before parsing: garbage bytes get UNAUTHENTICATED, not a parse error.
    raw = channel.unary_unary("/splitnet.v1.SplitInference/Infer")
    assert (
        _code(lambda: raw(b"\xff" * 64, metadata=metadata, timeout=5))
        == grpc.StatusCode.UNAUTHENTICATED
    )


def test_health_stays_open(guarded: ServerThread) -> None:
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(guarded.address))
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        == health_pb2.HealthCheckResponse.SERVING
    )


def test_client_with_token(guarded: ServerThread, digits_weights: Path) -> None:
    x = torch.zeros(2, 1, 8, 8)
    with EdgeClient(
        guarded.address, "digits-cnn", weights=digits_weights, cut="pool1", token=TOKEN
    ) as c:
        assert c.infer(x).output.shape == (2, 10)
        assert len(list(c.infer_many([x, x]))) == 2
    with pytest.raises(RemoteError) as err:
        EdgeClient(
            guarded.address, "digits-cnn", weights=digits_weights, token="not-the-token-0000000"
        ).connect()
    assert err.value.code == "UNAUTHENTICATED"


def test_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"# team tokens\n{TOKEN}\n\n")
    monkeypatch.delenv("SPLITNET_TOKENS", raising=False)
    assert load_tokens(f) == {TOKEN}
    monkeypatch.setenv("SPLITNET_TOKENS", f"{TOKEN}, another-long-token-abcdef")
    assert load_tokens(None) == {TOKEN, "another-long-token-abcdef"}
    f.write_text("short\n")
    with pytest.raises(ValueError, match="shorter than"):
        load_tokens(f, env=False)
