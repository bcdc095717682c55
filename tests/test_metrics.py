"""Prometheus metrics and the per-request debug log, scraped from a real server."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from conftest import ServerThread
from prometheus_client.parser import text_string_to_metric_families

from cloud.config import ModelEntry, ServerConfig
from cloud.runtime import TailRuntime
from splitnet import encode
from splitnet.models import fingerprint, load_model
from splitnet.partition import trace
from splitnet.v1 import inference_pb2 as pb
from splitnet.v1 import inference_pb2_grpc as pb_grpc

TOKEN = "metrics-test-token-0123456789"


def scrape(server: ServerThread) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert server.server is not None and server.server.scrape is not None
    port = server.server.scrape.port
    # The gRPC port asks for a token, so the metrics do too.
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    text = urllib.request.urlopen(request, timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture()
def metered(digits_runtime: TailRuntime) -> Iterator[ServerThread]:
    config = ServerConfig(
        models=(ModelEntry(name="digits-cnn"),),
        port=0,
        metrics_port=0,
        tokens=frozenset({TOKEN}),
    )
    server = ServerThread(config, digits_runtime)
    yield server
    server.stop()


def _pool1_request(weights: Path, batch: int, rid: int) -> pb.InferRequest:
    model = load_model("digits-cnn", weights)
    x = torch.rand(batch, 1, 8, 8)
    head, _ = trace(model, (x,)).split("pool1")
    with torch.no_grad():
        (frontier,) = head(x)
    return pb.InferRequest(
        id=rid,
        model="digits-cnn",
        cut="pool1",
        fingerprint=fingerprint(model),
        frontier=[encode(frontier, "int8+zstd:1")],
    )


def test_counts_match_what_was_sent(
    metered: ServerThread, digits_weights: Path, caplog: pytest.LogCaptureFixture
) -> None:
    md = (("authorization", f"Bearer {TOKEN}"),)
    channel = grpc.insecure_channel(metered.address)
    stub = pb_grpc.SplitInferenceStub(channel)
    raw_infer = channel.unary_unary("/splitnet.v1.SplitInference/Infer")
    good = [_pool1_request(digits_weights, b, i) for i, b in enumerate((1, 2, 1), start=1)]
    bad_cut = pb.InferRequest(id=10, model="digits-cnn", cut="no-such-cut")
    bad_model = pb.InferRequest(id=11, model="x" * 500, cut="pool1")
    bad_shape = pb.InferRequest(
        id=12, model="digits-cnn", cut="pool1", frontier=[encode(torch.zeros(1, 3))]
    )
    with caplog.at_level(logging.DEBUG, logger="cloud"):
        responses = [stub.Infer(r, metadata=md, timeout=10) for r in good]
        for request in (bad_cut, bad_model, bad_shape):
            with pytest.raises(grpc.RpcError):
                stub.Infer(request, metadata=md, timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            raw_infer(b"\xff\xff\xff garbage", metadata=md, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(good[0], timeout=10)  # no token
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()

    m = scrape(metered)
    pool1 = (("cut", "pool1"), ("model", "digits-cnn"))

    def get(name: str, labels: tuple[tuple[str, str], ...] = pool1) -> float:
        return m.get((name, labels), 0.0)

    def failure(model: str, cut: str, status: str) -> float:
        labels = (("cut", cut), ("model", model), ("status", status))
        return get("splitnet_inference_request_failure_total", labels)

    assert get("splitnet_inference_request_success_total") == 3
    assert get("splitnet_inference_count_total") == 4  # samples: 1 + 2 + 1
    assert get("splitnet_inference_exec_count_total") == 3  # sent one after another
    assert get("splitnet_inference_batch_size_count") == 3
    assert get("splitnet_inference_batch_size_sum") == 4
    assert get("splitnet_inference_request_duration_seconds_count") == 3
    assert get("splitnet_inference_request_bytes_total") == sum(
        len(r.frontier[0].payload) for r in good
    )
    assert get("splitnet_inference_response_bytes_total") == sum(
        len(r.outputs[0].payload) for r in responses
    )
    total_us = get("splitnet_inference_request_duration_us_total")
    parts_us = sum(
        get(f"splitnet_inference_{p}_duration_us_total")
        for p in ("queue", "compute_input", "compute_infer", "compute_output")
    )
    assert 0 < parts_us <= total_us
    # Names a client invents never become labels.
    assert failure("digits-cnn", "", "NOT_FOUND") == 1
    assert failure("", "", "NOT_FOUND") == 1
    assert failure("digits-cnn", "pool1", "INVALID_ARGUMENT") == 1
    assert failure("", "", "INVALID_ARGUMENT") == 1  # unparsable bytes
    assert failure("", "", "UNAUTHENTICATED") == 1
    assert not any("x" * 500 in v for _, labels in m for _, v in labels)
    assert m[("splitnet_inference_pending_request_count", ())] == 0
    assert m[("process_resident_memory_bytes", ())] > 0

    # One debug line per request, with its outcome.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request ")]
    assert sum(" OK " in line for line in lines) == 3
    assert sum("NOT_FOUND" in line for line in lines) == 2
    assert sum("INVALID_ARGUMENT" in line for line in lines) == 2
    assert len(lines) == 7


def test_metrics_are_off_unless_asked(digits_server: ServerThread) -> None:
    assert digits_server.server is not None
    assert digits_server.server.service.metrics is None
    assert "metrics" not in digits_server.server.banner()


def test_plaintext_metrics_off_loopback_are_refused() -> None:
    with pytest.raises(ValueError, match="metrics on 0.0.0.0 in plaintext"):
        ServerConfig(
            models=(ModelEntry(name="digits-cnn"),), metrics_port=0, metrics_host="0.0.0.0"
        )
