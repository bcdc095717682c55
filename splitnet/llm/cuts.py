"""Block cuts of a decoder-only model: names, parsing, listing.

``block.K``           the edge holds the embeddings and blocks [0, K); the cloud holds
                      blocks [K, n), the final norm and the LM head (a token id comes back)
``block.K:block.M``   U-shaped: the cloud runs only blocks [K, M); the edge holds the
                      embeddings, blocks [0, K) and [M, n), the final norm and the LM head
                      (token ids never leave the device; a hidden vector comes back)
``input``             all in the cloud: the edge holds no weights and sends token ids; the
                      cloud embeds them and runs every block, the norm and the LM head

0 <= K <= n for ``block.K``; 0 <= K < M <= n for the U-shaped form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from splitnet.errors import PartitionError

__all__ = ["ALL_CLOUD_CUT", "BlockCut", "block_cuts", "parse_block_cut"]

ALL_CLOUD_CUT = "input"  # the cut that sends token ids: everything runs in the cloud
_CUT_RE = re.compile(r"^block\.([0-9]{1,4})(?::block\.([0-9]{1,4}))?$")


@dataclass(frozen=True, order=True)
class BlockCut:
    """Where a decoder-only model is cut; ``stop`` is set for U-shaped cuts."""

    start: int  # K: the first block the cloud runs
    stop: int | None = None  # M: U-shaped, the first block back on the edge; None: block.K
    token_ids: bool = False  # "input": token ids go up, the cloud holds the embeddings too

    @property
    def name(self) -> str:
        """The cut's name, as it is given on the command line."""
        if self.token_ids:
            return ALL_CLOUD_CUT
        if self.stop is None:
            return f"block.{self.start}"
        return f"block.{self.start}:block.{self.stop}"

    @property
    def u_shaped(self) -> bool:
        """True when the LM head stays on the edge."""
        return self.stop is not None

    def cloud_blocks(self, num_layers: int) -> range:
        """The blocks the cloud runs."""
        return range(self.start, num_layers if self.stop is None else self.stop)

    def edge_blocks(self, num_layers: int) -> tuple[range, range]:
        """The blocks the edge runs before and after the cloud's."""
        return range(0, self.start), range(
            num_layers if self.stop is None else self.stop, num_layers
        )

    def check(self, num_layers: int) -> BlockCut:
        """Return the cut itself if it fits a model of ``num_layers`` blocks, else raise."""
        ok = 0 <= self.start <= num_layers and (
            self.stop is None or self.start < self.stop <= num_layers
        )
        if not ok:
            raise PartitionError(
                f"cut {self.name} does not fit a model of {num_layers} blocks: use block.K "
                f"with 0 <= K <= {num_layers}, or block.K:block.M with 0 <= K < M <= {num_layers}"
            )
        return self

    def __str__(self) -> str:
        return self.name


def parse_block_cut(text: str, num_layers: int | None = None) -> BlockCut:
    """``"block.3"`` or ``"block.2:block.5"`` as a ``BlockCut`` (checked against the model
    when ``num_layers`` is given).
    """
    if text.strip() == ALL_CLOUD_CUT:
        return BlockCut(0, None, token_ids=True)
    m = _CUT_RE.match(text.strip()) if len(text) <= 64 else None
    if m is None:
        limit = "n" if num_layers is None else str(num_layers)
        raise PartitionError(
            f"unknown cut {text[:64]!r}: a language-model cut is block.K (0 <= K <= {limit}), "
            f"U-shaped block.K:block.M (K < M <= {limit}), or {ALL_CLOUD_CUT} (all in the "
            "cloud, token ids sent)"
        )
    cut = BlockCut(int(m.group(1)), None if m.group(2) is None else int(m.group(2)))
    return cut if num_layers is None else cut.check(num_layers)


def block_cuts(num_layers: int, *, u_shaped: bool = False) -> list[BlockCut]:
    """Every ``block.K`` cut with blocks on both sides (1 <= K < n), then, with
    ``u_shaped``, every ``block.K:block.M`` with 1 <= K < M < n.
    """
    cuts = [BlockCut(k) for k in range(1, num_layers)]
    if u_shaped:
        cuts += [BlockCut(k, m) for k in range(1, num_layers) for m in range(k + 1, num_layers)]
    return cuts
