"""Edge bundles (``splitnet export``): the device holds only its half, the outputs through
a real server equal the whole model's, and damaged, foreign or wrongly keyed bundles
are refused with one line."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ServerThread

from cloud.config import ModelEntry, ServerConfig
from cloud.runtime import TailRuntime
from edge.client import EdgeClient
from splitnet.bundle import Bundle, export_bundle, new_key, read_key
from splitnet.data import load_digits
from splitnet.errors import (
    ConfigError,
    ModelError,
    ModelMismatchError,
    PartitionError,
    RemoteModelMismatchError,
)
from splitnet.models import fingerprint, load_model
from splitnet.report import sample_input

ROOT = Path(__file__).resolve().parents[1]


def splitnet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splitnet.cli", *args], capture_output=True, text=True, timeout=600
    )


def edge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, timeout=600
    )


def _one_line(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


@pytest.fixture(scope="module")
def digits_bundles(digits_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plain and encrypted bundles of the trained digits model up to pool1, by the CLI."""
    d = tmp_path_factory.mktemp("bundles")
    w = str(digits_weights)
    out = splitnet(
        "export", "digits-cnn", "--weights", w, "--cut", "pool1", "--out", str(d / "plain")
    )
    assert out.returncode == 0, out.stderr
    assert "head 18,912 parameters" in out.stdout and "up to cut pool1" in out.stdout
    out = splitnet("export", "digits-cnn", "--weights", w, "--cut", "pool1",
                   "--out", str(d / "sealed"), "--encrypt", str(d / "key"), "--tail")  # fmt: skip
    assert out.returncode == 0 and "wrote a new key" in out.stdout, out.stderr
    assert (d / "key").stat().st_mode & 0o077 == 0
    out = splitnet("export", "digits-cnn", "--cut", "fc1", "--out", str(d / "untrained"))
    assert out.returncode == 0, out.stderr
    out = splitnet("export", "digits-cnn", "--weights", w, "--cut", "pool1", "--whole",
                   "--out", str(d / "whole"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    return d


def test_a_bundle_holds_only_the_head(digits_bundles: Path, digits_weights: Path) -> None:
    b = Bundle.open(digits_bundles / "plain")
    m = b.manifest
    assert sorted(p.name for p in (digits_bundles / "plain").iterdir()) == [
        "head.safetensors",
        "manifest.json",
    ]
    head = b.state("head")
    model = load_model("digits-cnn", digits_weights)
    assert set(head) < set(model.state_dict())  # a subset: nothing of the tail
    assert not any(k.startswith(("conv.", "fc")) for k in head)
    assert b.fingerprint == fingerprint(model)  # the whole model's: what requests carry
    assert m["parts"]["head"]["fingerprint"] == fingerprint(head)
    assert b.cuts[0] == "input" and b.cuts[-1] == "pool1" and "block.conv1" in b.cuts
    assert m["split"]["frontier"]["block.conv1"][0]["shape"] == [1, 32, 8, 8]
    assert m["model"]["kind"] == "graph" and m["split"]["kind"] == "graph-cut"
    sealed = Bundle.open(digits_bundles / "sealed", read_key(digits_bundles / "key"))
    assert set(sealed.manifest["parts"]) == {"head", "tail"}
    assert set(sealed.state("head")) | set(sealed.state("tail")) >= set(model.state_dict())


def test_digits_bundles_are_exact_through_a_server_at_several_cuts(
    digits_server: ServerThread, digits_bundles: Path, digits_weights: Path
) -> None:
    x = load_digits()["test"].x[:4]
    with torch.no_grad():
        want = load_model("digits-cnn", digits_weights)(x)
    key = read_key(digits_bundles / "key")
    for name, k in (("plain", None), ("sealed", key)):
        with EdgeClient(digits_server.address, bundle=digits_bundles / name, bundle_key=k) as c:
            assert not c.device.can_run_whole
            # Nested heads: the bundle for pool1 serves every cut before it too.
            for cut in ("input", "stem.2", "block.conv1", "block.add", "pool1"):
                c.use(cut=cut, codec="zstd:1" if cut.startswith("block") else "raw")
                assert torch.equal(c.infer(x).output, want), (name, cut)
            # Pipelined requests may share a server batch: equal within batching's rounding.
            outs = [r.output for r in c.infer_many(x[i : i + 1] for i in range(4))]
            torch.testing.assert_close(torch.cat(outs), want, rtol=0, atol=1e-5)
            with pytest.raises(PartitionError, match="deeper than this device's bundle"):
                c.use(cut="fc1")


def test_resnet18_bundle_is_exact_and_nested(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    shape = (1, 3, 64, 64)
    name = "torchvision:resnet18"
    manifest = export_bundle(name, tmp_path / "r18", cut="layer2.1.relu_1", input_shape=shape)
    assert manifest["parts"]["head"]["params"] < 0.1 * 11_689_512  # of resnet18's 11.7 M
    server = ServerThread(
        ServerConfig(models=(ModelEntry(name=name, input_shape=shape),), port=0, profile_runs=0)
    )
    x = sample_input(shape)
    with torch.no_grad():
        want = load_model(name, input_shape=shape)(x)
    try:
        with EdgeClient(server.address, bundle=tmp_path / "r18") as c:
            cuts = c.device.names
            assert cuts[-1] == "layer2.1.relu_1" and "layer1.0.add" in cuts
            for cut in ("maxpool", "layer1.0.add", "layer1.1.relu_1", "layer2.0.add", cuts[-1]):
                c.use(cut=cut)
                assert torch.equal(c.infer(x).output, want), cut
    finally:
        server.stop()


def test_refusals(digits_server: ServerThread, digits_bundles: Path, tmp_path: Path) -> None:
    import shutil

    key = read_key(digits_bundles / "key")
    for name in ("plain", "sealed"):
        shutil.copytree(digits_bundles / name, tmp_path / name)
    # One byte flipped in the weights.
    head = tmp_path / "plain" / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[len(data) // 2] ^= 0x01
    head.write_bytes(data)
    with pytest.raises(ModelError, match="does not match its manifest"):
        EdgeClient(digits_server.address, bundle=tmp_path / "plain")
    sealed = tmp_path / "sealed" / "head.safetensors.enc"
    data = bytearray(sealed.read_bytes())
    data[-100] ^= 0x01
    sealed.write_bytes(data)
    with pytest.raises(ModelError, match="changed or damaged"):
        EdgeClient(digits_server.address, bundle=tmp_path / "sealed", bundle_key=key)
    # The manifest edited (still valid JSON): the encryption covers it too.
    shutil.copy(digits_bundles / "sealed" / "head.safetensors.enc", sealed)
    manifest = tmp_path / "sealed" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["split"]["cuts"] = doc["split"]["cuts"][:-1]
    doc["split"]["cut"] = doc["split"]["cuts"][-1]
    manifest.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="changed or damaged"):
        EdgeClient(digits_server.address, bundle=tmp_path / "sealed", bundle_key=key)
    # Keys.
    with pytest.raises(ConfigError, match="is encrypted: give its key"):
        Bundle.open(digits_bundles / "sealed")
    with pytest.raises(ModelError, match="wrong key"):
        Bundle.open(digits_bundles / "sealed", new_key(tmp_path / "other-key"))
    # A head-only bundle cannot fall back to the whole model; one exported whole can.
    with pytest.raises(ConfigError, match="holds only heads"):
        EdgeClient(digits_server.address, bundle=digits_bundles / "plain", fallback="local")
    whole = EdgeClient("127.0.0.1:1", bundle=digits_bundles / "whole", fallback="local",
                       retries=0, cut="pool1")  # fmt: skip
    with whole:  # nothing listens: the whole model runs here
        r = whole.infer(torch.zeros(1, 1, 8, 8))
        assert r.fallback and r.output.shape == (1, 10)
    # Other weights: the edge finds it at connect...
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        EdgeClient(digits_server.address, bundle=digits_bundles / "untrained").connect()


def test_the_server_refuses_a_bundle_of_other_weights(
    digits_runtime: TailRuntime, digits_bundles: Path
) -> None:
    """...and the server does, on every request: a device that connected while the
    server still had the bundle's weights gets FAILED_PRECONDITION once it has others."""
    untrained = TailRuntime([ModelEntry(name="digits-cnn")], profile_runs=0)
    server = ServerThread(ServerConfig(models=(ModelEntry(name="digits-cnn"),), port=0), untrained)
    x = torch.zeros(1, 1, 8, 8)
    try:
        with EdgeClient(server.address, bundle=digits_bundles / "untrained", cut="pool1") as c:
            c.infer(x)
            port = server.port
            server.stop()
            server = ServerThread(
                ServerConfig(models=(ModelEntry(name="digits-cnn"),), port=port), digits_runtime
            )
            with pytest.raises(RemoteModelMismatchError, match="fingerprint"):
                c.infer(x)
    finally:
        server.stop()


def test_the_cli_runs_from_a_bundle_and_refuses_with_one_line(
    digits_server: ServerThread, digits_bundles: Path, tmp_path: Path
) -> None:
    base = ["run", "--server", digits_server.address, "--limit", "20", "--cut", "pool1"]
    sealed = str(digits_bundles / "sealed")
    out = edge(*base, "--bundle", sealed, "--bundle-key", str(digits_bundles / "key"), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["requests"] == 20 and doc["accuracy"] >= 0.9 and doc["agreement"] is None
    assert "is encrypted: give its key" in _one_line(edge(*base, "--bundle", sealed))
    (tmp_path / "k").write_text("00" * 32 + "\n")
    line = _one_line(edge(*base, "--bundle", sealed, "--bundle-key", str(tmp_path / "k")))
    assert "wrong key" in line
    line = _one_line(edge(*base, "--bundle", str(digits_bundles / "untrained")))
    assert "fingerprint" in line
    assert "not a splitnet bundle" in _one_line(edge(*base, "--bundle", str(tmp_path)))


def test_export_mistakes_are_one_line(digits_bundles: Path, tmp_path: Path) -> None:
    out = splitnet("export", "digits-cnn", "--cut", "nope", "--out", str(tmp_path / "b"))
    assert "valid cuts: input" in _one_line(out)
    out = splitnet("export", "digits-cnn", "--cut", "pool1", "--out", str(digits_bundles / "plain"))
    assert "already holds a bundle" in _one_line(out)
    (tmp_path / "bad-key").write_text("not hex\n")
    out = splitnet("export", "digits-cnn", "--cut", "pool1", "--out", str(tmp_path / "c"),
                   "--encrypt", str(tmp_path / "bad-key"))  # fmt: skip
    assert "64 hex digits" in _one_line(out)


# --------------------------------------------------------------------- vgg16

EDGE_SCRIPT = r"""
import json, sys
def rss():
    got = {}
    for line in open("/proc/self/status"):
        k, v = line.split(":", 1)
        if k in ("VmRSS", "VmHWM"):
            got[k] = int(v.split()[0]) * 1024
    return got
import numpy as np, torch, torchvision, grpc, safetensors.torch  # what any edge process loads
import edge.client, splitnet.bundle, splitnet.report
torch.empty(1)
address, bundle, x_path, out_path = sys.argv[1:5]
x = torch.from_numpy(np.load(x_path))
before = rss()
client = edge.client.EdgeClient(address, bundle=bundle, cut="features.4")
built = rss()
with client:
    y = client.infer(x).output
after = rss()
np.save(out_path, y.numpy())
print(json.dumps({"before": before, "built": built, "after": after}))
"""


@pytest.fixture(scope="module")
def vgg16_bundle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    pytest.importorskip("torchvision")
    d = tmp_path_factory.mktemp("vgg16")
    manifest = export_bundle("torchvision:vgg16", d / "bundle", cut="features.4")
    yield d, manifest


def test_vgg16_at_features_4_holds_only_its_head(vgg16_bundle: tuple[Path, dict]) -> None:
    """The device process grows by the head's bytes plus a constant (below 48 MiB:
    torch's module objects for the architecture on the meta device, the traced graph
    and the head's generated code, a gRPC channel); the whole model's 528 MB are
    never allocated, not even for a moment (peak resident memory says so). The output
    through a real server equals the whole model's, bit for bit."""
    d, manifest = vgg16_bundle
    head_bytes = manifest["parts"]["head"]["bytes"]
    assert manifest["parts"]["head"]["params"] == 38_720 and head_bytes < 1 << 20
    assert sorted(p.name for p in (d / "bundle").iterdir()) == ["head.safetensors", "manifest.json"]
    assert (d / "bundle" / "head.safetensors").stat().st_size < 1 << 20
    shape = (1, 3, 224, 224)
    x = sample_input(shape)
    np.save(d / "x.npy", x.numpy())
    server = ServerThread(
        ServerConfig(models=(ModelEntry(name="torchvision:vgg16"),), port=0, profile_runs=0)
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", EDGE_SCRIPT, server.address, str(d / "bundle"),
             str(d / "x.npy"), str(d / "y.npy")],
            capture_output=True, text=True, timeout=600, cwd=ROOT,
        )  # fmt: skip
    finally:
        server.stop()
    assert out.returncode == 0, out.stderr
    mem = json.loads(out.stdout)
    built = mem["built"]["VmRSS"] - mem["before"]["VmRSS"]
    peak = mem["built"]["VmHWM"] - mem["before"]["VmRSS"]
    served = mem["after"]["VmHWM"] - mem["before"]["VmRSS"]
    print(
        f"vgg16 bundle at features.4: head {head_bytes / 2**20:.2f} MiB; the client grew "
        f"{built / 2**20:.1f} MiB (peak {peak / 2**20:.1f}), {served / 2**20:.1f} MiB "
        "peak after one 224x224 request"
    )
    assert built <= head_bytes + (48 << 20) and peak <= head_bytes + (48 << 20)
    assert served <= head_bytes + (96 << 20)  # plus one request's activations and buffers
    with torch.no_grad():
        want = load_model("torchvision:vgg16")(x)
    assert torch.equal(torch.from_numpy(np.load(d / "y.npy")), want)


def test_auto_plans_among_the_cuts_a_bundle_holds(
    digits_server: ServerThread, digits_bundles: Path, digits_weights: Path
) -> None:
    """With only heads here there is no all-on-device choice, and only the held cuts
    (profiled here, heads only) are candidates."""
    from splitnet.planning import LinkEstimate

    x = load_digits()["test"].x[:1]
    with torch.no_grad():
        want = load_model("digits-cnn", digits_weights)(x)
    slow = LinkEstimate(up_mbit=0.05, down_mbit=0.05, rtt_ms=50.0)
    with EdgeClient(
        digits_server.address, bundle=digits_bundles / "plain", cut="auto", link=slow
    ) as c:
        assert c.auto is not None
        table = c.auto.planner.table
        assert "output" not in table.edge_ms and set(table.edge_ms) == set(c.device.names)
        assert {cut for cut, _ in table.pairs} == set(c.device.names)
        assert c.cut in c.device.names and c.cut != "output"
        assert c.codec in ("raw", "zstd:1")  # lossy codecs are not calibrated without the tail
        assert torch.equal(c.infer(x).output, want)
