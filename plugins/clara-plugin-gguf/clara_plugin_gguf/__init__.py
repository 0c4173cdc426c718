"""clara's GGUF plugin: the ``ollama`` exporter and the ``llamacpp`` serving engine.

Nothing heavy is imported here (``clara --help`` loads this module): ``gguf``, ``llama_cpp``, torch and
transformers are imported inside the functions that need them.
"""

from __future__ import annotations

from typing import Any

from clara_core.plugin_api import Exporter, ExporterImpl, hookimpl


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
