"""Workspace discovery, `clara init`, and the CLI's promises: one-line errors, no heavy imports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from clara_core.cli import ClaraContext, cli
from clara_core.errors import WorkspaceNotFound
from clara_core.workspace import Workspace, normalise_domain, validate_adapter_id


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("CLARA_HOME", "CLARA_LOAD_PLUGINS", "CLARA_ENGINE")
    }
    env.update(extra)
    return env


def test_init_makes_the_folder_convention_and_is_idempotent(tmp_path, plugin_manager):
    runner = CliRunner()
    target = tmp_path / "ws"
    first = runner.invoke(cli, ["init", str(target)], obj=ClaraContext(plugins=plugin_manager))
    assert first.exit_code == 0, first.output
    assert "Initialised clara workspace" in first.output
    for folder in ("models/base", "models/adapters", "models/composites", "metadata"):
        assert (target / folder).is_dir()
    assert (target / "metadata" / "registry.db").is_file()
    second = runner.invoke(cli, ["init", str(target)], obj=ClaraContext(plugins=plugin_manager))
    assert second.exit_code == 0 and "already a clara workspace" in second.output


def test_workspace_is_found_from_option_then_env_then_parents(tmp_path, monkeypatch):
    one, _ = Workspace.init(tmp_path / "one")
    two, _ = Workspace.init(tmp_path / "two")
    nested = one.root / "models" / "adapters" / "deep"
    nested.mkdir(parents=True)
    monkeypatch.delenv("CLARA_HOME", raising=False)
    assert Workspace.find(cwd=nested).root == one.root
    monkeypatch.setenv("CLARA_HOME", str(two.root))
    assert Workspace.find(cwd=nested).root == two.root
    assert Workspace.find(one.root).root == one.root
    monkeypatch.setenv("CLARA_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(WorkspaceNotFound, match="from CLARA_HOME.*clara init"):
        Workspace.find(cwd=nested)


def test_missing_workspace_is_one_line_and_exit_1(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "clara_core.cli", "adapters", "list"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(CLARA_LOAD_PLUGINS=""),
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"Error: no clara workspace in {tmp_path.resolve()} or its parents; run 'clara init' there, "
        "or point to one with --workspace DIR or CLARA_HOME"
    ]


def test_help_and_adapters_list_do_not_import_heavy_libraries(tmp_path):
    """With every installed plugin loaded, `clara --help` and `clara adapters list` stay light."""
    Workspace.init(tmp_path / "ws")
    probe = (
        "import sys\n"
        "from clara_core.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'vllm', 'llama_cpp', 'bitsandbytes', 'fastapi') if m in sys.modules]\n"
        "print('HEAVY:' + ','.join(heavy))\n"
        "sys.exit(code)\n"
    )
    for args in (["--help"], ["-w", str(tmp_path / "ws"), "adapters", "list"], ["plugins"]):
        result = subprocess.run(
            [sys.executable, "-c", probe, *args],
            capture_output=True,
            text=True,
            env=clean_env(),
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == "HEAVY:", (args, result.stdout[-300:])


def test_unexpected_arguments_get_clicks_usage_error(run_cli):
    result = run_cli("adapters", "list", "--bogus")
    assert result.exit_code == 2
    assert "No such option '--bogus'" in result.output


def test_domains_and_ids_are_normalised_or_refused():
    assert normalise_domain("Sozialrecht") == "sozialrecht"
    assert normalise_domain("Verwaltungs-Verfahren") == "verwaltungs_verfahren"
    assert normalise_domain("Gebührenrecht") == "gebuehrenrecht"
    assert validate_adapter_id("steuerrecht-lora-r16-v1") == "steuerrecht-lora-r16-v1"
    for bad in ("steuer/recht", "..", "a..b", "Steuer"):
        with pytest.raises(Exception, match="invalid"):
            validate_adapter_id(bad) if bad != "Steuer" else normalise_domain("Steuer!")


def test_workspace_paths_follow_the_plan(tmp_path):
    ws, _ = Workspace.init(tmp_path)
    assert (
        ws.adapter_dir(["steuerrecht"], "lora", 16, 1) == tmp_path / "models/adapters/steuerrecht/lora-r16-v1"
    )
    assert ws.relative(tmp_path / "models" / "base" / "x") == "models/base/x"
    assert ws.relative(Path("/elsewhere")) == "/elsewhere"
