"""Edge bundles of language models: the device holds only its half of a block cut.

``splitnet export smollm2 --cut block.15 --out DIR [--encrypt KEYFILE]`` writes the same
bundle format as for graph models (``splitnet.bundle``: manifest, safetensors weights,
optional AES-256-GCM), with::

    DIR/manifest.json            model.kind "language-model", split.kind "block-cut"
    DIR/edge.safetensors         the edge half's weights only (``.enc`` when encrypted)
    DIR/tokenizer/...            the tokenizer's files (save_pretrained), when it has one

The edge half at ``block.K`` is the embeddings and blocks [0, K); at U-shaped
``block.K:block.M`` also blocks [M, n), the final norm and the LM head. Weights keep
the whole model's state-dict names (``model.layers.3.mlp.up_proj.weight``); a tied LM
head is the embedding matrix, stored once and tied again on load.

The manifest's ``model`` holds what the device needs to rebuild the architecture
without a checkpoint: ``architecture``, the transformers ``config`` (``to_dict()``),
``attn_implementation``, ``eos_token_ids``; and ``fingerprint``, the whole model's
(``splitnet.models.fingerprint`` over its state dict, as the server computes it for
graph models). A generation session sends it at open (``OpenSession.fingerprint``), so
the server refuses a device whose bundle was exported from other weights. The part's
own fingerprint is checked on every load. Tokenizer files are stored plain with their
sha256 in the manifest (which encryption authenticates).

The device (``load_edge``) builds the model from the config on the meta device (no
weight memory), assigns the bundle's tensors to the edge's modules only, and builds
the ``EdgeHalf`` from them: the cloud's blocks are never allocated.

A block.K bundle also serves every block.J with J <= K; a U-shaped block.K:block.M
bundle serves block.J:block.L with J <= K and L >= M, and block.J with J <= K.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splitnet import __version__
from splitnet.bundle import (
    _MAGIC,
    _NONCE,
    CIPHER,
    FORMAT,
    MANIFEST,
    VERSION,
    Bundle,
    _aad,
    _aes,
    _key_check,
    _state_bytes,
)
from splitnet.codecs import parse_codec
from splitnet.errors import ConfigError, ModelError, PartitionError
from splitnet.llm.cuts import BlockCut, parse_block_cut
from splitnet.llm.halves import EdgeHalf
from splitnet.llm.models import LanguageModel, _family, _materialize_buffers, load_lm
from splitnet.models import fingerprint

__all__ = [
    "DEFAULT_CODECS",
    "MODEL_KIND",
    "SPLIT_KIND",
    "check_manifest",
    "edge_keys",
    "export_lm_bundle",
    "load_edge",
    "serves",
]

MODEL_KIND = "language-model"
SPLIT_KIND = "block-cut"
PART = "edge"
TOKENIZER_DIR = "tokenizer"
DEFAULT_CODECS = ("raw", "fp16", "bf16", "int8o:4")  # the hidden-state codecs safe for LMs
_MAX_TOKENIZER_BYTES = 64 << 20  # per file: a tokenizer is a few MiB


def edge_keys(lm: LanguageModel, cut: BlockCut) -> list[str]:
    """The whole model's state-dict names of the edge half's tensors at ``cut``, each
    tensor once (a tied LM head shares the embedding's tensor: only the embedding's name).
    """
    half = EdgeHalf(lm, cut)
    wanted = {id(t) for t in itertools.chain(half.parameters(), half.buffers())}
    keys: list[str] = []
    seen: set[int] = set()
    for key, t in lm.model.state_dict(keep_vars=True).items():
        if id(t) in wanted and id(t) not in seen:
            keys.append(key)
            seen.add(id(t))
    missing = {id(p) for p in half.parameters()} - seen
    if missing:
        raise ModelError(f"{lm.name}: {len(missing)} edge parameters are not in the state dict")
    return keys


def serves(bundle_cut: BlockCut, cut: BlockCut) -> bool:
    """True if a bundle exported at ``bundle_cut`` holds every weight ``cut`` needs on
    the edge.
    """
    if cut.start > bundle_cut.start:
        return False
    if not cut.u_shaped:
        return True
    return bundle_cut.stop is not None and cut.stop is not None and cut.stop >= bundle_cut.stop


# ---------------------------------------------------------------- export


def export_lm_bundle(
    model: str,
    out: str | Path,
    *,
    cut: str,
    codecs: Sequence[str] | None = None,
    key: bytes | None = None,
    force: bool = False,
    lm: LanguageModel | None = None,
) -> dict[str, Any]:
    """Write the edge bundle of language model ``model`` at block cut ``cut`` to ``out``
    (``lm``: the model already loaded by that name); return its manifest.
    """
    out = Path(out)
    if (out / MANIFEST).exists() and not force:
        raise ConfigError(f"{out} already holds a bundle: not overwriting it (--force)")
    if key is not None and len(key) != 32:
        raise ConfigError("the key must be 32 bytes (AES-256)")
    names = []
    for c in codecs or DEFAULT_CODECS:
        spec = parse_codec(c)
        if not spec.llm_safe:
            raise ConfigError(
                f"codec {c!r} is not safe for language-model hidden states: use raw, fp16, "
                "bf16 or int8o[:K] (each optionally +zstd)"
            )
        names.append(str(spec))
    codec_names = list(dict.fromkeys(["raw", *names]))
    lm = lm if lm is not None else load_lm(model)
    block_cut = parse_block_cut(cut, lm.num_layers)
    full = lm.model.state_dict()
    state = {k: full[k] for k in edge_keys(lm, block_cut)}
    half = EdgeHalf(lm, block_cut)
    before, after = block_cut.edge_blocks(lm.num_layers)
    config = lm.model.config
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "splitnet_version": __version__,
        "model": {
            "kind": MODEL_KIND,
            "name": model,
            "family": lm.family,
            "architecture": type(lm.model).__name__,
            "config": config.to_dict(),
            "attn_implementation": str(getattr(config, "_attn_implementation", None) or "sdpa"),
            "num_layers": lm.num_layers,
            "hidden_size": lm.hidden_size,
            "vocab_size": int(config.vocab_size),
            "tied_embeddings": lm.tied_embeddings,
            "eos_token_ids": list(lm.eos_token_ids),
            "fingerprint": fingerprint(lm.model),
        },
        "split": {
            "kind": SPLIT_KIND,
            "cut": block_cut.name,
            "edge_blocks": [[before.start, before.stop], [after.start, after.stop]],
            "cloud_blocks": [block_cut.start, block_cut.cloud_blocks(lm.num_layers).stop],
        },
        "codecs": codec_names,
        "parts": {},
        "tokenizer": None,
        "encryption": {"cipher": CIPHER, "key_check": _key_check(key)} if key else None,
    }
    data = _state_bytes(state)
    entry: dict[str, Any] = {
        "file": f"{PART}.safetensors" + (".enc" if key else ""),
        "fingerprint": fingerprint(state),
        "tensors": len(state),
        "bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "params": half.num_params,
    }
    if key is None:
        entry["sha256"] = hashlib.sha256(data).hexdigest()
    manifest["parts"][PART] = entry
    tokenizer_files: dict[str, bytes] = {}
    if lm.tokenizer is not None:
        with tempfile.TemporaryDirectory() as tmp:
            lm.tokenizer.save_pretrained(tmp)  # type: ignore[attr-defined]
            for f in sorted(Path(tmp).iterdir()):
                if f.is_file():
                    tokenizer_files[f.name] = f.read_bytes()
        manifest["tokenizer"] = {
            "dir": TOKENIZER_DIR,
            "files": {n: hashlib.sha256(b).hexdigest() for n, b in tokenizer_files.items()},
        }
    out.mkdir(parents=True, exist_ok=True)
    if key is not None:
        nonce = secrets.token_bytes(_NONCE)
        data = _MAGIC + nonce + _aes(key).encrypt(nonce, data, _aad(manifest, PART))
    (out / entry["file"]).write_bytes(data)
    if tokenizer_files:
        (out / TOKENIZER_DIR).mkdir(exist_ok=True)
        for n, b in tokenizer_files.items():
            (out / TOKENIZER_DIR / n).write_bytes(b)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ------------------------------------------------------------------ open


def check_manifest(doc: dict[str, Any], where: str) -> None:
    """Raise ModelError unless ``doc`` is a well-formed language-model bundle manifest
    (called by ``Bundle.open`` for ``model.kind`` "language-model").
    """

    def bad(what: str) -> ModelError:
        return ModelError(f"{where}: manifest {what} is missing or malformed")

    model, split = doc["model"], doc["split"]
    if split.get("kind") != SPLIT_KIND:
        raise ModelError(
            f"{where} holds a language model cut by {split.get('kind')!r}; this splitnet "
            f"cuts language models by {SPLIT_KIND}"
        )
    for field, kind in (
        ("config", dict), ("architecture", str), ("family", str), ("attn_implementation", str),
        ("num_layers", int), ("vocab_size", int), ("eos_token_ids", list),
    ):  # fmt: skip
        if not isinstance(model.get(field), kind):
            raise bad(f"model.{field}")
    if not isinstance(split.get("cut"), str):
        raise bad("split.cut")
    try:
        parse_block_cut(split["cut"], model["num_layers"])
    except PartitionError as e:
        raise ModelError(f"{where}: manifest cut: {e}") from None
    parts = doc.get("parts")
    if not isinstance(parts, dict) or not isinstance(parts.get(PART), dict):
        raise ModelError(f"{where} has no {PART} part")
    tok = doc.get("tokenizer")
    if tok is not None and not (
        isinstance(tok, dict)
        and tok.get("dir") == TOKENIZER_DIR
        and isinstance(tok.get("files"), dict)
        and all(isinstance(v, str) for v in tok["files"].values())
    ):
        raise bad("tokenizer")


@dataclass(frozen=True)
class EdgeBundle:
    """What ``load_edge`` gives the device: the model (architecture on the meta device,
    the edge's modules materialized) and its edge half at the requested cut.
    """

    lm: LanguageModel  # only the edge's modules hold weights; the rest stays on meta
    edge: EdgeHalf
    bundle: Bundle


def load_edge(
    path: str | Path | Bundle,
    key: bytes | None = None,
    *,
    model: str | None = None,
    cut: str | None = None,
    codec: str | None = None,
) -> EdgeBundle:
    """The edge half from a bundle: ``model`` (if given) must be the bundle's, ``cut``
    (default the bundle's) one it serves, ``codec`` (if given) one it allows.
    """
    bundle = path if isinstance(path, Bundle) else Bundle.open(path, key)
    where = f"bundle {str(bundle.path)!r}"
    m = bundle.manifest["model"]
    if m.get("kind") != MODEL_KIND:
        raise ModelError(f"{where} holds a {m.get('kind')!r} model, not a language model")
    if model is not None and model != bundle.model_name:
        raise ConfigError(f"{where} holds {bundle.model_name}, not {model}")
    n = int(m["num_layers"])
    exported = parse_block_cut(bundle.cut, n)
    wanted = parse_block_cut(cut, n) if cut is not None else exported
    if not serves(exported, wanted):
        raise PartitionError(
            f"cut {wanted.name} is deeper than this device's bundle ({exported.name}): it "
            "holds no weights for the blocks that cut runs here"
        )
    if codec is not None and str(parse_codec(codec)) not in bundle.codecs:
        raise ConfigError(f"{where} allows codecs {', '.join(bundle.codecs)}, not {codec}")
    # The weights first: decrypting them authenticates the manifest the rest is built from.
    state = bundle.state(PART)
    lm = _meta_lm(bundle)
    keys = edge_keys(lm, wanted)
    lacking = [k for k in keys if k not in state]
    if lacking:
        raise ModelError(f"{where} lacks weights {', '.join(lacking[:3])}")
    result = lm.model.load_state_dict({k: state[k] for k in keys}, strict=False, assign=True)
    del state  # weights the requested cut does not need are dropped here
    if result.unexpected_keys:
        raise ModelError(f"{where}: weights {result.unexpected_keys[:3]} do not fit the model")
    if lm.model.config.tie_word_embeddings:
        lm.model.tie_weights()
    edge = EdgeHalf(lm, wanted)
    left = [
        n for n, t in itertools.chain(edge.named_parameters(), edge.named_buffers()) if t.is_meta
    ]
    if left:
        raise ModelError(f"{where}: weights {', '.join(left[:3])} are not in the bundle")
    edge.eval()
    lm.tokenizer = _tokenizer(bundle, where)
    return EdgeBundle(lm, edge, bundle)


def _meta_lm(bundle: Bundle) -> LanguageModel:
    """The model from the manifest's config, on the meta device (buffers computed from
    the config, such as rotary frequencies, are real: they hold no weights).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as tf_logging

    tf_logging.disable_progress_bar()
    m = bundle.manifest["model"]
    name = bundle.model_name
    values = dict(m["config"])
    model_type = values.pop("model_type", None)
    try:
        config = AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(
            f"bundle {str(bundle.path)!r}: its model config does not build ({e})"
        ) from None
    config._attn_implementation = m["attn_implementation"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if type(model).__name__ != m["architecture"]:
        raise ModelError(
            f"bundle {str(bundle.path)!r} holds a {m['architecture']}; its config builds a "
            f"{type(model).__name__} here (another transformers version?)"
        )
    _materialize_buffers(model)
    model.eval()
    model.requires_grad_(False)
    eos = tuple(int(e) for e in m["eos_token_ids"])
    return LanguageModel(name, model, _family(model, name), None, eos)


def _tokenizer(bundle: Bundle, where: str) -> object | None:
    """The bundle's tokenizer, each file checked against the manifest first (the files
    are read once, checked, and loaded from a private copy).
    """
    tok = bundle.manifest.get("tokenizer")
    if tok is None:
        return None
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, digest in tok["files"].items():
            if Path(name).name != name or name.startswith("."):
                raise ModelError(f"{where}: tokenizer file name {name!r} is not a plain name")
            file = bundle.path / TOKENIZER_DIR / name
            try:
                if file.stat().st_size > _MAX_TOKENIZER_BYTES:
                    raise ModelError(f"{where}: tokenizer file {name} is too large")
                data = file.read_bytes()
            except OSError:
                raise ModelError(f"{where}: tokenizer file {name} is missing") from None
            if hashlib.sha256(data).hexdigest() != digest:
                raise ModelError(
                    f"{where}: tokenizer file {name} does not match its manifest "
                    "(damaged or changed)"
                )
            (Path(tmp) / name).write_bytes(data)
        try:
            return AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelError(f"{where}: its tokenizer does not load ({e})") from None
