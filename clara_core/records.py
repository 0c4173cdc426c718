"""What the registry hands out: base and adapter records (plain attrs objects, no database attached), the
draft an adapter is registered from, and the ``dataset_ref`` format."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import attrs


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _loads(value: Any, default: Any) -> Any:
    if value is None or value == "":
        return default
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return default
    return value


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


@attrs.define
class BaseRecord:
    name: str
    path: Path
    base_model_hash: str
    tokenizer_hash: str | None
    architecture: str | None
    model_type: str | None
    config: dict
    size_bytes: int
    created: str

    @classmethod
    def from_row(cls, row: dict, workspace_root: Path) -> BaseRecord:
        stored = Path(row["path"])
        return cls(
            name=row["name"],
            path=stored if stored.is_absolute() else workspace_root / stored,
            base_model_hash=row["base_model_hash"],
            tokenizer_hash=row["tokenizer_hash"],
            architecture=row["architecture"],
            model_type=row["model_type"],
            config=_loads(row["config"], {}),
            size_bytes=row["size_bytes"] or 0,
            created=row["created"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "base_model_hash": self.base_model_hash,
            "tokenizer_hash": self.tokenizer_hash,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "size_bytes": self.size_bytes,
            "created": self.created,
        }


@attrs.define
class AdapterDraft:
    """Everything known about an adapter before the registry gives it an id and a version."""

    domain: list[str]
    method: str
    rank: int
    base_model_hash: str
    adapter_checksum: str
    alpha: float | None = None
    use_rslora: bool = False
    target_modules: list[str] = attrs.field(factory=list)
    tokenizer_hash: str | None = None
    dataset_ref: str | None = None
    license: str | None = None
    peft_config: dict = attrs.field(factory=dict)
    training_config: dict = attrs.field(factory=dict)
    seed: int | None = None
    library_versions: dict = attrs.field(factory=dict)
    metrics: dict = attrs.field(factory=dict)
    kind: str = "adapter"
    size_bytes: int = 0
    created: str = attrs.field(factory=utcnow)


@attrs.define
class AdapterRecord:
    id: str
    kind: str
    domain: list[str]
    method: str
    rank: int
    alpha: float | None
    use_rslora: bool
    target_modules: list[str]
    base_model_hash: str
    tokenizer_hash: str | None
    created: str
    metrics: dict
    dataset_ref: str | None
    adapter_checksum: str | None
    license: str | None
    path: Path
    stored_path: str
    status: str
    version: int
    peft_config: dict
    training_config: dict
    seed: int | None
    library_versions: dict
    size_bytes: int

    @classmethod
    def from_row(cls, row: dict, workspace_root: Path) -> AdapterRecord:
        stored = row["path"]
        path = Path(stored)
        return cls(
            id=row["id"],
            kind=row["kind"] or "adapter",
            domain=_loads(row["domain"], []),
            method=row["method"],
            rank=row["rank"],
            alpha=row["alpha"],
            use_rslora=bool(row["use_rslora"]),
            target_modules=_loads(row["target_modules"], []),
            base_model_hash=row["base_model_hash"],
            tokenizer_hash=row["tokenizer_hash"],
            created=row["created"],
            metrics=_loads(row["metrics"], {}),
            dataset_ref=row["dataset_ref"],
            adapter_checksum=row["adapter_checksum"],
            license=row["license"],
            path=path if path.is_absolute() else workspace_root / path,
            stored_path=stored,
            status=row["status"],
            version=row["version"],
            peft_config=_loads(row["peft_config"], {}),
            training_config=_loads(row["training_config"], {}),
            seed=row["seed"],
            library_versions=_loads(row["library_versions"], {}),
            size_bytes=row["size_bytes"] or 0,
        )

    def to_entry(self) -> dict[str, Any]:
        """The plan's registry entry (its keys first, in its order), then everything else clara records."""
        entry: dict[str, Any] = {
            "id": self.id,
            "domain": list(self.domain),
            "method": self.method,
            "rank": self.rank,
            "base_model_hash": self.base_model_hash,
            "tokenizer_hash": self.tokenizer_hash,
            "created": self.created,
            "metrics": dict(self.metrics),
            "dataset_ref": self.dataset_ref,
            "adapter_checksum": self.adapter_checksum,
            "license": self.license,
            "kind": self.kind,
            "version": self.version,
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "target_modules": list(self.target_modules),
            "path": self.stored_path,
            "status": self.status,
            "seed": self.seed,
            "peft_config": self.peft_config,
            "training_config": self.training_config,
            "library_versions": self.library_versions,
            "size_bytes": self.size_bytes,
        }
        return entry


def dataset_ref(path: str, sha256: str) -> str:
    """The ``dataset_ref`` string: the dataset's path and its sha256 (``data/x.jsonl@sha256:<hex>``)."""
    return f"{path}@sha256:{sha256}"


def parse_dataset_ref(ref: str) -> tuple[str, str | None]:
    path, sep, digest = ref.rpartition("@sha256:")
    return (path, digest) if sep else (ref, None)
