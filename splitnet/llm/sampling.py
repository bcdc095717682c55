"""Choosing the next token where the LM head is: greedy, or temperature and top-p.

Sampling is seeded per position (``seed`` and the token's position pick the random
draw), so a session replayed after a fault draws the same tokens as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitnet.errors import ConfigError

__all__ = ["Sampling", "next_token"]

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) over 64 bits


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How the next token is chosen; temperature 0 is greedy (argmax)."""

    temperature: float = 0.0  # 0: greedy; otherwise logits are divided by it
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose mass reaches top_p
    seed: int = 0  # with the position, decides each draw

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 100.0:
            raise ConfigError(f"temperature {self.temperature}: use 0 (greedy) to 100")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p {self.top_p}: use a value in (0, 1]")
        if not 0 <= self.seed < 1 << 63:
            raise ConfigError(f"seed {self.seed}: use 0 <= seed < 2**63")

    @property
    def greedy(self) -> bool:
        """True when the choice is the argmax."""
        return self.temperature == 0.0


def next_token(logits: torch.Tensor, sampling: Sampling, position: int) -> int:
    """The token chosen from ``logits`` (one row, [vocab]) for the token at ``position``."""
    row = logits.reshape(-1).float()
    if sampling.greedy:
        return int(torch.argmax(row))
    scaled = row / sampling.temperature
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(scaled, descending=False)
        mass = ordered.softmax(-1).cumsum(-1)
        drop = mass <= 1 - sampling.top_p
        drop[-1] = False  # the most likely token always stays
        scaled = scaled.clone()
        scaled[order[drop]] = float("-inf")
    probs = scaled.softmax(-1)
    generator = torch.Generator().manual_seed((sampling.seed * _MIX + position) % (1 << 63))
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
