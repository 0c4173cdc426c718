"""The registry as JSON: ``clara adapters export-json`` writes the plan's ``adapter_registry.json`` and
``import-json`` restores it, all or nothing (they round-trip)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .errors import Conflict, InvalidInput
from .records import _dumps, utcnow
from .registry import Registry
from .workspace import Workspace, domain_key, normalise_domain, validate_adapter_id

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
    """Restore entries written by :meth:`export_document`; all or nothing. Returns added/unchanged ids."""
    entries = document.get("adapters") if isinstance(document, dict) else document
    if not isinstance(entries, list):
        raise InvalidInput(f"{source}: expected a list of adapter entries or an object with 'adapters'")
    bases = document.get("bases", []) if isinstance(document, dict) else []
    parsed = [_entry_to_row(entry, index, source) for index, entry in enumerate(entries)]
    added: list[str] = []
    unchanged: list[str] = []
    with registry.transaction():
        for base in bases if isinstance(bases, list) else []:
            if not isinstance(base, dict) or not {"name", "path", "base_model_hash"} <= set(base):
                raise InvalidInput(f"{source}: a base entry needs name, path and base_model_hash")
            if (
                registry.find_base(base["base_model_hash"]) is None
                and not registry.db.execute("SELECT 1 FROM bases WHERE name = ?", [base["name"]]).fetchone()
            ):
                registry.db.table("bases").insert(
                    {
                        "name": base["name"],
                        "path": workspace.relative(Path(base["path"])),
                        "base_model_hash": base["base_model_hash"],
                        "tokenizer_hash": base.get("tokenizer_hash"),
                        "architecture": base.get("architecture"),
                        "model_type": base.get("model_type"),
                        "config": _dumps({}),
                        "size_bytes": base.get("size_bytes") or 0,
                        "created": base.get("created") or utcnow(),
                    }
                )
        for row, lineage in parsed:
            existing = list(registry.db["adapters"].rows_where("id = ?", [row["id"]]))
            if existing:
                if existing[0]["adapter_checksum"] != row["adapter_checksum"]:
                    raise Conflict(
                        f"{source}: adapter '{row['id']}' is registered here with a different checksum "
                        f"({str(existing[0]['adapter_checksum'])[:12]} vs {str(row['adapter_checksum'])[:12]}); "
                        "nothing was imported"
                    )
                unchanged.append(row["id"])
                continue
            clash = registry.db.execute(
                "SELECT id FROM adapters WHERE domain_key = ? AND method = ? AND rank = ? AND version = ?",
                [row["domain_key"], row["method"], row["rank"], row["version"]],
            ).fetchone()
            if clash:
                raise Conflict(
                    f"{source}: '{row['id']}' would take version {row['version']} already used by '{clash[0]}'; "
                    "nothing was imported"
                )
            row["status"] = "ready" if workspace.resolve(row["path"]).exists() else "missing"
            registry.db.table("adapters").insert(row)
            for position, item in enumerate(lineage):
                registry.db.table("lineage").insert(
                    {
                        "composite_id": row["id"],
                        "component_id": item["component_id"],
                        "position": position,
                        "weight": item.get("weight"),
                        "strategy": item.get("strategy") or "",
                        "options": _dumps(item.get("options") or {}),
                        "component_checksum": item.get("component_checksum"),
                    }
                )
            added.append(row["id"])
        registry.audit("registry.import", source, {"added": added, "unchanged": unchanged})
    return {"added": added, "unchanged": unchanged}


_REQUIRED_ENTRY_KEYS = ("id", "domain", "method", "rank", "base_model_hash", "created")


def _entry_to_row(entry: Any, index: int, source: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    where = f"{source}: entry {index + 1}"
    if not isinstance(entry, dict):
        raise InvalidInput(f"{where}: expected an object")
    missing = [k for k in _REQUIRED_ENTRY_KEYS if entry.get(k) in (None, "")]
    if missing:
        raise InvalidInput(f"{where}: missing {', '.join(missing)}")
    adapter_id = str(entry["id"])
    try:
        validate_adapter_id(adapter_id)
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc}") from exc
    domains = entry["domain"] if isinstance(entry["domain"], list) else [entry["domain"]]
    domains = [normalise_domain(str(d)) for d in domains]
    if not isinstance(entry["rank"], int) or entry["rank"] < 1:
        raise InvalidInput(f"{where}: rank must be a positive integer")
    version = entry.get("version")
    if not isinstance(version, int):
        match = re.search(r"-v(\d+)$", adapter_id)
        version = int(match.group(1)) if match else 1
    stored_path = (
        entry.get("path")
        or f"models/adapters/{domain_key(domains)}/{entry['method']}-r{entry['rank']}-v{version}"
    )
    stored_path = str(stored_path)
    if ".." in Path(stored_path).parts:
        raise InvalidInput(f"{where}: path {stored_path!r} must not contain '..'")
    lineage = entry.get("lineage") or []
    if not isinstance(lineage, list):
        raise InvalidInput(f"{where}: lineage must be a list")
    row = {
        "id": adapter_id,
        "kind": entry.get("kind") or "adapter",
        "domain": _dumps(domains),
        "domain_key": domain_key(domains),
        "method": str(entry["method"]),
        "rank": entry["rank"],
        "alpha": entry.get("alpha"),
        "use_rslora": int(bool(entry.get("use_rslora"))),
        "target_modules": _dumps(entry.get("target_modules") or []),
        "base_model_hash": entry["base_model_hash"],
        "tokenizer_hash": entry.get("tokenizer_hash"),
        "created": entry["created"],
        "metrics": _dumps(entry.get("metrics") or {}),
        "dataset_ref": entry.get("dataset_ref"),
        "adapter_checksum": entry.get("adapter_checksum"),
        "license": entry.get("license"),
        "path": stored_path,
        "status": entry.get("status") or "ready",
        "version": version,
        "peft_config": _dumps(entry.get("peft_config") or {}),
        "training_config": _dumps(entry.get("training_config") or {}),
        "seed": entry.get("seed"),
        "library_versions": _dumps(entry.get("library_versions") or {}),
        "size_bytes": entry.get("size_bytes") or 0,
    }
    return row, lineage
