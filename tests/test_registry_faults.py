"""The registry under faults (issue 12, items 13 and 15-19): a lock held by another process, a process killed
during a copy, a damaged page, a truncated file, a read-only folder and a full disk each get one honest line,
and none of them is ever called "not a clara registry ... run 'clara init' again".

Faults are real where the machine allows: the lock is held by another process, the kill is a SIGKILL of a real
`clara adapters register`, the page is overwritten on disk, the read-only folder is a read-only bind mount (or,
for a non-root user, a folder without write permission), the full disk is a size-limited tmpfs. Where a mount is
not allowed those tests skip with the reason, and the injected ENOSPC test still covers the copy.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from clara_core import registry_db
from clara_core.errors import RegistryCorrupt, RegistryDiskFull, RegistryLocked, RegistryReadOnly
from clara_core.registry import Registry
from clara_core.workspace import OWNER_FILE, Workspace

from .conftest import write_fake_adapter

DESTRUCTIVE_ADVICE = ("not a clara registry", "clara init")


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def no_destructive_advice(line: str) -> None:
    for words in DESTRUCTIVE_ADVICE:
        assert words not in line, line


@pytest.fixture
def registered(
    workspace_with_base: Workspace, fake_adapter: Callable[..., Path], run_cli: Callable[..., Result]
) -> str:
    """The id of one adapter copied into the workspace."""
    result = run_cli("adapters", "register", str(fake_adapter("steuer")), "--domain", "steuerrecht")
    assert result.exit_code == 0, result.output
    return "steuerrecht-lora-r4-v1"


def files_of(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# -- 13: a lock held by another process ----------------------------------------------------------------------


@pytest.fixture
def locked_registry(workspace_with_base: Workspace, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """registry.db held exclusively (readers blocked too) by another process until the test ends."""
    monkeypatch.setattr(registry_db, "READ_TIMEOUT_S", 0.2)
    monkeypatch.setattr(registry_db, "WRITE_TIMEOUT_S", 0.3)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys\n"
            "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "conn.execute('PRAGMA locking_mode=EXCLUSIVE')\n"
            "conn.execute('BEGIN EXCLUSIVE')\n"
            "print('locked', flush=True)\n"
            "sys.stdin.readline()\n",
            str(workspace_with_base.registry_path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield workspace_with_base.registry_path
    finally:
        holder.communicate("\n", timeout=30)


def test_a_lock_held_by_another_process_is_named_as_a_lock_with_the_time_waited(
    registered: str,
    locked_registry: Path,
    run_cli: Callable[..., Result],
    fake_adapter: Callable[..., Path],
) -> None:
    before = locked_registry.read_bytes()
    for args in (("adapters", "list"), ("adapters", "show", registered), ("adapters", "verify")):
        line = one_line_error(run_cli(*args))
        assert f"{locked_registry} is locked by another process (waited 0.2 s)" in line, line
        assert "Retry" in line
        no_destructive_advice(line)
    line = one_line_error(
        run_cli("adapters", "register", str(fake_adapter(seed=5)), "--domain", "x", "--in-place")
    )
    assert "locked by another process" in line
    no_destructive_advice(line)
    assert locked_registry.read_bytes() == before


def test_the_server_answers_503_registry_locked_with_the_same_honest_words(
    registered: str, locked_registry: Path, workspace_with_base: Workspace
) -> None:
    from clara_core.serving.runner import _registry_lookup

    lookup, list_all = _registry_lookup(workspace_with_base.registry_path)
    for call in (lambda: lookup(registered), list_all):
        with pytest.raises(RegistryLocked) as caught:
            call()
        assert caught.value.http_status == 503 and caught.value.code == "registry_locked"
        assert "locked by another process" in caught.value.message
        no_destructive_advice(caught.value.message)


# -- 16: a damaged page -----------------------------------------------------------------------------------------


def damage_adapters_table(path: Path) -> None:
    conn = sqlite3.connect(path)
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'adapters'").fetchone()[0]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()  # the last connection merges the WAL into registry.db
    assert not path.with_name("registry.db-wal").exists()
    with open(path, "r+b") as handle:
        handle.seek((root - 1) * page_size)
        handle.write(b"\xa5" * page_size)


def test_a_damaged_page_is_one_line_naming_the_file_and_recover_and_serve_refuses(
    registered: str, workspace_with_base: Workspace, run_cli: Callable[..., Result]
) -> None:
    path = workspace_with_base.registry_path
    damage_adapters_table(path)
    for args in (
        ("adapters", "list"),
        ("adapters", "show", registered),
        ("adapters", "verify"),
        ("serve", "--port", "0"),
    ):
        line = one_line_error(run_cli(*args))
        assert f"{path} is damaged" in line, (args, line)
        assert f"sqlite3 {path} .recover" in line
        no_destructive_advice(line)
    with Registry.open(path) as registry, pytest.raises(RegistryCorrupt):
        registry.check_integrity()


def test_a_healthy_registry_passes_the_integrity_check(
    registered: str, workspace_with_base: Workspace
) -> None:
    with Registry.open(workspace_with_base.registry_path) as registry:
        registry.check_integrity()


# -- 17: a registry truncated to zero bytes -----------------------------------------------------------------------


def test_a_truncated_registry_in_a_workspace_with_adapters_is_an_error_and_verify_lists_the_folders(
    registered: str, workspace_with_base: Workspace, run_cli: Callable[..., Result]
) -> None:
    path = workspace_with_base.registry_path
    path.write_bytes(b"")
    line = one_line_error(run_cli("adapters", "list"))
    assert f"{path} is empty (0 bytes)" in line and "1 adapter folder(s)" in line and "backup" in line
    result = run_cli("adapters", "verify")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "No adapters to verify." not in result.output
    assert "note     models/adapters/steuerrecht/lora-r4-v1 is not registered" in result.output
    assert "is empty (0 bytes)" in result.output
    assert path.stat().st_size == 0  # never silently re-initialised
    line = one_line_error(run_cli("init", str(workspace_with_base.root)))
    assert "is empty (0 bytes)" in line and path.stat().st_size == 0


def test_a_zero_byte_registry_in_an_empty_workspace_is_simply_new(tmp_path: Path) -> None:
    ws, _ = Workspace.init(tmp_path / "ws")
    ws.registry_path.unlink()
    ws.registry_path.write_bytes(b"")
    with Registry.open(ws.registry_path) as registry:
        assert registry.list_adapters() == []


# -- 18: a read-only metadata folder -------------------------------------------------------------------------------


@pytest.fixture
def read_only_metadata(registered: str, workspace_with_base: Workspace) -> Iterator[Path]:
    """metadata/ made read-only for real: a read-only bind mount as root (root ignores permissions), else
    a folder without write permission."""
    meta = workspace_with_base.metadata_dir
    if os.geteuid() == 0:
        bound = subprocess.run(["mount", "--bind", str(meta), str(meta)], capture_output=True, text=True)
        if bound.returncode != 0:
            pytest.skip(f"cannot bind-mount as root here ({bound.stderr.strip()}); read-only not testable")
        ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(meta)], capture_output=True, text=True)
        if ro.returncode != 0:
            subprocess.run(["umount", str(meta)], check=False)
            pytest.skip(f"cannot remount read-only here ({ro.stderr.strip()})")
        try:
            yield meta
        finally:
            subprocess.run(["umount", "-l", str(meta)], check=False)
    else:
        meta.chmod(0o555)
        try:
            yield meta
        finally:
            meta.chmod(0o755)


def test_reads_work_and_writes_name_the_read_only_folder(
    registered: str,
    read_only_metadata: Path,
    workspace_with_base: Workspace,
    run_cli: Callable[..., Result],
    fake_adapter: Callable[..., Path],
) -> None:
    with pytest.raises(OSError):  # honest: nothing can be written there, not even by root
        (read_only_metadata / "probe").write_text("x")
    before = files_of(read_only_metadata)
    listing = run_cli("adapters", "list")
    assert listing.exit_code == 0, listing.output
    assert registered in listing.output
    shown = run_cli("adapters", "show", registered)
    assert shown.exit_code == 0 and "steuerrecht" in shown.output
    verified = run_cli("adapters", "verify")
    assert verified.exit_code == 0, verified.output
    assert f"ok       {registered}" in verified.output
    for args in (
        ("adapters", "register", str(fake_adapter(seed=5)), "--domain", "sozialrecht"),
        ("adapters", "register", str(fake_adapter(seed=6)), "--domain", "sozialrecht", "--in-place"),
        ("adapters", "rm", registered, "--yes"),
    ):
        line = one_line_error(run_cli(*args))
        assert f"cannot write {workspace_with_base.registry_path}" in line, line
        assert str(read_only_metadata) in line and ("read-only" in line or "not writable" in line)
        no_destructive_advice(line)
    assert files_of(read_only_metadata) == before
    assert (workspace_with_base.adapters_dir / "steuerrecht" / "lora-r4-v1").is_dir()
    assert_serve_reads_the_registry(workspace_with_base, registered)


def assert_serve_reads_the_registry(workspace: Workspace, adapter_id: str) -> None:
    """What `clara serve` reads from the registry at start and per request works (engine left out)."""
    from clara_core import hookimpl
    from clara_core.plugins import PluginManager
    from clara_core.serving.app import ServeSettings
    from clara_core.serving.runner import _registry_lookup, prepare
    from clara_core.types import Engine, EngineImpl

    class Idle(EngineImpl):  # built, never started: only the registry reads are under test
        def __init__(self, base: object, options: object) -> None: ...
        async def start(self) -> None: ...
        async def load_adapter(self, adapter: object) -> None: ...
        async def unload_adapter(self, adapter_id: str) -> None: ...
        def loaded_adapters(self) -> list[str]:
            return []

        async def generate(self, request: object) -> Any:  # pragma: no cover - not called here
            yield None

        def render_chat(self, messages: object) -> str:
            return ""

    class Plugin:
        @hookimpl
        def register_engines(self, register: Callable) -> None:
            register(Engine("idle", Idle, "never started in these tests"))

    manager = PluginManager(load_entry_points=False)
    manager.register(Plugin(), name="idle")
    with Registry.open(workspace.registry_path) as registry:
        registry.check_integrity()  # what `clara serve` runs first
    state = prepare(
        workspace, manager, engine_name="idle", base_name=None, settings=ServeSettings(preload=[adapter_id])
    )
    assert state.base.name == "tiny"
    lookup, list_all = _registry_lookup(workspace.registry_path)
    assert lookup(adapter_id).id == adapter_id and [r.id for r in list_all()] == [adapter_id]


def test_a_read_only_registry_with_unmerged_changes_is_read_through_sqlites_read_only_mode(
    registered: str, workspace_with_base: Workspace
) -> None:
    """A WAL database whose writer is still open: the read-only connection must see the writer's latest
    commit (SQLite's mode=ro through the writer's -shm), not the stale main file (immutable=1 would)."""
    path = workspace_with_base.registry_path
    writer = sqlite3.connect(path)
    writer.execute("UPDATE adapters SET status = 'missing'")
    writer.commit()
    try:
        assert path.with_name("registry.db-wal").stat().st_size > 0
        conn = registry_db._open_read_only(path, "a test says so")
        assert conn.execute("SELECT status FROM adapters").fetchall() == [("missing",)]
        conn.close()
    finally:
        writer.close()


# -- 15: kill -9 during adapters register --copy ---------------------------------------------------------------

_KILLABLE_REGISTER = """
import shutil, sys
real_copy2 = shutil.copy2
def copy_then_wait(src, dst, **kwargs):
    result = real_copy2(src, dst, **kwargs)
    print("copying", flush=True)
    sys.stdin.readline()  # killed here, half-way through the copy
    return result
shutil.copy2 = copy_then_wait
from clara_core.cli import main
main(sys.argv[1:])
"""


def test_a_copy_killed_half_way_is_reported_by_verify_and_removed_by_the_next_command(
    workspace_with_base: Workspace,
    run_cli: Callable[..., Result],
    fake_adapter: Callable[..., Path],
    tmp_path: Path,
) -> None:
    large = fake_adapter("large")
    (large / "README.md").write_text("x" * (1 << 20))
    # a staging folder this (live) process is writing all along: never reported, never removed
    with workspace_with_base.staging("copy") as live:
        (live / "in-progress").write_text("still being written")
        command = ["-w", str(workspace_with_base.root), "adapters", "register", str(large), "--domain", "x"]
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILLABLE_REGISTER, *command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "CLARA_LOAD_PLUGINS": ""},
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "copying"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        left = [p for p in workspace_with_base.tmp_dir.iterdir() if p != live]
        assert len(left) == 1 and (left[0] / OWNER_FILE).is_file() and files_of(left[0] / "large")

        result = run_cli("adapters", "verify")
        assert result.exit_code == 0, result.output
        relative = workspace_with_base.relative(left[0])
        assert f"note     {relative} (" in result.output
        assert f"is a staging folder left by pid {proc.pid} (gone): the next" in result.output
        assert workspace_with_base.relative(live) not in result.output
        assert left[0].is_dir()  # verify reports, it does not delete

        registered = run_cli("adapters", "register", str(fake_adapter(seed=5)), "--domain", "sozialrecht")
        assert registered.exit_code == 0, registered.output
        assert not left[0].exists()
        assert (live / "in-progress").read_text() == "still being written"
    assert list(workspace_with_base.tmp_dir.iterdir()) == []


def test_an_unmarked_leftover_is_removed_only_when_its_pid_is_gone_and_it_is_old(
    workspace_with_base: Workspace,
) -> None:
    tmp = workspace_with_base.tmp_dir
    tmp.mkdir(parents=True, exist_ok=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    old_dead = tmp / f"copy-{dead_pid}-adapter"  # what clara before owner markers left
    fresh_dead = tmp / f"copy-{dead_pid}-other"
    old_alive = tmp / f"copy-{os.getpid()}-mine"
    for folder in (old_dead, fresh_dead, old_alive):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "weights").write_bytes(b"x" * 10)
    day_ago = __import__("time").time() - 2 * 24 * 3600
    for folder in (old_dead, old_alive):
        for path in [folder, *folder.rglob("*")]:
            os.utime(path, (day_ago, day_ago))
    unnamed = tmp / "tmpabc123"  # no pid, recent: possibly being made right now, never reported
    unnamed.mkdir()
    leftovers = {leftover.path: leftover.removable for leftover in workspace_with_base.staging_leftovers()}
    assert leftovers == {old_dead: True, fresh_dead: False}  # the fresh one is reported, not removed
    workspace_with_base.remove_abandoned_staging()
    assert not old_dead.exists() and fresh_dead.exists() and old_alive.exists() and unnamed.exists()


# -- 19 (and 18's full disk): a full disk ------------------------------------------------------------------------


def test_enospc_part_way_through_a_copy_is_one_line_and_leaves_nothing(
    workspace_with_base: Workspace,
    run_cli: Callable[..., Result],
    fake_adapter: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_copy2 = shutil.copy2
    calls = {"n": 0}

    def copy_until_full(src: str, dst: str, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:  # the second file: half written, then the disk is full
            Path(dst).write_bytes(Path(src).read_bytes()[:100])
            raise OSError(errno.ENOSPC, "No space left on device", dst)
        return real_copy2(src, dst)

    monkeypatch.setattr(shutil, "copy2", copy_until_full)
    line = one_line_error(run_cli("adapters", "register", str(fake_adapter()), "--domain", "steuerrecht"))
    assert line.startswith("Error: no space left on the disk holding ") and "Free some space" in line
    assert str(workspace_with_base.tmp_dir) in line
    assert calls["n"] == 2
    assert list(workspace_with_base.tmp_dir.iterdir()) == []
    assert not any(workspace_with_base.adapters_dir.rglob("*.safetensors"))
    with Registry.open(workspace_with_base.registry_path) as registry:
        assert registry.list_adapters() == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB file system (tmpfs), where the machine lets this test mount one."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "clara-test", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a size-limited tmpfs here ({done.stderr.strip() or done.returncode}); "
            "the full disk is covered by the injected ENOSPC test only"
        )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of ``folder`` until ENOSPC, then free ``leave`` bytes again."""
    filler = folder / "filler"
    with open(filler, "wb") as handle:
        chunk = b"\0" * 65536
        try:
            while True:
                handle.write(chunk)
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        if leave:
            handle.truncate(max(0, filler.stat().st_size - leave))
    return filler


def test_a_full_disk_keeps_reads_working_and_a_write_says_the_disk_is_full(
    small_disk: Path,
    tiny_base_dir: Path,
    tmp_path: Path,
    plugin_manager: object,
) -> None:
    from click.testing import CliRunner

    from clara_core.cli import ClaraContext, cli

    ws, _ = Workspace.init(small_disk / "ws")

    def run(*args: str) -> Result:
        obj = ClaraContext(workspace=ws.root, plugins=plugin_manager)  # type: ignore[arg-type]
        return CliRunner().invoke(cli, list(args), obj=obj)

    assert run("base", "add", str(tiny_base_dir), "--name", "tiny").exit_code == 0
    first = write_fake_adapter(tmp_path / "made" / "one", tiny_base_dir)
    assert run("adapters", "register", str(first), "--domain", "steuerrecht").exit_code == 0
    server_like = Registry.open(ws.registry_path)  # open before the disk fills up, as a running server is
    fill(small_disk)
    assert shutil.disk_usage(small_disk).free < 64 * 1024

    # a connection that was open already: its write hits SQLITE_FULL, its reads go on
    full = pytest.raises(RegistryDiskFull, match="no space left on the disk holding .*Free some space")
    with full, server_like.transaction():
        server_like.audit("test.blob", "x", {"blob": "x" * (2 << 20)})
    assert [r.id for r in server_like.list_adapters()] == ["steuerrecht-lora-r4-v1"]
    server_like.close()

    listing = run("adapters", "list")
    assert listing.exit_code == 0, listing.output
    assert "steuerrecht-lora-r4-v1" in listing.output
    assert run("adapters", "show", "steuerrecht-lora-r4-v1").exit_code == 0
    verified = run("adapters", "verify")
    assert verified.exit_code == 0, verified.output
    assert_serve_reads_the_registry(ws, "steuerrecht-lora-r4-v1")

    second = write_fake_adapter(tmp_path / "made" / "two", tiny_base_dir, seed=1)
    line = one_line_error(run("adapters", "register", str(second), "--domain", "sozialrecht", "--in-place"))
    assert f"cannot write {ws.registry_path}" in line and "full" in line and "Free some space" in line
    no_destructive_advice(line)


def test_a_full_disk_during_a_real_copy_removes_the_partial_copy(
    small_disk: Path,
    tiny_base_dir: Path,
    tmp_path: Path,
    plugin_manager: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from click.testing import CliRunner

    from clara_core import fileio
    from clara_core.cli import ClaraContext, cli

    ws, _ = Workspace.init(small_disk / "ws")

    def run(*args: str) -> Result:
        obj = ClaraContext(workspace=ws.root, plugins=plugin_manager)  # type: ignore[arg-type]
        return CliRunner().invoke(cli, list(args), obj=obj)

    with Registry.open(ws.registry_path) as registry:
        registry.add_base(tiny_base_dir, name="tiny", workspace=ws)
    large = write_fake_adapter(tmp_path / "made" / "large", tiny_base_dir)
    (large / "extra.bin").write_bytes(os.urandom(3 << 20))
    fill(small_disk, leave=1 << 20)
    free_before = shutil.disk_usage(small_disk).free

    # first the up-front check: nothing is copied at all
    line = one_line_error(run("adapters", "register", str(large), "--domain", "steuerrecht"))
    assert "needs 3.0 MB" in line and "free" in line and "nothing was copied" in line
    # then a disk that fills up during the copy (the free-space check fooled): the real ENOSPC
    monkeypatch.setattr(fileio, "_free_bytes", lambda path: 1 << 40)
    line = one_line_error(run("adapters", "register", str(large), "--domain", "steuerrecht"))
    assert line.startswith("Error: no space left on the disk holding ") and "Free some space" in line
    assert files_of(ws.tmp_dir) == [] and files_of(ws.adapters_dir) == []
    assert shutil.disk_usage(small_disk).free >= free_before - 64 * 1024  # the partial copy is gone
    with Registry.open(ws.registry_path) as registry:
        assert registry.list_adapters() == []
    assert json.loads((large / "adapter_config.json").read_text())["r"] == 4  # the source is untouched


@pytest.mark.parametrize(
    ("code", "name", "kind", "words"),
    [
        (5, "SQLITE_BUSY", RegistryLocked, "locked by another process"),
        (8, "SQLITE_READONLY", RegistryReadOnly, "cannot write"),
        (13, "SQLITE_FULL", RegistryDiskFull, "no space left"),
        (11, "SQLITE_CORRUPT", RegistryCorrupt, ".recover"),
        (26, "SQLITE_NOTADB", RegistryCorrupt, ".recover"),
    ],
)
def test_each_storage_fault_has_its_own_error_class_and_words(
    tmp_path: Path, code: int, name: str, kind: type, words: str
) -> None:
    exc = sqlite3.OperationalError("some words from SQLite")
    exc.sqlite_errorcode, exc.sqlite_errorname = code, name  # type: ignore[attr-defined]
    error = registry_db.classify(exc, tmp_path / "registry.db", waited=5)
    assert isinstance(error, kind) and words in str(error) and str(tmp_path / "registry.db") in str(error)
    if kind is not RegistryCorrupt:
        no_destructive_advice(str(error))
    constraint = sqlite3.IntegrityError("UNIQUE constraint failed: adapters.id")
    constraint.sqlite_errorcode = 2067  # type: ignore[attr-defined]  # SQLITE_CONSTRAINT_UNIQUE: not storage
    assert registry_db.classify(constraint, tmp_path / "registry.db") is constraint
