"""Faults: a ``splitnet-cloud`` subprocess SIGKILLed mid-generation and restarted on the
same port; the client resumes in a new session (the prefix replayed as one prefill) and
its tokens equal an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from llm_helpers import CHUNK, NEW_TOKENS, prompt_ids, reference  # noqa: E402

from edge.generate import GenerateConfig, Generator  # noqa: E402
from splitnet.llm import load_lm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny:llama:layers=5"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CloudProcess:
    """``splitnet-cloud`` in a subprocess, started and waited for by its banner."""

    def __init__(self, port: int, model: str = MODEL) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cloud.cli", "--model", model, "--port", str(port),
             "--profile-runs", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the banner, or the error that stopped it
        if "listening on" not in line:
            self.proc.kill()
            raise AssertionError(f"splitnet-cloud did not start: {line}{self.proc.stdout.read()}")
        self.address = line.split("listening on ")[1].split()[0]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


@pytest.fixture(scope="module")
def lm():
    return load_lm(MODEL)


def test_sigkill_and_restart_mid_generation_resumes_with_the_same_tokens(lm) -> None:
    """Two sessions at once (block.K and U-shaped) on one server; it is SIGKILLed when the
    first has 20 tokens and restarted on the same port while both keep trying.
    """
    prompt = prompt_ids(512)
    expected = reference(lm, prompt)
    port = _free_port()
    servers = [CloudProcess(port)]
    restarted = threading.Event()
    killed = threading.Event()

    def restart() -> None:
        servers.append(CloudProcess(port))
        restarted.set()

    def kill_at_20(seen: list[int]):
        def on_token(token: int) -> None:
            seen.append(token)
            if len(seen) == 20 and not killed.is_set():
                killed.set()
                servers[0].kill()
                threading.Thread(target=restart, daemon=True).start()
            elif len(seen) == 20:
                killed.wait(60)
        return on_token

    results: dict[str, object] = {}

    def run(cut: str) -> None:
        config = GenerateConfig(model=MODEL, cut=cut, chunk_tokens=CHUNK, reconnects=60,
                                backoff_s=0.1, max_backoff_s=0.5)  # fmt: skip
        with Generator(f"127.0.0.1:{port}", config, lm=lm) as g:
            results[cut] = g.generate(prompt, NEW_TOKENS, on_token=kill_at_20([]))

    threads = [threading.Thread(target=run, args=(c,)) for c in ("block.2", "block.1:block.4")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert restarted.wait(60)
    finally:
        for s in servers:
            s.stop()
    assert set(results) == {"block.2", "block.1:block.4"}
    for result in results.values():
        assert result.reconnects >= 1  # type: ignore[attr-defined]
        assert result.tokens == expected  # type: ignore[attr-defined]
