"""Hidden-state codecs at a block cut of a language model (benchmarks.llm_codecs).

A tiny random Llama whose residual stream carries one outlier channel ~10^4x the rest
(the embedding writes 3000 into it; every RMSNorm weight for it is 0, so it carries no
information, only magnitude, as massive activations do): naive int8 collapses, int8o
keeps transformers' own greedy tokens and teacher-forced top-1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.llm_codecs import (
    Reference,
    codec_at_cut,
    decoder_blocks,
    measure,
    meets_target,
    reference,
    round_trip,
    with_fp16_fraction,
)
from splitnet.codecs import accepted_codecs, decode, encode, parse_codec
from splitnet.codecs.outlier import choose_channels

transformers = pytest.importorskip("transformers")

OUTLIER = 13
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # logits far enough apart that fp16 keeps every top-1
        tie_word_embeddings=False,
    )
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.model.embed_tokens.weight[:, OUTLIER] = 3000.0
        for layer in m.model.layers:
            layer.input_layernorm.weight[OUTLIER] = 0.0
            layer.post_attention_layernorm.weight[OUTLIER] = 0.0
        m.model.norm.weight[OUTLIER] = 0.0
    return m


@pytest.fixture(scope="module")
def refs(model: torch.nn.Module) -> list[Reference]:
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (1, 12), generator=g) for _ in range(3)]
    return [reference(model, p, NEW_TOKENS) for p in prompts]


def test_the_cut_sees_the_outlier(model: torch.nn.Module, refs: list[Reference]) -> None:
    seen: list[torch.Tensor] = []

    def grab(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], kwargs: dict) -> None:
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handle = decoder_blocks(model)[2].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(refs[0].prompt)
    finally:
        handle.remove()
    a = seen[0].abs()
    assert float(a[..., OUTLIER].min()) > 1000 * float(a.median())


def test_raw_at_the_cut_is_exact(model: torch.nn.Module, refs: list[Reference]) -> None:
    row = measure(model, refs, 2, "raw", model_name="tiny")
    assert row.teacher_forced_top1 == 1.0 and row.greedy_match == 1.0
    assert row.first_divergence == NEW_TOKENS
    # One [1, 1, 64] float32 step: 256 payload bytes plus the message's header.
    assert 256 < row.bytes_per_token < 300


def test_int8o_keeps_what_naive_int8_loses(model: torch.nn.Module, refs: list[Reference]) -> None:
    rows = with_fp16_fraction(
        [measure(model, refs, 2, c, model_name="tiny")
         for c in ("fp16", "int8", "int8c", "int8o:1", "int8o:4")]
    )
    by = {r.codec: r for r in rows}
    assert by["fp16"].teacher_forced_top1 == 1.0
    # One scale per tensor or per token: the outlier sets it, everything else rounds to 0.
    for naive in ("int8", "int8c"):
        assert by[naive].teacher_forced_top1 < 0.5
        assert by[naive].first_divergence < NEW_TOKENS
        assert not by[naive].llm_safe
    # The outlier kept in fp16: every other channel gets a scale of its own row.
    for kept in ("int8o:1", "int8o:4"):
        assert by[kept].teacher_forced_top1 >= 0.95
        assert by[kept].greedy_match >= 0.9
        assert by[kept].llm_safe
    # ... at well under fp16's bytes (H = 64 here, so headers weigh more than on SmolLM2).
    assert by["int8o:1"].fp16_fraction < 0.7
    assert meets_target(by["int8o:1"]) == (by["int8o:1"].fp16_fraction <= 0.55)


def test_the_registry_does_not_offer_naive_int8_for_language_models() -> None:
    safe = accepted_codecs(llm_safe_only=True)
    assert not any(c.split("+")[0] in ("int8", "int8c") for c in safe)
    assert {"raw", "fp16", "bf16", "int8o:4"} <= set(safe)
    assert not parse_codec("int8").llm_safe and not parse_codec("int8c+zstd").llm_safe
    assert parse_codec("int8o:8+zstd:1").llm_safe


def test_codec_at_cut_sends_the_prefill_as_one_tensor_then_steps(
    model: torch.nn.Module, refs: list[Reference]
) -> None:
    ref = refs[0]
    p = ref.prompt.shape[1]
    full = torch.cat([ref.prompt[0], ref.tokens]).unsqueeze(0)
    with codec_at_cut(model, 2, "raw", prefill_rows=p) as wire, torch.no_grad():
        model(full, use_cache=False)
    assert wire.prefill_tokens == p and len(wire.step_bytes) == NEW_TOKENS
    x = torch.randn(1, 1, 64)
    y, n = round_trip(x, parse_codec("raw"))
    assert torch.equal(x, y) and n == encode(x, "raw").ByteSize()


def test_a_prefill_keeps_the_channels_most_rows_need() -> None:
    """Row 0 (an attention sink) has its own big channels; the other rows share one.
    The column maximum would keep row 0's; the choice keeps the shared one."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 32, 64, generator=g)
    x[0, 0, [3, 4, 5]] = torch.tensor([24000.0, 1800.0, 900.0])
    x[0, 1:, 40] = 80.0
    rows = x.reshape(-1, 64).numpy()
    col = np.abs(rows).max(axis=0)
    chosen = choose_channels(rows, col, 2)
    assert list(chosen) == [3, 40]
    y = decode(encode(x, "int8o:2"))
    err = (y - x)[0, 1:].abs().max()
    assert float(err) < 0.02  # the later rows' scale is ~3/127, not 900/127
    # One row: its own largest channels, as before.
    one = x[0, :1].numpy()
    assert list(choose_channels(one, np.abs(one).max(axis=0), 2)) == [3, 4]
