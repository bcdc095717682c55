from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_protoc(out: Path) -> None:
    """Generate Python code (messages, gRPC stubs, type stubs) from proto/ into ``out``."""
    import subprocess
    import sys

    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto").rglob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iproto",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--pyi_out={out}",
            *protos,
        ],
        cwd=ROOT,
        check=True,
    )


@pytest.fixture(scope="session")
def digits_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits-cnn trained once per test session with the default recipe."""
    from splitnet.models import load_model, save_weights
    from splitnet.training import TrainConfig, train_digits

    model = load_model("digits-cnn").train()
    with torch.enable_grad():
        result = train_digits(model, TrainConfig())
    path = tmp_path_factory.mktemp("weights") / "digits-cnn.safetensors"
    save_weights(model, path)
    (path.parent / "accuracy.txt").write_text(f"{result['test']}")
    return path


from cloud.config import ModelEntry, ServerConfig  # noqa: E402
from cloud.runtime import TailRuntime  # noqa: E402
from cloud.server import BackgroundServer as ServerThread  # noqa: E402


@pytest.fixture(scope="session")
def digits_runtime(digits_weights: Path) -> TailRuntime:
    """The digits model loaded once; servers in tests share it."""
    return TailRuntime([ModelEntry(name="digits-cnn", weights=str(digits_weights))], profile_runs=1)


@pytest.fixture()
def digits_server(digits_runtime: TailRuntime):  # type: ignore[no-untyped-def]
    config = ServerConfig(models=(ModelEntry(name="digits-cnn"),), port=0)
    server = ServerThread(config, digits_runtime)
    yield server
    server.stop()
