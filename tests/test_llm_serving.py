"""Split generation through a real server (127.0.0.1, port 0): exactness against
transformers' generate(), concurrent sessions, every limit with its status code, and
caches freed when a session ends, drops or idles out.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import grpc
import pytest
import torch

pytest.importorskip("transformers")

from llm_helpers import CHUNK, NEW_TOKENS, RawSession, code_of, prompt_ids, reference  # noqa: E402

from cloud.config import ModelEntry, ServerConfig  # noqa: E402
from cloud.generation import StepBatcher, _Work  # noqa: E402
from cloud.server import BackgroundServer  # noqa: E402
from cloud.sessions import ServedLM, SessionLimits, SessionTable  # noqa: E402
from edge.generate import GenerateConfig, Generator  # noqa: E402
from splitnet.codecs import encode, parse_codec  # noqa: E402
from splitnet.errors import ConfigError, ModelMismatchError, ResourceExhaustedError  # noqa: E402
from splitnet.llm import BlockCut, Sampling, load_lm  # noqa: E402
from splitnet.llm.halves import EdgeHalf  # noqa: E402
from splitnet.v1 import generation_pb2 as gpb  # noqa: E402
from splitnet.v1 import inference_pb2 as pb  # noqa: E402
from splitnet.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

MODELS = ("tiny:llama", "tiny:gpt2")


@pytest.fixture(scope="module")
def lms():
    return {name: load_lm(name) for name in MODELS}


@pytest.fixture(scope="module")
def server():
    config = ServerConfig(models=tuple(ModelEntry(name=n) for n in MODELS), port=0)
    s = BackgroundServer(config)
    yield s
    s.stop()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def small_server():
    """Small limits: 2 sessions, 128 tokens each, a KV budget for about 1.5 sessions at
    block.1 of tiny:llama (3 blocks x 2 heads x 16 x 2 x 4 bytes = 768 bytes a token),
    an idle timeout long enough never to pass by itself (the clock is injected).
    """
    config = ServerConfig(
        models=(ModelEntry(name="tiny:llama"),), port=0, llm_max_sessions=2,
        llm_max_tokens=128, llm_kv_budget_bytes=150_000, llm_idle_s=3600.0,
    )  # fmt: skip
    s = BackgroundServer(config)
    assert s.server is not None and s.server.generation is not None
    s.server.generation.table.clock = FakeClock()
    yield s
    s.stop()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("cut", ["block.1", "block.3", "block.1:block.3", "input"])
def test_server_generation_equals_generate(server, lms, model: str, cut: str) -> None:
    lm = lms[model]
    prompt = prompt_ids(lm.model.config.vocab_size)
    expected = reference(lm, prompt)
    config = GenerateConfig(model=model, cut=cut, chunk_tokens=CHUNK)
    with Generator(server.address, config, lm=lm) as g:
        result = g.generate(prompt, NEW_TOKENS)
    assert result.tokens == expected
    assert len(result.steps) == NEW_TOKENS - 1 and result.reconnects == 0
    assert result.bytes_per_token > 0 and result.ttft_s > 0


def test_server_sampling_equals_local(server, lms) -> None:
    from splitnet.llm.halves import split_model
    from splitnet.llm.local import generate_local

    lm = lms["tiny:llama"]
    prompt = prompt_ids(512, 12)
    for cut in ("block.2", "block.1:block.3"):
        config = GenerateConfig(model="tiny:llama", cut=cut, temperature=0.9, top_p=0.8, seed=5)
        with Generator(server.address, config, lm=lm) as g:
            got = g.generate(prompt, 20).tokens
        local = generate_local(split_model(lm, BlockCut(2) if cut == "block.2" else BlockCut(1, 3)),
                               prompt, 20, sampling=config.sampling)  # fmt: skip
        assert got == local


def test_eight_concurrent_sessions_equal_eight_sequential(server, lms) -> None:
    lm = lms["tiny:llama"]
    prompts = [prompt_ids(512, 10 + 3 * i, seed=i) for i in range(8)]
    cuts = ["block.1", "block.2", "block.1:block.3", "block.1"] * 2
    def run(i: int) -> list[int]:
        with Generator(server.address, GenerateConfig(model="tiny:llama", cut=cuts[i]), lm=lm) as g:
            return g.generate(prompts[i], 32).tokens
    sequential = [run(i) for i in range(8)]
    concurrent: list[list[int] | None] = [None] * 8
    threads = [threading.Thread(target=lambda i=i: concurrent.__setitem__(i, run(i))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert concurrent == sequential
    assert sequential[0] == reference(lm, prompts[0], 32)


def test_steps_waiting_together_run_as_one_batch(lms) -> None:
    """Four sessions' decode steps queued at once are one batched call, and each session's
    answer is the one it gets alone.
    """
    lm = lms["tiny:llama"]
    model = ServedLM(lm)
    table = SessionTable(SessionLimits())
    cut = BlockCut(1)
    edge = EdgeHalf(lm, cut)
    raw = parse_codec("raw")

    def sessions_with_hidden():
        out = []
        for i in range(4):
            s = table.open(model, cut, raw, Sampling(), 64)
            e = edge.new_state()
            with torch.inference_mode():
                s.half.segment(edge.front(torch.tensor([prompt_ids(512, 5 + 4 * i, seed=i)]), e.front), s.state)
                h = edge.front(torch.tensor([[7 + i]]), e.front)
            out.append((s, h))
        return out

    async def run(pairs, together: bool):
        batcher = StepBatcher(8)
        loop = asyncio.get_running_loop()
        works = [_Work(s, h, True, time.perf_counter(), loop.create_future()) for s, h in pairs]
        if together:
            results = await asyncio.gather(*(batcher.submit(w) for w in works))
        else:
            results = [await batcher.submit(w) for w in works]
        await batcher.close()
        return [r.result.token for r, _ in results], batcher.batches

    alone, batches_alone = asyncio.run(run(sessions_with_hidden(), together=False))
    together, batches = asyncio.run(run(sessions_with_hidden(), together=True))
    assert batches == [4] and batches_alone == []
    assert together == alone

    async def twice_on_the_loop(pairs):
        """Two rounds of the same four steps' shape: the first, unmeasured, goes to the
        worker; the second, measured under the (huge) threshold, runs on the event loop,
        batched the same way.
        """
        batcher = StepBatcher(8, inline_us=10**9)
        loop = asyncio.get_running_loop()
        tokens = []
        for round_ in range(2):
            works = [_Work(s, h, True, time.perf_counter(), loop.create_future()) for s, h in pairs]
            results = await asyncio.gather(*(batcher.submit(w) for w in works))
            tokens.append([r.result.token for r, _ in results])
            assert batcher.inline_runs == round_
            pairs = [(s, edge.front(torch.tensor([[t]]), edge.new_state().front)) for (s, _), t
                     in zip(pairs, tokens[-1], strict=True)]  # fmt: skip
        await batcher.close()
        return tokens[0], batcher.batches

    inline, batches = asyncio.run(twice_on_the_loop(sessions_with_hidden()))
    assert batches == [4, 4] and inline == alone

    async def alone_runs_at_once(pairs):
        """A session alone on the server: once measured, its step runs in the caller."""
        batcher = StepBatcher(8, inline_us=10**9)
        loop = asyncio.get_running_loop()
        tokens = []
        for s, h in pairs:
            r, _ = await batcher.submit(_Work(s, h, True, 0.0, loop.create_future()), alone=True)
            tokens.append(r.result.token)
        await batcher.close()
        return tokens, batcher.inline_runs

    direct, runs = asyncio.run(alone_runs_at_once(sessions_with_hidden()))
    assert direct == alone and runs == 3  # the first one, unmeasured, went to the worker


def test_info_reports_models_limits_capacity(small_server) -> None:
    lm = load_lm("tiny:llama")
    with Generator(small_server.address, GenerateConfig(model="tiny:llama"), lm=lm) as g:
        info = g.info()
    assert [m.name for m in info.models] == ["tiny:llama"]
    assert info.models[0].num_layers == 4 and info.models[0].hidden_size == 64
    assert info.models[0].kv_bytes_per_token_per_layer == 2 * 16 * 2 * 4
    assert info.limits.max_sessions == 2 and info.capacity.sessions_free == 2
    assert "int8" not in info.codecs and "fp16" in info.codecs and "int8o:4" in info.codecs
    profile = info.models[0].profile  # timed at start-up, one entry per block
    assert len(profile.decode_ms) == len(profile.prefill_ms) == 4
    assert min(profile.decode_ms) > 0 and profile.lm_head_ms > 0 and "median of 3" in profile.method


def test_a_server_told_not_to_profile_publishes_no_profile() -> None:
    config = ServerConfig(models=(ModelEntry(name="tiny:llama"),), port=0, profile_runs=0)
    s = BackgroundServer(config)
    try:
        lm = load_lm("tiny:llama")
        with Generator(s.address, GenerateConfig(model="tiny:llama"), lm=lm) as g:
            assert not g.info().models[0].HasField("profile")
    finally:
        s.stop()


def test_model_info_reports_generation_capacity_now(small_server) -> None:
    """GetModelInfo, the call every client makes first, carries the generation limits and
    the capacity free at that moment: a session open reserves its KV and a seat.
    """

    def model_info() -> pb.ModelInfoResponse:
        with grpc.insecure_channel(small_server.address) as channel:
            stub = pb_grpc.SplitInferenceStub(channel)
            return stub.GetModelInfo(pb.ModelInfoRequest())

    before = model_info()
    assert before.HasField("generation")
    assert [m.name for m in before.generation.models] == ["tiny:llama"]
    assert before.generation.limits.max_sessions == 2
    assert before.generation.limits.kv_budget_bytes == 150_000
    assert before.generation.capacity.sessions_free == 2
    assert before.generation.capacity.kv_free_bytes == 150_000
    s = RawSession(small_server.address)
    try:
        s.open(model="tiny:llama", cut="block.1", max_tokens=100)
        during = model_info().generation.capacity
        assert during.sessions_open == 1 and during.sessions_free == 1
        assert during.kv_reserved_bytes == 100 * 768
        assert during.kv_free_bytes == 150_000 - 100 * 768
    finally:
        s.close()


def _prefill(session: RawSession, n: int, position: int = 0, last: bool = True) -> gpb.GenerateResponse:
    hidden = torch.randn(1, n, 64)
    return session.ask(prefill=gpb.Prefill(position=position, hidden=encode(hidden), last=last))


def test_each_limit_is_answered_with_its_code(small_server) -> None:
    addr = small_server.address
    table = small_server.server.generation.table
    # tokens per session
    s = RawSession(addr)
    with pytest.raises(grpc.RpcError) as e:
        s.open(model="tiny:llama", cut="block.1", max_tokens=129)
    assert code_of(e) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit of 128 tokens per session" in e.value.details()
    # KV budget: one 128-token session at block.1 reserves 98,304 of 150,000 bytes
    a = RawSession(addr)
    opened = a.open(model="tiny:llama", cut="block.1", max_tokens=128)
    assert opened.capacity.kv_reserved_bytes == 128 * 768 and opened.max_chunk_tokens > 40
    b = RawSession(addr)
    with pytest.raises(grpc.RpcError) as e:
        b.open(model="tiny:llama", cut="block.1", max_tokens=128)
    assert code_of(e) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "KV memory" in e.value.details() and "at most 67 tokens" in e.value.details()
    # sessions
    c = RawSession(addr)
    c.open(model="tiny:llama", cut="block.3", max_tokens=16)
    d = RawSession(addr)
    with pytest.raises(grpc.RpcError) as e:
        d.open(model="tiny:llama", cut="block.3", max_tokens=16)
    assert code_of(e) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "all 2 generation sessions are in use" in e.value.details()
    # positions: a mismatch is ABORTED; a repeat is answered again, not appended
    r1 = _prefill(a, 10)
    assert r1.result.length == 10 and r1.result.WhichOneof("output") == "token"
    hidden = encode(torch.randn(1, 1, 64))
    step = a.ask(step=gpb.DecodeStep(position=10, hidden=hidden))
    again = a.ask(step=gpb.DecodeStep(position=10, hidden=hidden))
    assert again.result.length == step.result.length == 11 and again.result.token == step.result.token
    with pytest.raises(grpc.RpcError) as e:
        a.ask(step=gpb.DecodeStep(position=13, hidden=hidden))
    assert code_of(e) == grpc.StatusCode.ABORTED
    assert "position 13, but session" in e.value.details() and "holds 11 tokens" in e.value.details()
    # max_tokens of the session: OUT_OF_RANGE past it
    _prefill(c, 15)
    c.ask(step=gpb.DecodeStep(position=15, hidden=hidden))
    with pytest.raises(grpc.RpcError) as e:
        c.ask(step=gpb.DecodeStep(position=16, hidden=hidden))
    assert code_of(e) == grpc.StatusCode.OUT_OF_RANGE
    _wait(lambda: len(table) == 0)
    # bad requests: INVALID_ARGUMENT / NOT_FOUND, each with a message naming the fix
    for fields, code, text in (
        (dict(model="tiny:llama", cut="block.1", codec="int8"), "INVALID_ARGUMENT", "not safe"),
        (dict(model="tiny:llama", cut="block.9"), "INVALID_ARGUMENT", "does not fit"),
        (dict(model="nope", cut="block.1"), "NOT_FOUND", "tiny:llama"),
    ):
        with pytest.raises(grpc.RpcError) as e:
            RawSession(addr).open(**fields)
        assert code_of(e).name == code and text in e.value.details()
    x = RawSession(addr)
    x.open(model="tiny:llama", cut="block.1", max_tokens=64)
    with pytest.raises(grpc.RpcError) as e:
        x.ask(prefill=gpb.Prefill(position=0, hidden=encode(torch.randn(1, 3, 65)), last=True))
    assert code_of(e) == grpc.StatusCode.INVALID_ARGUMENT and "[1, T, 64]" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        RawSession(addr).ask(step=gpb.DecodeStep(position=0, hidden=hidden))
    assert code_of(e) == grpc.StatusCode.INVALID_ARGUMENT and "before open" in e.value.details()
    # token ids go only to cut input, and only ids below the vocabulary size
    for cut, prefill, text in (
        ("block.1", gpb.Prefill(position=0, token_ids=[1, 2], last=True), "only cut input"),
        ("input", gpb.Prefill(position=0, hidden=encode(torch.randn(1, 2, 64)), last=True),
         "send token_ids"),
        ("input", gpb.Prefill(position=0, token_ids=[1, 512], last=True), "token id 512"),
        ("input", gpb.Prefill(position=0, last=True), "0 token ids"),
    ):
        y = RawSession(addr)
        y.open(model="tiny:llama", cut=cut, max_tokens=16)
        with pytest.raises(grpc.RpcError) as e:
            y.ask(prefill=prefill)
        assert code_of(e) == grpc.StatusCode.INVALID_ARGUMENT and text in e.value.details()


def test_busy_server_fails_fast_at_open_for_the_generator(small_server) -> None:
    lm = load_lm("tiny:llama")
    held = [RawSession(small_server.address) for _ in range(2)]
    for h in held:
        h.open(model="tiny:llama", cut="block.3", max_tokens=8)
    with Generator(small_server.address, GenerateConfig(model="tiny:llama", cut="block.1"), lm=lm) as g:
        with pytest.raises(ResourceExhaustedError, match="sessions are in use"):
            g.generate([1, 2, 3], 4)
    for h in held:
        h.close()


def _wait(condition, limit_s: float = 20.0) -> None:
    """Wait for the server to notice (an event, not a timing assertion)."""
    end = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("the server did not get there in time")
        time.sleep(0.01)


def test_dropped_session_frees_its_cache(small_server) -> None:
    table = small_server.server.generation.table
    before = table.kv_used_bytes
    s = RawSession(small_server.address)
    s.open(model="tiny:llama", cut="block.1", max_tokens=100)
    _prefill(s, 40)
    held = table.kv_used_bytes
    assert held - before == 40 * 768  # 3 blocks x K and V x 2 heads x 16 x float32
    assert table.capacity().kv_reserved_bytes == 100 * 768
    s.cancel()  # the stream drops mid-generation
    _wait(lambda: len(table) == 0)
    assert table.kv_used_bytes == before == 0
    assert table.capacity().kv_reserved_bytes == 0


def test_idle_timeout_frees_the_cache(small_server) -> None:
    table = small_server.server.generation.table
    clock = table.clock
    s = RawSession(small_server.address)
    s.open(model="tiny:llama", cut="block.2", max_tokens=64)
    _prefill(s, 20)
    assert table.kv_used_bytes == 20 * 2 * 2 * 16 * 2 * 4
    clock.now += 3599.0
    assert table.expire() == [] and table.kv_used_bytes > 0
    clock.now += 2.0
    (ended,) = table.expire()
    assert ended.end_reason == "idle" and table.kv_used_bytes == 0 and len(table) == 0
    with pytest.raises(grpc.RpcError) as e:
        s.ask(step=gpb.DecodeStep(position=20, hidden=encode(torch.randn(1, 1, 64))))
    assert code_of(e) == grpc.StatusCode.DEADLINE_EXCEEDED and "idle" in e.value.details()


def test_other_weights_are_refused_at_open_on_both_sides(server, lms) -> None:
    """The session carries the edge's fingerprint: other weights under the same name are
    FAILED_PRECONDITION at open, a ModelMismatchError for the Generator, and the server
    publishes its own.
    """
    other = load_lm("tiny:llama:seed=7")  # the same architecture, other weights
    assert other.fingerprint != lms["tiny:llama"].fingerprint
    with Generator(server.address, GenerateConfig(model="tiny:llama"), lm=other) as g:
        (served,) = [m for m in g.info().models if m.name == "tiny:llama"]
        assert served.fingerprint == lms["tiny:llama"].fingerprint
        with pytest.raises(ModelMismatchError, match="load the same weights on both sides"):
            g.generate([1, 2, 3], 4)
    s = RawSession(server.address)
    with pytest.raises(grpc.RpcError) as e:
        s.open(model="tiny:llama", cut="block.1", fingerprint="0" * 64)
    assert code_of(e) == grpc.StatusCode.FAILED_PRECONDITION
    s.close()


def test_generator_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="not safe"):
        GenerateConfig(model="tiny:llama", codec="int8")
    with pytest.raises(ConfigError, match="top_p"):
        GenerateConfig(model="tiny:llama", top_p=0)


@pytest.mark.parametrize("model", MODELS)
def test_generate_command_json_equals_generate(server, lms, model: str, capsys) -> None:
    from edge.cli import main

    lm = lms[model]
    prompt = prompt_ids(lm.model.config.vocab_size)
    expected = reference(lm, prompt)
    for cut in ("block.1", "block.2", "block.1:block.3"):
        status = main(["generate", "--server", server.address, "--model", model, "--cut", cut,
                       "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens",
                       str(NEW_TOKENS), "--chunk-tokens", str(CHUNK), "--json"])  # fmt: skip
        lines = capsys.readouterr().out.strip().splitlines()
        assert status == 0
        report = json.loads(lines[-1])
        assert report["tokens"] == expected
        assert report["tokens_per_s"] > 0 and len(report["steps"]) == NEW_TOKENS - 1
        assert set(report["per_token_ms"]) >= {
            "edge_ms", "encode_ms", "network_ms", "queue_ms", "compute_ms"
        }
        assert any("tokens/s" in line and "bytes/token" in line for line in lines)


def test_generate_cut_auto_prices_the_cloud_from_the_servers_profile(server, lms, capsys) -> None:
    """--cut auto through the command: the plan says where the cloud's price came from,
    and whatever layout it picks, the lossless tokens equal transformers' generate()."""
    from edge.cli import main

    lm = lms["tiny:llama"]
    prompt = prompt_ids(lm.model.config.vocab_size)
    expected = reference(lm, prompt, 16)
    common = ["generate", "--server", server.address, "--model", "tiny:llama", "--cut", "auto",
              "--codec", "raw", "--prompt-ids", ",".join(map(str, prompt)),
              "--max-new-tokens", "16", "--rtt-ms", "5", "--json"]  # fmt: skip
    assert main(common) == 0
    out = capsys.readouterr().out
    assert "cloud" in out and "(the server's published profile)" in out, out
    assert json.loads(out.strip().splitlines()[-1])["tokens"] == expected
    assert main([*common, "--cloud-speedup", "4"]) == 0
    out = capsys.readouterr().out
    assert "/ 4 (--cloud-speedup)" in out
    assert json.loads(out.strip().splitlines()[-1])["tokens"] == expected


def test_a_server_with_a_small_chunk_limit_gets_the_prefill_again_within_it(lms) -> None:
    """The first prefill chunk travels behind the open, before the server has said its
    limit. A server whose messages hold fewer tokens (80 KiB: 64 tokens of tiny:llama)
    is sent the prefill again within its limit, once: the generator remembers it, and
    the tokens equal transformers' generate() both times."""
    config = ServerConfig(models=(ModelEntry(name="tiny:llama"),), port=0,
                          max_message_bytes=80 << 10, chunk_bytes=32 << 10)
    s = BackgroundServer(config)
    try:
        assert s.server is not None and s.server.generation is not None
        lm = lms["tiny:llama"]
        prompt = prompt_ids(lm.model.config.vocab_size, 100)
        expected = reference(lm, prompt, 8)
        with Generator(s.address, GenerateConfig(model="tiny:llama", cut="block.2"),
                       lm=lm) as g:
            assert g.generate(prompt, 8).tokens == expected
            assert s.server.generation.sessions_opened == 2  # over the limit, then within
            assert g.generate(prompt, 8).tokens == expected
            assert s.server.generation.sessions_opened == 3  # the limit was known
    finally:
        s.stop()


def test_generate_command_mistakes_are_one_line(server, capsys) -> None:
    from edge.cli import main

    for args, text in (
        (["--cut", "block.9", "--prompt-ids", "1,2"], "block.9 does not fit"),
        (["--prompt-ids", "1,x"], "give integers"),
        (["--prompt-ids", "1,99999"], "below the vocabulary size 512"),
        (["--prompt", "hello"], "no tokenizer"),
        (["--codec", "int8", "--prompt-ids", "1"], "not safe"),
    ):
        status = main(["generate", "--server", server.address, "--model", "tiny:llama", *args])
        err = capsys.readouterr().err
        assert status == 2 and err.count("\n") == 1 and text in err, err


def test_generation_needs_the_bearer_token_when_the_server_has_one(lms) -> None:
    from splitnet.errors import UnauthenticatedError

    token = "generation-token-0123456789"
    config = ServerConfig(models=(ModelEntry(name="tiny:llama"),), port=0,
                          tokens=frozenset({token}))  # fmt: skip
    s = BackgroundServer(config)
    try:
        lm = lms["tiny:llama"]
        with Generator(s.address, GenerateConfig(model="tiny:llama"), lm=lm) as g:
            with pytest.raises(UnauthenticatedError):
                g.generate([1, 2, 3], 4)
        with Generator(s.address, GenerateConfig(model="tiny:llama", token=token), lm=lm) as g:
            assert g.generate([1, 2, 3], 4).tokens == reference(lm, [1, 2, 3], 4)
        assert len(s.server.generation.table) == 0
    finally:
        s.stop()
