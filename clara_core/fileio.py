"""Small file helpers shared by every command: nothing half-written ever replaces a good file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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
