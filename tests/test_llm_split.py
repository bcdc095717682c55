"""The halves equal the whole, for language models: greedy generation through both halves
(each with its own KV cache, the prompt sent as two prefill chunks) equals transformers'
own ``generate()`` token for token, in float32.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from splitnet.errors import ModelError, PartitionError  # noqa: E402
from splitnet.llm import BlockCut, load_lm, parse_block_cut  # noqa: E402
from splitnet.llm.halves import CloudHalf, EdgeHalf, split_model  # noqa: E402
from splitnet.llm.local import generate_local  # noqa: E402
from splitnet.llm.sampling import Sampling  # noqa: E402

NEW_TOKENS = 64
PROMPT = 40
CHUNK = 23  # the 40-token prompt travels as two prefill chunks (23 + 17)
CUTS = ["block.1", "block.2", "block.3", "block.1:block.3", "block.2:block.3"]


def reference(lm, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    ids = torch.tensor([prompt])
    out = lm.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
    )
    return out[0, len(prompt) :].tolist()


def prompt_ids(vocab: int, n: int = PROMPT, seed: int = 1) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=["tiny:gpt2", "tiny:llama", "tiny:qwen2:layers=5,tied=1"])
def lm_and_reference(request):
    lm = load_lm(request.param)
    prompt = prompt_ids(lm.model.config.vocab_size)
    return lm, prompt, reference(lm, prompt)


@pytest.mark.parametrize("cut", CUTS)
def test_split_greedy_equals_generate(lm_and_reference, cut: str) -> None:
    lm, prompt, expected = lm_and_reference
    split = split_model(lm, parse_block_cut(cut, lm.num_layers))
    got = generate_local(split, prompt, NEW_TOKENS, chunk_tokens=CHUNK)
    assert len(set(expected)) > 4, "the reference should not be one token repeated"
    assert got == expected


def test_each_half_holds_only_its_weights() -> None:
    lm = load_lm("tiny:llama:layers=6")
    whole = {id(p) for p in lm.model.parameters()}
    for cut in (BlockCut(2), BlockCut(2, 4)):
        edge, cloud = EdgeHalf(lm, cut), CloudHalf(lm, cut)
        e = {id(p) for p in edge.parameters()}
        c = {id(p) for p in cloud.parameters()}
        assert e <= whole and c <= whole and not e & c
        assert e | c == whole
        assert edge.num_params + cloud.num_params == sum(p.numel() for p in lm.model.parameters())
        assert all(k.startswith(("front.", "back.")) for k in edge.state_dict())
        # The cloud's blocks are renumbered from 0: its cache starts at layer 0.
        idx = [m.layer_idx for m in cloud.modules() if hasattr(m, "layer_idx")]
        assert min(idx) == 0


def test_cut_table_lists_input_first(capsys) -> None:
    """``splitnet cuts`` lists the all-cloud cut: no edge weights, ids on the wire."""
    from splitnet.cli import main

    lm = load_lm("tiny:llama")
    grad = torch.is_grad_enabled()
    try:
        assert main(["cuts", "tiny:llama", "--codecs", "raw,fp16", "--json"]) == 0
    finally:  # the CLI sets torch's global grad mode for its process; this one goes on
        torch.set_grad_enabled(grad)
    rows = json.loads(capsys.readouterr().out)["cuts"]
    assert [r["cut"] for r in rows] == ["input", "block.1", "block.2", "block.3"]
    first, second = rows[0], rows[1]
    assert first["edge_params"] == 0 and first["edge_blocks"] == 0
    assert first["cloud_params"] == sum(p.numel() for p in lm.model.parameters())
    assert first["cloud_kv_bytes_per_token"] == lm.kv_bytes_per_token(lm.num_layers)
    # One token id (a few varint bytes) against a hidden vector of 64 floats.
    assert set(first["bytes_per_token"].values()) == {4}
    assert second["bytes_per_token"]["raw"] > 4 * lm.hidden_size


def test_tied_embeddings() -> None:
    lm = load_lm("tiny:llama:tied=1")
    assert lm.tied_embeddings
    u = EdgeHalf(lm, BlockCut(1, 3))
    assert u.tied_shared and not CloudHalf(lm, BlockCut(1, 3)).tied_copy
    assert CloudHalf(lm, BlockCut(2)).tied_copy
    assert not load_lm("tiny:llama").tied_embeddings


def test_sampling_is_seeded_by_position() -> None:
    lm = load_lm("tiny:llama")
    prompt = prompt_ids(512, 12)
    split = split_model(lm, BlockCut(2))
    s = Sampling(temperature=0.8, top_p=0.9, seed=7)
    a = generate_local(split, prompt, 20, sampling=s)
    assert a == generate_local(split, prompt, 20, sampling=s, chunk_tokens=5)
    assert a != generate_local(
        split, prompt, 20, sampling=Sampling(temperature=0.8, top_p=0.9, seed=8)
    )


def test_batched_decode_equals_one_at_a_time() -> None:
    lm = load_lm("tiny:llama")
    split = split_model(lm, BlockCut(1))
    seg = split.cloud.segment
    prompts = [prompt_ids(512, n, seed=n) for n in (3, 9, 17)]
    singles, batch = [], []
    for p in prompts:
        for states in (singles, batch):
            e, c = split.edge.new_state(), seg.new_state()
            with torch.inference_mode():
                seg(split.edge.front(torch.tensor([p]), e.front), c)
            states.append((e, c))
    tokens = [[1], [2], [3]]
    with torch.inference_mode():
        hs = [
            split.edge.front(torch.tensor([t]), e.front)
            for t, (e, _) in zip(tokens, singles, strict=True)
        ]
        for t, (e, _) in zip(tokens, batch, strict=True):
            split.edge.front(torch.tensor([t]), e.front)
        one = torch.cat([seg(h, c) for h, (_, c) in zip(hs, singles, strict=True)])
        together = seg.forward_batch(torch.cat(hs), [c for _, c in batch])
    torch.testing.assert_close(together, one, rtol=1e-5, atol=1e-5)
    for (_, a), (_, b) in zip(singles, batch, strict=True):
        assert a.length == b.length and a.nbytes() == b.nbytes()


def test_bad_names() -> None:
    with pytest.raises(PartitionError, match="block.K"):
        parse_block_cut("layer.3", 4)
    with pytest.raises(PartitionError, match="0 <= K < M <= 4"):
        parse_block_cut("block.3:block.2", 4)
    with pytest.raises(ModelError, match="FAMILY"):
        load_lm("tiny:bert")
    with pytest.raises(ModelError, match="bad override"):
        load_lm("tiny:llama:layers=x")


def test_hf_directory_loads_and_splits_exactly(tmp_path) -> None:
    tiny = load_lm("tiny:gpt2:layers=3")
    tiny.model.save_pretrained(str(tmp_path))
    lm = load_lm(f"hf:{tmp_path}")
    assert lm.family == "gpt2" and lm.num_layers == 3 and lm.tokenizer is None
    for a, b in zip(tiny.model.state_dict().values(), lm.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    prompt = prompt_ids(512)
    expected = reference(lm, prompt)
    for cut in ("block.1", "block.1:block.2"):
        split = split_model(lm, parse_block_cut(cut, lm.num_layers))
        assert generate_local(split, prompt, NEW_TOKENS, chunk_tokens=CHUNK) == expected
    with pytest.raises(ModelError, match="config.json"):
        load_lm(f"hf:{tmp_path / 'missing'}")
