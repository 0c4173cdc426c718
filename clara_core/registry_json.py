"""The registry as JSON: ``clara adapters export-json`` writes the plan's ``adapter_registry.json`` and
``import-json`` restores it, all or nothing (they round-trip)."""

from __future__ import annotations

from contextlib import suppress
from typing import Any

from .errors import ClaraError, InvalidInput
from .naming import parse_adapter_id, validate_adapter_id
from .records import ADAPTER_COLUMN_NAMES, ADAPTER_COLUMNS, utcnow
from .registry import Registry
from .workspace import Workspace

EXPORT_SCHEMA = "clara.adapter_registry/1"


def export_document(registry: Registry) -> dict[str, Any]:
    """The registry as the plan's adapter_registry.json: its entry keys first, in its order, then what clara
    needs to restore the registry (``import_document``)."""
    adapters = registry.list_adapters()
    entries = []
    for adapter in adapters:
        entry = adapter.to_entry()
        lineage = registry.lineage(adapter.id)
        if lineage:
            entry["lineage"] = [
                {
                    "component_id": r["component_id"],
                    "weight": r["weight"],
                    "strategy": r["strategy"],
                    "options": r["options"],
                    "component_checksum": r["component_checksum"],
                }
                for r in lineage
            ]
        entries.append(entry)
    return {
        "schema": EXPORT_SCHEMA,
        "comment": (
            "clara adapter registry. Each entry starts with the plan's fields (id, domain, method, rank, "
            "base_model_hash, tokenizer_hash, created, metrics, dataset_ref) and the governance fields "
            "(adapter_checksum, license); the rest is what clara needs to restore the registry with "
            "'clara adapters import-json'."
        ),
        "exported": utcnow(),
        "bases": [b.to_json() for b in registry.list_bases()],
        "adapters": entries,
    }


def import_document(
    registry: Registry, document: Any, source: str, workspace: Workspace
) -> dict[str, list[str]]:
    """Restore entries written by :func:`export_document`, all or nothing, through the registry's own checks
    (names, paths inside the workspace's adapter folders, ids never reused). Returns added/unchanged ids."""
    entries = document.get("adapters") if isinstance(document, dict) else document
    if not isinstance(entries, list):
        raise InvalidInput(f"{source}: expected a list of adapter entries or an object with 'adapters'")
    bases = document.get("bases", []) if isinstance(document, dict) else []
    if not isinstance(bases, list):
        raise InvalidInput(f"{source}: 'bases' must be a list")
    added: list[str] = []
    unchanged: list[str] = []
    try:
        parsed = [_entry_values(entry, index, source) for index, entry in enumerate(entries)]
        with registry.transaction():
            for index, base in enumerate(bases):
                registry.restore_base(base, workspace, where=f"{source}: base {index + 1}")
            for values, lineage, where in parsed:
                if registry.restore_adapter(values, lineage, workspace, where=where):
                    added.append(values["id"])
                else:
                    unchanged.append(values["id"])
            registry.audit("registry.import", source, {"added": added, "unchanged": unchanged})
    except ClaraError as exc:
        raise type(exc)(f"{exc}; nothing was imported") from exc
    return {"added": added, "unchanged": unchanged}


_REQUIRED_ENTRY_KEYS = ("id", "domain", "method", "rank", "base_model_hash", "created")


def _entry_values(entry: Any, index: int, source: str) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """An entry's column values (checked for shape; names and paths are the registry's to check), its lineage,
    and where it is, for messages."""
    where = f"{source}: entry {index + 1}"
    if not isinstance(entry, dict):
        raise InvalidInput(f"{where}: expected an object")
    with suppress(
        InvalidInput, TypeError, KeyError
    ):  # name the entry by its id when that is printable as it is
        where += f" ({validate_adapter_id(entry['id'])})"
    missing = [k for k in _REQUIRED_ENTRY_KEYS if entry.get(k) in (None, "")]
    if missing:
        raise InvalidInput(f"{where}: missing {', '.join(missing)}")
    if not isinstance(entry["rank"], int) or isinstance(entry["rank"], bool) or entry["rank"] < 1:
        raise InvalidInput(f"{where}: rank must be a positive integer")
    version = entry.get("version")
    if version is None:
        parts = parse_adapter_id(str(entry["id"]))
        version = parts[3] if parts else 1
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidInput(f"{where}: version must be a positive integer")
    domains = entry["domain"] if isinstance(entry["domain"], list) else [entry["domain"]]
    lineage = entry.get("lineage") or []
    if not isinstance(lineage, list) or not all(
        isinstance(item, dict) and isinstance(item.get("component_id"), str) for item in lineage
    ):
        raise InvalidInput(f"{where}: lineage must be a list of objects with a component_id")
    for item in lineage:
        try:
            validate_adapter_id(item["component_id"])
        except InvalidInput as exc:
            raise InvalidInput(f"{where}: lineage: {exc}") from exc
    # Provenance is this workspace's own record, never taken from a file.
    values = {k: entry[k] for k in ADAPTER_COLUMN_NAMES if k in entry and k != "placed_by_clara"}
    values.update(
        id=str(entry["id"]),
        domain=domains,
        kind=entry.get("kind") or "adapter",
        version=version,
        path=entry.get("path") or None,
    )
    for column in ADAPTER_COLUMNS:
        value = values.get(column.name)
        if value is not None and not column.accepts(value):
            raise InvalidInput(f"{where}: '{column.name}' must be {column.describe()}, not {value!r:.40}")
    return values, lineage, where
