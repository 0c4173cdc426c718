"""clara's GGUF plugin: the ``ollama`` exporter and the ``llamacpp`` serving engine.

Nothing heavy is imported here (``clara --help`` loads this module): ``gguf``, ``llama_cpp``, torch and
transformers are imported inside the functions that need them.
"""

from __future__ import annotations

from typing import Any

from clara_core.plugin_api import Engine, EngineOptions, Exporter, ExporterImpl, Option, hookimpl


def _ollama_exporter() -> ExporterImpl:
    from .exporter import OllamaExporter

    return OllamaExporter()


@hookimpl
def register_exporters(register: Any) -> None:
    from .exporter import exporter_options

    register(
        Exporter(
            "ollama",
            _ollama_exporter,
            "GGUF base + GGUF LoRA adapter (or one merged GGUF) and a Modelfile, verified against transformers",
            exporter_options(),
        )
    )


def make_engine(base: Any, options: EngineOptions | None = None) -> Any:
    """The ``llamacpp`` registration's factory (``clara --engine llamacpp serve``); llama_cpp loads on start."""
    from .engine import LlamaCppEngine

    return LlamaCppEngine(base, options or EngineOptions())


@hookimpl
def register_engines(register: Any) -> None:
    from .engine import DEFAULT_N_CTX, DEFAULT_OUTTYPE, OUTTYPES

    register(
        Engine(
            "llamacpp",
            make_engine,
            "llama.cpp on the GGUF export of the base; GGUF adapters loaded once and hot-swapped per request "
            "(requests on different adapters take turns)",
            options=(
                Option(
                    "outtype",
                    str,
                    DEFAULT_OUTTYPE,
                    "weight type of the GGUF base (converted once and cached per base and type); f32 also keeps the "
                    "KV cache in f32",
                    choices=OUTTYPES,
                ),
                Option(
                    "n_ctx", int, DEFAULT_N_CTX, "context tokens (prompt plus answer); 0: the model's own"
                ),
                Option("n_threads", int, 0, "CPU threads for llama.cpp (0: its default, half the cores)"),
                Option("n_gpu_layers", int, 0, "layers offloaded to the GPU (-1: all; needs a GPU build)"),
                Option(
                    "svd_rank",
                    int,
                    0,
                    "rank of the truncated SVD a DoRA adapter is served as (0: the adapter's own; higher is closer "
                    "to the DoRA model); plain LoRA adapters are exact",
                ),
            ),
        )
    )
