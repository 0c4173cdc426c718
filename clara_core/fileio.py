"""Small file helpers shared by every command: nothing half-written ever replaces a good file."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ClaraError, DiskFull, NotWritable
from .output import human_size


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a partial file in the same folder and an atomic rename.

    A crash or a full disk leaves either the old file or the new one, never a mix; the partial file is removed
    when the write fails.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, value: Any, *, sort_keys: bool = False) -> None:
    """Write ``value`` as indented UTF-8 JSON (non-ASCII kept as is) with a final newline, atomically."""
    text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n"
    write_text_atomic(path, text)


# -- a full disk or a read-only folder is one line, and nothing half-copied stays behind --------------------------


def storage_error(exc: OSError, path: Path, doing: str) -> ClaraError | None:
    """The one-line error for a full disk or a read-only folder met at ``path`` while ``doing`` ("copying X"),
    or None when ``exc`` is something else."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(
            f"no space left on the disk holding {path} while {doing} ({_free_text(path)} free); nothing "
            "half-written was kept. Free some space and retry"
        )
    if exc.errno == errno.EROFS:
        return NotWritable(f"cannot write {path} while {doing}: it is on a read-only file system")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return NotWritable(f"cannot write {path} while {doing}: permission denied")
    return None


def copy_folder(source: Path, target: Path) -> None:
    """Copy the folder ``source`` to ``target`` (which must not exist yet), all or nothing.

    Refuses up front when the target's disk has less free space than the files need; a full disk (or any other
    failure) part-way removes what was copied and is one line naming the disk, never a ``shutil.Error``.
    """
    from .hashing import folder_size

    source, target = Path(source), Path(target)
    need, free = folder_size(source), _free_bytes(target.parent)
    if need > free:
        raise DiskFull(
            f"copying {source} needs {human_size(need)} but the disk holding {target.parent} has "
            f"{human_size(free)} free; nothing was copied. Free some space and retry"
        )
    doing = f"copying {source}"

    def copy_file(src: str, dst: str) -> object:
        try:
            return shutil.copy2(src, dst)
        except OSError as exc:  # raised as a ClaraError, which copytree does not collect: it stops at once
            raise storage_error(exc, target.parent, doing) or ClaraError(
                f"cannot copy {src} to {dst}: {exc.strerror or exc}"
            ) from exc

    try:
        shutil.copytree(source, target, copy_function=copy_file)
    except BaseException as exc:
        shutil.rmtree(target, ignore_errors=True)
        if isinstance(exc, shutil.Error):  # errors copytree collected (on folders): the first says enough
            first = exc.args[0][0] if exc.args and exc.args[0] else ("?", "?", str(exc))
            raise ClaraError(f"cannot copy {source} to {target}: {first[2]}") from exc
        if isinstance(exc, OSError):
            raise storage_error(exc, target.parent, doing) or ClaraError(
                f"cannot copy {source} to {target}: {exc.strerror or exc}"
            ) from exc
        raise


def _free_bytes(path: Path) -> int:
    for folder in (Path(path), *Path(path).parents):  # the nearest folder that exists
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return 1 << 62


def _free_text(path: Path) -> str:
    return human_size(_free_bytes(path))


def jsonl_records(path: Path, raw: bytes) -> Iterator[tuple[int, Any]]:
    """The parsed records of the JSON Lines file ``path`` (its bytes ``raw``) with their 1-based line numbers;
    blank lines are skipped. A line that is not UTF-8 or not JSON is an ``InvalidInput`` naming file and line."""
    from .errors import InvalidInput

    for number, line_bytes in enumerate(raw.splitlines(), start=1):
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(
                f"{path}:{number}: not UTF-8 text ({exc.reason}); save the file as UTF-8"
            ) from exc
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except ValueError as exc:
            raise InvalidInput(
                f"{path}:{number}: invalid JSON ({exc}); each line must be one JSON object"
            ) from exc
