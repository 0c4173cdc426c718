"""``clara serve`` start-up errors: each is one line and exit 1, found before any model is loaded."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest
from click.testing import CliRunner, Result

from clara_core import hookimpl
from clara_core.cli import cli
from clara_core.errors import ClaraError
from clara_core.plugins import PluginManager
from clara_core.serving.runner import prepare
from clara_core.serving.state import ServeSettings
from clara_core.types import Engine
from clara_core.workspace import Workspace


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_unknown_engine_names_the_installed_ones(
    run_cli: Callable[..., Result], workspace_with_base: Workspace
) -> None:
    line = one_line_error(run_cli("--engine", "nosuch", "serve"))
    assert "unknown engine 'nosuch'" in line and "installed:" in line


def test_vllm_without_its_plugin_says_how_to_install_it(
    run_cli: Callable[..., Result], workspace_with_base: Workspace
) -> None:
    line = one_line_error(run_cli("--engine", "vllm", "serve"))
    assert "clara-plugin-vllm" in line and "pip install" in line


def test_port_in_use(run_cli: Callable[..., Result], workspace_with_base: Workspace) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        line = one_line_error(run_cli("serve", "--port", str(port)))
    assert f"port {port}" in line and "in use" in line and "--port" in line


def test_no_base_and_unknown_base(run_cli: Callable[..., Result], workspace: Workspace) -> None:
    class Plugin:
        @hookimpl
        def register_engines(self, register: Callable) -> None:
            register(Engine("dummy", lambda base, options: None, "never built in these tests"))

    manager = PluginManager(load_entry_points=False)
    manager.register(Plugin(), name="dummy")
    with pytest.raises(ClaraError, match="no base model is registered"):
        prepare(workspace, manager, engine_name="dummy", base_name=None, settings=ServeSettings())
    with pytest.raises(ClaraError, match="base 'nope' is not registered"):
        prepare(workspace, manager, engine_name="dummy", base_name="nope", settings=ServeSettings())
    with pytest.raises(ClaraError, match="no option 'colour'"):
        prepare(
            workspace,
            manager,
            engine_name="dummy",
            base_name=None,
            settings=ServeSettings(),
            engine_options={"colour": "red"},
        )
    with pytest.raises(ClaraError, match="--max-loaded must be at least 1"):
        prepare(workspace, manager, engine_name="dummy", base_name=None, settings=ServeSettings(max_loaded=0))
    with pytest.raises(ClaraError, match="--queue-timeout must be more than 0 seconds, got 0"):
        prepare(
            workspace, manager, engine_name="dummy", base_name=None, settings=ServeSettings(queue_timeout=0)
        )


def test_base_not_registered_through_the_cli(
    run_cli: Callable[..., Result], workspace_with_base: Workspace, plugin_manager: object
) -> None:
    class Plugin:
        @hookimpl
        def register_engines(self, register: Callable) -> None:
            register(Engine("dummy", lambda base, options: None, "never built in these tests"))

    plugin_manager.register(Plugin(), name="dummy")  # type: ignore[attr-defined]
    line = one_line_error(run_cli("--engine", "dummy", "serve", "--base", "nope", "--port", "0"))
    assert "base 'nope' is not registered" in line and "tiny" in line
    line = one_line_error(
        run_cli("--engine", "dummy", "serve", "--port", "0", "--preload", "nicht-lora-r4-v1")
    )
    assert "'nicht-lora-r4-v1' is not registered" in line
    line = one_line_error(run_cli("--engine", "dummy", "serve", "--port", "0", "-o", "oops"))
    assert "NAME=VALUE" in line
    result = run_cli("--engine", "dummy", "serve", "--port", "0", "--queue-timeout", "0")
    assert result.exit_code == 2 and "--queue-timeout" in result.output and "Traceback" not in result.output


def test_real_process_unknown_engine_is_one_line_without_traceback(workspace_with_base: Workspace) -> None:
    env = {**os.environ, "CLARA_HOME": str(workspace_with_base.root)}
    proc = subprocess.run(
        [sys.executable, "-m", "clara_core.cli", "--engine", "nosuch", "serve", "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "unknown engine 'nosuch'" in proc.stderr


def test_help_does_not_import_the_server_or_torch() -> None:
    code = (
        "import sys\n"
        "from clara_core.cli import main\n"
        "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'fastapi', 'uvicorn', 'prometheus_client') "
        "if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "--max-loaded" in proc.stdout
    assert "--queue-timeout SECONDS" in proc.stdout and "[default: 30.0;" in proc.stdout
    assert "HEAVY []" in proc.stdout, proc.stdout


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "myhost.example"])
def test_non_loopback_host_without_an_api_key_refuses_to_start(
    run_cli: Callable[..., Result],
    workspace_with_base: Workspace,
    monkeypatch: pytest.MonkeyPatch,
    host: str,
) -> None:
    monkeypatch.delenv("CLARA_API_KEY", raising=False)
    line = one_line_error(run_cli("serve", "--host", host, "--port", "0"))
    assert f"refusing to listen on {host} without an API key" in line
    assert "--api-key" in line and "--insecure-no-auth" in line
    # an empty key is no key, from the flag or the environment
    line = one_line_error(run_cli("serve", "--host", host, "--port", "0", "--api-key", ""))
    assert "without an API key" in line
    monkeypatch.setenv("CLARA_API_KEY", "")
    assert "without an API key" in one_line_error(run_cli("serve", "--host", host, "--port", "0"))


def test_insecure_no_auth_key_or_loopback_pass_the_auth_check(
    run_cli: Callable[..., Result],
    workspace_with_base: Workspace,
    plugin_manager: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each of these gets past the check to the next error (an unknown base), so nothing is served here."""

    class Plugin:
        @hookimpl
        def register_engines(self, register: Callable) -> None:
            register(Engine("dummy", lambda base, options: None, "never built in these tests"))

    plugin_manager.register(Plugin(), name="dummy")  # type: ignore[attr-defined]
    monkeypatch.delenv("CLARA_API_KEY", raising=False)
    serve = ("--engine", "dummy", "serve", "--port", "0", "--base", "nope")
    for extra in (
        ("--host", "127.0.0.1"),
        ("--host", "localhost"),
        ("--host", "::1"),
        ("--host", "0.0.0.0", "--api-key", "k"),
        ("--host", "0.0.0.0", "--insecure-no-auth"),
    ):
        result = run_cli(*serve, *extra)
        assert result.exit_code == 1, (extra, result.output)
        assert "base 'nope' is not registered" in result.output, (extra, result.output)
        assert "refusing" not in result.output
    monkeypatch.setenv("CLARA_API_KEY", "from-env")
    result = run_cli(*serve, "--host", "0.0.0.0")
    assert "base 'nope' is not registered" in result.output
    warned = run_cli(*serve, "--host", "0.0.0.0", "--insecure-no-auth", "--api-key", "")
    assert "warning: serving on 0.0.0.0 without an API key" in warned.output


def test_help_states_the_auth_rule() -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert "--insecure-no-auth" in result.output and "non-loopback" in result.output
