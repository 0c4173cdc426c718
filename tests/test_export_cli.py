"""clara export NAME ID and clara export list: the core's side of exporting, with exporters registered by the
test (the real one, clara-plugin-gguf's 'ollama', has its own tests): a finished export is put in place and
recorded with every file's sha256; a rejected one is kept aside and not recorded; a crash or an interrupt
leaves nothing; bad input is one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from clara_core.cli import ClaraContext, cli
from clara_core.errors import ExportRejected, InvalidInput
from clara_core.hookspecs import hookimpl
from clara_core.plugins import PluginManager
from clara_core.types import Exporter, ExporterImpl, ExportRequest, ExportResult, Option
from clara_core.workspace import Workspace

SEEN: list[ExportRequest] = []


class CopyExporter(ExporterImpl):
    """Writes the adapter's config and a file of the requested size; behaviour chosen by the 'mode' option."""

    def export(self, request: ExportRequest) -> ExportResult:
        SEEN.append(request)
        mode = request.options["mode"]
        config = (request.adapter.path / "adapter_config.json").read_bytes()
        (request.out_dir / "adapter_config.json").write_bytes(config)
        (request.out_dir / "sub").mkdir()
        (request.out_dir / "sub" / "data.bin").write_bytes(b"x" * request.options["size"])
        request.echo(f"wrote {request.name}")
        if mode == "reject":
            raise ExportRejected("verification failed: max abs diff 3.0 > 0.01")
        if mode == "crash":
            raise RuntimeError("boom\nsecond line")
        if mode == "interrupt":
            raise KeyboardInterrupt
        if mode == "bad-file":
            return ExportResult(files=[request.out_dir / "nope.bin"])
        if mode == "bad-input":
            raise InvalidInput("this adapter cannot be exported: it has lm_head weights; use --merged")
        return ExportResult(
            files=[request.out_dir / "adapter_config.json", Path("sub/data.bin")],
            details={"verification": {"max_abs_diff": 0.0}},
            message="Run: ollama create x -f Modelfile",
        )


class Plugin:
    @hookimpl
    def register_exporters(self, register: Any) -> None:
        register(
            Exporter(
                "copy",
                CopyExporter,
                description="Copy an adapter's config (a test exporter).",
                options=(
                    Option("mode", str, default="ok", help="What to do."),
                    Option("size", int, default=3, help="Bytes of data.bin."),
                    Option("check", bool, default=True, help="A flag."),
                ),
            )
        )


@pytest.fixture
def plugins() -> PluginManager:
    manager = PluginManager(load_entry_points=False)
    manager.register(Plugin(), name="copy", distribution="clara-plugin-copy")
    return manager


@pytest.fixture
def ws(workspace_with_base: Workspace, fake_adapter, plugins: PluginManager) -> Workspace:
    result = run(
        workspace_with_base, plugins, "adapters", "register", str(fake_adapter()), "--domain", "steuer"
    )
    assert result.exit_code == 0, result.output
    return workspace_with_base


ADAPTER = "steuer-lora-r4-v1"


def run(ws: Workspace, plugins: PluginManager, *args: str) -> Result:
    obj = ClaraContext(workspace=ws.root, plugins=plugins)
    return CliRunner().invoke(cli, list(args), obj=obj, catch_exceptions=True)


def exports(ws: Workspace, plugins: PluginManager) -> list[dict]:
    result = run(ws, plugins, "export", "list", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def leftovers(ws: Workspace) -> list[Path]:
    tmp = ws.root / "metadata" / "tmp"
    return sorted(p for p in tmp.iterdir()) if tmp.is_dir() else []


def test_export_puts_the_files_in_place_and_records_them(ws: Workspace, plugins: PluginManager) -> None:
    result = run(ws, plugins, "export", "copy", ADAPTER)
    assert result.exit_code == 0, result.output
    folder = ws.root / "models" / "exports" / ADAPTER
    assert f"Exported {ADAPTER} as '{ADAPTER}' to {folder}" in result.output
    assert "ollama create x -f Modelfile" in result.output
    assert f"wrote {ADAPTER}" in result.stderr
    assert (folder / "sub" / "data.bin").read_bytes() == b"xxx"
    [entry] = exports(ws, plugins)
    assert entry["name"] == ADAPTER and entry["exporter"] == "copy" and entry["adapter_id"] == ADAPTER
    assert entry["path"] == f"models/exports/{ADAPTER}" and entry["present"] is True
    assert entry["options"] == {"mode": "ok", "size": 3, "check": True}
    assert entry["details"] == {"verification": {"max_abs_diff": 0.0}}
    assert {f["path"]: f["sha256"] for f in entry["files"]} == {
        "adapter_config.json": hashlib.sha256((folder / "adapter_config.json").read_bytes()).hexdigest(),
        "sub/data.bin": hashlib.sha256(b"xxx").hexdigest(),
    }
    request = SEEN[-1]
    assert request.cache_dir == ws.root / "models" / "cache" and request.name == ADAPTER
    assert leftovers(ws) == []
    table = run(ws, plugins, "export", "list")
    assert ADAPTER in table.output and "mode=ok" in table.output and "2 (" in table.output


def test_options_are_converted_and_named_in_the_default_name(ws: Workspace, plugins: PluginManager) -> None:
    result = run(ws, plugins, "export", "copy", ADAPTER, "--size", "5", "--no-check", "--json")
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)
    assert entry["name"] == f"{ADAPTER}-5-no-check"
    assert entry["options"] == {"mode": "ok", "size": 5, "check": False}
    bad = run(ws, plugins, "export", "copy", ADAPTER, "--size", "five")
    assert bad.exit_code == 2 and "--size" in bad.output and "Traceback" not in bad.output


def test_an_existing_folder_or_name_is_refused(ws: Workspace, plugins: PluginManager, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    result = run(ws, plugins, "export", "copy", ADAPTER, "--out", str(out))
    assert result.exit_code == 1
    assert f"the out folder {out} exists already" in result.output and "--out or --name" in result.output
    assert run(ws, plugins, "export", "copy", ADAPTER, "--out", str(tmp_path / "new")).exit_code == 0
    again = run(ws, plugins, "export", "copy", ADAPTER, "--out", str(tmp_path / "new2"))
    assert again.exit_code == 1 and f"an export named '{ADAPTER}' is registered already" in again.output
    assert not (tmp_path / "new2").exists()
    bad_name = run(ws, plugins, "export", "copy", ADAPTER, "--name", "../up")
    assert bad_name.exit_code == 1 and "not usable as a folder name" in bad_name.output


def test_a_rejected_export_is_kept_aside_and_not_registered(ws: Workspace, plugins: PluginManager) -> None:
    result = run(ws, plugins, "export", "copy", ADAPTER, "--mode", "reject", "--name", "v")
    assert result.exit_code == 1
    assert "verification failed: max abs diff 3.0 > 0.01; the rejected files are kept in" in result.output
    exports_dir = ws.root / "models" / "exports"
    [aside] = list(exports_dir.iterdir())
    assert aside.name.startswith("v.rejected-") and (aside / "sub" / "data.bin").is_file()
    assert not (exports_dir / "v").exists()
    assert exports(ws, plugins) == [] and leftovers(ws) == []
    # the name is free: a good export under it works afterwards
    assert run(ws, plugins, "export", "copy", ADAPTER, "--name", "v").exit_code == 0


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("crash", "exporter 'copy' failed: RuntimeError: boom"),
        ("bad-file", "the exporter reported nope.bin, which it did not write"),
        ("bad-input", "it has lm_head weights; use --merged"),
        ("interrupt", "Interrupted; nothing half-made was kept."),
    ],
)
def test_a_failed_export_leaves_nothing(
    ws: Workspace, plugins: PluginManager, mode: str, message: str
) -> None:
    result = run(ws, plugins, "export", "copy", ADAPTER, "--mode", mode)
    assert result.exit_code == (130 if mode == "interrupt" else 1)
    assert message in result.output and "Traceback" not in result.output
    assert "second line" not in result.output
    assert not (ws.root / "models" / "exports").exists() or not any(
        (ws.root / "models" / "exports").iterdir()
    )
    assert exports(ws, plugins) == [] and leftovers(ws) == []


def test_unknown_adapter_and_unknown_exporter(ws: Workspace, plugins: PluginManager) -> None:
    result = run(ws, plugins, "export", "copy", "steuer-lora-r4-v2")
    assert result.exit_code == 1 and "adapter 'steuer-lora-r4-v2' is not registered" in result.output
    result = run(ws, plugins, "export", "ollama", ADAPTER)
    assert result.exit_code == 2
    assert "unknown exporter 'ollama'; installed: copy" in result.output
    assert "pip install clara-plugin-gguf" in result.output
    listing = run(ws, plugins, "export", "--help")
    assert "copy" in listing.output and "list" in listing.output
    helped = run(ws, plugins, "export", "copy", "--help")
    assert "--no-check" in helped.output and "(default: 3)" in helped.output and "rejected" in helped.output


def test_an_export_whose_folder_went_missing_is_listed_so(ws: Workspace, plugins: PluginManager) -> None:
    assert run(ws, plugins, "export", "copy", ADAPTER).exit_code == 0
    (ws.root / "models" / "exports" / ADAPTER / "sub" / "data.bin").unlink()
    [entry] = exports(ws, plugins)
    assert entry["present"] is False
    assert "(missing)" in run(ws, plugins, "export", "list").output
