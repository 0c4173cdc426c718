"""clara trainer method ``dora``: weight-decomposed low-rank adaptation (PEFT ``use_dora``).

DoRA learns a magnitude vector per adapted module besides LoRA's A and B. It is experimental (the plan's
"DoRA Reifegrad" risk), hence a separate distribution outside the default install.
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


class DoraMethod(TrainerMethodImpl):
    """LoRA's low-rank direction update plus a learned magnitude per output row."""

    recorded_packages = ("accelerate",)

    def load_base(
        self, base_path: Path, spec: AdapterSpec, *, dtype: Any = None, device_map: Any = None
    ) -> Any:
        return load_causal_lm(base_path, dtype=dtype, device_map=device_map)

    def peft_config(self, model: Any, spec: AdapterSpec, target_modules: list[str]) -> Any:
        return lora_config(spec, target_modules, use_dora=True)


@hookimpl
def register_trainer_methods(register):
    register(
        TrainerMethod(
            "dora",
            DoraMethod,
            "DoRA (weight-decomposed LoRA, PEFT use_dora); experimental",
        )
    )
