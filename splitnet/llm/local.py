"""Split generation in one process: both halves, optionally a codec between them.

The same loop the edge and the cloud run over the network, without the network, for
tests, the codec table and the planner's measurements::

    split = split_model(load_lm("tiny:llama"), parse_block_cut("block.2"))
    tokens = generate_local(split, prompt_ids, 64, chunk_tokens=16, codec="fp16")
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splitnet.codecs import CodecSpec, decode, encode
from splitnet.llm.halves import EdgeState, KVState, SplitLM
from splitnet.llm.sampling import Sampling, next_token

__all__ = ["chunks", "generate_local", "roundtrip", "step_local"]


def roundtrip(hidden: torch.Tensor, codec: str | CodecSpec | None) -> torch.Tensor:
    """``hidden`` encoded with ``codec`` and decoded again (unchanged when None)."""
    if codec is None:
        return hidden
    return decode(encode(hidden.contiguous(), codec))


def chunks(ids: Sequence[int], chunk_tokens: int | None) -> list[list[int]]:
    """``ids`` in pieces of at most ``chunk_tokens`` (one piece when None)."""
    step = len(ids) if not chunk_tokens else chunk_tokens
    return [list(ids[i : i + step]) for i in range(0, len(ids), max(step, 1))]


@torch.inference_mode()
def step_local(
    split: SplitLM,
    ids: Sequence[int],
    edge: EdgeState,
    cloud: KVState,
    codec: str | CodecSpec | None = None,
) -> torch.Tensor:
    """Feed ``ids`` (a prefill chunk, or one token) through edge, cloud and (U-shaped)
    the edge's tail; returns the logits of every position, [1, len(ids), vocab].
    """
    x = torch.tensor([list(ids)], dtype=torch.long)
    h = roundtrip(split.edge.front(x, edge.front), codec)
    out = split.cloud.segment(h, cloud)
    if split.cut.u_shaped:
        out = split.edge.finish(roundtrip(out, codec), edge)
    return out


def generate_local(
    split: SplitLM,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    sampling: Sampling | None = None,
    chunk_tokens: int | None = None,
    codec: str | CodecSpec | None = None,
    stop_ids: Sequence[int] = (),
) -> list[int]:
    """Generate up to ``max_new_tokens`` after ``prompt_ids`` through both halves; stops
    after a token in ``stop_ids`` (which is kept, as ``generate()`` does).
    """
    sampling = sampling or Sampling()
    edge, cloud = split.edge.new_state(), split.cloud.new_state()
    logits = torch.empty(0)
    for piece in chunks(prompt_ids, chunk_tokens):
        logits = step_local(split, piece, edge, cloud, codec)
    position = len(prompt_ids)
    tokens: list[int] = []
    while len(tokens) < max_new_tokens:
        token = next_token(logits[0, -1], sampling, position)
        tokens.append(token)
        if token in stop_ids or len(tokens) == max_new_tokens:
            break
        logits = step_local(split, [token], edge, cloud, codec)
        position += 1
    return tokens
