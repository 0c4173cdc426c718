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
  never leave a half-written file (:func:`write_text_atomic`, :func:`write_json_atomic`);
- the LoRA tensor helpers composites use, for exporters that convert adapters and engines that apply them
  (:func:`lora_factors`, :func:`lora_scaling`, :func:`load_base_weights`, :func:`svd_lora_factors`,
  :func:`lora_relative_error`);
- for engines that implement :meth:`EngineImpl.embed`: :func:`hidden_at` (a layer's hidden states, the forward
  pass stopped there, exactly as the CLI embeds), :func:`layer_count` and :func:`resolve_layer`.

Importing this module is cheap: nothing heavy (torch, transformers, peft, vllm) is imported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

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
from .routing.embed import hidden_at, layer_count, resolve_layer
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
    check_prompt_fits,
)
from .workspace import Workspace


def lora_scaling(config: Mapping[str, Any], module: str, rank: int) -> float:
    """The LoRA scaling PEFT applies to ``module`` (``model.layers.0.self_attn.q_proj``) of an adapter with
    ``config`` (its ``adapter_config.json``) and this module's ``rank``: alpha/r, or alpha/sqrt(r) with rsLoRA,
    ``alpha_pattern`` honoured."""
    from .composites.tensors import module_scaling

    return module_scaling(config, module, rank)


def lora_factors(adapter_id: str, config: Mapping[str, Any], weights: bytes, *, biases: bool = False) -> Any:
    """An adapter's tensors by module name in the base (``model.layers.0.self_attn.q_proj``), read from its
    verified bytes: an object with dicts ``lora_A`` (``[r, in]``), ``lora_B`` (``[out, r]``), ``magnitude``
    (DoRA's magnitude vectors; empty for plain LoRA), ``scaling`` (PEFT's alpha/r per module, patterns and
    rsLoRA applied) and, with ``biases``, ``bias`` (the trained bias vectors of PEFT's ``bias="all"`` or
    ``"lora_only"``: the values, not a difference). :class:`InvalidInput` for anything else in the file (embedding
    LoRA, trained copies of whole modules, ``lora_bias``, ``fan_in_fan_out``, biases without ``biases``) or a
    non-LoRA adapter."""
    from .composites.tensors import parse_component

    return parse_component(adapter_id, dict(config), weights, biases=biases)


def load_base_weights(base_path: Path, modules: Iterable[str]) -> dict[str, Any]:
    """The dense float32 weights ``[out, in]`` of ``modules`` (names without ``.weight``) from the safetensors
    files of the base folder ``base_path``, reading only those tensors; :class:`InvalidInput` names missing ones."""
    from .composites.tensors import load_base_weights as load

    return load(base_path, modules)


def svd_lora_factors(delta: Any, rank: int) -> tuple[Any, Any]:
    """The truncated SVD of the dense ``delta`` ``[out, in]`` (a torch tensor) as balanced LoRA factors
    ``(A [rank, in], B [out, rank])`` with ``B @ A`` the best rank-``rank`` approximation (scaling 1)."""
    from .composites.tensors import _svd_factors

    return _svd_factors(delta, rank)


def lora_relative_error(delta: Any, lora_A: Any, lora_B: Any) -> float:
    """``||delta - B @ A||_F / ||delta||_F`` in float64 (0.0 for a zero ``delta``)."""
    from .composites.tensors import _relative_error

    return _relative_error(delta.double(), lora_A, lora_B)


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
    "check_prompt_fits",
    "find_registry_path",
    "first_line",
    "hidden_at",
    "hookimpl",
    "layer_count",
    "linear_module_names",
    "load_base_weights",
    "load_causal_lm",
    "lora_config",
    "lora_factors",
    "lora_relative_error",
    "lora_scaling",
    "read_adapter_config",
    "read_verified_adapter",
    "resolve_layer",
    "resolve_target_modules",
    "svd_lora_factors",
    "validate_adapter_id",
    "write_json_atomic",
    "write_text_atomic",
]
