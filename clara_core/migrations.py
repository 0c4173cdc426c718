"""Schema of the registry, as sqlite-utils migrations applied in order, each in its own transaction.

Add a migration as a new ``mNNN_...`` function at the end; never edit one that has shipped. A plugin that needs
tables of its own keeps its own ``Migrations("clara-plugin-...")`` set.
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("clara")


@migrations()
def m001_initial(db: Database) -> None:
    db.table("bases").create(
        {
            "name": str,
            "path": str,
            "base_model_hash": str,
            "tokenizer_hash": str,
            "architecture": str,
            "model_type": str,
            "config": str,  # JSON: the model's config.json
            "size_bytes": int,
            "created": str,
        },
        pk="name",
        not_null={"path", "base_model_hash", "created"},
    )
    db.table("bases").create_index(["base_model_hash"], unique=True)

    db.table("adapters").create(
        {
            "id": str,
            "kind": str,  # adapter | composite | merged
            "domain": str,  # JSON list
            "domain_key": str,
            "method": str,
            "rank": int,
            "alpha": float,
            "use_rslora": int,
            "target_modules": str,  # JSON list
            "base_model_hash": str,
            "tokenizer_hash": str,
            "created": str,
            "metrics": str,  # JSON object: the latest value of each metric
            "dataset_ref": str,
            "adapter_checksum": str,
            "license": str,
            "path": str,
            "status": str,  # ready | missing
            "version": int,
            "peft_config": str,  # JSON
            "training_config": str,  # JSON
            "seed": int,
            "library_versions": str,  # JSON
            "size_bytes": int,
        },
        pk="id",
        not_null={
            "kind",
            "domain",
            "method",
            "rank",
            "base_model_hash",
            "created",
            "path",
            "status",
            "version",
        },
        defaults={"kind": "adapter", "status": "ready", "metrics": "{}", "use_rslora": 0},
    )
    db.table("adapters").create_index(["domain_key", "method", "rank", "version"], unique=True)
    db.table("adapters").create_index(["base_model_hash"])

    db.table("lineage").create(
        {
            "id": int,
            "composite_id": str,
            "component_id": str,
            "position": int,
            "weight": float,
            "strategy": str,
            "options": str,  # JSON
            "component_checksum": str,
        },
        pk="id",
        not_null={"composite_id", "component_id", "position", "strategy"},
    )
    db.table("lineage").create_index(["composite_id", "position"], unique=True)
    db.table("lineage").create_index(["component_id"])

    db.table("metrics_history").create(
        {
            "id": int,
            "adapter_id": str,
            "adapter_checksum": str,
            "name": str,
            "value": float,
            "eval_set": str,
            "eval_set_sha256": str,
            "run_id": str,
            "details": str,  # JSON
            "created": str,
        },
        pk="id",
        not_null={"adapter_id", "name", "created"},
    )
    db.table("metrics_history").create_index(["adapter_id", "name"])

    db.table("audit_log").create(
        {
            "id": int,
            "ts": str,
            "action": str,
            "subject": str,
            "actor": str,
            "pid": int,
            "details": str,  # JSON
        },
        pk="id",
        not_null={"ts", "action"},
    )
    # Append-only: the database itself refuses to change or delete audit entries.
    db.execute(
        "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
        "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"
    )
    db.execute(
        "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
        "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"
    )

    db.table("file_hashes").create(
        {"path": str, "size": int, "mtime_ns": int, "sha256": str},
        pk="path",
    )


@migrations()
def m002_provenance_and_removed_ids(db: Database) -> None:
    """``adapters.placed_by_clara``: whether clara put the folder in place (only then may ``rm`` delete it);
    ``removed_adapters``: one tombstone per removed id, so that versions keep counting and no id is reused.

    Rows registered before this migration count as placed by clara when their last registration was an
    ``adapter.register`` inside the workspace (not a JSON import); ids removed before it get their tombstone
    from the audit log.
    """
    import json
    import re

    db.table("adapters").add_column("placed_by_clara", int, not_null_default=0)
    db.execute(
        """
        UPDATE adapters SET placed_by_clara = 1
        WHERE path NOT LIKE '/%'
          AND COALESCE((SELECT MAX(id) FROM audit_log
                        WHERE action = 'adapter.register' AND subject = adapters.id), 0)
            > COALESCE((SELECT MAX(a.id) FROM audit_log a, json_each(a.details, '$.added') j
                        WHERE a.action = 'registry.import' AND json_valid(a.details) AND j.value = adapters.id), 0)
        """
    )
    db.table("removed_adapters").create(
        {
            "id": str,
            "domain_key": str,
            "method": str,
            "rank": int,
            "version": int,
            "adapter_checksum": str,
            "removed": str,
        },
        pk="id",
        not_null={"domain_key", "method", "rank", "version", "removed"},
    )
    db.table("removed_adapters").create_index(["domain_key", "method", "rank", "version"])

    id_parts = re.compile(r"^([a-z0-9][a-z0-9_.]*)-([a-z0-9][a-z0-9_]*)-r(\d+)-v(\d+)$")
    registered = {row[0] for row in db.execute("SELECT id FROM adapters").fetchall()}
    checksums: dict[str, str | None] = {}
    for _, ts, action, subject, details in db.execute(
        "SELECT id, ts, action, subject, details FROM audit_log "
        "WHERE action IN ('adapter.register', 'adapter.remove') ORDER BY id"
    ).fetchall():
        try:
            detail = json.loads(details or "{}")
        except ValueError:
            detail = {}
        if action == "adapter.register":
            checksums[subject] = detail.get("adapter_checksum") if isinstance(detail, dict) else None
            continue
        match = id_parts.match(subject or "")
        if match is None or subject in registered:
            continue
        db.table("removed_adapters").upsert(
            {
                "id": subject,
                "domain_key": match[1],
                "method": match[2],
                "rank": int(match[3]),
                "version": int(match[4]),
                "adapter_checksum": checksums.get(subject),
                "removed": ts,
            },
            pk="id",
        )


@migrations()
def m003_exports(db: Database) -> None:
    """``exports``: one row per finished export (``clara export NAME ID``): where it lies, every file with its
    sha256, the exporter's options and details (verification numbers), and the checksums of its sources."""
    db.table("exports").create(
        {
            "name": str,
            "exporter": str,
            "adapter_id": str,
            "adapter_checksum": str,
            "base_model_hash": str,
            "path": str,
            "files": str,  # JSON list of {"path", "sha256", "size_bytes"}, paths relative to the export folder
            "options": str,  # JSON
            "details": str,  # JSON
            "message": str,
            "created": str,
        },
        pk="name",
        not_null={"exporter", "adapter_id", "path", "files", "created"},
    )
    db.table("exports").create_index(["adapter_id"])
