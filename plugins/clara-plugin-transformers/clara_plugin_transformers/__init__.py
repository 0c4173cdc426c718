"""clara's default serving engine: transformers + PEFT with many adapters on one base.

Nothing heavy is imported here; torch, transformers and peft load when the engine is built.
"""

from __future__ import annotations

from typing import Any

from clara_core.plugin_api import Engine, Option, hookimpl


def make_engine(base: Any, options: Any) -> Any:
    from .engine import TransformersEngine

    return TransformersEngine(base, options)


@hookimpl
def register_engines(register: Any) -> None:
    register(
        Engine(
            "transformers",
            make_engine,
            "transformers + PEFT on CPU or GPU; many adapters on one base, mixed-adapter batches",
            options=(
                Option("device", str, "auto", "cpu, cuda, cuda:1, mps or auto (GPU when there is one)"),
                Option("dtype", str, "auto", "float32, bfloat16, float16 or auto (bf16 on GPU, fp32 on CPU)"),
                Option("max_batch_size", int, 32, "requests decoded together at most"),
                Option("threads", int, 0, "CPU threads for torch (0: torch's default, one per core)"),
            ),
        )
    )
