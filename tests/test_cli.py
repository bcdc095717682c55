"""The splitnet command, run as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splitnet.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cuts_table_and_json(digits_weights: Path) -> None:
    out = run("cuts", "digits-cnn", "--weights", str(digits_weights))
    assert out.returncode == 0, out.stderr
    assert "block.conv1" in out.stdout and "int8+zstd:1 B" in out.stdout
    doc = json.loads(run("cuts", "digits-cnn", "--json", "--codecs", "raw,int8+zstd:1").stdout)
    cuts = doc["cuts"]
    assert cuts[0]["cut"] == "input" and cuts[-1]["cut"] == "output"
    inside = next(c for c in cuts if c["cut"] == "block.conv1")
    assert inside["tensors"] == 2 and inside["float32_bytes"] == 2 * 32 * 8 * 8 * 4
    assert all(c["bytes"]["int8+zstd:1"] < c["bytes"]["raw"] for c in cuts[1:-1])
    assert len(doc["fingerprint"]) == 64


def test_cuts_torchvision_with_shape() -> None:
    pytest.importorskip("torchvision")
    out = run("cuts", "torchvision:resnet18", "--input-shape", "1,3,64,64", "--json")
    assert out.returncode == 0, out.stderr
    names = [c["cut"] for c in json.loads(out.stdout)["cuts"]]
    assert "layer2.1.relu" in names


def test_eval_whole_and_per_cut(digits_weights: Path) -> None:
    out = run("eval", "digits-cnn", "--weights", str(digits_weights))
    assert out.returncode == 0 and "test accuracy" in out.stdout
    out = run(
        "eval",
        "digits-cnn",
        "--weights",
        str(digits_weights),
        "--codecs",
        "raw,int8",
        "--cuts",
        "stem.2,pool1",
        "--json",
    )
    rows = json.loads(out.stdout)
    assert {(r["cut"], r["codec"]) for r in rows} == {
        ("stem.2", "raw"),
        ("stem.2", "int8"),
        ("pool1", "raw"),
        ("pool1", "int8"),
    }


def test_train_writes_weights(tmp_path: Path) -> None:
    prints = []
    for mode in ([], ["--native"]):  # portable (a child process) and in this process
        path = tmp_path / f"w{len(prints)}.safetensors"
        out = run("train", "digits-cnn", "--out", str(path), "--epochs", "1", *mode)
        assert out.returncode == 0, out.stderr
        assert "test accuracy" in out.stdout and path.stat().st_size > 1000
        printed = out.stdout.split("(fingerprint ")[1].split(")")[0]
        from splitnet.models import fingerprint, load_model

        assert fingerprint(load_model("digits-cnn", path)).startswith(printed)
        prints.append(printed)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["cuts", "resnet18"], "torchvision:NAME"),
        (["cuts", "digits-cnn", "--codecs", "int4"], "invalid codec spec"),
        (["cuts", "digits-cnn", "--input-shape", "1,a,8"], "invalid shape"),
        (["eval", "digits-cnn", "--weights", "/nonexistent.safetensors"], "does not exist"),
        (["eval", "digits-cnn", "--weights", "/dev/null", "--cuts", "nope"], "not a file"),
        (["train", "torchvision:resnet18", "--out", "/tmp/x"], "1x8x8"),
    ],
)
def test_errors_are_clear_and_have_no_traceback(args: list[str], needle: str) -> None:
    out = run(*args)
    assert out.returncode == 2
    assert needle in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_cut_lists_names(digits_weights: Path) -> None:
    out = run(
        "eval", "digits-cnn", "--weights", str(digits_weights), "--codecs", "raw", "--cuts", "nope"
    )
    assert out.returncode == 2 and "valid cuts: input, stem.0" in out.stderr
    assert "Traceback" not in out.stderr


def test_help_is_plain_and_complete() -> None:
    out = run("--help")
    assert out.returncode == 0
    for command in ("train", "eval", "cuts", "certs", "export"):
        assert command in out.stdout
    assert "``" not in out.stdout and "`" not in out.stdout  # no raw markup
    for command in ("train", "eval", "cuts", "certs", "export"):
        sub = run(command, "--help")
        assert sub.returncode == 0 and "`" not in sub.stdout, command
    assert "--force" in run("certs", "--help").stdout


def test_version() -> None:
    import splitnet

    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"splitnet {splitnet.__version__}"


def test_certs_refuse_to_overwrite_without_force(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    first = run("certs", "--out", str(tmp_path))
    assert first.returncode == 0, first.stderr
    key = (tmp_path / "ca.key").read_bytes()
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0  # owner only
    again = run("certs", "--out", str(tmp_path))
    assert again.returncode == 2
    assert "refusing to overwrite" in again.stderr and "--force" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and "Traceback" not in again.stderr
    assert (tmp_path / "ca.key").read_bytes() == key  # untouched
    forced = run("certs", "--out", str(tmp_path), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "ca.key").read_bytes() != key
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0


def test_cuts_warns_when_the_model_is_untrained(digits_weights: Path) -> None:
    bare = run("cuts", "digits-cnn", "--json", "--codecs", "raw")
    assert bare.returncode == 0
    assert "warning: digits-cnn has no weights: it is untrained" in bare.stderr
    trained = run(
        "cuts", "digits-cnn", "--json", "--codecs", "raw", "--weights", str(digits_weights)
    )
    assert trained.returncode == 0 and "warning" not in trained.stderr
