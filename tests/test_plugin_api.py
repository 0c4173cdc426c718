"""The plugin API's promises: one public surface, checked implementations, request objects, runnable examples,
pinned core versions, and `clara plugins` showing what each registration accepts."""

from __future__ import annotations

import ast
import inspect
import json
import re
import sys
import textwrap
import tomllib
import types as pytypes
from pathlib import Path
from types import SimpleNamespace

import attrs
import click
import pytest
from click.testing import CliRunner
from packaging.requirements import Requirement

import clara_core
from clara_core import hookspecs, plugin_api
from clara_core.cli import ClaraContext, cli
from clara_core.errors import PluginError
from clara_core.plugins import KNOWN_PROVIDERS, PluginManager
from clara_core.types import (
    REGISTRATION_KINDS,
    Engine,
    EngineImpl,
    EngineOptions,
    Exporter,
    ExporterImpl,
    ExportRequest,
    MergeCheckRequest,
    MergeStrategy,
    MergeStrategyImpl,
    ModuleDelta,
    ModuleMergeRequest,
    Option,
    Router,
    RouteRequest,
    RouterFitRequest,
    RouterImpl,
    TrainerMethod,
    TrainerMethodImpl,
)

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
PLUGIN_DIRS = sorted(p for p in PLUGINS.iterdir() if (p / "pyproject.toml").is_file())


@pytest.fixture(autouse=True)
def _no_process_wide_manager():
    """CONTRIBUTING's rule: tests build a fresh plugin manager; none may create or swap the process-wide one."""
    import clara_core.plugins

    before = clara_core.plugins._manager
    yield
    assert clara_core.plugins._manager is before, "a test used the process-wide plugin manager"


# -- what a plugin may import ------------------------------------------------------------------------------------


def plugin_source_files() -> list[Path]:
    """Every Python module of every plugin, its tests (and their conftest) excepted."""
    files = []
    for folder in PLUGIN_DIRS:
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder).parts
            if "tests" in relative or path.name == "conftest.py" or ".venv" in relative:
                continue
            files.append(path)
    return files


def core_imports_beyond_the_api(source: str) -> list[str]:
    """``clara_core`` imports in ``source`` other than ``clara_core.plugin_api`` (found with ast)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "clara_core":  # from clara_core import hookimpl / plugin_api
                names = [f"clara_core.{alias.name}" for alias in node.names]
            else:
                names = [node.module]
        else:
            continue
        for name in names:
            if (name == "clara_core" or name.startswith("clara_core.")) and name != "clara_core.plugin_api":
                found.append(f"line {node.lineno}: {name}")
    return found


def test_the_import_check_sees_every_way_of_reaching_into_the_core():
    source = textwrap.dedent(
        """
        import clara_core.registry
        from clara_core import hookimpl
        from clara_core.types import Engine
        from clara_core.plugin_api import Engine as Fine
        from clara_core import plugin_api
        import clara_core.plugin_api
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from clara_core.records import AdapterRecord
        def later():
            from clara_core.workspace import Workspace
        """
    )
    assert core_imports_beyond_the_api(source) == [
        "line 2: clara_core.registry",
        "line 3: clara_core.hookimpl",
        "line 4: clara_core.types",
        "line 10: clara_core.records",
        "line 12: clara_core.workspace",
    ]


def test_plugin_source_imports_only_the_plugin_api_from_the_core():
    files = plugin_source_files()
    assert {f.parent.name if f.parent.name.startswith("clara_plugin") else f.stem for f in files} >= {
        "clara_plugin_lora",
        "clara_plugin_qlora",
        "clara_plugin_dora",
        "clara_plugin_transformers",
        "clara_plugin_vllm",
    }
    offending = {
        str(path.relative_to(ROOT)): bad
        for path in files
        if (bad := core_imports_beyond_the_api(path.read_text(encoding="utf-8")))
    }
    assert offending == {}, f"plugins must import from clara_core.plugin_api only: {offending}"


def test_the_plugin_api_exports_what_it_lists_and_nothing_private():
    assert sorted(plugin_api.__all__) == plugin_api.__all__
    for name in plugin_api.__all__:
        assert hasattr(plugin_api, name), name
        assert not name.startswith("_")
    for needed in (
        "hookimpl",
        "Option",
        "first_line",
        "write_json_atomic",
        "ClaraError",
        "InvalidInput",
        "PluginError",
        *(cls.__name__ for cls in REGISTRATION_KINDS.values()),
        "TrainerMethodImpl",
        "MergeStrategyImpl",
        "EngineImpl",
        "ExporterImpl",
        "RouterImpl",
        "ModuleMergeRequest",
        "MergeCheckRequest",
        "ExportRequest",
        "RouterFitRequest",
        "RouteRequest",
        "GenerationRequest",
    ):
        assert needed in plugin_api.__all__, needed


def test_importing_the_plugin_api_imports_nothing_heavy():
    import subprocess

    code = (
        "import sys, clara_core.plugin_api\n"
        "print(','.join(m for m in ('torch', 'transformers', 'peft', 'vllm', 'fastapi') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


# -- version pins and install hints ------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", PLUGIN_DIRS, ids=lambda p: p.name)
def test_every_plugin_pins_the_core_version_range_it_works_with(folder):
    project = tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "clara-core"]
    assert len(core) == 1, f"{folder.name} must depend on clara-core once"
    specifier = core[0].specifier
    operators = {spec.operator for spec in specifier}
    assert operators & {">=", ">", "~=", "=="} and operators & {"<", "<=", "~=", "=="}, (
        f"{folder.name} pins no clara-core range (e.g. clara-core>=0.1,<0.2): {specifier}"
    )
    assert specifier.contains(clara_core.__version__), (
        f"{folder.name} does not accept this clara-core {clara_core.__version__}: {specifier}"
    )


def test_known_providers_name_only_plugins_that_exist():
    existing = {folder.name for folder in PLUGIN_DIRS}
    assert set(KNOWN_PROVIDERS.values()) <= existing
    assert (
        KNOWN_PROVIDERS[("exporter", "ollama")]
        == KNOWN_PROVIDERS[("engine", "llamacpp")]
        == "clara-plugin-gguf"
    )


# -- create(): the implementation is checked and the plugin named -----------------------------------------------


def make_plugin(**hooks):
    namespace = {name: staticmethod(clara_core.hookimpl(fn)) for name, fn in hooks.items()}
    return type("FakePlugin", (), namespace)()


@pytest.mark.parametrize(
    ("cls", "hook", "getter", "args"),
    [
        (TrainerMethod, "register_trainer_methods", "trainer_method", ()),
        (MergeStrategy, "register_merge_strategies", "merge_strategy", ()),
        (Engine, "register_engines", "engine", ("base", EngineOptions())),
        (Exporter, "register_exporters", "exporter", ()),
        (Router, "register_routers", "router", ()),
    ],
)
def test_create_refuses_a_factory_that_builds_the_wrong_thing_and_names_the_plugin(cls, hook, getter, args):
    manager = PluginManager(load_entry_points=False)

    def register(register):
        register(cls("x", lambda *a: object(), "builds the wrong thing"))

    manager.register(
        make_plugin(**{hook: register}), name="sloppy", distribution="clara-plugin-sloppy", version="0.3.0"
    )
    registration = getattr(manager, getter)("x")
    with pytest.raises(PluginError) as caught:
        registration.create(*args)
    message = str(caught.value)
    assert f"{cls.kind} 'x'" in message
    assert "plugin 'sloppy' (clara-plugin-sloppy 0.3.0)" in message
    assert "builtins.object" in message and "Impl" in message
    assert "\n" not in message


def test_trainer_method_with_object_as_factory_is_refused_at_create():
    with pytest.raises(
        PluginError, match=r"trainer method 'x' .*not an instance of clara_core.plugin_api.TrainerMethodImpl"
    ):
        TrainerMethod("x", object).create()


def test_create_names_the_plugin_when_its_factory_fails():
    manager = PluginManager(load_entry_points=False)

    def register_routers(register):
        register(Router("broken", lambda: 1 / 0))

    manager.register(make_plugin(register_routers=register_routers), name="b", distribution="clara-plugin-b")
    with pytest.raises(
        PluginError, match=r"router 'broken' from plugin 'b' \(clara-plugin-b .*ZeroDivisionError"
    ):
        manager.router("broken").create()


def test_create_returns_the_checked_implementation():
    class Strategy(MergeStrategyImpl):
        def merge_module(self, request):
            return None

    assert isinstance(MergeStrategy("s", Strategy).create(), Strategy)


# -- request objects --------------------------------------------------------------------------------------------


REQUESTS = [MergeCheckRequest, ModuleMergeRequest, ExportRequest, RouterFitRequest, RouteRequest]


@pytest.mark.parametrize("cls", REQUESTS, ids=lambda c: c.__name__)
def test_requests_are_keyword_only_so_they_can_grow(cls):
    fields = attrs.fields(cls)
    assert all(f.kw_only for f in fields)
    with pytest.raises(TypeError):
        cls("positional")


@pytest.mark.parametrize(
    ("impl", "method", "request_cls"),
    [
        (MergeStrategyImpl, "merge_module", ModuleMergeRequest),
        (MergeStrategyImpl, "check", MergeCheckRequest),
        (ExporterImpl, "export", ExportRequest),
        (RouterImpl, "fit", RouterFitRequest),
        (RouterImpl, "route", RouteRequest),
    ],
)
def test_interfaces_take_one_request_object(impl, method, request_cls):
    parameters = list(inspect.signature(getattr(impl, method)).parameters)
    assert parameters == ["self", "request"]
    assert request_cls.__name__ in str(inspect.signature(getattr(impl, method)).parameters["request"])


def test_a_plugin_written_against_a_request_keeps_working_when_it_grows():
    """New fields get defaults: a request class with one more field still serves an old implementation."""

    class OldRouter(RouterImpl):
        def fit(self, request):
            self.n = len(request.adapters)

        def route(self, request):
            return plugin_api.RouteDecision(None, float(len(request.prompt)))

        def save(self, state_dir): ...

        def load(self, state_dir): ...

    @attrs.frozen(kw_only=True)
    class GrownRouteRequest(RouteRequest):
        language: str = "de"

    router = OldRouter()
    router.fit(RouterFitRequest(adapters=[1, 2], base=None))
    assert router.n == 2
    assert router.route(GrownRouteRequest(prompt="abc")).score == 3.0


# -- every Example:: in hookspecs.py runs -------------------------------------------------------------------------


HOOKS = sorted(
    name
    for name, value in vars(hookspecs).items()
    if inspect.isfunction(value) and hasattr(value, "clara_spec")
)


def example_code(hook: str) -> str:
    """The indented block after ``Example::`` in the hook's docstring."""
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    _, _, after = doc.partition("Example::\n")
    block = []
    for line in after.splitlines():
        if line.strip() and not line.startswith("    "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block)).strip() + "\n"


def example_manager(hook: str, tmp_path: Path) -> tuple[PluginManager, pytypes.ModuleType]:
    """The hook's example, made a module and registered into a fresh plugin manager."""
    module = pytypes.ModuleType(f"clara_example_{hook}")
    module.__file__ = str(tmp_path / f"{module.__name__}.py")
    exec(compile(example_code(hook), module.__file__, "exec"), module.__dict__)
    manager = PluginManager(load_entry_points=False)
    manager.register(module, name=f"example-{hook}", distribution="clara-plugin-example")
    return manager, module


def test_every_hook_has_an_example_that_imports_only_the_plugin_api():
    for hook in HOOKS:
        code = example_code(hook)
        assert "@hookimpl" in code, hook
        assert core_imports_beyond_the_api(code) == [], hook
        compile(code, hook, "exec")


def test_example_register_trainer_methods_runs(tmp_path, tiny_base_dir):
    manager, _ = example_manager("register_trainer_methods", tmp_path)
    method = manager.trainer_method("mylora")
    assert [o.name for o in method.options] == ["dropout"]
    impl = method.create()
    assert isinstance(impl, TrainerMethodImpl)
    spec = plugin_api.AdapterSpec(rank=4, options={"dropout": 0.1})
    model = impl.load_base(tiny_base_dir, spec)
    config = impl.peft_config(model, spec, ["q_proj", "v_proj"])
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8.0, 0.1)
    assert set(config.target_modules) == {"q_proj", "v_proj"}


def test_example_register_merge_strategies_runs(tmp_path):
    import torch

    manager, _ = example_manager("register_merge_strategies", tmp_path)
    strategy = manager.merge_strategy("mean")
    assert strategy.options[0].name == "gain"
    impl = strategy.create()
    a = ModuleDelta("a", lora_A=torch.ones(2, 3), lora_B=torch.ones(4, 2), scaling=1.0, weight=1.5)
    b = ModuleDelta("b", lora_A=torch.zeros(2, 3), lora_B=torch.ones(4, 2), scaling=1.0)
    request = ModuleMergeRequest(module="q_proj", deltas=[a, b], options={"gain": 2.0})
    assert request.weights == (1.5, 1.0)
    merged = impl.merge_module(request)
    assert torch.equal(merged.dense_delta, torch.full((4, 3), 3.0))  # mean of 1.5*2 and 0, times 2


def test_example_register_engines_runs(tmp_path, monkeypatch):
    class MyEngine(EngineImpl):
        def __init__(self, base, options):
            self.base, self.options = base, options

        async def start(self): ...
        async def load_adapter(self, adapter): ...
        async def unload_adapter(self, adapter_id): ...
        def loaded_adapters(self):
            return []

        async def generate(self, request):  # pragma: no cover - not called here
            yield None

        def render_chat(self, messages):
            return ""

    package = pytypes.ModuleType("clara_plugin_myengine")
    package.__path__ = []
    engine_module = pytypes.ModuleType("clara_plugin_myengine.engine")
    engine_module.MyEngine = MyEngine
    package.engine = engine_module
    monkeypatch.setitem(sys.modules, "clara_plugin_myengine", package)
    monkeypatch.setitem(sys.modules, "clara_plugin_myengine.engine", engine_module)

    manager, _ = example_manager("register_engines", tmp_path)
    options = EngineOptions(max_loaded=2)
    engine = manager.engine("myengine").create("the base", options)
    assert isinstance(engine, MyEngine)
    assert (engine.base, engine.options) == ("the base", options)


def test_example_register_exporters_runs(tmp_path):
    manager, _ = example_manager("register_exporters", tmp_path)
    impl = manager.exporter("copy").create()
    adapter_dir, out_dir = tmp_path / "adapter", tmp_path / "out"
    adapter_dir.mkdir()
    out_dir.mkdir()
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"weights")
    result = impl.export(ExportRequest(adapter=SimpleNamespace(path=adapter_dir), base=None, out_dir=out_dir))
    assert result.files == [out_dir / "adapter_model.safetensors"]
    assert result.files[0].read_bytes() == b"weights"


def test_example_register_routers_runs(tmp_path):
    manager, _ = example_manager("register_routers", tmp_path)
    router = manager.router("first-word").create()
    adapters = [
        SimpleNamespace(id="steuer-lora-r4-v1", domain=["steuer"]),
        SimpleNamespace(id="sozial-lora-r4-v1", domain=["sozial"]),
    ]
    router.fit(RouterFitRequest(adapters=adapters, base=None))
    assert router.route(RouteRequest(prompt="Steuer: wer setzt sie fest?")).adapter_id is None  # "steuer:"
    assert router.route(RouteRequest(prompt="sozial Frage")).adapter_id == "sozial-lora-r4-v1"
    assert router.route(RouteRequest(prompt="")).adapter_id is None
    router.save(tmp_path)  # the example uses json: it must import it
    again = manager.router("first-word").create()
    again.load(tmp_path)
    decision = again.route(RouteRequest(prompt="steuer frage"))
    assert (decision.adapter_id, decision.score) == ("steuer-lora-r4-v1", 1.0)


def test_example_register_commands_runs(tmp_path):
    manager, _ = example_manager("register_commands", tmp_path)

    @click.group()
    def root():
        pass

    manager.add_commands(root)
    assert manager.warnings == []
    result = CliRunner().invoke(root, ["hello", "steuer-lora-r4-v1"])
    assert result.exit_code == 0, result.output
    assert result.output == "hello steuer-lora-r4-v1\n"


def test_every_hook_example_has_a_test():
    tests = {name for name in globals() if name.startswith("test_example_")}
    assert {f"test_example_{hook}_runs" for hook in HOOKS} == tests


# -- clara plugins: declared options; CLARA_LOAD_PLUGINS names that match nothing --------------------------------


def optioned_plugin():
    def register_engines(register):
        register(
            Engine(
                "fast",
                object,
                "a fast engine",
                options=[
                    Option("device", str, "cpu", "where to run", choices=["cpu", "cuda"]),
                    Option("threads", int, None, "CPU threads"),
                ],
            )
        )

    def register_trainer_methods(register):
        register(TrainerMethod("plain", object, "no options"))

    return make_plugin(register_engines=register_engines, register_trainer_methods=register_trainer_methods)


def test_clara_plugins_shows_each_registrations_options_as_json():
    manager = PluginManager(load_entry_points=False)
    manager.register(optioned_plugin(), name="opt", distribution="clara-plugin-opt", version="2.0")
    result = CliRunner().invoke(cli, ["plugins", "--json"], obj=ClaraContext(plugins=manager))
    assert result.exit_code == 0, result.output
    (listed,) = json.loads(result.output)
    assert listed["registers"] == {"trainer method": ["plain"], "engine": ["fast"]}
    by_name = {r["name"]: r for r in listed["registrations"]}
    assert by_name["plain"] == {
        "kind": "trainer method",
        "name": "plain",
        "description": "no options",
        "options": [],
    }
    assert by_name["fast"]["kind"] == "engine"
    assert by_name["fast"]["options"] == [
        {
            "name": "device",
            "type": "str",
            "default": "cpu",
            "choices": ["cpu", "cuda"],
            "help": "where to run",
        },
        {"name": "threads", "type": "int", "default": None, "choices": None, "help": "CPU threads"},
    ]


def test_clara_plugins_shows_each_registrations_options_as_text():
    manager = PluginManager(load_entry_points=False)
    manager.register(optioned_plugin(), name="opt", distribution="clara-plugin-opt", version="2.0")
    result = CliRunner().invoke(cli, ["plugins"], obj=ClaraContext(plugins=manager))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "Options of engine 'fast' (clara-plugin-opt):" in lines
    device = next(line for line in lines if line.strip().startswith("device"))
    assert re.search(r"device\s+str\s+cpu\s+cpu, cuda\s+where to run", device)
    threads = next(line for line in lines if line.strip().startswith("threads"))
    assert re.search(r"threads\s+int\s+-\s+-\s+CPU threads", threads)
    assert "Options of trainer method 'plain'" not in result.output  # nothing declared, nothing shown


def test_a_clara_load_plugins_name_that_matches_nothing_is_an_error_listing_what_is_installed(monkeypatch):
    monkeypatch.setenv("CLARA_LOAD_PLUGINS", "lora,nosuch")
    manager = PluginManager.from_environment()
    with pytest.raises(PluginError) as caught:
        manager.load()
    message = str(caught.value)
    assert "CLARA_LOAD_PLUGINS names 'nosuch'" in message
    assert "lora (clara-plugin-lora)" in message  # what is installed, by entry point and distribution
    with pytest.raises(PluginError):  # and again on every use, not only the first
        manager.engines()

    result = CliRunner().invoke(cli, ["plugins"], obj=ClaraContext(plugins=PluginManager.from_environment()))
    assert result.exit_code == 1
    assert "CLARA_LOAD_PLUGINS names 'nosuch'" in result.output
    assert "No plugins installed" not in result.output
    assert "Traceback" not in result.output


def test_clara_plugins_with_an_unknown_name_fails_in_a_real_process(tmp_path):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "CLARA_HOME"}
    env["CLARA_LOAD_PLUGINS"] = "nosuch"
    result = subprocess.run(
        [sys.executable, "-m", "clara_core.cli", "plugins"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "CLARA_LOAD_PLUGINS names 'nosuch'" in result.stderr
    assert "installed: " in result.stderr and "Traceback" not in result.stderr
    # --help still works and says why plugin commands are missing
    helped = subprocess.run(
        [sys.executable, "-m", "clara_core.cli", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert helped.returncode == 0 and "Usage:" in helped.stdout
    assert "CLARA_LOAD_PLUGINS names 'nosuch'" in helped.stderr


# -- engines get what they need from the server -------------------------------------------------------------------


def test_clara_serve_hands_the_engine_the_largest_rank_of_the_served_bases_adapters(
    workspace_with_base, fake_adapter, other_base_dir
):
    """``EngineOptions.max_adapter_rank`` is the largest ``r`` or ``rank_pattern`` value among the registry's
    adapters for the served base; adapters of other bases do not count."""
    from clara_core import hashing
    from clara_core.records import AdapterDraft
    from clara_core.registry import Registry
    from clara_core.serving.app import ServeSettings
    from clara_core.serving.runner import prepare

    built = []

    class Recording(EngineImpl):
        def __init__(self, base, options):
            built.append(options)

        async def start(self): ...
        async def load_adapter(self, adapter): ...
        async def unload_adapter(self, adapter_id): ...
        def loaded_adapters(self):
            return []

        async def generate(self, request):  # pragma: no cover - not called here
            yield None

        def render_chat(self, messages):
            return ""

    def register_engines(register):
        register(Engine("recording", Recording))

    def serve_options() -> EngineOptions:
        manager = PluginManager(load_entry_points=False)
        manager.register(make_plugin(register_engines=register_engines), name="rec")
        prepare(
            workspace_with_base, manager, engine_name="recording", base_name="tiny", settings=ServeSettings()
        )
        return built[-1]

    first = serve_options()
    assert first.max_adapter_rank is None  # nothing registered yet
    assert (
        first.cache_dir == workspace_with_base.root / "models" / "cache"
    )  # engines' converted files go there

    with Registry.open(workspace_with_base.registry_path) as registry:
        base = registry.get_base("tiny")
        other = registry.add_base(other_base_dir, name="other", workspace=workspace_with_base)

        def add(folder, base_record, rank, peft_config):
            draft = AdapterDraft(
                domain=[folder.name],
                method="lora",
                rank=rank,
                base_model_hash=base_record.base_model_hash,
                adapter_checksum=hashing.adapter_checksum(folder),
                peft_config=peft_config,
            )
            registry.register_adapter(draft, folder, workspace_with_base, place="copy")

        add(fake_adapter("steuer", rank=4), base, 4, {"r": 4})
        add(fake_adapter("sozial", rank=8), base, 8, {"r": 8, "rank_pattern": {"q_proj": 24}})
        add(fake_adapter("fremd", base_dir=other_base_dir, rank=64), other, 64, {"r": 64})

    assert serve_options().max_adapter_rank == 24
    assert "registry_path" not in attrs.fields_dict(EngineOptions)


# -- the pin holds at load time too ------------------------------------------------------------------------------


def test_an_installed_plugin_whose_core_range_excludes_this_core_is_skipped_with_a_warning(
    tmp_path, monkeypatch
):
    site = tmp_path / "site"
    site.mkdir()
    for dist, module, pin in [
        ("clara-plugin-future", "clara_test_future", "clara-core>=9.0,<10"),
        ("clara-plugin-fits", "clara_test_fits", f"clara-core>={clara_core.__version__},<99"),
    ]:
        (site / f"{module}.py").write_text(
            "from clara_core.plugin_api import Router, hookimpl\n\n"
            "@hookimpl\n"
            "def register_routers(register):\n"
            f"    register(Router('{module[len('clara_test_') :]}', object))\n"
        )
        info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\nRequires-Dist: {pin}\n"
        )
        (info / "entry_points.txt").write_text(f"[clara]\n{module} = {module}\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("CLARA_LOAD_PLUGINS", "clara_test_future,clara_test_fits")
    manager = PluginManager.from_environment()
    assert list(manager.routers()) == ["fits"]
    (warning,) = manager.warnings
    assert "plugin 'clara_test_future' (clara-plugin-future 1.0) is skipped" in warning
    assert f"works with clara-core<10,>=9.0, this is clara-core {clara_core.__version__}" in warning
    assert "clara_test_future" not in sys.modules  # not even imported


def test_the_contributing_example_plugin_imports_only_the_plugin_api():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "contributing_example", ROOT / "tests/test_contributing_example.py"
    )
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    files = example.example_files()
    module = files["plugins/clara-plugin-pissa/clara_plugin_pissa.py"]
    assert "clara_core.plugin_api" in module
    assert core_imports_beyond_the_api(module) == []
    pin = tomllib.loads(files["plugins/clara-plugin-pissa/pyproject.toml"])["project"]["dependencies"][0]
    assert Requirement(pin).name == "clara-core" and Requirement(pin).specifier.contains(
        clara_core.__version__
    )


def test_check_prompt_fits_is_the_one_prompt_check_of_every_engine() -> None:
    from clara_core.plugin_api import GenerationRequest, InvalidInput, check_prompt_fits

    request = GenerationRequest(prompt="x", max_tokens=8)
    check_prompt_fits([1, 2], request, 10)
    check_prompt_fits([1] * 100, request, None)
    with pytest.raises(InvalidInput, match="^the prompt is empty; send some text to complete$"):
        check_prompt_fits([], request, 10)
    with pytest.raises(InvalidInput) as caught:
        check_prompt_fits([1, 2, 3], request, 10)
    assert (
        str(caught.value) == "prompt (3 tokens) plus max_tokens (8) exceeds the model's context of 10 tokens"
    )
    for plugin in ("clara-plugin-transformers", "clara-plugin-gguf", "clara-plugin-vllm"):
        source = next((ROOT / "plugins" / plugin).glob("clara_plugin_*/engine.py")).read_text()
        assert "check_prompt_fits(prompt_ids, request, self.capabilities.max_model_len)" in source
        assert "exceeds the" not in source  # no engine keeps its own copy of the check
