"""Edge bundles: ship a device only its half of the model, optionally encrypted at rest.

``splitnet export MODEL --cut C --out DIR`` writes::

    DIR/manifest.json        what the bundle holds (below), in plain JSON
    DIR/head.safetensors     the head's weights only (``.enc`` when encrypted)
    DIR/tail.safetensors     with --tail: the tail's weights, for a cloud serving only C
    DIR/whole.safetensors    with --whole: every weight (the device may then run it all)

Heads are nested: a cut earlier in execution order reads a subset of the deepest
head's weights, so a bundle exported for cut C serves every cut up to C.

The manifest (``format`` ``splitnet-bundle``, ``version`` 1)::

    model   {"kind": "graph", "name", "input_shape", "fingerprint"}   the whole model
    split   {"kind": "graph-cut", "cut", "cuts": [...], "frontier": {cut: [tensor]}}
    codecs  [...]            codec specs the device may send with this bundle
    parts   {name: {"file", "fingerprint", "tensors", "bytes", "params", "sha256"?}}
    encryption  null | {"cipher": "AES-256-GCM", "key_check": hex}
    splitnet_version

``model.kind`` and ``split.kind`` say how to rebuild the halves: ``graph`` /
``graph-cut`` is a traced model cut after a node (``splitnet.partition``);
``language-model`` / ``block-cut`` is a decoder-only model cut between blocks, with one
part ``edge`` and the model's config instead of an input shape (``splitnet.llm.bundle``).
``fingerprint`` is the whole model's (what requests carry, so a server with other weights still
answers FAILED_PRECONDITION); each part has its own, checked when it is loaded.

Encryption: AES-256-GCM (``cryptography``), one random 96-bit nonce per file stored
before the ciphertext, and the whole manifest as associated data, so changing any
byte of it or of a weights file is detected. ``key_check`` (an HMAC of a constant
under the key) tells a wrong key from a damaged bundle. Decrypted weights are only
ever held in memory. Without encryption each file's sha256 in the manifest catches
damage, but not a deliberate edit: use ``--encrypt`` where that matters.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splitnet import __version__
from splitnet.codecs import parse_codec
from splitnet.errors import ConfigError, ModelError, ModelMismatchError, SplitNetError
from splitnet.models import build, fingerprint, load_model, resolve
from splitnet.partition import SplitGraph, trace

__all__ = [
    "KEY_ENV",
    "Bundle",
    "export_bundle",
    "materialize",
    "new_key",
    "read_key",
]

FORMAT = "splitnet-bundle"
VERSION = 1
MANIFEST = "manifest.json"
KEY_ENV = "SPLITNET_BUNDLE_KEY"  # 64 hex digits: the key when no key file is given
CIPHER = "AES-256-GCM"
_NONCE = 12
_MAGIC = b"SNB1"  # first bytes of an encrypted part
_KEY_CHECK = b"splitnet bundle key check"
PARTS = ("head", "tail", "whole")
LM_KIND = "language-model"  # model.kind of a language model's bundle (splitnet.llm.bundle)


# ------------------------------------------------------------------ keys


def read_key(path: str | Path | None = None, *, env: bool = True) -> bytes | None:
    """The 32-byte key from ``path`` (64 hex digits on one line), else from
    ``$SPLITNET_BUNDLE_KEY``; None if neither is given.
    """
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"key file {str(path)!r} does not exist")
        text = file.read_text(encoding="utf-8", errors="replace")
        source = f"key file {str(path)!r}"
    elif env and os.environ.get(KEY_ENV):
        text, source = os.environ[KEY_ENV], f"${KEY_ENV}"
    else:
        return None
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError(f"{source} must hold a 256-bit key as 64 hex digits")
    return key


def new_key(path: str | Path) -> bytes:
    """Write a new random key to ``path`` (readable by its owner only); refuse to
    overwrite an existing file.
    """
    file = Path(path)
    if file.exists():
        raise ConfigError(f"key file {str(path)!r} exists: not overwriting it")
    key = secrets.token_bytes(32)
    file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


def _key_check(key: bytes) -> str:
    return hmac.new(key, _KEY_CHECK, hashlib.sha256).hexdigest()[:32]


def _aes(key: bytes) -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise ConfigError(
            "encrypted bundles need the cryptography package: pip install 'splitnet[crypto]'"
        ) from None
    return AESGCM(key)


def _canonical(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def _aad(manifest: dict[str, Any], part: str) -> bytes:
    return f"{FORMAT}/{VERSION} {part}\n".encode() + _canonical(manifest)


# ---------------------------------------------------------------- export


def _state_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    # Own, contiguous copies: safetensors refuses tensors that share memory.
    return bytes(save({k: v.detach().contiguous().clone() for k, v in state.items()}))


def _describe(state: dict[str, torch.Tensor], module: nn.Module) -> dict[str, Any]:
    return {
        "fingerprint": fingerprint(state),
        "tensors": len(state),
        "bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "params": sum(p.numel() for p in module.parameters()),
    }


def export_bundle(
    model: str,
    out: str | Path,
    *,
    cut: str,
    weights: str | Path | None = None,
    input_shape: tuple[int, ...] | None = None,
    codecs: Sequence[str] = ("raw", "zstd:1", "int8+zstd:1"),
    tail: bool = False,
    whole: bool = False,
    key: bytes | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write the bundle for ``model`` cut at ``cut`` (the deepest cut the device may
    run) to ``out``; return its manifest.
    """
    out = Path(out)
    if (out / MANIFEST).exists() and not force:
        raise ConfigError(f"{out} already holds a bundle: not overwriting it (--force)")
    if key is not None and len(key) != 32:
        raise ConfigError("the key must be 32 bytes (AES-256)")
    codec_names = list(dict.fromkeys(["raw", *(str(parse_codec(c)) for c in codecs)]))
    spec = resolve(model, input_shape)
    module = load_model(model, weights, input_shape=spec.input_shape)
    from splitnet.report import sample_input

    graph = trace(module, (sample_input(spec.input_shape),))
    deepest = graph.cut(cut)
    head, tail_module = graph.split(deepest.name)
    served = graph.cuts[: deepest.index + 1]
    states: dict[str, tuple[dict[str, torch.Tensor], nn.Module]] = {
        "head": (head.state_dict(), head)
    }
    if tail:
        states["tail"] = (tail_module.state_dict(), tail_module)
    if whole:
        states["whole"] = (module.state_dict(), module)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "splitnet_version": __version__,
        "model": {
            "kind": "graph",
            "name": model,
            "input_shape": list(spec.input_shape),
            "fingerprint": fingerprint(module),
        },
        "split": {
            "kind": "graph-cut",
            "cut": deepest.name,
            "cuts": [c.name for c in served],
            "frontier": {
                c.name: [
                    {
                        "name": t.name,
                        "shape": list(t.shape),
                        "dtype": str(t.dtype).removeprefix("torch."),
                    }
                    for t in c.frontier
                ]
                for c in served
            },
        },
        "codecs": codec_names,
        "parts": {},
        "encryption": {"cipher": CIPHER, "key_check": _key_check(key)} if key else None,
    }
    blobs = {}
    for name, (state, part_module) in states.items():
        data = _state_bytes(state)
        entry = _describe(state, part_module)
        entry["file"] = f"{name}.safetensors" + (".enc" if key else "")
        if key is None:
            entry["sha256"] = hashlib.sha256(data).hexdigest()
        manifest["parts"][name] = entry
        blobs[name] = data
    out.mkdir(parents=True, exist_ok=True)
    for name, data in blobs.items():
        if key is not None:
            nonce = secrets.token_bytes(_NONCE)
            data = _MAGIC + nonce + _aes(key).encrypt(nonce, data, _aad(manifest, name))
        (out / manifest["parts"][name]["file"]).write_bytes(data)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ------------------------------------------------------------------ open


def _need(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(value, kind):
        raise ModelError(f"{where}: manifest field {key!r} is missing or malformed")
    return value


@dataclass(frozen=True)
class Bundle:
    """An opened bundle: the manifest checked; parts read, verified and decrypted on demand."""

    path: Path
    manifest: dict[str, Any]
    key: bytes | None = None

    @classmethod
    def open(cls, path: str | Path, key: bytes | None = None) -> Bundle:
        """Read and check ``path``'s manifest (and the key, if the bundle is encrypted)."""
        path = Path(path)
        where = f"bundle {str(path)!r}"
        try:
            text = (path / MANIFEST).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelError(f"{where} is not a splitnet bundle (no {MANIFEST})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ModelError(f"{where}: cannot read {MANIFEST} ({e})") from None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ModelError(f"{where}: {MANIFEST} is damaged (not JSON: {e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ModelError(f"{where}: {MANIFEST} is not a {FORMAT} manifest")
        if doc.get("version") != VERSION:
            raise ModelError(
                f"{where} has format version {doc.get('version')!r}; this splitnet reads "
                f"version {VERSION} (export it again with this version)"
            )
        model = _need(doc, "model", dict, where)
        _need(doc, "split", dict, where)
        _need(model, "name", str, where)
        _need(model, "fingerprint", str, where)
        if model.get("kind") == LM_KIND:  # a block cut: splitnet.llm.bundle reads it
            from splitnet.llm.bundle import check_manifest

            check_manifest(doc, where)
        else:
            cls._check_graph(doc, where)
        return cls(path, doc, cls._check_key(doc, key, where))

    @staticmethod
    def _check_graph(doc: dict[str, Any], where: str) -> None:
        model, split = doc["model"], doc["split"]
        shape = _need(model, "input_shape", list, where)
        if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ModelError(f"{where}: manifest input_shape {shape!r} is malformed")
        if model.get("kind") != "graph" or split.get("kind") != "graph-cut":
            raise ModelError(
                f"{where} holds a {model.get('kind')!r} model cut by {split.get('kind')!r}; "
                "this splitnet reads graph models cut by graph-cut"
            )
        _need(split, "cut", str, where)
        cuts = _need(split, "cuts", list, where)
        if not cuts or split["cut"] != cuts[-1]:
            raise ModelError(f"{where}: manifest cuts do not end at its cut")
        parts = _need(doc, "parts", dict, where)
        if "head" not in parts:
            raise ModelError(f"{where} has no head")

    @staticmethod
    def _check_key(doc: dict[str, Any], key: bytes | None, where: str) -> bytes | None:
        encryption = doc.get("encryption")
        if encryption is not None:
            if not isinstance(encryption, dict) or encryption.get("cipher") != CIPHER:
                raise ModelError(f"{where}: unknown encryption {encryption!r}")
            if key is None:
                raise ConfigError(
                    f"{where} is encrypted: give its key (--bundle-key FILE or ${KEY_ENV})"
                )
            if not hmac.compare_digest(str(encryption.get("key_check")), _key_check(key)):
                raise ModelError(f"{where}: wrong key (it is not the key the bundle was made with)")
        return key if encryption is not None else None

    # ------------------------------------------------------------ fields
    @property
    def model_name(self) -> str:
        """The model's registry name."""
        return str(self.manifest["model"]["name"])

    @property
    def kind(self) -> str:
        """``graph`` (a traced model cut after a node) or ``language-model`` (block cuts)."""
        return str(self.manifest["model"].get("kind"))

    def _graph_only(self) -> None:
        if self.kind == LM_KIND:
            raise ModelError(
                f"bundle {str(self.path)!r} holds language model {self.model_name} cut at "
                f"{self.cut}: run it with splitnet-edge generate --bundle"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The example input shape, with batch."""
        self._graph_only()
        return tuple(self.manifest["model"]["input_shape"])

    @property
    def fingerprint(self) -> str:
        """The whole model's fingerprint (what requests carry)."""
        return str(self.manifest["model"]["fingerprint"])

    @property
    def cut(self) -> str:
        """The deepest cut the bundle serves."""
        return str(self.manifest["split"]["cut"])

    @property
    def cuts(self) -> list[str]:
        """Every cut the bundle serves, in execution order (a language model's: its cut;
        ``splitnet.llm.bundle.serves`` says which others it serves).
        """
        return [str(c) for c in self.manifest["split"].get("cuts") or [self.cut]]

    @property
    def codecs(self) -> list[str]:
        """Codec specs the device may send with this bundle."""
        return [str(c) for c in self.manifest.get("codecs") or ["raw"]]

    def has(self, part: str) -> bool:
        """True if the bundle holds ``part`` (head, tail or whole)."""
        return part in self.manifest["parts"]

    # ------------------------------------------------------------- parts
    def state(self, part: str) -> dict[str, torch.Tensor]:
        """The weights of ``part``, verified against the manifest (decrypted in memory)."""
        where = f"bundle {str(self.path)!r}"
        entry = self.manifest["parts"].get(part)
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise ModelError(f"{where} has no {part} part")
        name = entry["file"]
        if Path(name).name != name:
            raise ModelError(f"{where}: part file name {name!r} is not a plain file name")
        try:
            data = (self.path / name).read_bytes()
        except OSError:
            raise ModelError(f"{where}: {name} is missing") from None
        if self.key is not None:
            data = self._decrypt(data, part, name, where)
        elif entry.get("sha256") != hashlib.sha256(data).hexdigest():
            raise ModelError(f"{where}: {name} does not match its manifest (damaged or changed)")
        try:
            state = _tensors(data)
        except ValueError as e:
            raise ModelError(f"{where}: {name} is not a safetensors file ({e})") from None
        del data
        if fingerprint(state) != entry.get("fingerprint"):
            raise ModelMismatchError(
                f"{where}: the {part} weights do not match the manifest's fingerprint"
            )
        return state

    def _decrypt(self, data: bytes, part: str, name: str, where: str) -> bytes:
        assert self.key is not None
        from cryptography.exceptions import InvalidTag

        head = len(_MAGIC) + _NONCE
        if len(data) < head + 16 or not data.startswith(_MAGIC):
            raise ModelError(f"{where}: {name} is not an encrypted bundle part")
        try:
            plain: bytes = _aes(self.key).decrypt(
                data[len(_MAGIC) : head], data[head:], _aad(self.manifest, part)
            )
        except InvalidTag:
            raise ModelError(
                f"{where}: {name} or the manifest was changed or damaged (authentication failed)"
            ) from None
        return plain

    # ------------------------------------------------------------ models
    def meta_graph(self) -> SplitGraph:
        """The model built on the meta device (no weight memory) and traced with a meta
        input: its cuts, frontiers and halves, with nothing computed or allocated.
        """
        self._graph_only()
        spec = resolve(self.model_name, self.input_shape)
        with torch.device("meta"):
            module = build(spec)
        graph = trace(module.eval(), (torch.empty(self.input_shape, device="meta"),), check=False)
        self._check_cuts(graph)
        return graph

    def _check_cuts(self, graph: SplitGraph) -> None:
        where = f"bundle {str(self.path)!r}"
        names = graph.names[: len(self.cuts)]
        frontier = self.manifest["split"].get("frontier") or {}
        if names != self.cuts:
            raise ModelError(
                f"{where} does not match {self.model_name} as built here: its cuts "
                f"({', '.join(self.cuts[:4])}, ...) differ from this model's; export it "
                "again with the same splitnet and torch versions"
            )
        for name in names:
            want = [list(t.get("shape", [])) for t in frontier.get(name, [])]
            got = [list(t.shape) for t in graph.cut(name).frontier]
            if want and want != got:
                raise ModelError(f"{where}: cut {name}'s frontier {want} differs from {got} here")

    def whole_model(self) -> nn.Module:
        """The whole model from a bundle exported with ``--whole``, its fingerprint checked."""
        module = build(resolve(self.model_name, self.input_shape))
        module.load_state_dict(self.state("whole"), strict=True)
        module.eval()
        if fingerprint(module) != self.fingerprint:
            raise ModelMismatchError(
                f"bundle {str(self.path)!r}: the whole model's weights do not match the "
                "manifest's fingerprint"
            )
        return module


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def _tensors(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in ``data``, each an own, aligned copy made
    straight from ``data`` (so at most the file's bytes and the weights are held at once;
    safetensors' ``load`` copies every tensor once more first). Views into ``data`` would
    be unaligned, and kernels then run far slower. ValueError if the bytes are malformed.
    """
    if len(data) < 8:
        raise ValueError("too short")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8 or size > 100 << 20:
        raise ValueError("its header is larger than the file")
    try:
        header = json.loads(data[8 : 8 + size])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"its header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    body = 8 + size
    out: dict[str, torch.Tensor] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            start, stop = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {key!r} is described wrongly") from None
        length = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= start <= stop <= len(data) - body:
            raise ValueError(f"tensor {key!r} lies outside the file")
        if stop - start != length:
            raise ValueError(f"tensor {key!r} has {stop - start} bytes, its shape needs {length}")
        t = torch.empty(shape, dtype=dtype)
        if length:
            with warnings.catch_warnings():  # read only, and copied at once
                warnings.simplefilter("ignore", UserWarning)
                src = torch.frombuffer(data, dtype=torch.uint8, count=length, offset=body + start)
            t.view(-1).view(torch.uint8).copy_(src)
        out[key] = t
    return out


def materialize(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Give a meta-device module real weights from ``state`` (its own keys only; no copy)."""
    keys = module.state_dict().keys()
    missing = [k for k in keys if k not in state]
    if missing:
        raise ModelError(f"the bundle lacks weights {', '.join(missing[:3])}")
    module.load_state_dict({k: state[k] for k in keys}, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise SplitNetError(f"weights {', '.join(left[:3])} are not in the bundle")
    return module.eval()


def nbytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of a state dict's tensors."""
    return sum(math.prod(t.shape) * t.element_size() for t in state.values())
