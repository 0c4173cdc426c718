"""The workspace: one folder with the plan's layout and the registry.

```
models/base/<name>/                              base models (or registered where they lie)
models/adapters/<domain>/<method>-r<rank>-v<N>/  adapters
models/composites/<hash6>_<a>+<b>/               composites
metadata/registry.db                             the registry (SQLite)
metadata/adapter_registry.json                   the plan's JSON view (clara adapters export-json)
```

Commands find the workspace from ``--workspace``, then ``CLARA_HOME``, then the current folder and its parents
(as git finds its repository). A folder is a workspace when it has ``metadata/registry.db``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

import attrs

from .errors import WorkspaceNotFound
from .naming import (
    adapter_folder_name,
    domain_key,
    make_adapter_id,
    normalise_domain,
    validate_adapter_id,
)
from .registry import Registry

__all__ = [
    "REGISTRY_FILE",
    "Workspace",
    # The naming rules live in clara_core.naming; these names stay importable from here for plugins.
    "domain_key",
    "make_adapter_id",
    "normalise_domain",
    "validate_adapter_id",
]

REGISTRY_FILE = Path("metadata") / "registry.db"


@attrs.frozen
class Workspace:
    root: Path = attrs.field(converter=lambda p: Path(p).expanduser().resolve())

    @property
    def base_dir(self) -> Path:
        return self.root / "models" / "base"

    @property
    def adapters_dir(self) -> Path:
        return self.root / "models" / "adapters"

    @property
    def composites_dir(self) -> Path:
        return self.root / "models" / "composites"

    @property
    def exports_dir(self) -> Path:
        """Finished exports (``clara export``), one folder per export name."""
        return self.root / "models" / "exports"

    @property
    def cache_dir(self) -> Path:
        """Artefacts derived from registered files and reused across runs (converted GGUF bases and adapters),
        keyed by their sources' hashes; safe to delete (they are rebuilt)."""
        return self.root / "models" / "cache"

    @property
    def metadata_dir(self) -> Path:
        return self.root / "metadata"

    @property
    def registry_path(self) -> Path:
        return self.root / REGISTRY_FILE

    @property
    def tmp_dir(self) -> Path:
        """Scratch space inside the workspace, on the same file system, so that finished work is renamed."""
        return self.root / "metadata" / "tmp"

    def adapter_dir(self, domains: list[str], method: str, rank: int, version: int) -> Path:
        return self.adapters_dir / domain_key(domains) / adapter_folder_name(method, rank, version)

    def relative(self, path: Path) -> str:
        """A path as stored in the registry: relative to the workspace when inside it, else absolute."""
        resolved = Path(path).resolve()
        try:
            return resolved.relative_to(self.root).as_posix()
        except ValueError:
            return str(resolved)

    def resolve(self, stored: str) -> Path:
        path = Path(stored)
        return path if path.is_absolute() else self.root / path

    def contains(self, path: Path) -> bool:
        try:
            Path(path).resolve().relative_to(self.root)
        except ValueError:
            return False
        return True

    @classmethod
    def init(cls, root: Path) -> tuple[Workspace, bool]:
        """Create the folder layout and the registry; returns (workspace, created)."""
        workspace = cls(root)
        created = not workspace.registry_path.exists()
        for folder in (
            workspace.base_dir,
            workspace.adapters_dir,
            workspace.composites_dir,
            workspace.metadata_dir,
        ):
            folder.mkdir(parents=True, exist_ok=True)
        Registry.open(workspace.registry_path, create=True).close()
        return workspace, created

    @classmethod
    def find(cls, explicit: Path | str | None = None, *, cwd: Path | None = None) -> Workspace:
        if explicit is not None:
            return cls._require(Path(explicit), "--workspace")
        env = os.environ.get("CLARA_HOME")
        if env:
            return cls._require(Path(env), "CLARA_HOME")
        start = (cwd or Path.cwd()).resolve()
        for folder in (start, *start.parents):
            if (folder / REGISTRY_FILE).is_file():
                return cls(folder)
        raise WorkspaceNotFound(
            f"no clara workspace in {start} or its parents; run 'clara init' there, "
            "or point to one with --workspace DIR or CLARA_HOME"
        )

    @classmethod
    def _require(cls, path: Path, source: str) -> Workspace:
        if not (path / REGISTRY_FILE).is_file():
            raise WorkspaceNotFound(
                f"{path} (from {source}) is not a clara workspace (no {REGISTRY_FILE}); run 'clara init {path}'"
            )
        return cls(path)

    # -- staging: work in progress, and what a killed process left of it -------------------------------------

    @contextmanager
    def staging(self, prefix: str) -> Iterator[Path]:
        """A temporary folder inside the workspace, removed on failure unless it was moved away.

        The folder holds an owner marker (:data:`OWNER_FILE`: pid, process start time, host) that this process
        keeps ``flock``-ed while the folder is in use. A process killed with ``kill -9`` loses the lock at once,
        so the folder it left is recognised as abandoned: ``clara adapters verify`` reports it and the next
        staging (``adapters register``, ``base add --copy``) removes it; a folder a live process is writing never is.
        """
        self.remove_abandoned_staging()
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            path = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=self.tmp_dir))
        except OSError as exc:
            from .fileio import storage_error

            error = storage_error(exc, self.tmp_dir, "making a staging folder")
            if error is None:
                raise
            raise error from exc
        owner = _claim(path)
        try:
            yield path
        finally:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
            owner.close()  # released only once the folder is gone

    @contextmanager
    def staged_copy(self, source: Path, prefix: str = "copy") -> Iterator[Path]:
        """A complete copy of the folder ``source`` inside a staging folder, to be renamed into place.

        A full disk is one line (:class:`clara_core.errors.DiskFull`) and leaves nothing behind; so does any
        failure or interrupt before the copy is renamed away."""
        from .fileio import copy_folder

        with self.staging(prefix) as folder:
            target = folder / Path(source).name
            copy_folder(Path(source), target)
            yield target

    def staging_leftovers(self) -> list[StagingLeftover]:
        """Folders in ``metadata/tmp`` whose owner is gone: its process died (its marker is no longer locked), or
        a folder without a marker names a pid that is gone (``train-<pid>-...``; ``removable`` only once it is
        older than :data:`UNMARKED_STALE_AFTER_S`)."""
        if not self.tmp_dir.is_dir():
            return []
        leftovers = []
        for folder in sorted(self.tmp_dir.iterdir()):
            if folder.is_dir() and not folder.is_symlink():
                owner, state = _owner(folder)
                if state != "running":
                    leftovers.append(StagingLeftover(folder, owner, _tree_size(folder), state == "abandoned"))
        return leftovers

    def remove_abandoned_staging(self) -> list[StagingLeftover]:
        """Remove :meth:`staging_leftovers` (best effort: a read-only or busy folder stays); returns them."""
        try:
            leftovers = self.staging_leftovers()
        except OSError:
            return []
        removable = [leftover for leftover in leftovers if leftover.removable]
        for leftover in removable:
            shutil.rmtree(leftover.path, ignore_errors=True)
        return removable


#: Owner marker inside every staging folder (see :meth:`Workspace.staging`).
OWNER_FILE = ".clara-owner"
#: A staging folder without an owner marker (left by an older clara, or by a process killed in the instant
#: between making the folder and marking it) counts as abandoned only this long after its last change, and only
#: when the pid in its name (``copy-<pid>-...``) is gone: long enough that no live process is still writing it.
UNMARKED_STALE_AFTER_S = 24 * 3600
_PID_IN_NAME = re.compile(r"^(?:copy|train|rebuild)-(?P<pid>\d+)-|^removed-.+-(?P<last>\d+)$")


@attrs.frozen
class StagingLeftover:
    """A staging folder a process left behind (killed, or the machine lost power)."""

    path: Path
    owner: str
    size_bytes: int
    #: True when clara removes it at the next staging; False for a folder without an owner marker that changed
    #: within :data:`UNMARKED_STALE_AFTER_S` (reported only).
    removable: bool = True


def _claim(folder: Path) -> IO[str]:
    """Mark ``folder`` as this process's: the marker appears under its final name already locked, so a cleaner
    never finds it unlocked while this process lives. The handle must stay open while the folder is in use."""
    partial = folder / f"{OWNER_FILE}.{os.getpid()}"
    handle = open(partial, "w+", encoding="utf-8")  # noqa: SIM115 - held until the staging folder is gone
    try:
        # on a file system without flock, the pid and start time below still say who owns it
        with suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        pid = os.getpid()
        marker = {
            "pid": pid,
            "started": _process_start(pid),
            "host": socket.gethostname(),
            "created": time.time(),
        }
        handle.write(json.dumps(marker))
        handle.flush()
        os.rename(partial, folder / OWNER_FILE)
    except BaseException:
        handle.close()
        raise
    return handle


def _owner(folder: Path) -> tuple[str, str]:
    """Who owns the staging ``folder``, in words, and its state: ``running``, ``abandoned`` (remove it) or
    ``suspect`` (no marker, its pid is gone, but it changed recently: report it only)."""
    marker = folder / OWNER_FILE
    try:
        handle = open(marker, encoding="utf-8")  # noqa: SIM115 - closed below, after the lock test
    except FileNotFoundError:
        return _unmarked_owner(folder)
    except OSError:
        return "unknown owner (unreadable marker)", "running"
    with handle:
        try:
            info = json.loads(handle.read() or "{}")
        except ValueError:
            info = {}
        pid = info.get("pid", "?")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return f"pid {pid} (running)", "running"
        except OSError:  # no flock on this file system: the pid, its start time and the host decide
            alive = (
                info.get("host") != socket.gethostname()
                or not isinstance(pid, int)
                or (_pid_alive(pid) and _process_start(pid) in (None, info.get("started")))
            )
            return f"pid {pid} ({'running' if alive else 'gone'})", "running" if alive else "abandoned"
        return f"pid {pid} (gone)", "abandoned"  # the lock is free: its process died without cleaning up


def _unmarked_owner(folder: Path) -> tuple[str, str]:
    match = _PID_IN_NAME.match(folder.name)
    pid = int(match["pid"] or match["last"]) if match else None
    if pid is not None and _pid_alive(pid):
        return f"pid {pid} (running)", "running"
    age = time.time() - _newest_mtime(folder)
    who = f"pid {pid} (gone)" if pid is not None else "unknown owner"
    if age > UNMARKED_STALE_AFTER_S:
        return f"{who}, unchanged for {age / 3600:.0f} h", "abandoned"
    # recent and unmarked: a folder being made right now, or one whose pid lives in another container
    return f"{who}, changed {age / 60:.0f} min ago", "suspect" if pid is not None else "running"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from its owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _newest_mtime(folder: Path) -> float:
    newest = folder.lstat().st_mtime
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except OSError:
                continue
    return newest


def _tree_size(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total
