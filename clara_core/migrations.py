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
