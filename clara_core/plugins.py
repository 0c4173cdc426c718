"""The plugin manager: finds plugins, collects what they register, and answers "which engine is 'x'?".

Plugins are modules behind entry points of the group ``clara``; they load on first use, not at import.
``CLARA_LOAD_PLUGINS=a,b`` limits which installed plugins load (entry-point or distribution names; an empty
value loads none; a name that matches no installed plugin is an error that lists the installed ones). A plugin
whose import fails, or whose pinned ``clara-core`` range excludes this core, is reported as a warning and the
rest of clara keeps working. Two plugins registering the same name is an error that names both distributions.
Each registration collected here carries ``registered_by`` (plugin, distribution, version), so that its
``create()`` can name the plugin when the implementation it builds is not what the kind promises.

Tests build a fresh :class:`PluginManager` and register fake plugins into it; nothing global needs undoing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import types as pytypes
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import attrs
import pluggy

from . import hookspecs
from .errors import PluginError, UnknownPluginName, first_line
from .types import (
    REGISTRATION_KINDS,
    Engine,
    Exporter,
    MergeStrategy,
    Registration,
    Router,
    TrainerMethod,
)

ENTRY_POINT_GROUP = "clara"

#: Modules inside clara-core that are registered like third-party plugins. Every concrete implementation
#: ships as its own distribution under ``plugins/``; this tuple is for the ones that may come to live in the
#: core itself, and they load exactly like the rest.
DEFAULT_PLUGINS: tuple[str, ...] = ()

#: The distributions that provide the names clara's own plugins register, for "install X" hints. Only
#: distributions that exist under ``plugins/`` belong here (``tests/test_plugin_api.py`` checks it).
KNOWN_PROVIDERS: dict[tuple[str, str], str] = {
    ("trainer method", "lora"): "clara-plugin-lora",
    ("trainer method", "qlora"): "clara-plugin-qlora",
    ("trainer method", "dora"): "clara-plugin-dora",
    ("engine", "transformers"): "clara-plugin-transformers",
    ("engine", "vllm"): "clara-plugin-vllm",
    ("merge strategy", "additive"): "clara-plugin-merge",
    ("merge strategy", "weighted"): "clara-plugin-merge",
    ("merge strategy", "sequential"): "clara-plugin-merge",
    ("merge strategy", "ties"): "clara-plugin-merge-ties",
    ("merge strategy", "dare_ties"): "clara-plugin-merge-ties",
    ("merge strategy", "dare_linear"): "clara-plugin-merge-ties",
    ("router", "embedding"): "clara-plugin-router",
    ("router", "keyword"): "clara-plugin-router",
    ("exporter", "ollama"): "clara-plugin-gguf",
    ("engine", "llamacpp"): "clara-plugin-gguf",
}

R = TypeVar("R", bound=Registration)


@attrs.define
class PluginInfo:
    """One loaded plugin: its entry-point name, distribution and what it registered, by kind."""

    name: str
    distribution: str
    version: str
    module: str
    registers: dict[str, list[str]] = attrs.field(factory=dict)
    hooks: list[str] = attrs.field(factory=list)
    #: What it registered, in registration order (for ``clara plugins``: descriptions and options).
    registrations: list[Registration] = attrs.field(factory=list)


def install_hint(distribution: str) -> str:
    return f"pip install {distribution} (from a clara checkout: pip install -e plugins/{distribution})"


class PluginManager:
    """Wraps pluggy's manager with clara's loading rules and typed, validated registrations."""

    def __init__(
        self,
        *,
        load_entry_points: bool = True,
        default_plugins: Iterable[str] = DEFAULT_PLUGINS,
        only: Iterable[str] | None = None,
    ) -> None:
        self.pm = pluggy.PluginManager("clara")
        self.pm.add_hookspecs(hookspecs)
        self.warnings: list[str] = []
        self._infos: dict[str, PluginInfo] = {}
        self._registrations: dict[str, dict[str, tuple[Registration, str]]] = {}
        self._load_entry_points = load_entry_points
        self._default_plugins = tuple(default_plugins)
        self._only = None if only is None else {n.strip() for n in only if n.strip()}
        self._loaded = False
        self._load_error: PluginError | None = None

    # -- loading -----------------------------------------------------------------------------------------------

    @classmethod
    def from_environment(cls) -> PluginManager:
        raw = os.environ.get("CLARA_LOAD_PLUGINS")
        only = None if raw is None else raw.split(",")
        return cls(only=only)

    def load(self) -> PluginManager:
        """Import default and installed plugins once; later calls do nothing.

        Raises :class:`PluginError` (now and on every later call) when ``CLARA_LOAD_PLUGINS`` names a plugin
        that is not installed, listing what is.
        """
        if self._load_error is not None:
            raise self._load_error
        if self._loaded:
            return self
        self._loaded = True
        for module_name in self._default_plugins:
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:  # a broken default plugin must not take the CLI down
                self.warnings.append(f"default plugin {module_name} failed to load: {_describe(exc)}")
                continue
            self.register(module, name=module_name, distribution="clara-core", version=_version("clara-core"))
        if self._load_entry_points:
            self._load_installed()
        if self._load_error is not None:
            raise self._load_error
        return self

    def _load_installed(self) -> None:
        try:
            entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        except Exception as exc:  # pragma: no cover - broken environment metadata
            self.warnings.append(f"could not read installed plugins: {_describe(exc)}")
            return
        seen: set[str] = set()
        installed: dict[str, str] = {}  # entry-point name -> distribution
        for ep in sorted(entry_points, key=lambda e: e.name):
            dist_name = ep.dist.name if ep.dist is not None else ep.name
            version = ep.dist.version if ep.dist is not None else "unknown"
            installed.setdefault(ep.name, dist_name)
            if ep.name in seen or ep.name in self._infos:
                continue
            seen.add(ep.name)
            if self._only is not None and ep.name not in self._only and dist_name not in self._only:
                continue
            mismatch = core_version_mismatch(ep.dist)
            if mismatch:
                self.warnings.append(f"plugin '{ep.name}' ({dist_name} {version}) is skipped: {mismatch}")
                continue
            try:
                module = ep.load()
            except Exception as exc:
                self.warnings.append(
                    f"plugin '{ep.name}' ({dist_name} {version}) failed to load and is skipped: {_describe(exc)}"
                )
                continue
            try:
                self.register(module, name=ep.name, distribution=dist_name, version=version)
            except PluginError as exc:
                self.warnings.append(f"plugin '{ep.name}' ({dist_name} {version}) is skipped: {exc}")
        if self._only:
            known = set(installed) | set(installed.values()) | set(self._default_plugins)
            unknown = sorted(self._only - known)
            if unknown:
                listing = ", ".join(f"{name} ({dist})" for name, dist in sorted(installed.items())) or "none"
                names = ", ".join(f"'{n}'" for n in unknown)
                self._load_error = PluginError(
                    f"CLARA_LOAD_PLUGINS names {names}, which no installed plugin has; installed: {listing}. "
                    "Use these entry-point or distribution names, or unset CLARA_LOAD_PLUGINS"
                )

    def register(
        self,
        plugin: Any,
        *,
        name: str | None = None,
        distribution: str | None = None,
        version: str = "unknown",
    ) -> None:
        """Register a plugin object or module (tests use this to add fakes to a fresh manager)."""
        plugin_name = name or getattr(plugin, "__name__", None) or repr(plugin)
        if plugin_name in self._infos:
            raise PluginError(f"a plugin named '{plugin_name}' is already registered")
        try:
            self.pm.register(plugin, name=plugin_name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise PluginError(f"plugin '{plugin_name}' is invalid: {exc}") from exc
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(plugin)
            raise PluginError(f"plugin '{plugin_name}' implements an unknown hook: {exc}") from exc
        module = plugin.__name__ if isinstance(plugin, pytypes.ModuleType) else type(plugin).__module__
        hooks = sorted(hc.name for hc in self.pm.get_hookcallers(plugin) or [] if not hc.name.startswith("_"))
        self._infos[plugin_name] = PluginInfo(
            name=plugin_name,
            distribution=distribution or plugin_name,
            version=version,
            module=module,
            hooks=hooks,
        )
        self._registrations.clear()  # recollect with the new plugin

    # -- registrations -----------------------------------------------------------------------------------------

    def _collect(self, hook_name: str) -> dict[str, tuple[Registration, str]]:
        """Call one ``register_*`` hook per plugin, so that each registration is tied to its plugin."""
        self.load()
        if hook_name in self._registrations:
            return self._registrations[hook_name]
        cls = REGISTRATION_KINDS[hook_name]
        collected: dict[str, tuple[Registration, str]] = {}
        hook = getattr(self.pm.hook, hook_name)
        for impl in reversed(hook.get_hookimpls()):  # registration order
            plugin_name = impl.plugin_name
            info = self._infos.get(plugin_name)

            def register(item: Any, _plugin: str = plugin_name) -> None:
                if not isinstance(item, cls):
                    raise PluginError(
                        f"plugin '{_plugin}' registered {item!r} from {hook_name}; "
                        f"expected a clara_core.plugin_api.{cls.__name__}"
                    )
                if item.name in collected:
                    first = collected[item.name][1]
                    raise PluginError(
                        f"{item.kind} '{item.name}' is registered by two plugins: "
                        f"{self._distribution(first)} and {self._distribution(_plugin)}; "
                        "uninstall one of them or limit loading with CLARA_LOAD_PLUGINS"
                    )
                collected[item.name] = (attrs.evolve(item, registered_by=self._origin(_plugin)), _plugin)

            kwargs = {"register": register}
            try:
                impl.function(**{arg: kwargs[arg] for arg in impl.argnames if arg in kwargs})
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin '{plugin_name}' ({self._distribution(plugin_name)}) failed in {hook_name}: "
                    f"{_describe(exc)}"
                ) from exc
            if info is not None:
                mine = [item for item, p in collected.values() if p == plugin_name]
                info.registers[cls.kind] = [item.name for item in mine]
                info.registrations = [r for r in info.registrations if not isinstance(r, cls)] + mine
        self._registrations[hook_name] = collected
        return collected

    def _distribution(self, plugin_name: str) -> str:
        info = self._infos.get(plugin_name)
        return info.distribution if info else plugin_name

    def _origin(self, plugin_name: str) -> str:
        """``plugin 'name' (distribution version)``, for messages about what the plugin registered."""
        info = self._infos.get(plugin_name)
        if info is None:
            return f"plugin '{plugin_name}'"
        return f"plugin '{plugin_name}' ({info.distribution} {info.version})"

    def _get(self, hook_name: str, name: str) -> Registration:
        collected = self._collect(hook_name)
        key = name.strip().lower()
        if key in collected:
            return collected[key][0]
        kind = REGISTRATION_KINDS[hook_name].kind
        installed = ", ".join(sorted(collected)) or "none"
        message = f"unknown {kind} '{name}'; installed: {installed}"
        provider = KNOWN_PROVIDERS.get((kind, key))
        if provider:
            message += f". It is provided by {provider}: {install_hint(provider)}"
        raise UnknownPluginName(message)

    def _all(self, hook_name: str, cls: type[R]) -> dict[str, R]:
        return {name: item for name, (item, _) in self._collect(hook_name).items() if isinstance(item, cls)}

    def trainer_methods(self) -> dict[str, TrainerMethod]:
        return self._all("register_trainer_methods", TrainerMethod)

    def merge_strategies(self) -> dict[str, MergeStrategy]:
        return self._all("register_merge_strategies", MergeStrategy)

    def engines(self) -> dict[str, Engine]:
        return self._all("register_engines", Engine)

    def exporters(self) -> dict[str, Exporter]:
        return self._all("register_exporters", Exporter)

    def routers(self) -> dict[str, Router]:
        return self._all("register_routers", Router)

    def trainer_method(self, name: str) -> TrainerMethod:
        return _typed(self._get("register_trainer_methods", name), TrainerMethod)

    def merge_strategy(self, name: str) -> MergeStrategy:
        return _typed(self._get("register_merge_strategies", name), MergeStrategy)

    def engine(self, name: str) -> Engine:
        return _typed(self._get("register_engines", name), Engine)

    def exporter(self, name: str) -> Exporter:
        return _typed(self._get("register_exporters", name), Exporter)

    def router(self, name: str) -> Router:
        return _typed(self._get("register_routers", name), Router)

    def provider_of(self, registration: Registration) -> str:
        """The distribution that registered ``registration``."""
        for hook_name, cls in REGISTRATION_KINDS.items():
            if isinstance(registration, cls):
                entry = self._collect(hook_name).get(registration.name)
                if entry is not None:
                    return self._distribution(entry[1])
        return "unknown"

    # -- commands and listing ----------------------------------------------------------------------------------

    def add_commands(self, cli: Any) -> None:
        self.load()
        for impl in reversed(self.pm.hook.register_commands.get_hookimpls()):
            try:
                impl.function(**{arg: cli for arg in impl.argnames if arg == "cli"})
            except Exception as exc:
                self.warnings.append(
                    f"plugin '{impl.plugin_name}' failed to add its commands: {_describe(exc)}"
                )

    def plugins(self) -> list[PluginInfo]:
        """Every loaded plugin with what it registers (collecting every kind first)."""
        self.load()
        for hook_name in REGISTRATION_KINDS:
            self._collect(hook_name)
        return sorted(self._infos.values(), key=lambda p: p.name)


def _typed(item: Registration, cls: type[R]) -> R:
    assert isinstance(item, cls)
    return item


def _describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (just ``Type`` when there is no message)."""
    name, line = type(exc).__name__, first_line(exc)
    return name if line == name else f"{name}: {line}"


def core_version_mismatch(dist: importlib.metadata.Distribution | None) -> str | None:
    """Why ``dist`` cannot run on this clara-core: the range it pins (``Requires-Dist: clara-core>=0.1,<0.2``)
    excludes the running version. ``None`` when it fits, pins nothing, or cannot be told.

    pip enforces the pin at install time, but not for plugins installed with ``--no-deps`` (the vLLM plugin on
    machines without CUDA) or copied onto the path; this check makes the pin hold at load time too.
    """
    if dist is None:
        return None
    try:
        from packaging.requirements import InvalidRequirement, Requirement
        from packaging.utils import canonicalize_name
    except ImportError:  # pragma: no cover - packaging comes with every pip-managed environment
        return None
    core = _version("clara-core")
    if core == "unknown":
        return None
    for line in dist.requires or []:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(requirement.name) != "clara-core" or requirement.marker is not None:
            continue
        if requirement.specifier and not requirement.specifier.contains(core, prereleases=True):
            return (
                f"it works with clara-core{requirement.specifier}, this is clara-core {core}; install a version "
                f"of the plugin made for clara-core {core}"
            )
    return None


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide manager, built from the environment and loaded on first use."""
    global _manager
    if _manager is None:
        _manager = PluginManager.from_environment()
    return _manager.load()


def set_plugin_manager(manager: PluginManager | None) -> PluginManager | None:
    """Swap the process-wide manager (for embedding and tests); returns the previous one."""
    global _manager
    previous, _manager = _manager, manager
    return previous


def warn_once(manager: PluginManager, emit: Callable[[str], None] | None = None) -> None:
    """Print the manager's plugin warnings once to stderr."""
    out = emit or (lambda line: print(line, file=sys.stderr))
    for warning in manager.warnings:
        out(f"clara: warning: {warning}")
    manager.warnings.clear()
