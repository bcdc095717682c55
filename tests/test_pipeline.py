"""The request path: an error belongs to the request that caused it.

A real server on 127.0.0.1:0; requests through the generated stub, so each status code
and in-band error is what any client would see.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest
import torch

from cloud.config import ModelEntry, ServerConfig
from cloud.server import BackgroundServer
from splitnet import decode, encode, load_model
from splitnet.data import load_digits
from splitnet.v1 import inference_pb2 as pb
from splitnet.v1 import inference_pb2_grpc as pb_grpc
from splitnet.wire import RawChunk, serialize_stream_message, stream_parser

OVERFLOWING = "tests.zoo:Overflowing"
SHAPE = (1, 4)


@pytest.fixture(scope="module")
def overflowing_server() -> Iterator[BackgroundServer]:
    # A full batch (2) runs at once; the long delay only matters if one request is late,
    # and then the assertion on batch_size says so instead of a timing flake.
    config = ServerConfig(
        models=(ModelEntry(name=OVERFLOWING, input_shape=SHAPE),),
        port=0,
        max_batch_size=2,
        max_queue_delay_us=5_000_000,
        profile_runs=1,
    )
    server = BackgroundServer(config)
    yield server
    server.stop()


def _request(rid: int, x: torch.Tensor, codec: str) -> pb.InferRequest:
    return pb.InferRequest(
        id=rid, model=OVERFLOWING, cut="input", frontier=[encode(x)], output_codec=codec
    )


def test_output_codec_error_fails_only_its_own_request(
    overflowing_server: BackgroundServer,
) -> None:
    channel = grpc.insecure_channel(overflowing_server.address)
    stub = pb_grpc.SplitInferenceStub(channel)
    x = torch.randn(1, 4, generator=torch.Generator().manual_seed(0))
    answers: dict[str, object] = {}

    def call(codec: str) -> None:
        try:
            answers[codec] = stub.Infer(_request(1, x, codec), timeout=30)
        except grpc.RpcError as e:
            answers[codec] = e

    threads = [threading.Thread(target=call, args=(c,)) for c in ("int8", "raw")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    channel.close()

    refused = answers["int8"]
    assert isinstance(refused, grpc.RpcError)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output codec int8" in (refused.details() or "")
    assert "NaN or infinite" in (refused.details() or "")

    ok = answers["raw"]
    assert isinstance(ok, pb.InferResponse), ok
    assert ok.timing.batch_size == 2  # both ran in one tail call
    model = load_model(OVERFLOWING, input_shape=SHAPE)
    with torch.no_grad():  # the reference runs the same batch of two (BLAS may round
        want = model(torch.cat([x, x]))[:1]  # a batch of one differently in the last bit)
    assert torch.equal(decode(ok.outputs[0]), want)


def _stream(address: str, messages: list[pb.StreamRequest | RawChunk]) -> list[pb.StreamResponse]:
    channel = grpc.insecure_channel(address)
    call = channel.stream_stream(
        "/splitnet.v1.SplitInference/InferStream",
        request_serializer=serialize_stream_message,
        response_deserializer=stream_parser(pb.StreamResponse),
    )
    try:
        return list(call(iter(messages), timeout=30))
    finally:
        channel.close()


def test_a_refused_chunked_request_is_answered_in_band_and_its_chunks_dropped(
    digits_server: BackgroundServer, digits_runtime
) -> None:
    """A chunked request the server refuses at its header (unknown cut) gets its error
    in-band at once; its chunks are skipped and the next request is answered normally.
    """
    fp = digits_runtime.models["digits-cnn"].fingerprint
    x = load_digits()["test"].x[:1]
    wire = encode(x)
    payload = bytes(wire.payload)
    bad = pb.InferRequest(id=1, model="digits-cnn", cut="no-such-cut", fingerprint=fp)
    bad.frontier.append(wire)
    bad.frontier[0].payload = b""
    bad.chunked_payload_bytes.append(len(payload))
    good = pb.InferRequest(id=2, model="digits-cnn", cut="input", fingerprint=fp)
    good.frontier.append(encode(x))
    messages: list[pb.StreamRequest | RawChunk] = [
        pb.StreamRequest(request=bad),
        RawChunk(1, payload[:100]),
        RawChunk(1, payload[100:]),
        pb.StreamRequest(request=good),
    ]
    answers = _stream(digits_server.address, messages)
    assert [a.response.id for a in answers] == [1, 2]
    assert answers[0].response.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "no-such-cut" in answers[0].response.error.message
    assert not answers[1].response.HasField("error")
    model = digits_runtime.models["digits-cnn"].model
    with torch.no_grad():
        want = model(x)
    assert torch.equal(decode(answers[1].response.outputs[0]), want)


def test_chunks_of_a_request_that_never_arrive_end_the_stream_with_a_protocol_error(
    digits_server: BackgroundServer, digits_runtime
) -> None:
    fp = digits_runtime.models["digits-cnn"].fingerprint
    x = load_digits()["test"].x[:1]
    wire = encode(x)
    first = pb.InferRequest(id=1, model="digits-cnn", cut="input", fingerprint=fp)
    first.frontier.append(wire)
    n = len(first.frontier[0].payload)
    first.frontier[0].payload = b""
    first.chunked_payload_bytes.append(n)
    second = pb.InferRequest(id=2, model="digits-cnn", cut="input", fingerprint=fp)
    second.frontier.append(encode(x))
    with pytest.raises(grpc.RpcError) as err:
        _stream(
            digits_server.address,
            [pb.StreamRequest(request=first), RawChunk(1, b"\0" * 10), pb.StreamRequest(request=second)],
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request 2 began before request 1's chunks were complete" in (err.value.details() or "")
    # The slot the incomplete request held was given back: the server still answers.
    answers = _stream(digits_server.address, [pb.StreamRequest(request=second)])
    assert not answers[0].response.HasField("error")
    assert digits_server.server is not None
    assert digits_server.server.service.admission.in_flight == 0
