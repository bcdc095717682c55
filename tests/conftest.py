from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


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


class ServerThread:
    """A real splitnet-cloud server (grpc.aio) on 127.0.0.1:0, in a thread of its own."""

    def __init__(self, config: "ServerConfig", runtime: "TailRuntime | None" = None) -> None:
        import asyncio
        import threading

        self.config = config
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self.error: BaseException | None = None
        self.server: CloudServer | None = None
        self.thread = threading.Thread(target=self._main, args=(runtime,), daemon=True)
        self.thread.start()
        if not self._started.wait(120):
            raise RuntimeError("server did not start in 120 s")
        if self.error is not None:
            raise self.error

    def _main(self, runtime: "TailRuntime | None") -> None:
        import asyncio

        asyncio.set_event_loop(self.loop)

        async def run() -> None:
            try:
                self.server = await CloudServer.start(self.config, runtime)
            except BaseException as e:  # reported to the test thread
                self.error = e
                self._started.set()
                return
            self._started.set()
            await self.server.wait_stopped()

        self.loop.run_until_complete(run())

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float = 0.5) -> None:
        import asyncio

        if self.server is not None and self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result(30)
        self.thread.join(30)


from cloud.config import ModelEntry, ServerConfig  # noqa: E402
from cloud.runtime import TailRuntime  # noqa: E402
from cloud.server import CloudServer  # noqa: E402


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
