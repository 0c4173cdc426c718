"""The plugin system: hooks, typed registrations, loading rules, conflicts, unknown names, `clara plugins`."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest

from clara_core import hookimpl, hookspecs
from clara_core.errors import PluginError, UnknownPluginName
from clara_core.plugins import PluginManager
from clara_core.types import (
    Engine,
    EngineImpl,
    EngineOptions,
    Exporter,
    MergeStrategy,
    Option,
    Router,
    TrainerMethod,
    normalise_name,
)

HOOK_NAMES = sorted(
    name
    for name, value in vars(hookspecs).items()
    if inspect.isfunction(value) and hasattr(value, "clara_spec")
)


@pytest.fixture(autouse=True)
def _no_process_wide_manager():
    """CONTRIBUTING's rule: tests build a fresh plugin manager; none may create or swap the process-wide one."""
    import clara_core.plugins

    before = clara_core.plugins._manager
    yield
    assert clara_core.plugins._manager is before, "a test used the process-wide plugin manager"


def make_plugin(**hooks):
    """A plugin object whose attributes are hook implementations."""
    namespace = {name: staticmethod(hookimpl(fn)) for name, fn in hooks.items()}
    return type("FakePlugin", (), namespace)()


# -- each hook, registered into a fresh manager ----------------------------------------------------------------


def test_register_trainer_methods_is_collected(plugin_manager):
    def register_trainer_methods(register):
        register(TrainerMethod("MyLoRA", object, "fake method", options=[Option("bits", int, 4, "bits")]))

    plugin_manager.register(make_plugin(register_trainer_methods=register_trainer_methods), name="fake")
    method = plugin_manager.trainer_method("mylora")
    assert method.name == "mylora"
    assert method.options[0].flag == "--bits"
    assert list(plugin_manager.trainer_methods()) == ["mylora"]


def test_register_merge_strategies_is_collected(plugin_manager):
    def register_merge_strategies(register):
        register(
            MergeStrategy(
                "ties",
                object,
                "fake",
                options=[Option("majority_sign", str, "total", choices=["total", "frequency"])],
            )
        )

    plugin_manager.register(make_plugin(register_merge_strategies=register_merge_strategies), name="fake")
    strategy = plugin_manager.merge_strategy("ties")
    assert strategy.options[0].flag == "--majority-sign"
    assert strategy.options[0].choices == ("total", "frequency")


def test_register_engines_is_collected_and_factory_is_lazy(plugin_manager):
    built = []

    class FakeEngine(EngineImpl):
        def __init__(self, base, options):
            built.append((base, options))

        def start(self): ...
        def load_adapter(self, adapter): ...
        def unload_adapter(self, adapter_id): ...
        def loaded_adapters(self):
            return []

        async def generate(self, request):  # pragma: no cover - not called here
            yield None

        def render_chat(self, messages):
            return ""

    def register_engines(register):
        register(Engine("fake", FakeEngine, "fake engine"))

    plugin_manager.register(make_plugin(register_engines=register_engines), name="fake")
    engine = plugin_manager.engine("FAKE")
    assert built == []  # registering builds nothing
    options = EngineOptions(max_loaded=2)
    instance = engine.create("base", options)
    assert isinstance(instance, FakeEngine)
    assert built == [("base", options)]
    assert engine.registered_by == "plugin 'fake' (fake unknown)"


def test_register_exporters_is_collected(plugin_manager):
    def register_exporters(register):
        register(Exporter("ollama", object, "fake exporter"))

    plugin_manager.register(make_plugin(register_exporters=register_exporters), name="fake")
    assert plugin_manager.exporter("ollama").description == "fake exporter"


def test_register_routers_is_collected(plugin_manager):
    def register_routers(register):
        register(Router("keyword", object, "fake router"))

    plugin_manager.register(make_plugin(register_routers=register_routers), name="fake")
    assert list(plugin_manager.routers()) == ["keyword"]


def test_register_commands_adds_a_cli_command(workspace, plugin_manager):
    from click.testing import CliRunner

    from clara_core.cli import ClaraContext, ClaraGroup

    def register_commands(cli):
        @cli.command()
        @click.argument("name")
        def hello(name):
            """Say hello."""
            click.echo(f"hello {name}")

    plugin_manager.register(make_plugin(register_commands=register_commands), name="fake")

    @click.group(cls=ClaraGroup)
    def root():
        pass

    obj = ClaraContext(workspace=workspace.root, plugins=plugin_manager)
    result = CliRunner().invoke(root, ["hello", "world"], obj=obj)
    assert result.exit_code == 0, result.output
    assert result.output == "hello world\n"
    listing = CliRunner().invoke(root, ["--help"], obj=obj)
    assert "hello" in listing.output


def test_hook_implementations_get_only_the_arguments_they_ask_for(plugin_manager):
    calls = []

    def register_routers():  # asks for nothing: allowed, pluggy passes a subset
        calls.append("called")

    plugin_manager.register(make_plugin(register_routers=register_routers), name="quiet")
    assert plugin_manager.routers() == {}
    assert calls == ["called"]


# -- datasette's rules: every hook tested and documented -------------------------------------------------------


def test_every_hook_has_a_test():
    source = Path(__file__).read_text(encoding="utf-8")
    tests = {name for name in dir(sys.modules[__name__]) if name.startswith("test_")}
    for hook in HOOK_NAMES:
        assert any(hook in test_name for test_name in tests), f"hook {hook} has no test named after it"
        assert f"def {hook}(" in source


def test_every_hook_is_documented_with_an_example():
    assert HOOK_NAMES == [
        "register_commands",
        "register_engines",
        "register_exporters",
        "register_merge_strategies",
        "register_routers",
        "register_trainer_methods",
    ]
    for hook in HOOK_NAMES:
        doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
        assert len(doc.splitlines()[0]) > 20, f"{hook} has no summary line"
        assert "Example::" in doc and "@hookimpl" in doc, f"{hook} has no minimal plugin example"


# -- validation, conflicts and unknown names -------------------------------------------------------------------


def test_two_plugins_registering_one_name_is_an_error_naming_both(plugin_manager):
    def one(register):
        register(Engine("shared", object))

    def two(register):
        register(Engine("Shared", object))

    plugin_manager.register(
        make_plugin(register_engines=one), name="first", distribution="clara-plugin-first"
    )
    plugin_manager.register(
        make_plugin(register_engines=two), name="second", distribution="clara-plugin-second"
    )
    with pytest.raises(PluginError) as info:
        plugin_manager.engines()
    message = str(info.value)
    assert "engine 'shared'" in message
    assert "clara-plugin-first" in message and "clara-plugin-second" in message


def test_unknown_name_lists_installed_and_names_the_package(plugin_manager):
    def register_engines(register):
        register(Engine("transformers", object))

    plugin_manager.register(make_plugin(register_engines=register_engines), name="t")
    with pytest.raises(UnknownPluginName) as info:
        plugin_manager.engine("vllm")
    assert str(info.value).startswith("unknown engine 'vllm'; installed: transformers.")
    assert "pip install clara-plugin-vllm" in str(info.value)
    with pytest.raises(
        UnknownPluginName, match="unknown trainer method 'dora'; installed: none.*clara-plugin-dora"
    ):
        plugin_manager.trainer_method("dora")
    with pytest.raises(UnknownPluginName) as info:
        plugin_manager.router("nonesuch")
    assert "pip install" not in str(info.value)


def test_registering_the_wrong_type_is_an_error(plugin_manager):
    def register_engines(register):
        register(TrainerMethod("lora", object))

    plugin_manager.register(make_plugin(register_engines=register_engines), name="confused")
    with pytest.raises(PluginError, match="expected a clara_core.plugin_api.Engine"):
        plugin_manager.engines()


def test_a_misspelt_hook_is_refused(plugin_manager):
    def register_engine(register):  # singular: not a clara hook
        pass

    with pytest.raises(PluginError, match="unknown hook"):
        plugin_manager.register(make_plugin(register_engine=register_engine), name="typo")


def test_a_hook_that_raises_is_reported_with_its_plugin(plugin_manager):
    def register_engines(register):
        raise RuntimeError("boom")

    plugin_manager.register(
        make_plugin(register_engines=register_engines), name="broken", distribution="clara-plugin-broken"
    )
    with pytest.raises(PluginError, match="clara-plugin-broken.*RuntimeError: boom"):
        plugin_manager.engines()


def test_names_are_normalised_and_validated():
    assert normalise_name("  VLLM ") == "vllm"
    assert normalise_name("Dare_Ties") == "dare_ties"
    with pytest.raises(ValueError):
        normalise_name("bad/name")
    with pytest.raises(ValueError):
        Option("x", list)
    with pytest.raises(ValueError):
        Engine("", object)


def test_default_plugins_load_like_installed_ones(tmp_path, monkeypatch):
    (tmp_path / "clara_test_default_plugin.py").write_text(
        textwrap.dedent(
            """
            from clara_core import hookimpl
            from clara_core.types import Router

            @hookimpl
            def register_routers(register):
                register(Router("builtin", object, "a default plugin"))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    manager = PluginManager(load_entry_points=False, default_plugins=["clara_test_default_plugin"])
    assert list(manager.routers()) == ["builtin"]
    info = manager.plugins()[0]
    assert info.distribution == "clara-core"
    assert info.registers["router"] == ["builtin"]


# -- installed plugins: entry points, CLARA_LOAD_PLUGINS, broken imports ---------------------------------------


def make_distribution(site: Path, dist: str, module: str, source: str) -> None:
    """An installed distribution on ``site`` with one module and an entry point in the group ``clara``."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[clara]\n{module} = {module}\n")


GOOD_PLUGIN = """
    from clara_core import hookimpl
    from clara_core.types import Engine

    @hookimpl
    def register_engines(register):
        register(Engine("good-engine", object, "works"))
"""

BROKEN_PLUGIN = """
    raise ImportError("needs a library that is missing")
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "clara-plugin-good", "clara_test_good", GOOD_PLUGIN)
    make_distribution(site, "clara-plugin-broken", "clara_test_broken", BROKEN_PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    return site


def test_a_plugin_that_fails_to_import_is_a_warning(site, monkeypatch):
    monkeypatch.delenv("CLARA_LOAD_PLUGINS", raising=False)
    manager = PluginManager.from_environment()
    assert "good-engine" in manager.engines()
    broken = [w for w in manager.warnings if "clara_test_broken" in w]
    assert len(broken) == 1
    assert "clara-plugin-broken 1.2.3" in broken[0] and "needs a library that is missing" in broken[0]
    good = next(p for p in manager.plugins() if p.name == "clara_test_good")
    assert (good.distribution, good.version) == ("clara-plugin-good", "1.2.3")


def test_clara_load_plugins_limits_what_loads(site, monkeypatch):
    monkeypatch.setenv("CLARA_LOAD_PLUGINS", "clara-plugin-broken")
    manager = PluginManager.from_environment()
    assert manager.engines() == {}
    assert len(manager.warnings) == 1
    monkeypatch.setenv("CLARA_LOAD_PLUGINS", "clara_test_good")
    manager = PluginManager.from_environment()
    assert list(manager.engines()) == ["good-engine"]
    assert manager.warnings == []
    monkeypatch.setenv("CLARA_LOAD_PLUGINS", "")
    manager = PluginManager.from_environment()
    assert manager.plugins() == []


def test_clara_plugins_command_lists_installed_plugins_and_warns(site, tmp_path):
    env = {**_clean_env(), "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-m", "clara_core.cli", "plugins", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    listed = {p["name"]: p for p in json.loads(result.stdout)}
    assert listed["clara_test_good"]["registers"] == {"engine": ["good-engine"]}
    assert listed["clara_test_good"]["version"] == "1.2.3"
    assert "clara_test_broken" not in listed
    assert "warning: plugin 'clara_test_broken'" in result.stderr
    assert "Traceback" not in result.stderr

    table = subprocess.run(
        [sys.executable, "-m", "clara_core.cli", "plugins"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    line = next(x for x in table.stdout.splitlines() if x.startswith("clara_test_good"))
    assert "clara-plugin-good" in line and "1.2.3" in line and "engine: good-engine" in line


def _clean_env():
    import os

    env = dict(os.environ)
    env.pop("CLARA_LOAD_PLUGINS", None)
    env.pop("CLARA_HOME", None)
    return env
