"""clara's ``vllm`` engine: many LoRA adapters on one base, served by vLLM's async engine on a GPU.

This module stays light (no vllm, no torch): clara imports it to list plugins and build ``--help``. vLLM is
imported when the engine is built (:func:`make_engine`), and the engine itself lives in
:mod:`clara_plugin_vllm.engine`. The vLLM LoRA resolver for plain ``vllm serve`` is
:mod:`clara_plugin_vllm.resolver`.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from clara_core.plugin_api import Engine, EngineOptions, first_line, hookimpl

from .errors import NOT_INSTALLED, VllmNotInstalled
from .translate import ENGINE_OPTIONS

__version__ = "0.1.0"

DESCRIPTION = "vLLM async engine on a CUDA GPU: continuous batching that mixes LoRA adapters in one batch"


def require_vllm() -> Any:
    """Import vLLM, or raise :class:`VllmNotInstalled` with the one line that says how to get it."""
    if importlib.util.find_spec("vllm") is None:
        raise VllmNotInstalled(NOT_INSTALLED)
    try:
        return importlib.import_module("vllm")
    except Exception as exc:  # a CUDA-less or torch-mismatched install fails here, not at find_spec
        reason = first_line(exc)
        raise VllmNotInstalled(
            f"vLLM is installed but cannot be imported ({type(exc).__name__}: {reason}); it needs a CUDA "
            "machine with the torch it was built for: reinstall it there with pip install vllm "
            "(or use --engine transformers)"
        ) from exc


def make_engine(base: Any, options: EngineOptions | None = None) -> Any:
    """The registration's factory: ``factory(base, options)`` as ``clara serve`` calls it."""
    require_vllm()
    from .engine import VllmEngine

    return VllmEngine(base, options or EngineOptions())


@hookimpl
def register_engines(register: Any) -> None:
    register(Engine("vllm", make_engine, DESCRIPTION, options=ENGINE_OPTIONS))
