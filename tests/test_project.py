"""Project hygiene: generated code matches proto/, the public API, and who imports whom."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import run_protoc

import splitnet

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    run_protoc(tmp_path)
    generated = sorted(tmp_path.rglob("*_pb2*.py*"))
    assert generated
    for new in generated:
        rel = new.relative_to(tmp_path)
        mine = ROOT / rel
        assert mine.exists(), f"{rel} is missing: run `make proto`"
        assert mine.read_text() == new.read_text(), f"{rel} differs from proto/: run `make proto`"


def test_public_api_is_pinned() -> None:
    assert sorted(splitnet.__all__) == sorted(
        [
            "CodecError",
            "CodecSpec",
            "ConfigError",
            "Cut",
            "DecodeLimits",
            "FrontierTensor",
            "ModelError",
            "ModelMismatchError",
            "PartitionError",
            "ProtocolError",
            "RemoteError",
            "SplitGraph",
            "SplitNetError",
            "decode",
            "encode",
            "fingerprint",
            "load_model",
            "parse_codec",
            "remote_error",
            "trace",
        ]
    )
    for name in splitnet.__all__:
        assert hasattr(splitnet, name)
    assert (ROOT / "splitnet" / "py.typed").exists()


def _imports(package: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_layering() -> None:
    assert not _imports("splitnet") & {"edge", "cloud", "benchmarks"}
    assert "cloud" not in _imports("edge")
    assert "edge" not in _imports("cloud")


def _module_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_no_library_module_imports_a_cli_module() -> None:
    for package in ("splitnet", "edge", "cloud"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name == "cli.py" or path.name.endswith("_cli.py"):
                continue
            clis = {m for m in _module_imports(path) if m.split(".")[-1] in ("cli",)}
            clis |= {m for m in _module_imports(path) if m.endswith("_cli")}
            assert not clis, f"{path.relative_to(ROOT)} imports {sorted(clis)}"


def test_no_pickle_on_the_wire() -> None:
    for package in ("splitnet", "edge", "cloud"):
        assert "pickle" not in _imports(package), package
