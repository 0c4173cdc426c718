"""Opening ``registry.db``, and telling a user what its failures mean.

SQLite reports a lock held by another process, a read-only folder, a full disk and a damaged file in words that
say little about what to do ("database is locked", "unable to open database file", "disk I/O error", "database
disk image is malformed"), and a generic handler that calls all of them "not a clara registry, run 'clara init'
again" would make a user destroy a healthy registry. Every connection to the registry is therefore a
:class:`RegistryConnection`: its statements turn those errors into one-line errors that name the file and the
remedy (:func:`classify`); every other error (a constraint, a programming error) passes through unchanged.

Reads work where writes cannot. A registry whose folder is read-only or whose disk is full is opened read-only
(``immutable=1`` when no write-ahead log holds unmerged changes, else ``mode=ro`` through the ``-shm`` the writer
left), and a write then says why it cannot happen. Reads wait :data:`READ_TIMEOUT_S` for a lock (in WAL mode only
a process holding the file exclusively blocks a reader), writes :data:`WRITE_TIMEOUT_S` (other clara processes
hold the write lock for milliseconds, a long training's registration included).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any

from .errors import (
    RegistryCorrupt,
    RegistryDiskFull,
    RegistryEmpty,
    RegistryError,
    RegistryLocked,
    RegistryReadOnly,
)

#: Seconds a read waits for another process's lock before saying so.
READ_TIMEOUT_S = 5.0
#: Seconds a write transaction waits for the write lock before saying so.
WRITE_TIMEOUT_S = 60.0
#: Free bytes below which an I/O error on the registry's disk is reported as a full disk.
_NEARLY_FULL = 1 << 20

# SQLite's primary result codes (the low byte of an extended code)
_BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 5, 6, 8, 10, 11, 13, 14, 26


class RegistryConnection(sqlite3.Connection):
    """A connection whose statements raise clara's storage errors (locked, read-only, full, damaged)."""

    registry_path: Path = Path("registry.db")
    #: Why this connection is read-only (a read-only folder, a full disk), or None when it can write.
    read_only_reason: str | None = None
    busy_timeout_s: float = READ_TIMEOUT_S

    def cursor(self, factory: Any = None) -> Any:
        return super().cursor(factory or RegistryCursor)

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Any:
        return self.cursor().executemany(sql, parameters)

    def executescript(self, script: str, /) -> Any:
        return self.cursor().executescript(script)

    def commit(self) -> None:
        _guard(self, super().commit)

    def set_busy_timeout(self, seconds: float) -> None:
        self.busy_timeout_s = seconds
        super().execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")

    def translate(self, exc: sqlite3.Error) -> BaseException:
        return classify(
            exc, self.registry_path, read_only_reason=self.read_only_reason, waited=self.busy_timeout_s
        )


class RegistryCursor(sqlite3.Cursor):
    connection: RegistryConnection

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        return _guard(self.connection, super().execute, sql, parameters)

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Any:
        return _guard(self.connection, super().executemany, sql, parameters)

    def executescript(self, script: str, /) -> Any:
        return _guard(self.connection, super().executescript, script)

    def fetchone(self) -> Any:
        return _guard(self.connection, super().fetchone)

    def fetchmany(self, size: int | None = None) -> list[Any]:
        return _guard(self.connection, super().fetchmany, self.arraysize if size is None else size)

    def fetchall(self) -> list[Any]:
        return _guard(self.connection, super().fetchall)

    def __next__(self) -> Any:
        return _guard(self.connection, super().__next__)


def _guard(conn: RegistryConnection, call: Any, *args: Any) -> Any:
    try:
        return call(*args)
    except sqlite3.Error as exc:
        translated = conn.translate(exc)
        if translated is exc:
            raise
        raise translated from exc


# -- what an error means -----------------------------------------------------------------------------------------


def classify(
    exc: sqlite3.Error,
    path: Path,
    *,
    read_only_reason: str | None = None,
    waited: float | None = None,
) -> BaseException:
    """The user-facing error for an SQLite error on the registry at ``path``, or ``exc`` itself when it is not
    about the file (a constraint, a bad statement)."""
    extended = getattr(exc, "sqlite_errorcode", None)
    primary = extended & 0xFF if isinstance(extended, int) else None
    if primary is None:  # raised by the sqlite3 module itself, without a code: fall back to its words
        text = str(exc).lower()
        primary = {
            "database is locked": _BUSY,
            "attempt to write a readonly database": _READONLY,
            "database or disk is full": _FULL,
            "disk i/o error": _IOERR,
            "database disk image is malformed": _CORRUPT,
            "file is not a database": _NOTADB,
            "unable to open database file": _CANTOPEN,
        }.get(text)
    folder = path.parent
    if primary in (_BUSY, _LOCKED):
        how_long = f" (waited {waited:g} s)" if waited else ""
        return RegistryLocked(
            f"{path} is locked by another process{how_long}; nothing was changed. Retry when that process is "
            f"done ('fuser -v {path}' shows which); the registry itself is fine"
        )
    if primary == _READONLY:
        return cannot_write(
            path, read_only_reason or read_only_reason_for(path) or "SQLite opened it read-only"
        )
    if primary == _FULL or (primary in (_IOERR, _CANTOPEN) and _free_bytes(folder) < _NEARLY_FULL):
        return RegistryDiskFull(
            f"cannot write {path}: no space left on the disk holding {folder} ({_free_text(folder)} free); "
            "nothing was changed. Free some space and retry"
        )
    if primary == _CORRUPT:
        return RegistryCorrupt(
            f"{path} is damaged ({exc}). Recover what it holds with 'sqlite3 {path} .recover > registry.sql', "
            f"move the damaged file aside, then 'sqlite3 {path} < registry.sql'"
        )
    if primary == _NOTADB:
        return RegistryCorrupt(
            f"{path} is not a clara registry (not an SQLite database: {exc}); if it was one, it is damaged (try "
            f"'sqlite3 {path} .recover > registry.sql'); if it is some other file, move it aside and run "
            "'clara init' again"
        )
    if primary == _CANTOPEN:
        return RegistryError(f"cannot open {path}: {read_only_reason_for(path) or exc}")
    if primary == _IOERR:
        return RegistryError(
            f"cannot read or write {path}: {exc} ({getattr(exc, 'sqlite_errorname', 'SQLITE_IOERR')}); "
            "check the disk and the file system it lies on"
        )
    return exc


def cannot_write(path: Path, reason: str) -> RegistryError:
    """The error for a write to a registry opened read-only because of ``reason``."""
    if reason.startswith(_FULL_DISK):
        return RegistryDiskFull(
            f"cannot write {path}: {reason}; nothing was changed. Free some space and retry"
        )
    return RegistryReadOnly(
        f"cannot write {path}: {reason}. Reading works, but this command changes the registry; run it where "
        "the workspace is writable"
    )


_FULL_DISK = "the disk holding "


def read_only_reason_for(path: Path) -> str | None:
    """Why SQLite cannot write ``path`` (or create its journal files beside it), or None when it can."""
    folder = Path(path).parent
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return f"{folder} is on a read-only file system"
    except OSError:
        pass
    if not os.access(folder, os.W_OK):
        return f"its folder {folder} is not writable"
    if Path(path).exists() and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return None


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 1 << 62


def _free_text(folder: Path) -> str:
    from .output import human_size

    return human_size(_free_bytes(folder))


# -- opening -----------------------------------------------------------------------------------------------------


def connect(path: Path, *, create: bool = False) -> RegistryConnection:
    """A connection to the registry at ``path``, read-only (and saying why) where the file cannot be written."""
    path = Path(path).absolute()
    if not path.exists():
        if not create:
            raise RegistryError(f"{path}: no registry here; run 'clara init' in the workspace first")
    else:
        _refuse_lost_registry(path)
    reason = read_only_reason_for(path)
    if reason is None:
        conn = _open(path, "rwc" if create else "rw", None)
        try:
            conn.execute("PRAGMA schema_version").fetchone()
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                with suppress(RegistryLocked):  # WAL is an optimisation: the next opener switches it
                    conn.execute("PRAGMA journal_mode=WAL")
            return conn
        except RegistryDiskFull:  # SQLite cannot size its -shm on a full disk: reads still work
            conn.close()
            reason = f"{_FULL_DISK}{path.parent} is full ({_free_text(path.parent)} free)"
        except RegistryReadOnly:
            conn.close()
            reason = read_only_reason_for(path) or "SQLite may not write it"
        except BaseException:
            conn.close()
            raise
    if not path.exists():
        raise RegistryReadOnly(f"cannot create {path}: {reason}")
    return _open_read_only(path, reason)


def _open(
    path: Path, mode: str, read_only_reason: str | None, *, immutable: bool = False
) -> RegistryConnection:
    uri = f"{path.as_uri()}?mode={mode}" + ("&immutable=1" if immutable else "")
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=READ_TIMEOUT_S, factory=RegistryConnection)
    except sqlite3.Error as exc:
        raise _as_error(classify(exc, path, read_only_reason=read_only_reason), exc) from exc
    assert isinstance(conn, RegistryConnection)
    conn.registry_path = path
    conn.read_only_reason = read_only_reason
    conn.busy_timeout_s = READ_TIMEOUT_S
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _open_read_only(path: Path, reason: str) -> RegistryConnection:
    wal = path.with_name(path.name + "-wal")
    shm = path.with_name(path.name + "-shm")
    unmerged = wal.exists() and wal.stat().st_size > 0
    if shm.exists():
        # another process may have it open and write: SQLite's read-only mode, through that process's -shm,
        # sees its changes and its locks; immutable=1 would read past both
        try:
            conn = _open(path, "ro", reason)
        except RegistryLocked:
            raise  # a writer holds it: reading past its lock (immutable=1) could see a half-written page
        except RegistryError as exc:
            conn, failure = None, exc
        if conn is not None:
            try:
                conn.execute("PRAGMA schema_version").fetchone()
                return conn
            except RegistryLocked:
                conn.close()
                raise
            except RegistryError as exc:
                conn.close()
                failure = exc
        if unmerged:
            raise RegistryReadOnly(
                f"cannot read {path}: {reason}, and its write-ahead log {wal.name} holds changes not yet "
                f"merged into it ({failure}); make {path.parent} writable (or free space) once and retry"
            ) from failure
    elif unmerged:
        raise RegistryReadOnly(
            f"cannot read {path}: {reason}, and its write-ahead log {wal.name} holds changes not yet merged into "
            f"it; make {path.parent} writable (or free space) once and retry"
        )
    # no other connection and nothing unmerged: the file is all there is, and nobody here can change it
    return _open(path, "ro", reason, immutable=True)


def _as_error(error: BaseException, original: sqlite3.Error) -> BaseException:
    return error if error is not original else RegistryError(str(original))


def _refuse_lost_registry(path: Path) -> None:
    """A zero-byte registry.db is new only in a workspace without adapters or bases; otherwise it was lost."""
    try:
        if path.stat().st_size != 0:
            return
        wal = path.with_name(path.name + "-wal")
        if wal.exists() and wal.stat().st_size != 0:
            return
    except OSError:
        return
    root = path.parent.parent
    adapters = [c.parent for c in (root / "models" / "adapters").glob("*/*/adapter_config.json")]
    composites = [c.parent for c in (root / "models" / "composites").glob("*/adapter_config.json")]
    bases = [c.parent for c in (root / "models" / "base").glob("*/config.json")]
    if not (adapters or composites or bases):
        return
    exported = path.parent / "adapter_registry.json"
    json_hint = f" or 'clara adapters import-json {exported}'" if exported.is_file() else ""
    raise RegistryEmpty(
        f"{path} is empty (0 bytes) although this workspace holds {len(adapters) + len(composites)} adapter "
        f"folder(s) and {len(bases)} base folder(s): the registry was truncated or lost, not new. Restore it "
        f"from a backup, or move it aside, run 'clara init', add the base(s) again with 'clara base add' and the "
        f"adapters with 'clara adapters register PATH --in-place'{json_hint} ('clara adapters verify' lists "
        "the folders)"
    )


def check_integrity(conn: RegistryConnection) -> None:
    """A cheap structural check (``PRAGMA quick_check``): a damaged registry raises :class:`RegistryCorrupt`."""
    rows = conn.execute("PRAGMA quick_check(5)").fetchall()
    problems = [str(row[0]) for row in rows if str(row[0]).lower() != "ok"]
    if problems:
        path = conn.registry_path
        raise RegistryCorrupt(
            f"{path} is damaged ({'; '.join(problems)[:300]}). Recover what it holds with 'sqlite3 {path} "
            f".recover > registry.sql', move the damaged file aside, then 'sqlite3 {path} < registry.sql'"
        )
