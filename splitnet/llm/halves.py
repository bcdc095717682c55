"""The two halves of a decoder-only model, each with its own weights and its own KV cache.

A half is made of ``Segment`` modules: an optional embedding, a run of decoder blocks,
an optional final norm + LM head. The edge is one segment (``block.K``) or two
(U-shaped: front and back); the cloud is one. A segment holds the model's own
submodules (no weights are copied) but its blocks are shallow copies renumbered from 0
(``layer_idx``), so each half's ``DynamicCache`` starts at layer 0 and its sequence
length is right: with the global numbers the cloud's cache would hold empty layers
0..K-1, read its length as 0, and chunked prefill would go wrong.

Positions come from the segment's own cache (``KVState.length``). A GPT-2 segment
adds position embeddings only where the embedding is (the edge), and runs the blocks
itself elsewhere, so positions are never added twice.

    split = split_model(lm, parse_block_cut("block.2:block.5", lm.num_layers))
    edge, cloud = split.edge.new_state(), split.cloud.new_state()
    h = split.edge.front(ids, edge.front)            # hidden states at the cut
    out = split.cloud.segment(h, cloud.kv)           # logits (block.K) or hidden (U)
    logits = split.edge.finish(out, edge)            # U-shaped: the edge's tail
"""

from __future__ import annotations

import copy
import inspect
import itertools
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from splitnet.errors import PartitionError
from splitnet.llm.cuts import BlockCut
from splitnet.llm.models import LanguageModel

__all__ = [
    "CloudHalf",
    "EdgeHalf",
    "EdgeState",
    "KVState",
    "Segment",
    "SplitLM",
    "kv_nbytes",
    "split_model",
]


@dataclass(eq=False)
class KVState:
    """One segment's cache for one sequence: the KV tensors and how many positions it holds."""

    cache: DynamicCache = field(default_factory=DynamicCache)
    length: int = 0  # positions seen; the next token's position

    def nbytes(self) -> int:
        """Bytes held by the K and V tensors."""
        return kv_nbytes(self.cache)


def kv_nbytes(cache: DynamicCache) -> int:
    """Bytes of every K and V tensor in ``cache``."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def layer_kv(cache: DynamicCache, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V tensors of layer ``index`` of ``cache``: [batch, heads, positions, dim]."""
    layer = cast(Any, cache.layers[index])
    return layer.keys, layer.values


def _cache_keyword(fn: object) -> str:
    """Transformers 5.x renamed ``past_key_values`` to ``cache``: ask the signature."""
    params = inspect.signature(fn).parameters  # type: ignore[arg-type]
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in params:
            return name
    raise PartitionError(f"{fn!r} takes no cache argument this version of splitnet knows")


def _renumbered(block: nn.Module, index: int) -> nn.Module:
    """A copy of ``block`` sharing its parameters and buffers, with ``layer_idx = index``."""
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(block.parameters(), block.buffers())}
    clone = copy.deepcopy(block, memo)
    for module in clone.modules():
        if hasattr(module, "layer_idx"):
            setattr(module, "layer_idx", index)  # noqa: B010 - nn.Module types attributes
    return clone


class Segment(nn.Module):
    """Embedding (optional) -> blocks [start, stop) -> final norm + LM head (optional)."""

    embed_tokens: nn.Module | None
    embed_positions: nn.Module | None
    drop: nn.Module | None
    norm: nn.Module | None
    rotary: nn.Module | None
    lm_head: nn.Module | None

    def __init__(
        self, lm: LanguageModel, blocks: range, *, embed: bool = False, head: bool = False
    ) -> None:
        super().__init__()
        self.family = lm.family
        self.config = lm.model.config
        self.block_range = blocks
        self.has_embed = embed
        self.has_head = head
        self.blocks = nn.ModuleList(_renumbered(lm.blocks[g], i) for i, g in enumerate(blocks))
        model: Any = lm.model
        if lm.family == "gpt2":
            t = model.transformer
            self.embed_tokens = t.wte if embed else None
            self.embed_positions = t.wpe if embed else None
            self.drop = t.drop if embed else None
            self.norm = t.ln_f if head else None
            self.rotary = None
        else:
            inner = model.model
            self.embed_tokens = inner.embed_tokens if embed else None
            self.embed_positions = None
            self.drop = None
            self.norm = inner.norm if head else None
            self.rotary = inner.rotary_emb if len(blocks) else None
        self.lm_head = model.lm_head if head else None
        self._cache_kw = _cache_keyword(lm.blocks[0].forward) if len(blocks) else "cache"
        self._mask_kw = _cache_keyword(create_causal_mask)

    @property
    def num_blocks(self) -> int:
        """Blocks this segment runs."""
        return len(self.blocks)

    def new_state(self) -> KVState:
        """An empty cache for one sequence."""
        return KVState()

    def forward(  # noqa: D102
        self,
        x: torch.Tensor,
        state: KVState,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n = x.shape[1]
        if position_ids is None:
            position_ids = torch.arange(state.length, state.length + n, device=x.device)[None]
        h = x
        if self.embed_tokens is not None:
            h = self.embed_tokens(x)
            if self.embed_positions is not None:
                h = h + self.embed_positions(position_ids)
            if self.drop is not None:
                h = self.drop(h)
        if self.blocks:
            h = self._run_blocks(h, state.cache, position_ids, attention_mask)
        if self.norm is not None:
            h = self.norm(h)
        if self.lm_head is not None:
            h = self.lm_head(h)
        state.length += n
        return h

    def _run_blocks(
        self,
        h: torch.Tensor,
        cache: DynamicCache,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=h,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{self._mask_kw: cache},
        )
        kwargs: dict[str, object] = {
            self._cache_kw: cache,
            "attention_mask": mask,
            "position_ids": position_ids,
            "use_cache": True,
        }
        if self.rotary is not None:
            kwargs["position_embeddings"] = self.rotary(h, position_ids)
        for block in self.blocks:
            out = block(h, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def forward_batch(self, xs: torch.Tensor, states: list[KVState]) -> torch.Tensor:
        """One decode step for several sequences at once: ``xs`` is [B, 1, ...], one row
        per state. Their caches are left-padded into one batch, run together, and each
        state gets its own new K/V column back (the padded batch is dropped).
        """
        if len(states) == 1:
            return self(xs, states[0])
        if xs.shape[0] != len(states) or xs.shape[1] != 1:
            raise ValueError("forward_batch takes one token per state")
        lengths = [s.length for s in states]
        longest = max(lengths)
        device = xs.device
        position_ids = torch.tensor(lengths, device=device)[:, None]
        mask = None
        batch_cache = DynamicCache()
        if self.blocks:
            if longest > 0:
                for i in range(self.num_blocks):
                    keys, values = [], []
                    for s in states:
                        k, v = layer_kv(s.cache, i)
                        pad = longest - s.length
                        keys.append(nn.functional.pad(k, (0, 0, pad, 0)))
                        values.append(nn.functional.pad(v, (0, 0, pad, 0)))
                    batch_cache.update(torch.cat(keys), torch.cat(values), i)
            mask = torch.zeros(len(states), longest + 1, dtype=torch.long, device=device)
            for row, length in enumerate(lengths):
                mask[row, longest - length :] = 1
        tmp = KVState(batch_cache, longest)
        out = self(xs, tmp, position_ids=position_ids, attention_mask=mask)
        for i in range(self.num_blocks):
            k, v = layer_kv(batch_cache, i)
            new_k, new_v = k[:, :, -1:], v[:, :, -1:]
            for row, s in enumerate(states):
                s.cache.update(new_k[row : row + 1].clone(), new_v[row : row + 1].clone(), i)
        for s in states:
            s.length += 1
        return out


def _params(*modules: nn.Module | None) -> int:
    seen: dict[int, int] = {}
    for m in modules:
        if m is not None:
            for p in m.parameters():
                seen[id(p)] = p.numel()
    return sum(seen.values())


@dataclass(eq=False)
class EdgeState:
    """The edge's caches for one sequence: front blocks, and back blocks when U-shaped."""

    front: KVState
    back: KVState | None = None


class EdgeHalf(nn.Module):
    """Embeddings + blocks [0, K); when U-shaped also blocks [M, n), norm and LM head."""

    def __init__(self, lm: LanguageModel, cut: BlockCut) -> None:
        super().__init__()
        before, after = cut.edge_blocks(lm.num_layers)
        self.cut = cut
        # Cut "input": no embeddings either; the front passes token ids through.
        self.front = Segment(lm, before, embed=not cut.token_ids)
        self.back = Segment(lm, after, head=True) if cut.u_shaped else None

    def new_state(self) -> EdgeState:
        """Empty caches for one sequence."""
        return EdgeState(
            self.front.new_state(), None if self.back is None else self.back.new_state()
        )

    def finish(self, hidden: torch.Tensor, state: EdgeState) -> torch.Tensor:
        """U-shaped: the cloud's hidden states through the last blocks and the LM head."""
        if self.back is None or state.back is None:
            raise PartitionError(f"cut {self.cut.name} has no edge tail: the cloud returns tokens")
        out: torch.Tensor = self.back(hidden, state.back)
        return out

    @property
    def num_params(self) -> int:
        """Parameters the edge holds (a tied embedding counted once)."""
        return _params(self.front, self.back)

    @property
    def tied_shared(self) -> bool:
        """True when the edge's embedding and LM head are one tensor (U-shaped, tied)."""
        if self.back is None or self.back.lm_head is None or self.front.embed_tokens is None:
            return False
        return bool(self.back.lm_head.weight is self.front.embed_tokens.weight)


class CloudHalf(nn.Module):
    """Blocks [K, n) + norm + LM head, or U-shaped blocks [K, M) only."""

    def __init__(self, lm: LanguageModel, cut: BlockCut) -> None:
        super().__init__()
        self.cut = cut
        self.segment = Segment(
            lm, cut.cloud_blocks(lm.num_layers), embed=cut.token_ids, head=not cut.u_shaped
        )
        # block.K of a tied model: the LM head is the embedding matrix, which the edge
        # also holds; the cloud keeps its own reference (a copy once the model is gone).
        self.tied_copy = not cut.u_shaped and not cut.token_ids and lm.tied_embeddings

    @property
    def returns_logits(self) -> bool:
        """True for block.K (the cloud samples the token)."""
        return self.segment.has_head

    def new_state(self) -> KVState:
        """An empty cache for one sequence."""
        return self.segment.new_state()

    @property
    def num_params(self) -> int:
        """Parameters the cloud holds."""
        return _params(self.segment)


@dataclass(eq=False)
class SplitLM:
    """Both halves of one model at one cut."""

    lm: LanguageModel
    cut: BlockCut
    edge: EdgeHalf
    cloud: CloudHalf


def split_model(lm: LanguageModel, cut: BlockCut) -> SplitLM:
    """Build both halves of ``lm`` at ``cut`` (each from the model's own submodules; build
    one with ``EdgeHalf(lm, cut)`` or ``CloudHalf(lm, cut)`` alone).
    """
    cut.check(lm.num_layers)
    return SplitLM(lm, cut, EdgeHalf(lm, cut), CloudHalf(lm, cut))
