"""``clara export``: run an exporter plugin into a staging folder, put the result in place, register it.

The exporter writes into a fresh folder inside the workspace's staging area; only when it returns is the folder
renamed to its final place and recorded in the registry (every file with its sha256). An exporter that wrote
its files but refused them itself (:class:`~clara_core.errors.ExportRejected`, a failed verification) gets them
kept aside beside the final place as ``NAME.rejected-<time>``, and nothing is registered; any other failure or
an interrupt leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from .errors import ClaraError, Conflict, ExportRejected, InvalidInput, NotFound, PluginError, first_line
from .naming import validate_adapter_id
from .plugins import PluginManager
from .registry import Registry
from .types import Exporter, ExportRequest, ExportResult
from .workspace import Workspace


@attrs.define
class ExportOutcome:
    """What :func:`run_export` did: the registered entry and what the exporter said."""

    entry: dict[str, Any]
    result: ExportResult
    path: Path


def default_name(adapter_id: str, registration: Exporter, options: Mapping[str, Any]) -> str:
    """The export's name when ``--name`` is not given: the adapter id, then every option that differs from its
    default (``steuerrecht-lora-r16-v1-merged-q8_0``), so exports with other settings do not collide."""
    parts = [adapter_id]
    for option in registration.options:
        value = options.get(option.name)
        if value is None or value == option.default:
            continue
        if isinstance(value, bool):
            parts.append(option.name if value else f"no-{option.name}")
        elif isinstance(value, list | tuple):
            parts.extend(str(v) for v in value)
        else:
            parts.append(str(value))
    return "-".join(p.replace("/", "_").replace(" ", "_") for p in parts)


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or name in {".", ".."} or "/" in name or "\\" in name or name.startswith("."):
        raise InvalidInput(
            f"export name '{name}' is not usable as a folder name; use letters, digits, '-', '_' and '.'"
        )
    return name


def convert_options(registration: Exporter, given: Mapping[str, Any]) -> dict[str, Any]:
    """The exporter's declared options with the given values converted and the defaults filled in."""
    values: dict[str, Any] = {}
    for option in registration.options:
        raw = given.get(option.name)
        if raw is None or raw == ():
            values[option.name] = option.default
        else:
            values[option.name] = option.convert(raw)
    return values


def _sha256(path: Path) -> str:
    from .hashing import sha256_file

    return sha256_file(path)


def _files(folder: Path, result: ExportResult) -> list[dict[str, Any]]:
    """Every file the export wrote (the result's list, checked to lie inside the folder), hashed."""
    listed = []
    for item in result.files:
        path = Path(item)
        path = path if path.is_absolute() else folder / path
        try:
            relative = path.resolve().relative_to(folder.resolve())
        except ValueError:
            raise PluginError(f"the exporter reported {path}, which is not inside its out folder") from None
        if not path.is_file():
            raise PluginError(f"the exporter reported {relative}, which it did not write")
        listed.append(
            {"path": relative.as_posix(), "sha256": _sha256(path), "size_bytes": path.stat().st_size}
        )
    if not listed:
        raise PluginError("the exporter wrote no files")
    return listed


def _move_into_place(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` (which must not exist); across file systems copy next to the target
    under a temporary name first, so ``target`` appears complete or not at all."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(source, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    from .fileio import copy_folder

    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        copy_folder(source, partial)
        os.rename(partial, target)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def rejected_path(final: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    candidate = final.with_name(f"{final.name}.rejected-{stamp}")
    n = 2
    while candidate.exists():
        candidate = final.with_name(f"{final.name}.rejected-{stamp}-{n}")
        n += 1
    return candidate


def run_export(
    workspace: Workspace,
    plugins: PluginManager,
    exporter: str,
    adapter_id: str,
    *,
    options: Mapping[str, Any] | None = None,
    out: Path | None = None,
    name: str | None = None,
    echo: Callable[[str], None] = lambda _line: None,
) -> ExportOutcome:
    """Export the registered adapter ``adapter_id`` with the exporter plugin ``exporter`` and register it.

    ``out``: the folder to create (default ``models/exports/NAME``); it must not exist. ``options``: the
    exporter's declared options by name (raw values are converted). Raises :class:`ClaraError` subclasses with
    one-line messages; :class:`ExportRejected` after keeping the rejected files aside.
    """
    registration = plugins.exporter(exporter)
    values = convert_options(registration, options or {})
    validate_adapter_id(adapter_id)
    with Registry.open(workspace.registry_path) as registry:
        adapter = registry.get_adapter(adapter_id)
        base = registry.find_base(adapter.base_model_hash)
        if base is None:
            raise NotFound(
                f"adapter '{adapter_id}' was trained on a base (hash {adapter.base_model_hash[:12]}) that is not "
                "registered in this workspace; register it with 'clara base add PATH'"
            )
        if not adapter.path.exists():
            raise NotFound(
                f"adapter '{adapter_id}' is registered at {adapter.path}, which does not exist; "
                "'clara adapters verify' shows what is missing"
            )
        export_name = _check_name(name or default_name(adapter_id, registration, values))
        if registry.get_export(export_name) is not None:
            raise Conflict(
                f"an export named '{export_name}' is registered already; choose another --name "
                "(clara export list shows them)"
            )
    final = (Path(out).expanduser() if out is not None else workspace.exports_dir / export_name).absolute()
    if final.exists():
        raise Conflict(
            f"the out folder {final} exists already; choose another --out or --name, or remove it first"
        )
    impl = registration.create()
    with workspace.staging("export") as staging:
        folder = staging / export_name
        folder.mkdir()
        request = ExportRequest(
            adapter=adapter,
            base=base,
            out_dir=folder,
            options=values,
            name=export_name,
            cache_dir=workspace.cache_dir,
            echo=echo,
        )
        try:
            result = impl.export(request)
        except ExportRejected as exc:
            aside = rejected_path(final)
            _move_into_place(folder, aside)
            raise ExportRejected(
                f"{exc.message}; the rejected files are kept in {aside}, nothing was registered"
            ) from exc
        except ClaraError:
            raise
        except Exception as exc:  # a plugin's bug: one line naming the exporter, nothing left behind
            raise PluginError(
                f"exporter '{exporter}' failed: {type(exc).__name__}: {first_line(exc)}"
            ) from exc
        if not isinstance(result, ExportResult):
            raise PluginError(f"exporter '{exporter}' returned {type(result).__name__}, not an ExportResult")
        files = _files(folder, result)
        _move_into_place(folder, final)
    entry = {
        "name": export_name,
        "exporter": registration.name,
        "adapter_id": adapter.id,
        "adapter_checksum": adapter.adapter_checksum,
        "base_model_hash": base.base_model_hash,
        "path": workspace.relative(final),
        "files": files,
        "options": values,
        "details": result.details,
        "message": result.message,
    }
    try:
        with Registry.open(workspace.registry_path) as registry:
            registry.add_export(entry)
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)  # not registered: not kept either
        raise
    return ExportOutcome(entry=entry, result=result, path=final)
