"""Edge bundles of language models (``splitnet export tiny:llama --cut block.2``): the
bundle holds only the edge half, the device builds the rest on the meta device and
never allocates it, generation from a bundle through a real server equals
transformers' generate(), and damaged or wrongly keyed bundles are refused with one line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from llm_helpers import CHUNK, prompt_ids, reference  # noqa: E402

from cloud.config import ModelEntry, ServerConfig  # noqa: E402
from cloud.server import BackgroundServer  # noqa: E402
from edge.generate import GenerateConfig, Generator  # noqa: E402
from splitnet.bundle import Bundle, new_key  # noqa: E402
from splitnet.errors import ConfigError, ModelError, PartitionError  # noqa: E402
from splitnet.llm import load_lm, parse_block_cut  # noqa: E402
from splitnet.llm.bundle import export_lm_bundle, load_edge  # noqa: E402
from splitnet.llm.halves import EdgeHalf  # noqa: E402
from splitnet.models import fingerprint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("tiny:llama", "tiny:gpt2", "tiny:llama:tied=1")
CUTS = ("block.2", "block.1:block.3")
NEW = 32
BIG = "tiny:llama:layers=16,hidden=512,intermediate=2048"  # 63 M parameters, 242 MiB
BIG_CUT = "block.2"


def _run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600
    )


def _one_line(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


def _edge_one_line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """``splitnet-edge ARGV`` run in this process (its real main): exit 2, one line."""
    from edge.cli import main

    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def lms():
    return {name: load_lm(name) for name in MODELS}


@pytest.fixture(scope="module")
def server():
    config = ServerConfig(models=tuple(ModelEntry(name=n) for n in MODELS), port=0)
    s = BackgroundServer(config)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def bundles(lms, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    d = tmp_path_factory.mktemp("llm-bundles")
    out = {}
    for i, name in enumerate(MODELS):
        for j, cut in enumerate(CUTS):
            path = d / f"{i}-{j}"
            export_lm_bundle(name, path, cut=cut, lm=lms[name])
            out[(name, cut)] = path
    return out


def test_a_bundle_holds_only_the_edge_half(lms, bundles) -> None:
    from safetensors.torch import load_file

    for (name, cut), path in bundles.items():
        lm = lms[name]
        bc = parse_block_cut(cut, lm.num_layers)
        b = Bundle.open(path)
        m = b.manifest
        assert b.kind == "language-model" and m["split"]["kind"] == "block-cut"
        assert m["model"]["name"] == name and b.cut == cut
        assert sorted(p.name for p in path.iterdir()) == ["edge.safetensors", "manifest.json"]
        stored = load_file(path / "edge.safetensors")
        whole = lm.model.state_dict()
        assert set(stored) < set(whole)  # whole-model names, a strict subset
        # Only the edge's blocks: none of the cloud's.
        family_prefix = "transformer.h." if lm.family == "gpt2" else "model.layers."
        held = {int(k[len(family_prefix) :].split(".")[0]) for k in stored if k.startswith(family_prefix)}
        before, after = bc.edge_blocks(lm.num_layers)
        assert held == set(before) | set(after), (name, cut)
        # Count them: the half's parameters, a tied embedding once.
        half = EdgeHalf(lm, bc)
        assert sum(t.numel() for t in stored.values()) == half.num_params == m["parts"]["edge"]["params"]
        assert all(torch.equal(t, whole[k]) for k, t in stored.items())
        if lm.tied_embeddings:
            assert "lm_head.weight" not in stored
        elif bc.u_shaped:
            assert "lm_head.weight" in stored
        assert m["model"]["fingerprint"] == fingerprint(lm.model)  # the whole model's
        assert m["parts"]["edge"]["fingerprint"] == fingerprint(stored)
        assert m["model"]["config"]["model_type"] == lm.model.config.model_type
        assert m["codecs"] == ["raw", "fp16", "bf16", "int8o:4"]


def test_the_device_materializes_only_its_half(lms, bundles) -> None:
    for (name, cut), path in bundles.items():
        lm = lms[name]
        held = load_edge(path)
        tensors = [*held.edge.parameters(), *held.edge.buffers()]
        assert tensors and not any(t.is_meta for t in tensors)
        cloud = parse_block_cut(cut, lm.num_layers).cloud_blocks(lm.num_layers)
        for i in cloud:  # never allocated
            assert all(p.is_meta for p in held.lm.blocks[i].parameters())
        assert held.edge.num_params == EdgeHalf(lm, held.edge.cut).num_params
        if lm.tied_embeddings and held.edge.back is not None:
            assert held.edge.tied_shared


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("cut", CUTS)
def test_generation_from_a_bundle_equals_generate(server, lms, bundles, model, cut) -> None:
    lm = lms[model]
    prompt = prompt_ids(lm.model.config.vocab_size)
    config = GenerateConfig(model=model, cut=cut, chunk_tokens=CHUNK)
    with Generator(server.address, config, bundle=bundles[(model, cut)]) as g:
        result = g.generate(prompt, NEW)
    assert result.tokens == reference(lm, prompt, NEW)


def test_a_bundle_serves_shallower_cuts_only(server, lms, bundles) -> None:
    lm = lms["tiny:llama"]
    prompt = prompt_ids(512, 12)
    want = reference(lm, prompt, NEW)
    for exported, cut in (("block.2", "block.1"), ("block.1:block.3", "block.1:block.4"),
                          ("block.1:block.3", "block.1")):  # fmt: skip
        config = GenerateConfig(model="tiny:llama", cut=cut)
        with Generator(server.address, config, bundle=bundles[("tiny:llama", exported)]) as g:
            assert g.cut.name == cut
            assert g.generate(prompt, NEW).tokens == want, (exported, cut)
    for exported, cut in (("block.2", "block.3"), ("block.2", "block.1:block.3"),
                          ("block.1:block.3", "block.1:block.2")):  # fmt: skip
        with pytest.raises(PartitionError, match="deeper than this device's bundle"):
            load_edge(bundles[("tiny:llama", exported)], cut=cut)
    with pytest.raises(ConfigError, match="holds tiny:llama, not tiny:gpt2"):
        load_edge(bundles[("tiny:llama", "block.2")], model="tiny:gpt2")
    with pytest.raises(ConfigError, match="allows codecs"):
        load_edge(bundles[("tiny:llama", "block.2")], codec="fp16+zstd:1")


def test_a_tokenizer_travels_in_the_bundle(tmp_path: Path) -> None:
    """An hf:DIR checkpoint with a tokenizer: the bundle carries its files (checked by
    hash) and the device encodes text as the original does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    lm = load_lm("tiny:llama")
    vocab = {f"w{i}": i for i in range(512)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w0")
    ckpt = tmp_path / "ckpt"
    lm.model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    name = f"hf:{ckpt}"
    m = export_lm_bundle(name, tmp_path / "b", cut="block.1:block.3")
    assert "tokenizer.json" in m["tokenizer"]["files"]
    held = load_edge(tmp_path / "b")
    text = "w5 w17 w300 w2"
    assert held.lm.encode_text(text) == load_lm(name).encode_text(text) == [5, 17, 300, 2]
    f = tmp_path / "b" / "tokenizer" / "tokenizer.json"
    f.write_text(f.read_text().replace('"w17"', '"w71"'))
    with pytest.raises(ModelError, match="tokenizer file tokenizer.json does not match"):
        load_edge(tmp_path / "b")


# ------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def cli_bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("llm-cli")
    out = _run("splitnet.cli", "export", "tiny:llama", "--cut", "block.2", "--out", str(d / "sealed"),
               "--encrypt", str(d / "key"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "wrote a new key" in out.stdout and "edge 106,752 parameters" in out.stdout
    assert "at cut block.2" in out.stdout and "encrypted" in out.stdout
    out = _run("splitnet.cli", "export", "tiny:gpt2", "--cut", "block.1:block.3",
               "--out", str(d / "plain"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    return d


def test_the_cli_generates_from_a_bundle(server, lms, cli_bundles: Path) -> None:
    for model, bundle, extra in (
        ("tiny:llama", "sealed", ["--bundle-key", str(cli_bundles / "key")]),
        ("tiny:gpt2", "plain", []),
    ):
        prompt = prompt_ids(512)
        out = _run("edge.cli", "generate", "--server", server.address, "--bundle",
                   str(cli_bundles / bundle), *extra, "--prompt-ids", ",".join(map(str, prompt)),
                   "--max-new-tokens", str(NEW), "--json")  # fmt: skip
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout.strip().splitlines()[-1])
        assert doc["tokens"] == reference(lms[model], prompt, NEW), model


def test_the_cli_refuses_bad_bundles_with_one_line(server, cli_bundles, tmp_path, capsys) -> None:
    base = ["generate", "--server", server.address, "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]
    sealed, plain = cli_bundles / "sealed", cli_bundles / "plain"
    new_key(tmp_path / "other")
    # One real process: exit status 2 and one line on stderr.
    out = _run("edge.cli", *base, "--bundle", str(sealed), "--bundle-key", str(tmp_path / "other"))
    assert "wrong key" in _one_line(out)
    assert "is encrypted: give its key" in _edge_one_line(capsys, *base, "--bundle", str(sealed))
    # One byte flipped in the encrypted weights; the manifest edited.
    for name in ("sealed", "plain"):
        shutil.copytree(cli_bundles / name, tmp_path / name)
    enc = tmp_path / "sealed" / "edge.safetensors.enc"
    data = bytearray(enc.read_bytes())
    data[len(data) // 2] ^= 0x01
    enc.write_bytes(data)
    key = ["--bundle-key", str(cli_bundles / "key")]
    line = _edge_one_line(capsys, *base, "--bundle", str(tmp_path / "sealed"), *key)
    assert "changed or damaged (authentication failed)" in line
    shutil.copy(sealed / "edge.safetensors.enc", enc)
    manifest = tmp_path / "sealed" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["model"]["eos_token_ids"] = [7]
    manifest.write_text(json.dumps(doc))
    line = _edge_one_line(capsys, *base, "--bundle", str(tmp_path / "sealed"), *key)
    assert "changed or damaged (authentication failed)" in line
    # Unencrypted: its sha256 catches damage.
    st = tmp_path / "plain" / "edge.safetensors"
    data = bytearray(st.read_bytes())
    data[-9] ^= 0x01
    st.write_bytes(data)
    line = _edge_one_line(capsys, *base, "--bundle", str(tmp_path / "plain"))
    assert "does not match its manifest" in line
    # A language model's bundle is not for `run`, and a cut it cannot serve is refused.
    line = _edge_one_line(capsys, "run", "--server", server.address, "--bundle", str(plain))
    assert "run it with splitnet-edge generate --bundle" in line
    line = _edge_one_line(capsys, *base, "--bundle", str(plain), "--cut", "block.3")
    assert "deeper than this device's bundle" in line


def test_export_mistakes_are_one_line(cli_bundles: Path, tmp_path: Path, capsys) -> None:
    from splitnet.cli import main

    def one_line(*argv: str) -> str:
        with torch.set_grad_enabled(torch.is_grad_enabled()):  # main() sets it: put it back
            code = main(list(argv))
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        return err

    x = ["export", "tiny:llama", "--out", str(tmp_path / "b")]
    assert "block.K" in one_line(*x, "--cut", "layer2")
    assert "not safe for language-model" in one_line(*x, "--cut", "block.2", "--codecs", "int8")
    assert "--whole is not for language models" in one_line(*x, "--cut", "block.2", "--whole")
    out = ["--out", str(cli_bundles / "sealed")]
    assert "already holds a bundle" in one_line("export", "tiny:llama", "--cut", "block.2", *out)


# ---------------------------------------------------------------- memory

EDGE_SCRIPT = r"""
import json, sys
def rss():
    got = {}
    for line in open("/proc/self/status"):
        k, v = line.split(":", 1)
        if k in ("VmRSS", "VmHWM"):
            got[k] = int(v.split()[0]) * 1024
    return got
import torch, grpc, safetensors.torch, transformers  # what any edge process loads
import edge.generate, splitnet.llm.bundle, splitnet.llm.halves
from transformers import AutoModelForCausalLM, LlamaForCausalLM, GPT2LMHeadModel
torch.empty(1)
address, bundle, model, cut, prompt, n = sys.argv[1:7]
prompt = [int(t) for t in prompt.split(",")]
before = rss()
config = edge.generate.GenerateConfig(model=model, cut=cut)
g = edge.generate.Generator(address, config, bundle=bundle)
built = rss()
with g:
    result = g.generate(prompt, int(n))
after = rss()
print(json.dumps({"before": before, "built": built, "after": after, "tokens": result.tokens,
                  "text": result.text, "tokens_per_s": result.tokens_per_s}))
"""


def measure_edge(address: str, bundle: Path, model: str, cut: str, prompt: list[int], n: int) -> dict:
    """Run a Generator from ``bundle`` in a fresh process; its RSS before, once built, after."""
    out = subprocess.run(
        [sys.executable, "-c", EDGE_SCRIPT, address, str(bundle), model, cut,
         ",".join(map(str, prompt)), str(n)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_device_grows_by_its_half_only(tmp_path: Path) -> None:
    """A 16-block model (242 MiB) cut at block.2: the edge process grows by the half's
    bytes plus a constant below 24 MiB (the architecture's module objects on the meta
    device and the safetensors bytes read before the weights are cloned out of them,
    allocator slack); the other 14 blocks are never allocated. The tokens equal
    generate()."""
    lm = load_lm(BIG)
    m = export_lm_bundle(BIG, tmp_path / "b", cut=BIG_CUT, lm=lm)
    half = m["parts"]["edge"]["bytes"]
    whole = sum(t.numel() * t.element_size() for t in lm.model.parameters())
    assert half < whole / 6
    prompt = prompt_ids(512, 16)
    want = reference(lm, prompt, NEW)
    server = BackgroundServer(ServerConfig(models=(ModelEntry(name=BIG),), port=0))
    try:
        mem = measure_edge(server.address, tmp_path / "b", BIG, BIG_CUT, prompt, NEW)
    finally:
        server.stop()
    built = mem["built"]["VmRSS"] - mem["before"]["VmRSS"]
    peak = mem["built"]["VmHWM"] - mem["before"]["VmRSS"]
    print(
        f"{BIG} at {BIG_CUT}: half {half / 2**20:.1f} MiB of {whole / 2**20:.1f} MiB; the "
        f"Generator grew the process {built / 2**20:.1f} MiB (peak {peak / 2**20:.1f} MiB)"
    )
    assert mem["tokens"] == want
    assert built <= half + (24 << 20)
    assert peak <= 2 * half + (24 << 20)  # the file's bytes and the weights, for a moment
