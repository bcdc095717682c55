"""Training and evaluation of the digits model (the model lifecycle).

Determinism. Float sums give different bits when they are done in another order or
with other instructions, and 40 epochs turn one different bit into different weights.
What decides the order: the number of threads, the CPU kernels torch picks for this
processor (AVX2, AVX-512 or plain: FMA rounds once where multiply-then-add rounds
twice), oneDNN's convolutions (chosen by instruction set too) and MKL's matrix
products (likewise). So there are two levels:

- ``train_digits`` (in this process): one thread, deterministic algorithms, seeded
  generators, CPU. Two trainings with the same seed give the same bits **on the same
  machine and torch build**. Another processor, or the same one with other kernels,
  gives other weights (and other accuracy, by a few tenths of a point).
- ``train_portable`` (``splitnet train``): the same, in a child process started with
  ``PORTABLE_ENV``, which pins every choice above to the one code path every x86-64
  processor runs: plain CPU kernels, oneDNN at SSE4.1, MKL in its compatible mode.
  The caller's environment (threads, kernel choices) then no longer matters, and the
  model's random initial weights are drawn in the child too. It was meant to give the
  same bits on any x86-64 machine with the same torch build, but two machines of this
  workplace (both torch 2.14.1, x86-64) gave different bits, so what holds is: the same
  bits **on the same machine and build**, whatever the caller's environment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from splitnet.data import Split, load_digits
from splitnet.errors import ConfigError, SplitNetError

__all__ = [
    "PORTABLE_ENV",
    "TrainConfig",
    "accuracy",
    "deterministic",
    "is_portable",
    "predict",
    "train_digits",
    "train_portable",
]

logger = logging.getLogger(__name__)

# Read by torch, oneDNN and MKL when they start, so they must be set before the
# process imports torch: one thread, plain CPU kernels, oneDNN at SSE4.1, MKL's
# compatible (processor-independent) code path.
PORTABLE_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "MKL_CBWR": "COMPATIBLE",
}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train the digits model."""

    epochs: int = 40  # passes over the training split
    batch_size: int = 64  # images per step
    lr: float = 3e-3  # AdamW learning rate (cosine-decayed to 0)
    weight_decay: float = 1e-4  # AdamW weight decay
    seed: int = 0  # seeds weights, data order and augmentation

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs, batch_size and lr must be positive")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay must be >= 0")


def is_portable() -> bool:
    """Whether this process runs under ``PORTABLE_ENV`` (and torch took it up)."""
    env_ok = all(os.environ.get(k) == v for k, v in PORTABLE_ENV.items())
    return env_ok and torch.backends.cpu.get_cpu_capability() == "DEFAULT"


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """One intra-op thread and torch's deterministic algorithms, restored afterwards."""
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel in each direction."""
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    out = torch.empty_like(x)
    offsets = torch.randint(0, 3, (len(x), 2), generator=gen)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + 8, dx : dx + 8]
    return out


def train_digits(
    model: nn.Module,
    config: TrainConfig = TrainConfig(),
    *,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` (on the CPU) on the digits train split; return val and test accuracy.

    Deterministic on the same machine and torch build (see the module docstring);
    ``train_portable`` is deterministic across x86-64 machines. ``progress(epoch,
    loss)`` is called after every epoch.
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ConfigError("train_digits trains on the CPU: move the model there first")
    with deterministic():
        return _train(model, config, progress)


def _train(
    model: nn.Module, config: TrainConfig, progress: Callable[[int, float], None] | None
) -> dict[str, float]:
    torch.manual_seed(config.seed)  # dropout draws from the global generator
    data = load_digits(config.seed)
    train = data["train"]
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * -(-len(train) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        total = 0.0
        for start in range(0, len(train), config.batch_size):
            idx = order[start : start + config.batch_size]
            x, y = _augment(train.x[idx], gen), train.y[idx]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if progress is not None:
            progress(epoch + 1, total / len(train))
    model.eval()
    return {"val": accuracy(model, data["val"]), "test": accuracy(model, data["test"])}


def train_portable(
    name: str,
    out: str | Path,
    config: TrainConfig = TrainConfig(),
    *,
    input_shape: tuple[int, ...] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, float | str]:
    """Build ``name`` from its seed, train it and save it to ``out``, in a child process
    under ``PORTABLE_ENV``: the same bits on any x86-64 machine with this torch build.

    Returns ``{"val": ..., "test": ..., "fingerprint": ...}``; ``progress`` as for
    ``train_digits``. A failure in the child raises ``SplitNetError`` with its message.
    """
    job = {
        "name": name,
        "out": str(out),
        "config": asdict(config),
        "input_shape": list(input_shape) if input_shape is not None else None,
    }
    env = {**os.environ, **PORTABLE_ENV}
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitnet.training", json.dumps(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    result: dict[str, float | str] = {}
    for line in proc.stdout:
        msg = json.loads(line)
        if "epoch" in msg and progress is not None:
            progress(int(msg["epoch"]), float(msg["loss"]))
        elif "result" in msg:
            result = msg["result"]
    err = proc.stderr.read()
    if proc.wait() != 0 or not result:
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise SplitNetError(f"training {name!r} failed: {last}")
    return result


def _child(job_text: str) -> int:
    """``python -m splitnet.training JOB``: what ``train_portable`` runs."""
    from splitnet.models import fingerprint, load_model, save_weights

    job = json.loads(job_text)
    if not is_portable():
        raise SplitNetError("run through train_portable: PORTABLE_ENV is not in effect")
    shape = tuple(job["input_shape"]) if job["input_shape"] is not None else None
    model = load_model(job["name"], input_shape=shape).train()

    def report(epoch: int, loss: float) -> None:
        print(json.dumps({"epoch": epoch, "loss": loss}), flush=True)

    result = train_digits(model, TrainConfig(**job["config"]), progress=report)
    save_weights(model, job["out"])
    print(json.dumps({"result": {**result, "fingerprint": fingerprint(model)}}), flush=True)
    return 0


@torch.no_grad()
def predict(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int = 256
) -> torch.Tensor:
    """Class predictions of ``fn`` over ``x``, in batches."""
    return torch.cat([fn(x[i : i + batch]).argmax(dim=1) for i in range(0, len(x), batch)])


def accuracy(fn: Callable[[torch.Tensor], torch.Tensor], split: Split) -> float:
    """Top-1 accuracy of ``fn`` on ``split``, in [0, 1]."""
    return float((predict(fn, split.x) == split.y).float().mean())


if __name__ == "__main__":  # pragma: no cover - run by train_portable
    try:
        sys.exit(_child(sys.argv[1]))
    except SplitNetError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
