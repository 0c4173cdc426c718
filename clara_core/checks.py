"""Checks made before an adapter is used: it belongs to the served base and its files are what was registered.

The server, the vLLM resolver and export all call :func:`check_adapter_for_base`; a failure is a
:class:`~clara_core.errors.Conflict` (HTTP 409) naming both hashes, and nothing is loaded. An engine that loads
weights itself calls :func:`read_verified_adapter` and loads from the bytes it returns: the check and the load
then see the same bytes, whatever happens to the files in between.
"""

from __future__ import annotations

from typing import Any

from . import hashing
from .compat import adapter_init, base_changing_init
from .errors import Conflict, InvalidInput
from .hashing import AdapterFiles, HashCache
from .registry import AdapterRecord, BaseRecord


def check_adapter_for_base(adapter: AdapterRecord, base: BaseRecord) -> str:
    """Raise :class:`Conflict` unless ``adapter`` was made for ``base`` and its files match its checksum.

    Returns the checksum computed from the files.
    """
    if adapter.base_model_hash != base.base_model_hash:
        raise Conflict(
            f"adapter '{adapter.id}' was made for base {adapter.base_model_hash[:12]}, "
            f"but the served base '{base.name}' is {base.base_model_hash[:12]}; serve its base or pick another adapter"
        )
    # The files decide (the checksum below covers adapter_config.json); an imported row may lack peft_config.
    init = adapter_init(adapter.path)
    if base_changing_init(init) is not None:
        raise Conflict(
            f"adapter '{adapter.id}' was saved with init_lora_weights {init!r}, which changed the base's weights "
            "while it trained, so it does not fit the unchanged base; train it again with clara (which saves it "
            "converted to a plain LoRA) or convert it with PEFT and register the converted folder"
        )
    try:
        actual = hashing.adapter_checksum(adapter.path)
    except InvalidInput as exc:
        raise Conflict(f"adapter '{adapter.id}' cannot be read from {adapter.path}: {exc}") from exc
    if actual != adapter.adapter_checksum:
        raise Conflict(
            f"adapter '{adapter.id}' files changed since registration: registered checksum "
            f"{(adapter.adapter_checksum or '-')[:12]}, files {actual[:12]}; run 'clara adapters verify {adapter.id}'"
        )
    return actual


def read_verified_adapter(adapter: Any) -> AdapterFiles:
    """Read the files of ``adapter`` (an :class:`AdapterRecord`: ``id``, ``path``, ``adapter_checksum``) once
    and return them; :class:`Conflict` unless those very bytes hash to the registered checksum."""
    expected = getattr(adapter, "adapter_checksum", None)
    if not expected:
        raise Conflict(f"adapter '{adapter.id}' has no registered checksum; register it again to serve it")
    try:
        files = hashing.read_adapter_files(adapter.path)
    except InvalidInput as exc:
        raise Conflict(f"adapter '{adapter.id}' cannot be read from {adapter.path}: {exc}") from exc
    if files.checksum != expected:
        raise Conflict(
            f"adapter '{adapter.id}' files changed since registration: registered checksum "
            f"{expected[:12]}, files {files.checksum[:12]}; run 'clara adapters verify {adapter.id}'"
        )
    return files


def check_base_unchanged(base: BaseRecord, cache: HashCache | None = None) -> None:
    """Raise :class:`Conflict` unless the files of ``base`` still hash to its registered ``base_model_hash``.

    With ``cache`` (the registry's per-file hashes, keyed by path, size and mtime) an unchanged base costs a
    few ``stat`` calls; a changed file is hashed again.
    """
    try:
        actual = hashing.base_model_hash(base.path, cache=cache)
    except InvalidInput as exc:
        raise Conflict(f"base '{base.name}' cannot be read: {exc}") from exc
    if actual != base.base_model_hash:
        raise Conflict(
            f"base '{base.name}' in {base.path} changed since it was registered (registered base_model_hash "
            f"{base.base_model_hash[:12]}, files now {actual[:12]}); its adapters were trained on the registered "
            f"weights. Restore the original files, or register the changed model as a new base: "
            f"clara base add {base.path} --name {base.name}-2"
        )
