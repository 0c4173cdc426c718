"""The adapter registry: one SQLite file (``metadata/registry.db``) that ties every step together.

Bases, adapters (and later composites), lineage, a metrics history and an append-only audit log. Writes take
the database's write lock up front (``BEGIN IMMEDIATE``) and the file runs in WAL mode, so several processes
can register at once: versions are assigned without gaps or clashes and readers are never blocked.
"""

from __future__ import annotations

import difflib
import getpass
import os
import shutil
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:  # sqlite_utils is imported when a registry is opened, keeping `clara --help` light
    from sqlite_utils import Database

    from .workspace import Workspace

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
from .naming import (
    did_you_mean,
    domain_key,
    make_adapter_id,
    normalise_base_name,
    normalise_domain,
    normalise_method,
    parse_adapter_id,
    validate_adapter_id,
    version_from_folder,
)
from .records import (
    BASE_COLUMNS,
    AdapterDraft,
    AdapterRecord,
    BaseRecord,
    _dumps,
    _loads,
    adapter_row,
    base_row,
    dataset_ref,
    parse_dataset_ref,
    utcnow,
)
from .registry_db import cannot_write, check_integrity, connect

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

#: Kept for callers that imported it from here; the rule lives in clara_core.naming.
_version_from_folder = version_from_folder


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
        row = base_row(
            {
                "name": base_name,
                "path": workspace.relative(path) if workspace else str(path),
                "base_model_hash": base_hash,
                "tokenizer_hash": tok_hash,
                "architecture": architectures[0] if architectures else None,
                "model_type": config.get("model_type"),
                "config": config,
                "size_bytes": hashing.folder_size(path),
                "created": utcnow(),
            }
        )
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
            names = [b.name for b in self.list_bases()]
            # A path to a registered base (models/base/leo_base) is most likely meant as its name.
            hint = did_you_mean(Path(name_or_hash).name.lower(), names) if name_or_hash.strip() else ""
            raise NotFound(
                f"base '{name_or_hash}' is not registered (registered: {', '.join(names) or 'none'})"
                f"{hint or ';'} add it with 'clara base add PATH'"
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

    def restore_base(self, entry: dict[str, Any], workspace: Workspace, *, where: str) -> bool:
        """Record a base from an exported registry entry (``import-json``) without hashing its files, which
        may not be on this machine yet. Returns False when it is registered already."""
        if not isinstance(entry, dict) or not {"name", "path", "base_model_hash"} <= set(entry):
            raise InvalidInput(f"{where}: a base entry needs name, path and base_model_hash")
        name = str(entry["name"])
        if normalise_base_name(name) != name:
            raise InvalidInput(
                f"{where}: invalid base name {name!r}: use a-z, 0-9, '.', '_' and '-' (like leo_base)"
            )
        for column in BASE_COLUMNS:
            value = entry.get(column.name)
            if value is not None and not column.accepts(value):
                raise InvalidInput(f"{where}: '{column.name}' must be {column.describe()}, not {value!r:.40}")
        path = _checked_base_path(str(entry["path"]), workspace, where)
        base_hash = str(entry["base_model_hash"])
        with self.transaction():
            if self.find_base(base_hash) is not None:
                return False
            if self.db.execute("SELECT 1 FROM bases WHERE name = ?", [name]).fetchone():
                raise Conflict(
                    f"{where}: base '{name}' is registered here with a different base_model_hash; "
                    "rename it in the file or here"
                )
            values: dict[str, Any] = {
                k: entry.get(k) for k in ("tokenizer_hash", "architecture", "model_type")
            }
            self.db.table("bases").insert(
                base_row(
                    {
                        **values,
                        "name": name,
                        "path": workspace.relative(path),
                        "base_model_hash": base_hash,
                        "size_bytes": entry.get("size_bytes") or 0,
                        "created": entry.get("created") or utcnow(),
                    }
                )
            )
            self.audit("base.restore", name, {"path": workspace.relative(path), "base_model_hash": base_hash})
        return True

    # -- adapters ----------------------------------------------------------------------------------------------

    def _next_version(self, key: str, method: str, rank: int) -> int:
        """One more than any version this (domain, method, rank) ever had: removed ids are never reused."""
        row = self.db.execute(
            "SELECT MAX(version) FROM (SELECT version FROM adapters WHERE domain_key = ? AND method = ? AND rank = ?"
            " UNION ALL SELECT version FROM removed_adapters WHERE domain_key = ? AND method = ? AND rank = ?)",
            [key, method, rank, key, method, rank],
        ).fetchone()
        return (row[0] or 0) + 1

    def refuse_taken_id(self, adapter_id: str) -> None:
        """Raise Conflict when ``adapter_id`` is registered, or was and has been removed (ids are never reused)."""
        if self.has_adapter(adapter_id):
            raise Conflict(f"adapter '{adapter_id}' is already registered; choose another version or folder")
        removed = self.removed(adapter_id)
        if removed is not None:
            raise Conflict(
                f"adapter id '{adapter_id}' belonged to an adapter removed on {removed['removed']}; ids are "
                "never reused, leave the version out for the next free one"
            )

    def _refuse_duplicate(self, checksum: str, base_model_hash: str, what: Path) -> None:
        duplicate = self.find_by_checksum(checksum, base_model_hash)
        if duplicate is not None:
            raise Conflict(f"{what} is already registered as '{duplicate.id}' (same adapter_checksum)")

    def register_adapter(
        self,
        draft: AdapterDraft,
        source: Path,
        workspace: Workspace,
        *,
        place: str = "move",
        target: Path | None = None,
        refuse_duplicate: bool = False,
    ) -> AdapterRecord:
        """Give ``draft`` an id and a version, put its folder in place and record it, all or nothing.

        ``place``: ``move`` renames ``source`` (a finished folder in the workspace's staging area) into the
        convention's location (or ``target``); ``copy`` copies it there first; ``in_place`` records ``source``
        where it lies (and ``adapters rm`` will never delete it). The version is the next one never used for
        (domain, method, rank), or the one in ``target``'s folder name (``lora-r16-v3``).
        ``refuse_duplicate``: refuse an adapter whose checksum is registered for the same base already
        (checked again under the write lock, so concurrent registrations of one folder make one row).
        """
        if place not in ("move", "copy", "in_place"):
            raise ValueError(f"place must be move, copy or in_place, not {place!r}")
        domains = [normalise_domain(d) for d in draft.domain]
        if not domains:
            raise InvalidInput("an adapter needs at least one domain (--domain)")
        method = normalise_method(draft.method)
        if draft.rank < 1:
            raise InvalidInput(f"rank must be at least 1, got {draft.rank}")
        key = domain_key(domains)
        requested_version = version_from_folder(target, method, draft.rank)
        if refuse_duplicate:  # early, before copying anything; again below under the lock
            self._refuse_duplicate(draft.adapter_checksum, draft.base_model_hash, source)
        staged: Path | None = None
        staging = ExitStack()  # the copy's staging folder: removed (and its owner marker released) at the end
        if place == "copy":
            self.require_writable()  # before copying gigabytes that could not be recorded
            staged = staging.enter_context(workspace.staged_copy(source))
        try:
            with self.transaction():
                if refuse_duplicate:
                    self._refuse_duplicate(draft.adapter_checksum, draft.base_model_hash, source)
                version = requested_version or self._next_version(key, method, draft.rank)
                adapter_id = make_adapter_id(domains, method, draft.rank, version)
                self.refuse_taken_id(adapter_id)
                if place == "in_place":
                    final = Path(source).resolve()
                    self._refuse_registered_path(final, workspace)
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
                    self._refuse_registered_path(final, workspace)
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.rename(staged if staged is not None else source, final)
                try:
                    values = {
                        **attrs.asdict(draft, recurse=False),
                        "id": adapter_id,
                        "domain": domains,
                        "domain_key": key,
                        "method": method,
                        "target_modules": sorted(draft.target_modules),
                        "path": workspace.relative(final),
                        "status": "ready",
                        "version": version,
                        "placed_by_clara": place != "in_place",
                    }
                    self.db.table("adapters").insert(adapter_row(values))
                    self.audit(
                        "adapter.register",
                        adapter_id,
                        {
                            "path": values["path"],
                            "adapter_checksum": draft.adapter_checksum,
                            "kind": draft.kind,
                            "place": place,
                        },
                    )
                except BaseException:
                    if place != "in_place" and final.exists():
                        os.rename(final, staged if staged is not None else source)
                    raise
        finally:
            staging.close()
        return self.get_adapter(adapter_id)

    def _refuse_registered_path(self, folder: Path, workspace: Workspace) -> None:
        if self.db.execute("SELECT id FROM adapters WHERE path = ?", [workspace.relative(folder)]).fetchone():
            raise Conflict(f"{folder} is already registered")

    def restore_adapter(
        self,
        values: dict[str, Any],
        lineage: Sequence[dict[str, Any]],
        workspace: Workspace,
        *,
        where: str,
    ) -> bool:
        """Record an adapter from an exported registry entry (``import-json``); False when it is registered
        already with the same checksum.

        The entry's names must follow the same rules as everywhere else, its folder must lie in the workspace's
        adapter folders, and clara never deletes that folder (it did not place it)."""
        domains = [normalise_domain(str(d)) for d in values["domain"]]
        method = normalise_method(str(values["method"]))
        rank, version = values["rank"], values["version"]
        expected = make_adapter_id(domains, method, rank, version)
        if values["id"] != expected:
            raise InvalidInput(
                f"{where}: id '{values['id']}' does not match its domain, method, rank and version "
                f"(that adapter's id is '{expected}')"
            )
        stored = values.get("path") or workspace.relative(
            workspace.adapter_dir(domains, method, rank, version)
        )
        folder = _checked_adapter_path(str(stored), workspace, where)
        with self.transaction():
            existing = self.db.execute(
                "SELECT adapter_checksum FROM adapters WHERE id = ?", [expected]
            ).fetchone()
            if existing is not None:
                if existing[0] != values.get("adapter_checksum"):
                    raise Conflict(
                        f"{where}: adapter '{expected}' is registered here with a different checksum "
                        f"({str(existing[0])[:12]} vs {str(values.get('adapter_checksum'))[:12]})"
                    )
                return False
            removed = self.removed(expected)
            if removed is not None and removed["adapter_checksum"] != values.get("adapter_checksum"):
                raise Conflict(
                    f"{where}: id '{expected}' belonged to another adapter, removed here on {removed['removed']}; "
                    "ids are never reused"
                )
            clash = self.db.execute(
                "SELECT id FROM adapters WHERE domain_key = ? AND method = ? AND rank = ? AND version = ?",
                [domain_key(domains), method, rank, version],
            ).fetchone()
            if clash:
                raise Conflict(
                    f"{where}: '{expected}' would take version {version} already used by '{clash[0]}'"
                )
            self._refuse_registered_path(folder, workspace)
            row = adapter_row(
                {
                    **values,
                    "domain": domains,
                    "domain_key": domain_key(domains),
                    "method": method,
                    "path": workspace.relative(folder),
                    "status": "ready" if folder.exists() else "missing",
                    "placed_by_clara": False,
                }
            )
            self.db.table("adapters").insert(row)
            self._insert_lineage(expected, lineage)
            self.audit(
                "adapter.import",
                expected,
                {"path": row["path"], "adapter_checksum": row["adapter_checksum"], "source": where},
            )
        return True

    def list_adapters(
        self, *, domain: str | None = None, method: str | None = None, kind: str | None = None
    ) -> list[AdapterRecord]:
        clauses, args = [], []
        if domain:
            clauses.append("EXISTS (SELECT 1 FROM json_each(adapters.domain) WHERE json_each.value = ?)")
            args.append(normalise_domain(domain))
        if method:
            clauses.append("method = ?")
            args.append(normalise_method(method))
        if kind:
            clauses.append("kind = ?")
            args.append(kind)
        where = " AND ".join(clauses) or None
        rows = self.db["adapters"].rows_where(where, args, order_by="domain_key, method, rank, version")
        return [AdapterRecord.from_row(r, self.root) for r in rows]

    def adapter_ids(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT id FROM adapters ORDER BY id").fetchall()]

    def get_adapter(self, adapter_id: str) -> AdapterRecord:
        validate_adapter_id(adapter_id)
        rows = list(self.db["adapters"].rows_where("id = ?", [adapter_id]))
        if not rows:
            removed = self.removed(adapter_id)
            if removed is not None:
                raise NotFound(
                    f"adapter '{adapter_id}' is not registered: it was removed on {removed['removed']}; "
                    "see 'clara adapters list'"
                )
            hint = did_you_mean(adapter_id, self._suggestion_candidates(adapter_id))
            raise NotFound(f"adapter '{adapter_id}' is not registered{hint or ';'} see 'clara adapters list'")
        return AdapterRecord.from_row(rows[0], self.root)

    def _suggestion_candidates(self, adapter_id: str, *, small: int = 500) -> list[str]:
        """Ids worth comparing with a mistyped one: all of a small registry; in a large one (a server with
        thousands of adapters answers unknown ids too) only those of the closest domains, narrowed to the
        closest one and then to the same method or rank while too many, so a miss costs milliseconds."""
        total = self.db.execute("SELECT COUNT(*) FROM adapters").fetchone()[0]
        parts = parse_adapter_id(adapter_id)
        if total <= small or parts is None:
            return self.adapter_ids() if total <= small else []
        key, method, rank, _ = parts
        keys = [r[0] for r in self.db.execute("SELECT DISTINCT domain_key FROM adapters").fetchall()]
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        marks = ", ".join("?" for _ in close)
        rows = self.db.execute(
            f"SELECT id, domain_key, method, rank FROM adapters WHERE domain_key IN ({marks})", close
        ).fetchall()
        if len(rows) > small:  # the closest domain only
            rows = [r for r in rows if r[1] == close[0]]
        if len(rows) > small:  # and of those, one typo away in method or rank
            rows = [r for r in rows if r[2] == method or r[3] == rank]
        return [r[0] for r in rows[: small * 2]]

    def has_adapter(self, adapter_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM adapters WHERE id = ?", [adapter_id]).fetchone() is not None

    def removed(self, adapter_id: str) -> dict[str, Any] | None:
        """The tombstone of a removed adapter id (its checksum and when), or None."""
        rows = list(self.db["removed_adapters"].rows_where("id = ?", [adapter_id]))
        return rows[0] if rows else None

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

    def deletable_folder(self, record: AdapterRecord, workspace: Workspace) -> Path | None:
        """The folder ``adapters rm`` may delete with ``record``: only one clara placed there itself, inside the
        workspace, that neither holds nor lies in a base or another adapter, and holds none of the workspace's
        own folders."""
        if not record.placed_by_clara or not record.path.is_dir():
            return None
        folder = record.path.resolve()
        if not workspace.contains(folder) or folder == workspace.root:
            return None
        own = [workspace.metadata_dir, workspace.base_dir, workspace.adapters_dir, workspace.composites_dir]
        if any(f.resolve() == folder or folder in f.resolve().parents for f in own):
            return None
        others = [b.path for b in self.list_bases()]
        others += [a.path for a in self.list_adapters() if a.id != record.id]
        for other in (o.resolve() for o in others):
            if other == folder or folder in other.parents or other in folder.parents:
                return None
        return folder

    def remove_adapter(
        self, adapter_id: str, workspace: Workspace, *, delete_files: bool = True
    ) -> Path | None:
        """Unregister ``adapter_id`` and leave a tombstone (its id is never given out again); delete its folder
        when ``delete_files`` and clara placed it (:meth:`deletable_folder`). Returns the deleted folder."""
        record = self.get_adapter(adapter_id)
        users = self.dependents(adapter_id)
        if users:
            raise Conflict(
                f"adapter '{adapter_id}' is a component of {', '.join(users)}; remove those composites first"
            )
        folder = self.deletable_folder(record, workspace) if delete_files else None
        trash: Path | None = None
        with self.transaction():
            self.db.execute("DELETE FROM adapters WHERE id = ?", [adapter_id])
            self.db.execute("DELETE FROM lineage WHERE composite_id = ?", [adapter_id])
            self.db.table("removed_adapters").upsert(
                {
                    "id": adapter_id,
                    "domain_key": domain_key(record.domain),
                    "method": record.method,
                    "rank": record.rank,
                    "version": record.version,
                    "adapter_checksum": record.adapter_checksum,
                    "removed": utcnow(),
                },
                pk="id",
            )
            self.audit(
                "adapter.remove",
                adapter_id,
                {
                    "path": record.stored_path,
                    "adapter_checksum": record.adapter_checksum,
                    "deleted_files": folder is not None,
                },
            )
            if folder is not None:
                # Moved aside inside the transaction; deleted only once the row is gone for good.
                workspace.tmp_dir.mkdir(parents=True, exist_ok=True)
                trash = workspace.tmp_dir / f"removed-{adapter_id}-{os.getpid()}"
                os.rename(folder, trash)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return folder

    # -- lineage and metrics -----------------------------------------------------------------------------------

    def add_lineage(
        self,
        composite_id: str,
        components: Sequence[tuple[str, float | None]],
        strategy: str,
        options: dict[str, Any] | None = None,
    ) -> None:
        with self.transaction():
            items = [
                {
                    "component_id": component_id,
                    "weight": weight,
                    "strategy": strategy,
                    "options": options or {},
                    "component_checksum": self.get_adapter(component_id).adapter_checksum,
                }
                for component_id, weight in components
            ]
            self._insert_lineage(composite_id, items)
            self.audit(
                "lineage.add", composite_id, {"components": [c for c, _ in components], "strategy": strategy}
            )

    def _insert_lineage(self, composite_id: str, items: Sequence[dict[str, Any]]) -> None:
        for position, item in enumerate(items):
            self.db.table("lineage").insert(
                {
                    "composite_id": composite_id,
                    "component_id": item["component_id"],
                    "position": position,
                    "weight": item.get("weight"),
                    "strategy": item.get("strategy") or "",
                    "options": _dumps(item.get("options") or {}),
                    "component_checksum": item.get("component_checksum"),
                }
            )

    def lineage(self, composite_id: str) -> list[dict[str, Any]]:
        rows = self.db["lineage"].rows_where("composite_id = ?", [composite_id], order_by="position")
        return [{**r, "options": _loads(r["options"], {})} for r in rows]

    def add_export(self, entry: Mapping[str, Any]) -> None:
        """Record a finished export (see migration ``m003_exports``); its name must be new."""
        with self.transaction():
            if self.get_export(entry["name"]) is not None:
                raise Conflict(
                    f"an export named '{entry['name']}' is registered already; choose another --name "
                    "(clara export list shows them)"
                )
            row = dict(entry)
            for key in ("files", "options", "details"):
                row[key] = _dumps(row.get(key) or ({} if key != "files" else []))
            row.setdefault("created", utcnow())
            self.db.table("exports").insert(row)
            self.audit(
                "export.add", entry["name"], {"adapter_id": entry["adapter_id"], "path": entry["path"]}
            )

    def list_exports(self, adapter_id: str | None = None) -> list[dict[str, Any]]:
        """Registered exports, oldest first, JSON columns decoded, ``path`` as stored."""
        where, args = ("adapter_id = ?", [adapter_id]) if adapter_id else (None, [])
        return self._exports(where, args)

    def get_export(self, name: str) -> dict[str, Any] | None:
        found = self._exports("name = ?", [name])
        return found[0] if found else None

    def _exports(self, where: str | None, args: list[Any]) -> list[dict[str, Any]]:
        rows = self.db["exports"].rows_where(where, args, order_by="created, name")
        return [
            {**r, **{k: _loads(r[k], [] if k == "files" else {}) for k in ("files", "options", "details")}}
            for r in rows
        ]

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
        """Every evaluation of this adapter: rows measured on its checksum only, so an id reused by a registry
        from before ids were never reused does not show another adapter's history."""
        checksum = self.get_adapter(adapter_id).adapter_checksum
        rows = self.db["metrics_history"].rows_where(
            "adapter_id = ? AND adapter_checksum IS ?", [adapter_id, checksum], order_by="id"
        )
        return [{**r, "details": _loads(r["details"], {})} for r in rows]


def _strictly_inside(path: Path, folder: Path) -> bool:
    return path != folder and folder in path.parents


def _checked_adapter_path(stored: str, workspace: Workspace, where: str) -> Path:
    """An imported adapter's folder: inside the workspace's models/adapters/ (symlinks resolved), or refused."""
    if ".." in Path(stored).parts:
        raise InvalidInput(f"{where}: path {stored!r} must not contain '..'")
    folder = workspace.resolve(stored).resolve()
    if not _strictly_inside(folder, workspace.adapters_dir.resolve()):
        raise InvalidInput(
            f"{where}: path {stored!r} lies outside this workspace's {workspace.relative(workspace.adapters_dir)}/; "
            "copy the adapter folder there (models/adapters/<domain>/<method>-r<rank>-v<N>) and set its path"
        )
    return folder


def _checked_base_path(stored: str, workspace: Workspace, where: str) -> Path:
    """An imported base's folder: a model folder (or one not there yet), never the workspace's own folders."""
    if ".." in Path(stored).parts:
        raise InvalidInput(f"{where}: base path {stored!r} must not contain '..'")
    folder = workspace.resolve(stored).resolve()
    never = [workspace.metadata_dir, workspace.adapters_dir, workspace.composites_dir]
    if (
        folder == workspace.root
        or folder == workspace.base_dir
        or folder in workspace.root.parents  # '/' among them
        or any(folder == f or f in folder.parents for f in never)
    ):
        raise InvalidInput(
            f"{where}: base path {stored!r} is not a model folder; give the folder of the base model"
        )
    if folder.exists() and not (folder / "config.json").is_file():
        raise InvalidInput(
            f"{where}: base path {stored!r} is not a model folder (no config.json); give the folder of the base model"
        )
    return folder
