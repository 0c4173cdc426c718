"""Everything a plugin may import from clara, in one module.

A plugin's source imports from ``clara_core.plugin_api`` only; the rest of ``clara_core`` may move or change
between releases without notice, this module's names may not (within the core version range a plugin pins in
its ``pyproject.toml``, e.g. ``"clara-core>=0.1,<0.2"``). ``tests/test_plugin_api.py`` fails when a module under
``plugins/*/`` imports anything else from the core; plugin *tests* may use the core's test helpers
(``clara_core.tinymodels``, ``clara_core.plugins.PluginManager``, ``clara_core.workspace.Workspace``).

What is here:

- the hook marker :data:`hookimpl` and the registration classes (:class:`TrainerMethod`,
  :class:`MergeStrategy`, :class:`Engine`, :class:`Exporter`, :class:`Router`, with :class:`Option`);
- the interfaces implementations fill in (:class:`TrainerMethodImpl`, :class:`MergeStrategyImpl`,
  :class:`EngineImpl`, :class:`ExporterImpl`, :class:`RouterImpl`) and the request and result objects they
  receive and return; new request fields get defaults, so plugins keep working when they grow;
- the registry's records (:class:`AdapterRecord`, :class:`BaseRecord`) and, for plugins that work outside
  clara's own commands (the vLLM LoRA resolver), read access to a registry (:class:`Registry`,
  :func:`find_registry_path`) with the checks clara makes before an adapter is used
  (:func:`read_verified_adapter` for an engine that loads the very bytes it checked);
- the errors a plugin raises (:class:`ClaraError` and its subclasses; one line: what, where, what to do) and
  :func:`first_line` to quote a library's exception in one;
- helpers trainer methods build on (:func:`load_causal_lm`, :func:`lora_config`, ...) and file helpers that
  never leave a half-written file (:func:`write_text_atomic`, :func:`write_json_atomic`).

Importing this module is cheap: nothing heavy (torch, transformers, peft, vllm) is imported.
"""

from __future__ import annotations

from pathlib import Path

from .checks import check_adapter_for_base, read_verified_adapter
from .errors import (
    ClaraError,
    Conflict,
    ExportRejected,
    InvalidInput,
    NotFound,
    PluginError,
    RegistryError,
    UnknownPluginName,
    WorkspaceNotFound,
    first_line,
)
from .fileio import write_json_atomic, write_text_atomic
from .hashing import AdapterFiles, adapter_checksum, base_model_hash, read_adapter_config
from .hookspecs import hookimpl
from .naming import validate_adapter_id
from .records import AdapterRecord, BaseRecord
from .registry import Registry
from .training.methods import linear_module_names, load_causal_lm, lora_config, resolve_target_modules
from .types import (
    AdapterSpec,
    EmbedFn,
    Engine,
    EngineCapabilities,
    EngineImpl,
    EngineOptions,
    Exporter,
    ExporterImpl,
    ExportRequest,
    ExportResult,
    GenerationChunk,
    GenerationRequest,
    MergeCheckRequest,
    MergedModule,
    MergeStrategy,
    MergeStrategyImpl,
    ModuleDelta,
    ModuleMergeRequest,
    Option,
    OptionValueError,
    Registration,
    RouteDecision,
    Router,
    RouteRequest,
    RouterFitRequest,
    RouterImpl,
    TrainerMethod,
    TrainerMethodImpl,
)
from .workspace import Workspace


def find_registry_path(start: Path | None = None) -> Path:
    """The registry of the workspace clara's commands would use: ``CLARA_HOME``, else the current folder (or
    ``start``) and its parents. Raises :class:`WorkspaceNotFound` (a ``ClaraError``) when there is none."""
    return Workspace.find(start).registry_path


__all__ = [
    "AdapterFiles",
    "AdapterRecord",
    "AdapterSpec",
    "BaseRecord",
    "ClaraError",
    "Conflict",
    "EmbedFn",
    "Engine",
    "EngineCapabilities",
    "EngineImpl",
    "EngineOptions",
    "ExportRejected",
    "ExportRequest",
    "ExportResult",
    "Exporter",
    "ExporterImpl",
    "GenerationChunk",
    "GenerationRequest",
    "InvalidInput",
    "MergeCheckRequest",
    "MergeStrategy",
    "MergeStrategyImpl",
    "MergedModule",
    "ModuleDelta",
    "ModuleMergeRequest",
    "NotFound",
    "Option",
    "OptionValueError",
    "PluginError",
    "Registration",
    "Registry",
    "RegistryError",
    "RouteDecision",
    "RouteRequest",
    "Router",
    "RouterFitRequest",
    "RouterImpl",
    "TrainerMethod",
    "TrainerMethodImpl",
    "UnknownPluginName",
    "WorkspaceNotFound",
    "adapter_checksum",
    "base_model_hash",
    "check_adapter_for_base",
    "find_registry_path",
    "first_line",
    "hookimpl",
    "linear_module_names",
    "load_causal_lm",
    "lora_config",
    "read_adapter_config",
    "read_verified_adapter",
    "resolve_target_modules",
    "validate_adapter_id",
    "write_json_atomic",
    "write_text_atomic",
]
