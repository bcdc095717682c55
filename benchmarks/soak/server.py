"""``splitnet-cloud`` in a subprocess: a crash is a dead process, RSS is its own."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from benchmarks.soak.reference import MODEL

__all__ = ["Server"]


class Server:
    """``splitnet-cloud`` serving digits-cnn from ``weights`` in a subprocess.

    ``extra`` are more command-line flags; ``metrics`` opens the Prometheus endpoint on a
    free port (``metrics_url``). The log is drained in a thread so the server never
    blocks on a full pipe: the banner is ``banner``, the last ``LOG_LINES`` lines after
    it are ``output()``.
    """

    LOG_LINES = 1000

    def __init__(
        self,
        weights: Path,
        *extra: str,
        port: int = 0,
        metrics: bool = True,
        profile: bool = False,
    ) -> None:
        """``profile``: profile the cuts at start-up as a user's server does (slower)."""
        self.weights = weights
        self.profile = profile
        self.extra = extra
        self.metrics_on = metrics
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cloud.cli",
                "--model",
                f"{MODEL}={weights}",
                "--port",
                str(port),
                *(() if profile else ("--profile-runs", "0")),
                *(("--metrics-port", "0") if metrics else ()),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if "listening on" in line or not line:
                break
        if "listening on" not in line:
            self.kill()
            raise RuntimeError(f"splitnet-cloud did not start: {line!r}")
        self.banner = line.strip()
        self.address = line.split("listening on ")[1].split()[0]
        self.port = int(self.address.rsplit(":", 1)[1])
        self.metrics_url = line.split("metrics ")[1].split()[0] if "metrics " in line else ""
        self._log: collections.deque[str] = collections.deque(maxlen=self.LOG_LINES)
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.append(line)

    def output(self) -> str:
        """The log after the banner (its last ``LOG_LINES`` lines); complete once exited."""
        if not self.alive:
            self._drainer.join(10)
        return "".join(self._log)

    @property
    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def rss_mib(self) -> float:
        """Resident memory of the server process, MiB (NaN once it has exited)."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return float("nan")
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus samples, ``name{labels}`` -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
        return out

    def kill(self) -> None:
        """SIGKILL the process (if it still runs) and reap it."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        """SIGTERM, then wait for the exit status (a clean stop drains in-flight work)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def restart(self) -> Server:
        """A new process on the same port with the same flags (the old one must be dead)."""
        return Server(
            self.weights, *self.extra, port=self.port, metrics=self.metrics_on, profile=self.profile
        )
