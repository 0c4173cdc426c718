import errno
import json

import pytest

from clara_core.errors import first_line
from clara_core.fileio import write_json_atomic, write_text_atomic


def test_write_json_atomic_writes_utf8_and_leaves_no_partial(tmp_path):
    target = tmp_path / "a.json"
    write_json_atomic(target, {"b": "Steuerrecht ä", "a": 1}, sort_keys=True)
    assert target.read_text(encoding="utf-8") == '{\n  "a": 1,\n  "b": "Steuerrecht ä"\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failed_write_keeps_the_old_file_and_removes_the_partial(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    target.write_text("old")

    def full_disk(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.fsync", full_disk)
    with pytest.raises(OSError):
        write_text_atomic(target, json.dumps({"new": True}))
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_first_line():
    assert first_line(RuntimeError("top\nsecond")) == "top"
    assert first_line(RuntimeError("  \n")) == "RuntimeError"
