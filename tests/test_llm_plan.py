"""The generation planner: costs are injected, no clock decides anything."""

from __future__ import annotations

import pytest

from splitnet.errors import CodecError, ConfigError
from splitnet.llm.plan import (
    ALL_CLOUD,
    ALL_EDGE,
    Constraints,
    GenerationJob,
    ModelCosts,
    ModelSizes,
    SideCost,
    model_sizes,
    plan_generation,
)
from splitnet.planning import LinkEstimate

N = 6  # blocks
MB = 1_000_000


def costs(*, edge_ms: float = 10.0, cloud_ms: float = 1.0, **kw: object) -> ModelCosts:
    """A 6-block model: each block 10 MB of weights and 1 kB of KV per token; the edge
    10x slower than the cloud; prefill a tenth of a step per token."""
    sizes = ModelSizes(
        param_bytes=(10 * MB,) * N,
        kv_bytes_per_token=(1000,) * N,
        embed_bytes=20 * MB,
        lm_head_bytes=1000,
    )
    args: dict = dict(
        sizes=sizes,
        edge=SideCost(decode_ms=(edge_ms,) * N, prefill_ms=(edge_ms / 10,) * N,
                      lm_head_ms=2 * edge_ms),
        cloud=SideCost(decode_ms=(cloud_ms,) * N, prefill_ms=(cloud_ms / 10,) * N,
                       lm_head_ms=2 * cloud_ms),
        codec_bytes={"raw": 2300, "fp16": 1170, "int8o:8": 630, "int8": 600},
        codec_agreement={"fp16": 1.0, "int8o:8": 0.996, "int8": 0.5},
    )
    args.update(kw)
    return ModelCosts(**args)


JOB = GenerationJob(prompt_tokens=100, new_tokens=64)
FAST = LinkEstimate(up_mbit=100, down_mbit=100, rtt_ms=2)
SLOW = LinkEstimate(up_mbit=0.5, down_mbit=2, rtt_ms=80)


def test_a_fast_link_sends_everything_to_the_cloud_unless_privacy_forbids() -> None:
    result = plan_generation(costs(), JOB, FAST)
    assert result.choice is not None and result.choice.cut == ALL_CLOUD
    # All in the cloud: 6 cloud blocks + head + 2 ms RTT + two token messages per step.
    step = 6 * 1 + 2 + 2 + 2 * 16 * 8 / 100_000
    assert result.choice.step_ms == pytest.approx(step)
    assert result.choice.edge_memory_mb == 0
    private = plan_generation(costs(), JOB, FAST, Constraints(min_edge_blocks=2))
    assert private.choice is not None and private.choice.cut == "block.2"
    assert private.choice.codec == "int8o:8"  # fewest bytes among the safe codecs
    assert private.baseline(ALL_CLOUD).rejected.startswith("privacy: 0 blocks")


def test_a_slow_link_keeps_everything_on_the_device() -> None:
    result = plan_generation(costs(), JOB, SLOW)
    assert result.choice is not None and result.choice.cut == ALL_EDGE
    edge = result.choice
    assert edge.step_ms == pytest.approx(6 * 10 + 20)  # blocks + LM head
    assert edge.ttft_ms == pytest.approx(100 * 6 * 1.0 + 20)
    assert edge.network_ms_per_token == 0 and edge.bytes_up_per_token == 0
    # Weights + embeddings + head + KV of 164 positions in 6 blocks.
    assert edge.edge_memory_mb == pytest.approx((60 * MB + 20 * MB + 1000 + 164 * 6000) / MB)


def test_edge_memory_forces_a_cut_and_says_why_the_rest_was_rejected() -> None:
    # 45 MB: embeddings (20) + 2 blocks (20) + KV fits; a third block does not.
    c = Constraints(edge_memory_mb=45, min_edge_blocks=1)
    result = plan_generation(costs(), JOB, SLOW, c)
    assert result.choice is not None
    assert result.choice.cut in {"block.1", "block.2"}
    assert result.choice.edge_memory_mb <= 45
    edge = result.baseline(ALL_EDGE)
    assert edge.rejected == f"memory: the edge needs {edge.edge_memory_mb:.1f} MB, 45 MB allowed"
    assert all(p.edge_memory_mb > 45 for p in result.candidates if p.rejected.startswith("memory"))
    assert "memory" in result.rejections() and "privacy" in result.rejections()
    text = result.describe()
    assert "choice: block." in text and "baseline all on device" in text
    assert "rejected: memory" in text


def test_u_shaped_keeps_token_ids_and_prices_both_directions() -> None:
    result = plan_generation(costs(), JOB, FAST, Constraints(u_shaped=True, min_edge_blocks=1))
    choice = result.choice
    assert choice is not None and ":" in choice.cut
    k, m = (int(part.removeprefix("block.")) for part in choice.cut.split(":"))
    # A fast link: as little on the slow edge as allowed, one block before and after.
    assert (k, m) == (1, N - 1)
    hidden = 630
    assert choice.bytes_up_per_token == choice.bytes_down_per_token == hidden
    net = hidden * 8 / 100_000 * 2 + 2
    assert choice.network_ms_per_token == pytest.approx(net)
    assert choice.edge_ms_per_token == pytest.approx(10 + 10 + 20)  # block 0, block 5, head
    assert choice.cloud_ms_per_token == pytest.approx(4)  # blocks 1..4, no head
    # The prefill comes back down for the edge's last block.
    ttft = (100 * 1.0 + 100 * hidden * 8 / 100_000 + 2 + 4 * 100 * 0.1
            + 100 * hidden * 8 / 100_000 + 100 * 1.0 + 20)
    assert choice.ttft_ms == pytest.approx(ttft)
    for p in result.candidates:
        if p.cut == ALL_CLOUD or (p.cut.startswith("block.") and ":" not in p.cut):
            assert p.rejected.startswith("privacy: U-shaped required")


def test_naive_int8_and_low_agreement_codecs_are_never_chosen() -> None:
    result = plan_generation(costs(), JOB, SLOW, Constraints(min_edge_blocks=1,
                                                             edge_memory_mb=45))
    verdicts = {p.codec: p.rejected for p in result.candidates if p.codec and
                not p.rejected.startswith(("memory", "privacy"))}
    assert verdicts["int8"].startswith("codec: int8 is not safe for language-model")
    assert verdicts["int8o:8"] == "" and verdicts["raw"] == ""
    strict = plan_generation(costs(), JOB, SLOW, Constraints(min_edge_blocks=1,
                                                             edge_memory_mb=45,
                                                             min_agreement=0.999))
    assert strict.choice is not None and strict.choice.codec in {"fp16", "raw"}
    assert any("keeps 99.6% top-1, under the 99.9% required" in p.rejected
               for p in strict.candidates)


def test_the_plan_moves_with_the_job() -> None:
    """A long prompt over a thin uplink keeps the prefill on the device (here the edge
    prefills 100x cheaper per token than it steps); a long generation weighs the step."""
    cheap_prefill = costs(edge=SideCost(decode_ms=(10.0,) * N, prefill_ms=(0.1,) * N,
                                        lm_head_ms=20.0))
    mid = LinkEstimate(up_mbit=5, down_mbit=20, rtt_ms=20)
    c = Constraints(min_edge_blocks=1)
    short = plan_generation(cheap_prefill, GenerationJob(prompt_tokens=8, new_tokens=256), mid, c)
    long = plan_generation(cheap_prefill, GenerationJob(prompt_tokens=4000, new_tokens=4), mid, c)
    assert short.choice is not None and long.choice is not None
    assert short.choice.cut == "block.1"  # one slow edge block, then the cloud
    assert long.choice.cut == ALL_EDGE  # 4000 rows up would take 4 s; prefilling here 2.4 s
    allowed = [p for p in long.candidates if not p.rejected]
    assert long.choice.ttft_ms == pytest.approx(min(p.ttft_ms for p in allowed), rel=0.01)
    allowed = [p for p in short.candidates if not p.rejected]
    assert short.choice.step_ms == min(p.step_ms for p in allowed)
    for r in (short, long):
        ranked = [p.total_ms for p in r.candidates]
        assert ranked == sorted(ranked)


def test_bad_inputs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="6 blocks"):
        costs(edge=SideCost(decode_ms=(1.0,) * 5, prefill_ms=(1.0,) * 5))
    with pytest.raises(ConfigError, match="finite"):
        SideCost(decode_ms=(float("nan"),), prefill_ms=(1.0,))
    with pytest.raises(CodecError):
        costs(codec_bytes={"int9": 10})
    with pytest.raises(ConfigError, match="no bytes per token"):
        plan_generation(costs(), JOB, FAST, codecs=["bf16"])
    with pytest.raises(ConfigError):
        GenerationJob(prompt_tokens=0, new_tokens=1)
    with pytest.raises(ConfigError):
        Constraints(edge_memory_mb=0)


def test_everything_rejected_is_no_choice_with_reasons() -> None:
    result = plan_generation(costs(), JOB, FAST, Constraints(edge_memory_mb=1,
                                                             min_edge_blocks=1))
    assert result.choice is None
    assert "choice: none" in result.describe()
    assert all(p.rejected for p in result.candidates)


def test_model_sizes_match_a_real_llama() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(cfg)
    sizes = model_sizes(cfg)
    block = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    assert sizes.param_bytes == (block,) * 3
    total = sum(p.numel() for p in model.parameters()) * 4  # tied: the head is shared
    assert sum(sizes.param_bytes) + sizes.embed_bytes + sizes.lm_head_bytes == total
    assert sizes.kv_bytes_per_token == (2 * 2 * 16 * 4,) * 3  # k and v, 2 heads of 16


def test_model_sizes_match_a_real_gpt2() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4,
                                  n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg)
    sizes = model_sizes(cfg)
    block = sum(p.numel() for p in model.transformer.h[0].parameters()) * 4
    assert sizes.param_bytes == (block,) * 2
    total = sum(p.numel() for p in model.parameters()) * 4
    assert sum(sizes.param_bytes) + sizes.embed_bytes + sizes.lm_head_bytes == total


def test_measured_costs_come_from_an_injected_clock() -> None:
    """The profile's arithmetic, with a clock that advances 1 ms per reading."""
    transformers = pytest.importorskip("transformers")
    from splitnet.llm.plan import measure_side_cost

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    ticks = iter(range(10**6))
    side = measure_side_cost(model, 2, prompt_tokens=4, steps=2, runs=1,
                             clock=lambda: next(ticks) / 1000)
    # Every timed span reads the clock twice, 1 ms apart: 1 ms each, the head included.
    assert side.lm_head_ms == pytest.approx(1.0)
    assert side.decode_ms == (0.0, 0.0) and side.prefill_ms == (0.0, 0.0)
    assert len(side.decode_ms) == 2


def test_cut_auto_respects_the_constraints_on_a_real_model() -> None:
    """edge.generate_plan with a real tiny model: whatever the timings, the layout run
    meets the constraints, and nothing fitting is one ConfigError that says why."""
    import argparse

    from edge.generate_plan import choose_cut
    from splitnet.llm import load_lm

    lm = load_lm("tiny:llama")
    base = dict(codec=None, edge_memory_mb=None, min_edge_blocks=0, u_shaped=False,
                link_mbit="5:20", cloud_speedup=4.0, max_new_tokens=16)
    cut, codec, text = choose_cut(argparse.Namespace(**{**base, "min_edge_blocks": 2}), lm, 8,
                                  20.0)
    assert cut.startswith("block.") and int(cut.split(":")[0].removeprefix("block.")) >= 2
    assert codec in ("raw", "fp16", "int8o:8") and "choice: " in text and "running" in text
    cut, codec, _ = choose_cut(argparse.Namespace(**{**base, "u_shaped": True,
                                                     "codec": "fp16"}), lm, 8, 20.0)
    assert ":" in cut and codec == "fp16"
    with pytest.raises(ConfigError, match="no split layout meets the constraints"):
        choose_cut(argparse.Namespace(**{**base, "edge_memory_mb": 0.01,
                                         "min_edge_blocks": 1}), lm, 8, 20.0)
    with pytest.raises(ConfigError, match="--link-mbit"):
        choose_cut(argparse.Namespace(**{**base, "link_mbit": "fast"}), lm, 8, 20.0)


def test_a_published_profile_is_checked_before_it_is_priced() -> None:
    """What a server publishes is read back as it was sent, and a profile of the wrong
    length or with a cost that is not a number is a ProtocolError, not a price."""
    from splitnet.errors import ProtocolError
    from splitnet.llm.plan import SideCost, profile_from_pb, profile_to_pb

    side = SideCost(decode_ms=(1.5, 2.0), prefill_ms=(0.25, 0.5), lm_head_ms=0.75)
    pb = profile_to_pb(side, "test")
    assert profile_from_pb(pb, 2) == side and pb.method == "test"
    with pytest.raises(ProtocolError, match="2 decode and 2 prefill entries for a model of 3"):
        profile_from_pb(pb, 3)
    for bad in (float("nan"), float("inf"), -1.0, 1e12):
        pb.decode_ms[1] = bad
        with pytest.raises(ProtocolError, match="not a number of milliseconds"):
            profile_from_pb(pb, 2)


def test_cut_auto_follows_the_cloud_it_is_given() -> None:
    """An injected cloud profile decides the layout: a cloud that costs nothing puts the
    whole model there; one a thousand times slower than any edge keeps every block on
    the device the session allows."""
    import argparse

    from edge.generate_plan import choose_cut
    from splitnet.llm import load_lm
    from splitnet.llm.plan import SideCost

    lm = load_lm("tiny:llama")
    n = lm.num_layers
    args = argparse.Namespace(codec="raw", edge_memory_mb=None, min_edge_blocks=0,
                              u_shaped=False, link_mbit="1000", cloud_speedup=None,
                              max_new_tokens=8)
    free = SideCost(decode_ms=(0.0,) * n, prefill_ms=(0.0,) * n)
    cut, _, text = choose_cut(args, lm, 8, 0.001, free)
    assert "(the server's published profile)" in text
    slow = SideCost(decode_ms=(1e4,) * n, prefill_ms=(1e4,) * n, lm_head_ms=1e4)
    slow_cut, _, slow_text = choose_cut(args, lm, 8, 0.001, slow)
    assert "cloud 50000.0 ms" in slow_text
    # The free cloud takes every block; the slow one as few as a session can (one block
    # or the head: block.n, or a U-shape with a single cloud block).
    assert cut == "input", text
    assert slow_cut in {f"block.{n}"} | {f"block.{k}:block.{k + 1}" for k in range(n)}, slow_text
