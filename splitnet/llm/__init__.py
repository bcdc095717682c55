"""Language models split between edge and cloud, with a KV cache on each side.

Needs the ``llm`` extra (transformers). ``load_lm(name)`` loads ``smollm2``, ``hf:DIR``
or ``tiny:FAMILY[:k=v,...]``; ``parse_block_cut`` names a cut (``block.K`` or U-shaped
``block.K:block.M``); ``split_model`` builds the halves; ``generate_local`` runs the
split loop in one process.
"""

from __future__ import annotations

from splitnet.llm.cuts import ALL_CLOUD_CUT, BlockCut, block_cuts, parse_block_cut
from splitnet.llm.models import SMOLLM2, LanguageModel, is_llm_name, load_lm
from splitnet.llm.sampling import Sampling, next_token

__all__ = [
    "ALL_CLOUD_CUT",
    "SMOLLM2",
    "BlockCut",
    "LanguageModel",
    "Sampling",
    "block_cuts",
    "is_llm_name",
    "load_lm",
    "next_token",
    "parse_block_cut",
]
