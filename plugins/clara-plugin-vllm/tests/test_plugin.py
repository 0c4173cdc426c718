"""The plugin registers through clara's plugin manager, stays light to import, and says how to get vLLM."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import clara_plugin_vllm
import pytest
from clara_plugin_vllm.engine import VllmEngine
from clara_plugin_vllm.errors import NOT_INSTALLED, VllmNotInstalled
from click.testing import CliRunner

from clara_core.cli import ClaraContext, cli
from clara_core.plugins import KNOWN_PROVIDERS, PluginManager
from clara_core.types import EngineImpl, EngineOptions

PLUGIN_ROOT = Path(__file__).resolve().parents[1]
VLLM_PRESENT = importlib.util.find_spec("vllm") is not None


@pytest.fixture
def manager() -> PluginManager:
    pm = PluginManager(load_entry_points=False)
    pm.register(clara_plugin_vllm, name="vllm", distribution="clara-plugin-vllm")
    return pm


def test_the_engine_registers_through_a_fresh_plugin_manager(manager):
    engine = manager.engine("vllm")
    assert engine.name == "vllm"
    assert engine.factory is clara_plugin_vllm.make_engine
    assert "LoRA" in engine.description
    names = {o.name for o in engine.options}
    assert {"max_loras", "max_lora_rank", "max_cpu_loras", "tensor_parallel_size", "vllm_args"} <= names
    assert manager.provider_of(engine) == "clara-plugin-vllm"
    assert KNOWN_PROVIDERS[("engine", "vllm")] == "clara-plugin-vllm"
    info = next(p for p in manager.plugins() if p.name == "vllm")
    assert info.registers["engine"] == ["vllm"]


def test_the_engine_implements_the_whole_engine_interface():
    assert issubclass(VllmEngine, EngineImpl)
    assert not VllmEngine.__abstractmethods__
    assert VllmEngine.capabilities.mixed_adapter_batching is True
    for name in ("start", "load_adapter", "unload_adapter", "shutdown"):
        assert importlib.import_module("inspect").iscoroutinefunction(getattr(VllmEngine, name)), name
    assert importlib.import_module("inspect").isasyncgenfunction(VllmEngine.generate)


def test_importing_the_plugin_imports_neither_vllm_nor_torch():
    code = (
        "import sys, clara_plugin_vllm, clara_plugin_vllm.resolver, clara_plugin_vllm.translate\n"
        "heavy = [m for m in ('vllm', 'torch', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_without_vllm_the_factory_says_how_to_install_it(manager, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a)
    )
    with pytest.raises(VllmNotInstalled) as caught:
        manager.engine("vllm").create(object(), EngineOptions())
    message = str(caught.value)
    assert message == NOT_INSTALLED
    assert message.startswith("vLLM is not installed")
    assert "pip install vllm on a CUDA machine" in message and "--engine transformers" in message
    assert "\n" not in message


def test_a_vllm_that_fails_to_import_is_reported_in_one_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())

    def broken(name, *args):
        raise OSError("libcudart.so.12: cannot open shared object file\nmore detail")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(
        VllmNotInstalled, match=r"installed but cannot be imported \(OSError: libcudart"
    ) as caught:
        clara_plugin_vllm.require_vllm()
    assert "\n" not in str(caught.value) and "--engine transformers" in str(caught.value)


def test_pyproject_declares_vllm_and_both_entry_points():
    project = tomllib.loads((PLUGIN_ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "clara-plugin-vllm"
    assert any(dep.startswith("vllm") for dep in project["dependencies"])
    assert any(dep.startswith("clara-core") for dep in project["dependencies"])
    assert project["entry-points"]["clara"] == {"vllm": "clara_plugin_vllm"}
    assert project["entry-points"]["vllm.general_plugins"] == {
        "clara_resolver": "clara_plugin_vllm.resolver:register"
    }


def test_the_installed_distribution_exposes_the_entry_points():
    try:
        dist = importlib.metadata.distribution("clara-plugin-vllm")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("clara-plugin-vllm is not installed (pip install --no-deps -e plugins/clara-plugin-vllm)")
    entry_points = {(ep.group, ep.name): ep.value for ep in dist.entry_points}
    assert entry_points[("clara", "vllm")] == "clara_plugin_vllm"
    assert entry_points[("vllm.general_plugins", "clara_resolver")] == "clara_plugin_vllm.resolver:register"
    resolved = next(ep for ep in dist.entry_points if ep.group == "vllm.general_plugins").load()
    assert resolved is importlib.import_module("clara_plugin_vllm.resolver").register


@pytest.mark.skipif(
    VLLM_PRESENT, reason="vLLM is installed here, so 'clara --engine vllm serve' would start it"
)
def test_clara_engine_vllm_serve_without_vllm_prints_the_install_line(populated, manager):
    obj = ClaraContext(workspace=populated["workspace"].root, plugins=manager)
    result = CliRunner().invoke(
        cli, ["--engine", "vllm", "serve", "--port", "0"], obj=obj, catch_exceptions=True
    )
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "vLLM is not installed" in result.output
    assert "pip install vllm" in result.output and "--engine transformers" in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if "vLLM" in line]) == 1


@pytest.mark.skipif(VLLM_PRESENT, reason="vLLM is installed here")
def test_the_real_clara_command_without_vllm_exits_non_zero_without_a_traceback(populated):
    env = {"CLARA_HOME": str(populated["workspace"].root), "CLARA_LOAD_PLUGINS": "vllm"}
    result = subprocess.run(
        [sys.executable, "-m", "clara_core.cli", "--engine", "vllm", "serve", "--port", "0"],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, **env},
        timeout=120,
    )
    if "unknown engine 'vllm'" in result.stderr:
        pytest.skip("clara-plugin-vllm is not installed as a distribution in this environment")
    assert result.returncode != 0
    assert "vLLM is not installed" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
