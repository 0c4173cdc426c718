"""The adapter registry: one SQLite file (``metadata/registry.db``) that ties every step together.

Bases, adapters (and later composites), lineage, a metrics history and an append-only audit log. Writes take
the database's write lock up front (``BEGIN IMMEDIATE``) and the file runs in WAL mode, so several processes
can register at once: versions are assigned without gaps or clashes and readers are never blocked.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # sqlite_utils is imported when a registry is opened, keeping `clara --help` light
    from sqlite_utils import Database

from . import hashing, registry_db
from .errors import (
    Conflict,
    InvalidInput,
    NotFound,
    RegistryDiskFull,
    RegistryError,
    RegistryLocked,
    RegistryReadOnly,
)
from .records import (
    AdapterDraft,
    AdapterRecord,
    BaseRecord,
    _dumps,
    _loads,
    dataset_ref,
    parse_dataset_ref,
    utcnow,
)
from .registry_db import cannot_write, check_integrity, connect
from .workspace import Workspace, domain_key, make_adapter_id, normalise_domain, validate_adapter_id

__all__ = [
    "AdapterDraft",
    "AdapterRecord",
    "BaseRecord",
    "Registry",
    "dataset_ref",
    "normalise_base_name",
    "parse_dataset_ref",
    "utcnow",
]

_FOLDER_VERSION_RE = re.compile(r"^(?P<method>[a-z0-9_]+)-r(?P<rank>\d+)-v(?P<version>\d+)$")


class Registry:
    """Open with :meth:`open`; every write is one transaction with its audit entry."""

    def __init__(self, db: Database, path: Path) -> None:
        self.db = db
        self.path = path
        self.root = path.parent.parent  # <workspace>/metadata/registry.db

    # -- opening -----------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, create: bool = False) -> Registry:
        """Open (with ``create``: create) the registry at ``path``.

        Storage faults are one-line errors of their own (see :mod:`clara_core.registry_db`): a lock held by
        another process, a damaged or lost (zero-byte) file; a read-only folder or a full disk opens it
        read-only, and only a write then fails, saying why."""
        from sqlite_utils import Database

        conn = connect(Path(path), create=create)
        db = Database(conn, execute_plugins=False)
        registry = cls(db, conn.registry_path)
        try:
            registry._migrate()
        except BaseException:
            conn.close()
            raise
        return registry

    @property
    def read_only_reason(self) -> str | None:
        """Why this registry cannot be written (a read-only folder, a full disk), or None when it can."""
        return getattr(self.db.conn, "read_only_reason", None)

    def require_writable(self) -> None:
        """Fail now, before any file is copied or written, when the registry cannot record the result."""
        reason = self.read_only_reason
        if reason is not None:
            raise cannot_write(self.path, reason)

    def check_integrity(self) -> None:
        """A cheap structural check of the file (``PRAGMA quick_check``): raises when registry.db is damaged."""
        check_integrity(self.db.conn)  # type: ignore[arg-type]

    def _migrate(self) -> None:
        from .migrations import migrations

        known = {m.name for m in migrations._migrations}
        try:
            applied = {m.name for m in migrations.applied(self.db)}
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"{self.path} is not a clara registry ({exc})") from exc
        newer = sorted(applied - known)
        if newer:
            raise RegistryError(
                f"{self.path} was written by a newer clara (schema migrations {', '.join(newer)} are unknown "
                "here); upgrade clara-core to use this registry"
            )
        if len(applied) == len(known):
            return
        other_tables = {t for t in self.db.table_names() if not t.startswith("_sqlite")}
        if not applied and other_tables and "adapters" not in other_tables:
            raise RegistryError(
                f"{self.path} is an SQLite database but not a clara registry (tables: "
                f"{', '.join(sorted(other_tables)[:5])}); move it aside and run 'clara init' again"
            )
        with self.transaction():
            # Pending is re-read under the write lock: another process may have migrated meanwhile.
            migrations.apply(self.db)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction holding the write lock from its start (no lost updates between processes).

        Registry methods called inside it join it, so several changes (a new base and its first adapter)
        commit together or not at all."""
        conn = self.db.conn
        if conn.in_transaction:
            yield
            return
        self.require_writable()
        conn.set_busy_timeout(registry_db.WRITE_TIMEOUT_S)  # type: ignore[attr-defined]
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                # the first error is the one to report; SQLite rolls back on its own when the connection closes
                with suppress(sqlite3.Error, RegistryError):
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")
        finally:
            conn.set_busy_timeout(registry_db.READ_TIMEOUT_S)  # type: ignore[attr-defined]

    def audit(self, action: str, subject: str, details: dict[str, Any] | None = None) -> None:
        try:
            actor = getpass.getuser()
        except Exception:  # no user name in some containers
            actor = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
        self.db.table("audit_log").insert(
            {
                "ts": utcnow(),
                "action": action,
                "subject": subject,
                "actor": actor,
                "pid": os.getpid(),
                "details": _dumps(details or {}),
            }
        )

    def audit_entries(self, subject: str | None = None) -> list[dict[str, Any]]:
        where, args = ("subject = ?", [subject]) if subject else (None, [])
        rows = self.db["audit_log"].rows_where(where, args, order_by="id")
        return [{**row, "details": _loads(row["details"], {})} for row in rows]

    # -- the per-file hash cache -------------------------------------------------------------------------------

    def get(self, path: str, size: int, mtime_ns: int) -> str | None:
        row = self.db.execute(
            "SELECT sha256 FROM file_hashes WHERE path = ? AND size = ? AND mtime_ns = ?",
            [path, size, mtime_ns],
        ).fetchone()
        return row[0] if row else None

    def put(self, path: str, size: int, mtime_ns: int, sha256: str) -> None:
        """Best effort: the cache only saves time, so a read-only or full registry (or a lock) skips it."""
        if self.read_only_reason is not None:
            return
        try:
            with self.transaction():
                self.db.table("file_hashes").upsert(
                    {"path": path, "size": size, "mtime_ns": mtime_ns, "sha256": sha256}, pk="path"
                )
        except (RegistryLocked, RegistryReadOnly, RegistryDiskFull):
            pass

    # -- bases -------------------------------------------------------------------------------------------------

    def add_base(
        self, path: Path, *, name: str | None = None, workspace: Workspace | None = None
    ) -> BaseRecord:
        path = Path(path).resolve()
        config = hashing.read_model_config(path)
        base_hash = hashing.base_model_hash(path, cache=self)
        tok_hash = hashing.tokenizer_hash(path, cache=self)
        base_name = normalise_base_name(name or path.name)
        architectures = config.get("architectures") or []
        row = {
            "name": base_name,
            "path": workspace.relative(path) if workspace else str(path),
            "base_model_hash": base_hash,
            "tokenizer_hash": tok_hash,
            "architecture": architectures[0] if architectures else None,
            "model_type": config.get("model_type"),
            "config": _dumps(config),
            "size_bytes": hashing.folder_size(path),
            "created": utcnow(),
        }
        with self.transaction():
            existing = self.db.execute(
                "SELECT name FROM bases WHERE base_model_hash = ?", [base_hash]
            ).fetchone()
            if existing:
                raise Conflict(
                    f"{path}: this base is already registered as '{existing[0]}' (same base_model_hash "
                    f"{base_hash[:12]}); use that name"
                )
            if self.db.execute("SELECT 1 FROM bases WHERE name = ?", [base_name]).fetchone():
                raise Conflict(
                    f"a different base is already registered as '{base_name}'; choose another --name"
                )
            self.db.table("bases").insert(row)
            self.audit("base.add", base_name, {"path": row["path"], "base_model_hash": base_hash})
        return self.get_base(base_name)

    def list_bases(self) -> list[BaseRecord]:
        return [BaseRecord.from_row(r, self.root) for r in self.db["bases"].rows_where(order_by="name")]

    def get_base(self, name_or_hash: str) -> BaseRecord:
        rows = list(
            self.db["bases"].rows_where("name = ? OR base_model_hash = ?", [name_or_hash, name_or_hash])
        )
        if not rows:
            known = ", ".join(b.name for b in self.list_bases()) or "none"
            raise NotFound(
                f"base '{name_or_hash}' is not registered (registered: {known}); add it with 'clara base add PATH'"
            )
        return BaseRecord.from_row(rows[0], self.root)

    def choose_base(self, name: str | None = None) -> BaseRecord:
        """The base named ``name``, or the workspace's only base when no name is given."""
        if name:
            return self.get_base(name)
        bases = self.list_bases()
        if not bases:
            raise NotFound("no base model is registered; add one with 'clara base add PATH'")
        if len(bases) > 1:
            names = ", ".join(b.name for b in bases)
            raise InvalidInput(f"several bases are registered ({names}); choose one with --base NAME")
        return bases[0]

    def find_base(self, base_model_hash: str) -> BaseRecord | None:
        rows = list(self.db["bases"].rows_where("base_model_hash = ?", [base_model_hash]))
        return BaseRecord.from_row(rows[0], self.root) if rows else None

    def base_for_path(self, path: Path) -> BaseRecord | None:
        """The base registered at ``path`` (the same folder), if any."""
        resolved = Path(path).resolve()
        for base in self.list_bases():
            if base.path.resolve() == resolved:
                return base
        return None

    # -- adapters ----------------------------------------------------------------------------------------------

    def _next_version(self, key: str, method: str, rank: int) -> int:
        row = self.db.execute(
            "SELECT MAX(version) FROM adapters WHERE domain_key = ? AND method = ? AND rank = ?",
            [key, method, rank],
        ).fetchone()
        return (row[0] or 0) + 1

    def next_version(self, domains: Sequence[str], method: str, rank: int) -> int:
        """The version the next adapter of this domain, method and rank would get (informational)."""
        return self._next_version(domain_key([normalise_domain(d) for d in domains]), method, rank)

    def register_adapter(
        self,
        draft: AdapterDraft,
        source: Path,
        workspace: Workspace,
        *,
        place: str = "move",
        target: Path | None = None,
    ) -> AdapterRecord:
        """Give ``draft`` an id and a version, put its folder in place and record it, all or nothing.

        ``place``: ``move`` renames ``source`` (a finished folder in the workspace's staging area) into the
        convention's location (or ``target``); ``copy`` copies it there first; ``in_place`` records ``source``
        where it lies. The version is the next free one for (domain, method, rank), or the one in ``target``'s
        folder name (``lora-r16-v3``).
        """
        if place not in ("move", "copy", "in_place"):
            raise ValueError(f"place must be move, copy or in_place, not {place!r}")
        domains = [normalise_domain(d) for d in draft.domain]
        if not domains:
            raise InvalidInput("an adapter needs at least one domain (--domain)")
        method = draft.method.strip().lower()
        if draft.rank < 1:
            raise InvalidInput(f"rank must be at least 1, got {draft.rank}")
        key = domain_key(domains)
        requested_version = _version_from_folder(target, method, draft.rank) if target is not None else None
        staged: Path | None = None
        staging = ExitStack()  # the copy's staging folder: removed (and its owner marker released) at the end
        if place == "copy":
            self.require_writable()  # before copying gigabytes that could not be recorded
            staged = staging.enter_context(workspace.staged_copy(source))
        try:
            with self.transaction():
                version = requested_version or self._next_version(key, method, draft.rank)
                adapter_id = make_adapter_id(domains, method, draft.rank, version)
                if self.db.execute("SELECT 1 FROM adapters WHERE id = ?", [adapter_id]).fetchone():
                    raise Conflict(
                        f"adapter '{adapter_id}' is already registered; choose another version or folder"
                    )
                if place == "in_place":
                    final = Path(source).resolve()
                    if self.db.execute(
                        "SELECT id FROM adapters WHERE path = ?", [workspace.relative(final)]
                    ).fetchone():
                        raise Conflict(f"{final} is already registered")
                else:
                    final = (
                        Path(target).resolve()
                        if target is not None
                        else workspace.adapter_dir(domains, method, draft.rank, version)
                    )
                    if target is None:
                        while (
                            final.exists()
                        ):  # an unregistered folder already sits there: take the next version
                            version += 1
                            adapter_id = make_adapter_id(domains, method, draft.rank, version)
                            final = workspace.adapter_dir(domains, method, draft.rank, version)
                    elif final.exists():
                        raise Conflict(f"{final} already exists; clara never overwrites an adapter folder")
                    if self.db.execute(
                        "SELECT id FROM adapters WHERE path = ?", [workspace.relative(final)]
                    ).fetchone():
                        raise Conflict(f"{final} is already registered")
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.rename(staged if staged is not None else source, final)
                try:
                    row = self._adapter_row(
                        draft, adapter_id, domains, key, method, version, workspace.relative(final)
                    )
                    self.db.table("adapters").insert(row)
                    self.audit(
                        "adapter.register",
                        adapter_id,
                        {"path": row["path"], "adapter_checksum": draft.adapter_checksum, "kind": draft.kind},
                    )
                except BaseException:
                    if place != "in_place" and final.exists():
                        os.rename(final, staged if staged is not None else source)
                    raise
        finally:
            staging.close()
        return self.get_adapter(adapter_id)

    @staticmethod
    def _adapter_row(
        draft: AdapterDraft,
        adapter_id: str,
        domains: list[str],
        key: str,
        method: str,
        version: int,
        path: str,
    ) -> dict[str, Any]:
        return {
            "id": adapter_id,
            "kind": draft.kind,
            "domain": _dumps(domains),
            "domain_key": key,
            "method": method,
            "rank": draft.rank,
            "alpha": draft.alpha,
            "use_rslora": int(bool(draft.use_rslora)),
            "target_modules": _dumps(sorted(draft.target_modules)),
            "base_model_hash": draft.base_model_hash,
            "tokenizer_hash": draft.tokenizer_hash,
            "created": draft.created,
            "metrics": _dumps(draft.metrics),
            "dataset_ref": draft.dataset_ref,
            "adapter_checksum": draft.adapter_checksum,
            "license": draft.license,
            "path": path,
            "status": "ready",
            "version": version,
            "peft_config": _dumps(draft.peft_config),
            "training_config": _dumps(draft.training_config),
            "seed": draft.seed,
            "library_versions": _dumps(draft.library_versions),
            "size_bytes": draft.size_bytes,
        }

    def list_adapters(
        self, *, domain: str | None = None, method: str | None = None, kind: str | None = None
    ) -> list[AdapterRecord]:
        clauses, args = [], []
        if domain:
            clauses.append("EXISTS (SELECT 1 FROM json_each(adapters.domain) WHERE json_each.value = ?)")
            args.append(normalise_domain(domain))
        if method:
            clauses.append("method = ?")
            args.append(method.strip().lower())
        if kind:
            clauses.append("kind = ?")
            args.append(kind)
        where = " AND ".join(clauses) or None
        rows = self.db["adapters"].rows_where(where, args, order_by="domain_key, method, rank, version")
        return [AdapterRecord.from_row(r, self.root) for r in rows]

    def get_adapter(self, adapter_id: str) -> AdapterRecord:
        validate_adapter_id(adapter_id)
        rows = list(self.db["adapters"].rows_where("id = ?", [adapter_id]))
        if not rows:
            raise NotFound(f"adapter '{adapter_id}' is not registered; see 'clara adapters list'")
        return AdapterRecord.from_row(rows[0], self.root)

    def has_adapter(self, adapter_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM adapters WHERE id = ?", [adapter_id]).fetchone() is not None

    def find_by_checksum(self, adapter_checksum: str, base_model_hash: str) -> AdapterRecord | None:
        rows = list(
            self.db["adapters"].rows_where(
                "adapter_checksum = ? AND base_model_hash = ?", [adapter_checksum, base_model_hash], limit=1
            )
        )
        return AdapterRecord.from_row(rows[0], self.root) if rows else None

    def dependents(self, adapter_id: str) -> list[str]:
        rows = self.db.execute(
            "SELECT DISTINCT composite_id FROM lineage WHERE component_id = ?", [adapter_id]
        )
        return [r[0] for r in rows.fetchall()]

    def remove_adapter(
        self, adapter_id: str, workspace: Workspace, *, delete_files: bool = True
    ) -> AdapterRecord:
        record = self.get_adapter(adapter_id)
        users = self.dependents(adapter_id)
        if users:
            raise Conflict(
                f"adapter '{adapter_id}' is a component of {', '.join(users)}; remove those composites first"
            )
        trash: Path | None = None
        with self.transaction():
            self.db.execute("DELETE FROM adapters WHERE id = ?", [adapter_id])
            self.db.execute("DELETE FROM lineage WHERE composite_id = ?", [adapter_id])
            self.audit(
                "adapter.remove", adapter_id, {"path": record.stored_path, "deleted_files": delete_files}
            )
            if delete_files and workspace.contains(record.path) and record.path.exists():
                # Moved aside inside the transaction; deleted only once the row is gone for good.
                workspace.tmp_dir.mkdir(parents=True, exist_ok=True)
                trash = workspace.tmp_dir / f"removed-{adapter_id}-{os.getpid()}"
                os.rename(record.path, trash)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return record

    def set_status(self, adapter_id: str, status: str) -> None:
        with self.transaction():
            self.db.execute("UPDATE adapters SET status = ? WHERE id = ?", [status, adapter_id])
            self.audit("adapter.status", adapter_id, {"status": status})

    # -- lineage and metrics -----------------------------------------------------------------------------------

    def add_lineage(
        self,
        composite_id: str,
        components: Sequence[tuple[str, float | None]],
        strategy: str,
        options: dict[str, Any] | None = None,
    ) -> None:
        with self.transaction():
            for position, (component_id, weight) in enumerate(components):
                component = self.get_adapter(component_id)
                self.db.table("lineage").insert(
                    {
                        "composite_id": composite_id,
                        "component_id": component_id,
                        "position": position,
                        "weight": weight,
                        "strategy": strategy,
                        "options": _dumps(options or {}),
                        "component_checksum": component.adapter_checksum,
                    }
                )
            self.audit(
                "lineage.add", composite_id, {"components": [c for c, _ in components], "strategy": strategy}
            )

    def lineage(self, composite_id: str) -> list[dict[str, Any]]:
        rows = self.db["lineage"].rows_where("composite_id = ?", [composite_id], order_by="position")
        return [{**r, "options": _loads(r["options"], {})} for r in rows]

    def add_metrics(
        self,
        adapter_id: str,
        metrics: dict[str, float],
        *,
        eval_set: str | None = None,
        eval_set_sha256: str | None = None,
        run_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Append to the metrics history (with the checksum measured) and update the latest values."""
        now = utcnow()
        with self.transaction():
            record = self.get_adapter(adapter_id)
            for name, value in metrics.items():
                self.db.table("metrics_history").insert(
                    {
                        "adapter_id": adapter_id,
                        "adapter_checksum": record.adapter_checksum,
                        "name": name,
                        "value": float(value),
                        "eval_set": eval_set,
                        "eval_set_sha256": eval_set_sha256,
                        "run_id": run_id,
                        "details": _dumps(details or {}),
                        "created": now,
                    }
                )
            latest = {**record.metrics, **{k: float(v) for k, v in metrics.items()}}
            self.db.execute("UPDATE adapters SET metrics = ? WHERE id = ?", [_dumps(latest), adapter_id])
            self.audit("metrics.add", adapter_id, {"metrics": dict(metrics), "eval_set": eval_set})

    def metrics_history(self, adapter_id: str) -> list[dict[str, Any]]:
        rows = self.db["metrics_history"].rows_where("adapter_id = ?", [adapter_id], order_by="id")
        return [{**r, "details": _loads(r["details"], {})} for r in rows]


def normalise_base_name(value: str) -> str:
    name = value.strip().lower().replace(" ", "_")
    if not re.match(r"^[a-z0-9][a-z0-9._-]*$", name) or ".." in name:
        raise InvalidInput(f"invalid base name {value!r}: use a-z, 0-9, '.', '_' and '-' (like leo_base)")
    return name


def _version_from_folder(target: Path | None, method: str, rank: int) -> int | None:
    if target is None:
        return None
    match = _FOLDER_VERSION_RE.match(Path(target).name)
    if match and match["method"] == method and int(match["rank"]) == rank:
        return int(match["version"])
    return None
