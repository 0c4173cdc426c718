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

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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

    @contextmanager
    def staging(self, prefix: str) -> Iterator[Path]:
        """A temporary folder inside the workspace, removed on failure unless it was moved away."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=self.tmp_dir))
        try:
            yield path
        finally:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
