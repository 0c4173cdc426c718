"""clara trainer method ``lora``: LoRA adapters on a full-precision base (fp32 on the CPU, bf16/fp16 on GPUs).

Importing this module is cheap: torch, transformers and peft are imported when a model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clara_core.plugin_api import (
    AdapterSpec,
    TrainerMethod,
    TrainerMethodImpl,
    hookimpl,
    load_causal_lm,
    lora_config,
)


class LoraMethod(TrainerMethodImpl):
    """Low-rank adapters (``lora_A``/``lora_B``) on every target module of an unquantised base."""

    recorded_packages = ("accelerate",)

    def load_base(
        self, base_path: Path, spec: AdapterSpec, *, dtype: Any = None, device_map: Any = None
    ) -> Any:
        return load_causal_lm(base_path, dtype=dtype, device_map=device_map)

    def peft_config(self, model: Any, spec: AdapterSpec, target_modules: list[str]) -> Any:
        return lora_config(spec, target_modules)


@hookimpl
def register_trainer_methods(register):
    register(
        TrainerMethod(
            "lora",
            LoraMethod,
            "LoRA on a full-precision base (fp32 / bf16 / fp16)",
        )
    )
