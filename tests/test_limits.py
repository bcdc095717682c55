"""Limits that hold per request and in aggregate, and gRPC's own limits set on purpose.

Real servers on 127.0.0.1:0 (in-process where a figure is not needed, a real
``splitnet-cloud`` subprocess where the question is what a user gets).
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud.admission import Admission
from cloud.auth import load_tokens
from cloud.config import ModelEntry, ServerConfig
from cloud.job import RequestError
from cloud.runtime import TailRuntime
from cloud.server import BackgroundServer
from splitnet import encode
from splitnet.data import load_digits
from splitnet.errors import ConfigError
from splitnet.v1 import inference_pb2 as pb
from splitnet.wire import RawChunk, serialize_stream_message, stream_parser

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "a-long-enough-test-token-0123456789"


# ------------------------------------------------------------------ admission
def test_fair_shares_once_the_server_is_half_full() -> None:
    a = Admission(max_in_flight=8, max_pending_bytes=1 << 20)
    for _ in range(4):  # under half full: one client may take what is free
        a.acquire("greedy")
    a.acquire("other")  # a second client is always let in
    # Half full and more: "greedy" holds 4 >= 8 // 2 clients, so it waits its turn...
    with pytest.raises(RequestError) as err:
        a.acquire("greedy")
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "fair share" in err.value.message
    # ...while the other client still gets in, up to its own share.
    a.acquire("other")
    a.acquire("other")
    a.release("greedy")
    assert a.in_flight == 6 and a.per_client == {"greedy": 3, "other": 3}
    for _ in range(3):
        a.release("greedy")
    assert "greedy" not in a.per_client  # no entry kept for clients that left


def test_pending_budget_is_shared_and_given_back() -> None:
    a = Admission(max_in_flight=8, max_pending_bytes=100)
    a.reserve(60)
    with pytest.raises(RequestError) as err:
        a.reserve(41)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-pending-mb" in err.value.message
    a.unreserve(60)
    a.reserve(100)


# --------------------------------------------------------------- the stream
def _stream(address: str, messages: Iterator[pb.StreamRequest | RawChunk]) -> grpc.Future:
    channel = grpc.insecure_channel(address)
    call = channel.stream_stream(
        "/splitnet.v1.SplitInference/InferStream",
        request_serializer=serialize_stream_message,
        response_deserializer=stream_parser(pb.StreamResponse),
    )
    return call(messages, timeout=60)


def _chunked(rid: int, fp: str, announce: int, cut: str = "input") -> pb.StreamRequest:
    x = load_digits()["test"].x[:1]
    req = pb.InferRequest(id=rid, model="digits-cnn", cut=cut, fingerprint=fp)
    req.frontier.append(encode(x))
    req.frontier[0].payload = b""
    req.chunked_payload_bytes.append(announce)
    return pb.StreamRequest(request=req)


def _server(runtime: TailRuntime, **limits: object) -> BackgroundServer:
    config = ServerConfig(models=(ModelEntry(name="digits-cnn"),), port=0, **limits)  # type: ignore[arg-type]
    return BackgroundServer(config, runtime)


def test_an_announcement_larger_than_the_cut_can_need_is_refused_at_once(
    digits_server: BackgroundServer, digits_runtime: TailRuntime
) -> None:
    fp = digits_runtime.models["digits-cnn"].fingerprint
    # The input cut of a 1x1x8x8 float32 batch needs 256 bytes; 255 MiB is announced.
    answers = list(_stream(digits_server.address, iter([_chunked(1, fp, 255 << 20)])))
    assert answers[0].response.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "never needs more than" in answers[0].response.error.message


def _held_open(message: pb.StreamRequest, release: threading.Event) -> Iterator[pb.StreamRequest]:
    """Send ``message``, then keep the stream open until ``release``."""
    yield message
    release.wait(120)


def test_the_pending_budget_holds_across_streams_and_comes_back(
    digits_runtime: TailRuntime,
) -> None:
    """Budget 1000 bytes: three 256-byte chunked requests whose chunks never come fit; a
    fourth, on another stream, is refused; when the streams go, so do their bytes.
    """
    server = _server(digits_runtime, max_pending_bytes=1000, chunk_idle_s=600)
    fp = digits_runtime.models["digits-cnn"].fingerprint
    release = threading.Event()
    try:
        calls = [
            _stream(server.address, _held_open(_chunked(i + 1, fp, 256), release)) for i in range(3)
        ]
        assert server.server is not None
        admission = server.server.service.admission
        _until(lambda: admission.pending_bytes == 768)
        answers = list(_stream(server.address, iter([_chunked(9, fp, 256)])))
        assert answers[0].response.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "budget" in answers[0].response.error.message
        for call in calls:
            call.cancel()  # the client goes away mid-transfer
        _until(lambda: admission.pending_bytes == 0 and admission.in_flight == 0)
    finally:
        release.set()
        server.stop()


def test_a_request_whose_chunks_stop_fails_and_releases_its_bytes(
    digits_runtime: TailRuntime,
) -> None:
    server = _server(digits_runtime, chunk_idle_s=0.3)
    fp = digits_runtime.models["digits-cnn"].fingerprint
    release = threading.Event()
    try:
        call = _stream(server.address, _held_open(_chunked(1, fp, 256), release))
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "stopped arriving for 0.3 s" in (err.value.details() or "")
        assert server.server is not None
        admission = server.server.service.admission
        _until(lambda: admission.pending_bytes == 0 and admission.in_flight == 0)
    finally:
        release.set()
        server.stop()


def _until(condition, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    """Wait for a state the server reaches on its own (bounded, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the server never reached the expected state"
        time.sleep(0.01)


# --------------------------------------------------------- probes, metrics
def test_health_is_open_but_bounded(digits_runtime: TailRuntime) -> None:
    config = ServerConfig(
        models=(ModelEntry(name="digits-cnn"),),
        port=0,
        tokens=frozenset({TOKEN}),
        max_health_watches=2,
    )
    server = BackgroundServer(config, digits_runtime)
    channel = grpc.insecure_channel(server.address)
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        ok = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert ok.status == health_pb2.HealthCheckResponse.SERVING  # no token needed
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="x" * 1_000_000), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(err.value.details() or "") < 200  # the name is not quoted back
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        watches = [stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)]
        watches.append(stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30))
        for w in watches:
            assert next(w).status == health_pb2.HealthCheckResponse.SERVING
        third = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            next(third)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for w in watches:
            w.cancel()
    finally:
        channel.close()
        server.stop()


def test_metrics_ask_for_the_token_and_an_idle_connection_blocks_nothing(
    digits_runtime: TailRuntime,
) -> None:
    config = ServerConfig(
        models=(ModelEntry(name="digits-cnn"),), port=0, metrics_port=0, tokens=frozenset({TOKEN})
    )
    server = BackgroundServer(config, digits_runtime)
    assert server.server is not None and server.server.scrape is not None
    url = f"http://127.0.0.1:{server.server.scrape.port}/metrics"
    idle = socket.create_connection(("127.0.0.1", server.server.scrape.port))  # says nothing
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=10)
        assert err.value.code == 401
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
        body = urllib.request.urlopen(request, timeout=10).read().decode()
        assert "splitnet_inference_pending_request_count" in body
    finally:
        idle.close()
        server.stop()


# ------------------------------------------------------------------- the CLI
def _cloud(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cloud.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_a_port_in_use_is_an_error_not_a_shared_port(digits_weights: Path) -> None:
    first = subprocess.Popen(
        [sys.executable, "-m", "cloud.cli", "--model", f"digits-cnn={digits_weights}",
         "--port", "0", "--profile-runs", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert first.stdout is not None
        line = first.stdout.readline()
        port = line.split("listening on ")[1].split()[0].rsplit(":", 1)[1]
        second = _cloud("--model", f"digits-cnn={digits_weights}", "--port", port,
                        "--profile-runs", "0")  # fmt: skip
        assert second.returncode == 2
        (message,) = second.stderr.strip().splitlines()
        assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in message
    finally:
        first.terminate()
        first.wait(30)


def test_an_empty_token_file_refuses_to_start(tmp_path: Path) -> None:
    empty = tmp_path / "tokens"
    empty.write_text("\n   # retired 2024-05, do not use: device-17\n\n")
    out = _cloud("--model", "digits-cnn", "--port", "0", "--token-file", str(empty))
    assert out.returncode == 2
    (message,) = out.stderr.strip().splitlines()
    assert "holds no token" in message and "Traceback" not in out.stderr


def test_an_indented_comment_is_not_a_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"    # retired 2024-05, do not use: device-17\n{TOKEN}\n")
    assert load_tokens(path, env=False) == frozenset({TOKEN})
    path.write_text("\t# only a comment\n")
    with pytest.raises(ConfigError):
        load_tokens(path, env=False)


def test_a_certificate_and_a_key_that_do_not_match_are_named(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    from splitnet.certs import make_certs

    one = make_certs(tmp_path / "one")
    two = make_certs(tmp_path / "two")
    out = _cloud("--model", "digits-cnn", "--port", "0", "--tls-cert", str(one.server_cert),
                 "--tls-key", str(two.server_key))  # fmt: skip
    assert out.returncode == 2
    (message,) = [m for m in out.stderr.strip().splitlines() if "warning" not in m]
    assert "do not make a pair" in message and "bind" not in message


def test_metrics_over_tls_need_a_client_certificate_under_mtls(
    digits_runtime: TailRuntime, tmp_path: Path
) -> None:
    pytest.importorskip("cryptography")
    from splitnet.certs import make_certs

    certs = make_certs(tmp_path)
    config = ServerConfig(
        models=(ModelEntry(name="digits-cnn"),),
        port=0,
        metrics_port=0,
        tls_cert=str(certs.server_cert),
        tls_key=str(certs.server_key),
        tls_client_ca=str(certs.ca),
    )
    server = BackgroundServer(config, digits_runtime)
    assert server.server is not None and server.server.scrape is not None
    url = f"https://localhost:{server.server.scrape.port}/metrics"
    try:
        anonymous = ssl.create_default_context(cafile=str(certs.ca))
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            urllib.request.urlopen(url, timeout=10, context=anonymous).read()
        with_cert = ssl.create_default_context(cafile=str(certs.ca))
        with_cert.load_cert_chain(str(certs.client_cert), str(certs.client_key))
        body = urllib.request.urlopen(url, timeout=10, context=with_cert).read().decode()
        assert "splitnet_inference_request_success_total" in body or "process_" in body
    finally:
        server.stop()


def _rss_mib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024


def test_unauthenticated_calls_are_refused_before_their_body_is_read(
    digits_weights: Path, tmp_path: Path
) -> None:
    """12 concurrent 50 MiB Infer calls without a token: refused, and the server never
    buffers them (before the fix: +1.1 GB; a streaming refusal reads no message).
    """
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud.cli", "--model", f"digits-cnn={digits_weights}",
         "--port", "0", "--profile-runs", "0", "--token-file", str(tokens)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().split("listening on ")[1].split()[0]
        base = _rss_mib(proc.pid)
        request = pb.InferRequest(model="digits-cnn", cut="input")
        request.frontier.add().payload = b"\0" * (50 << 20)
        data = request.SerializeToString()
        channel = grpc.insecure_channel(
            address, options=[("grpc.max_send_message_length", 64 << 20)]
        )
        infer = channel.unary_unary("/splitnet.v1.SplitInference/Infer")
        codes: list[grpc.StatusCode] = []

        def call() -> None:
            try:
                infer(data, timeout=60)
            except grpc.RpcError as e:
                codes.append(e.code())

        threads = [threading.Thread(target=call) for _ in range(12)]
        for t in threads:
            t.start()
        peak = base
        while any(t.is_alive() for t in threads):
            peak = max(peak, _rss_mib(proc.pid))
            time.sleep(0.01)
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 12
        assert peak - base < 200, f"resident memory {base} -> {peak} MiB"
        # A legitimate client is served meanwhile and after.
        from edge.client import EdgeClient

        x = load_digits()["test"].x[:1]
        with EdgeClient(address, "digits-cnn", weights=digits_weights, token=TOKEN) as client:
            assert client.infer(x).output.shape == (1, 10)
        channel.close()
    finally:
        proc.terminate()
        proc.wait(30)


# ------------------------------------------------------- bounds before parsing
def test_repeated_fields_over_their_bound_are_refused_before_parsing(
    digits_runtime: TailRuntime,
) -> None:
    from splitnet.wire import BOUNDS, OutOfBounds, safe_parser, scan_bounds, stream_parser

    fp = digits_runtime.models["digits-cnn"].fingerprint
    good = _chunked(7, fp, 256).request
    assert scan_bounds(good.SerializeToString(), BOUNDS["splitnet.v1.InferRequest"]) is None
    big = pb.InferRequest()
    big.CopyFrom(good)
    big.frontier[0].payload = bytes(1 << 20)  # large payloads are skipped, not refused
    big.frontier[0].shape[:] = [2**40] * 8  # 8 dimensions of 6 bytes each: fine
    assert scan_bounds(big.SerializeToString(), BOUNDS["splitnet.v1.InferRequest"]) is None
    wide = pb.InferRequest()
    wide.CopyFrom(good)
    wide.chunked_payload_bytes[:] = [1] * 100_000
    parsed = safe_parser(pb.InferRequest)(wide.SerializeToString())
    assert isinstance(parsed, OutOfBounds)
    assert "'chunked_payload_bytes' has 10000 entries or more" in parsed.message
    streamed = stream_parser(pb.StreamRequest)(pb.StreamRequest(request=wide).SerializeToString())
    assert isinstance(streamed, OutOfBounds) and streamed.request_id == 7  # answerable in-band
    named = pb.InferRequest(id=3, model="m" * 100_000)
    parsed = safe_parser(pb.InferRequest)(named.SerializeToString())
    assert isinstance(parsed, OutOfBounds) and "'model' of 100000 bytes" in parsed.message


def test_metrics_over_https_an_idle_connection_blocks_no_scrape(
    digits_runtime: TailRuntime, tmp_path: Path
) -> None:
    """The TLS handshake runs with a timeout on the event loop, never in accept()."""
    pytest.importorskip("cryptography")
    from splitnet.certs import make_certs

    certs = make_certs(tmp_path)
    config = ServerConfig(
        models=(ModelEntry(name="digits-cnn"),),
        port=0,
        metrics_port=0,
        tls_cert=str(certs.server_cert),
        tls_key=str(certs.server_key),
    )
    server = BackgroundServer(config, digits_runtime)
    assert server.server is not None and server.server.scrape is not None
    port = server.server.scrape.port
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]  # no handshake
    try:
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        for _ in range(3):
            body = urllib.request.urlopen(
                f"https://localhost:{port}/metrics", timeout=10, context=ctx
            ).read()
            assert b"splitnet_inference" in body
    finally:
        for s in idle:
            s.close()
        server.stop()


def test_the_allocator_gives_freed_memory_back() -> None:
    """glibc: a fixed mmap threshold, and malloc_trim once RSS grew (cloud/memory.py)."""
    import ctypes.util

    from cloud.memory import Trimmer, rss_bytes, tune_allocator

    if not ctypes.util.find_library("c") or not rss_bytes():
        pytest.skip("not glibc on Linux")
    assert tune_allocator()
    trimmer = Trimmer(interval_s=0.05, grow_bytes=8 << 20).start()
    try:
        blocks = [bytearray(64 << 10) for _ in range(1024)]  # 64 MiB in heap-sized blocks
        held = rss_bytes()
        _until(lambda: trimmer.trims >= 1)  # it saw the growth (and trimmed nothing in use)
        del blocks
        _until(lambda: rss_bytes() < held - (32 << 20))  # given back, not kept
    finally:
        trimmer.stop()


# ------------------------------------------------ every exception has a code
class _BrokenRuntime(TailRuntime):
    """The digits runtime, with a bug in ``model_info`` and in decoding one cut."""

    def __init__(self, base: TailRuntime) -> None:  # shares the loaded models
        self.__dict__.update(base.__dict__)

    def model_info(self, name: str = "") -> pb.ModelInfoResponse:
        raise ValueError("secret internal detail")

    def decode(self, job) -> None:  # type: ignore[no-untyped-def]
        if job.cut.name == "pool1":
            raise ValueError("secret internal detail")
        super().decode(job)


def test_a_bug_inside_the_server_is_internal_and_alone(digits_runtime: TailRuntime) -> None:
    from splitnet.v1 import inference_pb2_grpc as pb_grpc

    config = ServerConfig(models=(ModelEntry(name="digits-cnn"),), port=0)
    server = BackgroundServer(config, _BrokenRuntime(digits_runtime))
    fp = digits_runtime.models["digits-cnn"].fingerprint
    x = load_digits()["test"].x[:1]
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.SplitInferenceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "secret" not in (err.value.details() or "")
            graph = digits_runtime.models["digits-cnn"].graph
            good = pb.InferRequest(id=1, model="digits-cnn", cut="input", fingerprint=fp)
            good.frontier.append(encode(x))
            bad = pb.InferRequest(id=2, model="digits-cnn", cut="pool1", fingerprint=fp)
            head = graph.split("pool1")[0](x)
            bad.frontier.extend(encode(t) for t in (head if isinstance(head, tuple) else [head]))
            answers = list(
                stub.InferStream(
                    iter([pb.StreamRequest(request=r) for r in (bad, good)]), timeout=10
                )
            )
        assert [a.response.id for a in answers] == [2, 1]  # the stream went on
        assert answers[0].response.error.code == grpc.StatusCode.INTERNAL.value[0]
        assert "secret" not in answers[0].response.error.message
        assert not answers[1].response.HasField("error")
    finally:
        server.stop()
