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


@attrs.frozen
class Column:
    """One column of a registry table: its SQL type, and how a record holds its value."""

    name: str
    sql_type: type  # str, int or float, as sqlite-utils creates them
    #: JSON columns: the Python type the text decodes to (list or dict); None for plain values.
    json: type | None = None
    boolean: bool = False  # stored as 0/1, handed out as bool
    not_null: bool = False
    #: Part of the exported registry entry (``to_entry``); provenance that only holds here is not.
    exported: bool = True

    def encode(self, value: Any) -> Any:
        if self.json is not None:
            return _dumps(self.json() if value is None else value)
        if self.boolean:
            return int(bool(value))
        return value

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` (not None) fits this column, as it comes from JSON."""
        if self.json is not None:
            return isinstance(value, self.json)
        if self.boolean:
            return isinstance(value, bool | int)
        if self.sql_type is float:
            return isinstance(value, int | float) and not isinstance(value, bool)
        return isinstance(value, self.sql_type) and not isinstance(value, bool)

    def describe(self) -> str:
        if self.json is not None:
            return "a list" if self.json is list else "an object"
        if self.boolean:
            return "true or false"
        return {str: "a string", int: "an integer", float: "a number"}[self.sql_type]

    def decode(self, value: Any) -> Any:
        if self.json is not None:
            return _loads(value, self.json())
        if self.boolean:
            return bool(value)
        return value


#: The base row, declared once (m001 created it; a test checks the two agree).
BASE_COLUMNS: tuple[Column, ...] = (
    Column("name", str, not_null=True),
    Column("path", str, not_null=True),  # relative to the workspace when inside it
    Column("base_model_hash", str, not_null=True),
    Column("tokenizer_hash", str),
    Column("architecture", str),
    Column("model_type", str),
    Column("config", str, json=dict, exported=False),  # the model's config.json
    Column("size_bytes", int),
    Column("created", str, not_null=True),
)


def base_row(values: dict[str, Any]) -> dict[str, Any]:
    """The database row for a base (one value per column of :data:`BASE_COLUMNS`)."""
    return _row(BASE_COLUMNS, values, "bases")


def _row(columns: tuple[Column, ...], values: dict[str, Any], table: str) -> dict[str, Any]:
    unknown = set(values) - {c.name for c in columns}
    if unknown:
        raise ValueError(f"not columns of the {table} table: {', '.join(sorted(unknown))}")
    return {c.name: c.encode(values.get(c.name)) for c in columns}


@attrs.define
class BaseRecord:
    """One registered base: a field per column of :data:`BASE_COLUMNS`, ``path`` resolved."""

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
        values = {c.name: c.decode(row.get(c.name)) for c in BASE_COLUMNS}
        stored = Path(values["path"])
        values.update(
            path=stored if stored.is_absolute() else workspace_root / stored,
            size_bytes=values["size_bytes"] or 0,
        )
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        entry = {c.name: getattr(self, c.name) for c in BASE_COLUMNS if c.exported}
        entry["path"] = str(self.path)
        return entry


#: The adapter row, declared once. ``migrations.py`` creates it (m001, then later migrations; a test checks
#: that the migrated table has exactly these columns), the registry writes rows with :func:`adapter_row`, and
#: records, export and import derive their fields from it.
ADAPTER_COLUMNS: tuple[Column, ...] = (
    Column("id", str, not_null=True),
    Column("kind", str, not_null=True),  # adapter | composite | merged
    Column("domain", str, json=list, not_null=True),
    Column("domain_key", str, exported=False),  # the domain part of the id, for version numbering
    Column("method", str, not_null=True),
    Column("rank", int, not_null=True),
    Column("alpha", float),
    Column("use_rslora", int, boolean=True),
    Column("target_modules", str, json=list),
    Column("base_model_hash", str, not_null=True),
    Column("tokenizer_hash", str),
    Column("created", str, not_null=True),
    Column("metrics", str, json=dict),  # the latest value of each metric
    Column("dataset_ref", str),
    Column("adapter_checksum", str),
    Column("license", str),
    Column("path", str, not_null=True),  # relative to the workspace when inside it
    Column("status", str, not_null=True),  # ready | missing
    Column("version", int, not_null=True),
    Column("peft_config", str, json=dict),
    Column("training_config", str, json=dict),
    Column("seed", int),
    Column("library_versions", str, json=dict),
    Column("size_bytes", int),
    # m002: clara moved or copied the folder into place itself, so `adapters rm` may delete it.
    Column("placed_by_clara", int, boolean=True, not_null=True, exported=False),
)
ADAPTER_COLUMN_NAMES = tuple(c.name for c in ADAPTER_COLUMNS)
#: The plan's registry entry, in its order; ``to_entry`` puts these keys first.
PLAN_ENTRY_KEYS = (
    "id", "domain", "method", "rank", "base_model_hash", "tokenizer_hash", "created", "metrics", "dataset_ref",
    "adapter_checksum", "license",
)  # fmt: skip
ENTRY_KEYS = PLAN_ENTRY_KEYS + tuple(
    c.name for c in ADAPTER_COLUMNS if c.exported and c.name not in PLAN_ENTRY_KEYS
)


def adapter_row(values: dict[str, Any]) -> dict[str, Any]:
    """The database row for ``values`` (one value per column; JSON and booleans encoded)."""
    return _row(ADAPTER_COLUMNS, values, "adapters")


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
    """One registered adapter: a field per column of :data:`ADAPTER_COLUMNS` (except ``domain_key``), with
    ``path`` resolved against the workspace and the value as stored in ``stored_path``."""

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
    placed_by_clara: bool = False

    @classmethod
    def from_row(cls, row: dict, workspace_root: Path) -> AdapterRecord:
        values = {c.name: c.decode(row.get(c.name)) for c in ADAPTER_COLUMNS if c.name != "domain_key"}
        stored = values["path"]
        path = Path(stored)
        values.update(
            kind=values["kind"] or "adapter",
            path=path if path.is_absolute() else workspace_root / path,
            stored_path=stored,
            size_bytes=values["size_bytes"] or 0,
        )
        return cls(**values)

    def to_entry(self) -> dict[str, Any]:
        """The plan's registry entry (its keys first, in its order), then everything else clara records."""
        entry = {key: getattr(self, key) for key in ENTRY_KEYS}
        entry["path"] = self.stored_path
        return entry


def dataset_ref(path: str, sha256: str) -> str:
    """The ``dataset_ref`` string: the dataset's path and its sha256 (``data/x.jsonl@sha256:<hex>``)."""
    return f"{path}@sha256:{sha256}"


def parse_dataset_ref(ref: str) -> tuple[str, str | None]:
    path, sep, digest = ref.rpartition("@sha256:")
    return (path, digest) if sep else (ref, None)
