"""The block cuts of a language model as rows: parameters per side, KV bytes per token on
each side, and the bytes one token's hidden state costs on the wire per codec
(what ``splitnet cuts smollm2`` prints).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from splitnet.codecs import estimate_nbytes, parse_codec
from splitnet.llm.cuts import ALL_CLOUD_CUT, BlockCut, block_cuts, parse_block_cut
from splitnet.llm.halves import CloudHalf, EdgeHalf
from splitnet.llm.models import LanguageModel
from splitnet.v1 import generation_pb2 as gpb

__all__ = ["LLM_CODECS", "llm_cut_rows"]

LLM_CODECS = ("raw", "fp16", "bf16", "int8o:4")


def llm_cut_rows(
    lm: LanguageModel, codecs: Sequence[str] = LLM_CODECS, cuts: Sequence[BlockCut] | None = None
) -> list[dict[str, Any]]:
    """One row per cut (default: ``input``, then every block.K with blocks on both sides).
    Bytes per token are the wire ``Tensor`` message of one [1, 1, hidden] float32 hidden
    vector (int8o's few varint bytes of channel indices estimated at their upper bound);
    at ``input`` they are the step's token id, whatever the codec.
    """
    n = lm.num_layers
    shape = (1, 1, lm.hidden_size)
    per_codec = {
        str(parse_codec(c)): estimate_nbytes(c, shape, torch.float32).nbytes for c in codecs
    }
    # The largest id costs the most varint bytes: the upper bound, like int8o's.
    id_bytes = len(gpb.DecodeStep(token_ids=[max(lm.vocab_size - 1, 0)]).SerializeToString())
    rows = []
    for cut in cuts if cuts is not None else [parse_block_cut(ALL_CLOUD_CUT), *block_cuts(n)]:
        edge, cloud = EdgeHalf(lm, cut), CloudHalf(lm, cut)
        front, back = cut.edge_blocks(n)
        rows.append(
            {
                "cut": cut.name,
                "edge_blocks": len(front) + len(back),
                "cloud_blocks": len(cut.cloud_blocks(n)),
                "edge_params": edge.num_params,
                "cloud_params": cloud.num_params,
                "edge_kv_bytes_per_token": lm.kv_bytes_per_token(len(front) + len(back)),
                "cloud_kv_bytes_per_token": lm.kv_bytes_per_token(len(cut.cloud_blocks(n))),
                "bytes_per_token": (
                    dict.fromkeys(per_codec, id_bytes) if cut.token_ids else dict(per_codec)
                ),
                "down": "hidden" if cut.u_shaped else "token id",
            }
        )
    return rows
