"""clara's GGUF plugin: the ``ollama`` exporter and the ``llamacpp`` serving engine.

Nothing heavy is imported here (``clara --help`` loads this module): ``gguf``, ``llama_cpp``, torch and
transformers are imported inside the functions that need them.
"""

from __future__ import annotations
