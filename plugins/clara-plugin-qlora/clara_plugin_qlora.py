"""clara trainer method ``qlora``: LoRA on a base quantised by bitsandbytes as it loads.

``--bits 4`` (default) loads the base as NF4 with double quantisation; ``--bits 8`` as LLM.int8. The base is
then prepared with PEFT's ``prepare_model_for_kbit_training`` (norms in fp32, input gradients, gradient
checkpointing) and LoRA adapters are trained in the compute dtype on top. The adapter itself is an ordinary
PEFT LoRA folder: it loads on a full-precision base as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clara_core.plugin_api import (
    AdapterSpec,
    InvalidInput,
    Option,
    TrainerMethod,
    TrainerMethodImpl,
    hookimpl,
    load_causal_lm,
    lora_config,
)


class QLoraMethod(TrainerMethodImpl):
    """LoRA on a 4-bit (NF4, double quantisation) or 8-bit base."""

    recorded_packages = ("bitsandbytes", "accelerate")

    def check(self, spec: AdapterSpec) -> None:
        bits = spec.options.get("bits", 4)
        if bits not in (4, 8):
            raise InvalidInput(f"--bits must be 4 or 8, not {bits}")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise InvalidInput(
                f"qlora needs bitsandbytes, which cannot be imported here ({exc}); pip install bitsandbytes"
            ) from exc

    def load_base(
        self, base_path: Path, spec: AdapterSpec, *, dtype: Any = None, device_map: Any = None
    ) -> Any:
        import torch
        from transformers import BitsAndBytesConfig

        compute_dtype = dtype if dtype is not None else torch.float32
        if spec.options.get("bits", 4) == 8:
            quantization = BitsAndBytesConfig(load_in_8bit=True)
        else:
            quantization = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=spec.options.get("quant_type") or "nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute_dtype,
            )
        return load_causal_lm(
            base_path,
            dtype=compute_dtype,
            device_map=device_map if device_map is not None else _default_device_map(),
            quantization_config=quantization,
        )

    def prepare(self, model: Any, spec: AdapterSpec) -> Any:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=bool(spec.options.get("gradient_checkpointing", True)),
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )

    def peft_config(self, model: Any, spec: AdapterSpec, target_modules: list[str]) -> Any:
        return lora_config(spec, target_modules)


def _default_device_map() -> dict[str, Any]:
    """bitsandbytes quantises on the device the weights land on: the local GPU, else the CPU."""
    import os

    import torch

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


@hookimpl
def register_trainer_methods(register):
    register(
        TrainerMethod(
            "qlora",
            QLoraMethod,
            "LoRA on a 4-bit NF4 (double quantisation) or 8-bit base via bitsandbytes",
            options=[
                Option("bits", int, 4, "Quantise the base to 4 (NF4) or 8 bits.", choices=(4, 8)),
                Option("quant_type", str, "nf4", "4-bit data type.", choices=("nf4", "fp4")),
                Option(
                    "gradient_checkpointing",
                    bool,
                    True,
                    "Recompute activations in the backward pass (less memory, slower).",
                ),
            ],
        )
    )
