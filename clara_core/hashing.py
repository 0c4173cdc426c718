"""Hashes that tie the registry to files: base model, tokenizer and adapter.

- ``base_model_hash``: sha256 over ``config.json`` and the weight files (safetensors), each by name and content.
- ``tokenizer_hash``: the same over the tokenizer files present.
- ``adapter_checksum``: sha256 over the adapter weights and the behaviour-relevant part of
  ``adapter_config.json`` (without the path of the base it was trained from, which differs between machines).

Per-file hashes can be cached by (path, size, mtime) so that a 15 GB base is not hashed twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import attrs

from .errors import InvalidInput

_CHUNK = 8 * 1024 * 1024

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: Keys of adapter_config.json that say where or when the adapter was made, not what it computes.
_VOLATILE_ADAPTER_KEYS = frozenset({"base_model_name_or_path", "revision", "inference_mode"})
#: Keys whose list values are sets: their order carries no meaning.
_SET_VALUED_ADAPTER_KEYS = ("target_modules", "modules_to_save")


class HashCache(Protocol):
    def get(self, path: str, size: int, mtime_ns: int) -> str | None: ...

    def put(self, path: str, size: int, mtime_ns: int, sha256: str) -> None: ...


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path, cache: HashCache | None = None) -> str:
    """sha256 of one file, through ``cache`` keyed by absolute path, size and mtime when given."""
    if cache is None:
        return sha256_file(path)
    stat = path.stat()
    key = str(path.resolve())
    cached = cache.get(key, stat.st_size, stat.st_mtime_ns)
    if cached is not None:
        return cached
    digest = sha256_file(path)
    cache.put(key, stat.st_size, stat.st_mtime_ns, digest)
    return digest


def combine(entries: Iterable[tuple[str, str]]) -> str:
    """One sha256 over (relative name, file sha256) pairs, order-independent."""
    digest = hashlib.sha256()
    for name, sha in sorted(entries):
        digest.update(name.encode("utf-8") + b"\0" + sha.encode("ascii") + b"\n")
    return digest.hexdigest()


def read_model_config(path: Path) -> dict:
    """The ``config.json`` of a Hugging Face model folder, or a clear error saying why it is not one."""
    if not path.exists():
        raise InvalidInput(f"{path}: no such folder; give the folder of a Hugging Face model")
    if not path.is_dir():
        raise InvalidInput(f"{path}: not a folder; give the folder of a Hugging Face model")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InvalidInput(
            f"{path}: not a model folder (no config.json); give the folder of a Hugging Face model"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{config_path}: unreadable model config ({exc})") from exc
    if not isinstance(config, dict) or not (config.get("model_type") or config.get("architectures")):
        raise InvalidInput(f"{config_path}: not a transformers model config (no model_type or architectures)")
    return config


def base_weight_files(path: Path) -> list[Path]:
    weights = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weights.append(index)
    if not weights:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise InvalidInput(
                f"{path}: weights are pickles (*.bin/*.pt); clara reads safetensors only. Convert them, "
                "e.g. model.save_pretrained(dir, safe_serialization=True)"
            )
        raise InvalidInput(f"{path}: no weight files (*.safetensors) next to config.json")
    return weights


def base_model_hash(path: Path, cache: HashCache | None = None) -> str:
    read_model_config(path)
    files = [path / "config.json", *base_weight_files(path)]
    return combine((f.name, file_sha256(f, cache)) for f in files)


def tokenizer_hash(path: Path, cache: HashCache | None = None) -> str | None:
    files = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not files:
        return None
    return combine((f.name, file_sha256(f, cache)) for f in files)


def read_adapter_config(path: Path) -> dict:
    """``adapter_config.json`` of a PEFT adapter folder, or a clear error saying why it is not one."""
    _check_adapter_folder(path)
    config_path = path / ADAPTER_CONFIG
    try:
        raw = config_path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{config_path}: unreadable adapter config ({exc})") from exc
    config = _parse_adapter_config(config_path, raw)
    _check_adapter_weights(path)
    return config


def _check_adapter_folder(path: Path) -> None:
    if not path.is_dir():
        raise InvalidInput(f"{path}: no such folder; give a PEFT adapter folder")
    if not (path / ADAPTER_CONFIG).is_file():
        raise InvalidInput(f"{path}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")


def _parse_adapter_config(config_path: Path, raw: bytes) -> dict:
    try:
        config = json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        raise InvalidInput(f"{config_path}: unreadable adapter config ({exc})") from exc
    if not isinstance(config, dict) or "peft_type" not in config:
        raise InvalidInput(f"{config_path}: not a PEFT adapter config (no peft_type)")
    return config


def _check_adapter_weights(path: Path) -> None:
    if not (path / ADAPTER_WEIGHTS).is_file():
        if (path / "adapter_model.bin").is_file():
            raise InvalidInput(
                f"{path}: adapter weights are a pickle (adapter_model.bin); clara reads safetensors only. "
                "Re-save with save_pretrained(dir, safe_serialization=True)"
            )
        raise InvalidInput(f"{path}: not a PEFT adapter folder (no {ADAPTER_WEIGHTS})")


def _config_sha256(config: dict) -> str:
    """sha256 of the behaviour-relevant part of an adapter config, in a canonical form."""
    stable = {k: v for k, v in config.items() if k not in _VOLATILE_ADAPTER_KEYS}
    for key in _SET_VALUED_ADAPTER_KEYS:  # PEFT writes these sets in an order that varies between processes
        if isinstance(stable.get(key), list):
            stable[key] = sorted(stable[key], key=str)
    canonical = json.dumps(stable, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return sha256_bytes(canonical.encode("utf-8"))


def _adapter_checksum(weights_sha256: str, config: dict) -> str:
    return combine([(ADAPTER_WEIGHTS, weights_sha256), (ADAPTER_CONFIG, _config_sha256(config))])


def adapter_checksum(path: Path) -> str:
    config = read_adapter_config(path)
    return _adapter_checksum(sha256_file(path / ADAPTER_WEIGHTS), config)


@attrs.frozen
class AdapterFiles:
    """An adapter's config and weights as read once, with the checksum of exactly these bytes.

    Whoever loads an adapter from this object loads what was hashed: a file swapped on disk after the read can
    neither pass the check nor be served under the checked id.
    """

    config: dict
    weights: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")
    checksum: str


def read_adapter_files(path: Path) -> AdapterFiles:
    """Read ``adapter_config.json`` and the weights of the adapter folder ``path`` once each, and hash those
    bytes (the same checksum as :func:`adapter_checksum`)."""
    _check_adapter_folder(path)
    config_path = path / ADAPTER_CONFIG
    try:
        raw = config_path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{config_path}: unreadable adapter config ({exc})") from exc
    config = _parse_adapter_config(config_path, raw)
    _check_adapter_weights(path)
    try:
        with open(path / ADAPTER_WEIGHTS, "rb") as handle:
            weights = handle.read()
    except OSError as exc:
        raise InvalidInput(f"{path / ADAPTER_WEIGHTS}: unreadable adapter weights ({exc})") from exc
    return AdapterFiles(config, weights, _adapter_checksum(sha256_bytes(weights), config))


def folder_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                continue
    return total
