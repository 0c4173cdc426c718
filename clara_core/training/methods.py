"""Helpers that trainer-method plugins build on: load a base, build a LoRA-family config, find linear layers.

A method decides how the base is loaded and how the PEFT config is built; these functions hold the parts the
LoRA, QLoRA and DoRA plugins share, so that each plugin stays a few lines and depends on clara-core only.
torch, transformers and peft are imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InvalidInput, first_line
from ..types import AdapterSpec

#: Layer classes that count as "a linear projection" when choosing default target modules.
_LINEAR_CLASS_NAMES = frozenset({"Linear", "Linear4bit", "Linear8bitLt", "Conv1D"})
#: Output heads are never adapted by default (they tie to the vocabulary, and GGUF LoRA cannot carry them).
_EXCLUDED_LEAVES = frozenset({"lm_head", "embed_out", "output", "score", "classifier"})


def load_causal_lm(
    base_path: Path,
    *,
    dtype: Any = None,
    device_map: Any = None,
    quantization_config: Any = None,
) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` with clara's defaults (safetensors only, no remote code)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        return AutoModelForCausalLM.from_pretrained(str(base_path), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInput(
            f"{base_path}: cannot be loaded as a causal language model ({first_line(exc)}); give a Hugging Face "
            "model folder with config.json and safetensors weights"
        ) from exc


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of every linear projection in the transformer blocks (``q_proj``, ..., ``down_proj``)."""
    names: set[str] = set()
    for full_name, module in model.named_modules():
        if type(module).__name__ not in _LINEAR_CLASS_NAMES:
            continue
        leaf = full_name.rsplit(".", 1)[-1]
        if leaf in _EXCLUDED_LEAVES or "lora_" in full_name:
            continue
        names.add(leaf)
    return sorted(names)


def resolve_target_modules(model: Any, requested: list[str] | None) -> list[str]:
    """The requested modules (checked against the model) or, by default, all its linear projections."""
    available = linear_module_names(model)
    if not available:
        raise InvalidInput("the base model has no linear layers that LoRA could adapt")
    if not requested:
        return available
    unknown = [m for m in requested if m not in available]
    if unknown:
        raise InvalidInput(
            f"--target-modules: {', '.join(unknown)} not found in the base; its linear projections are "
            f"{', '.join(available)}"
        )
    return sorted(set(requested))


def lora_config(spec: AdapterSpec, target_modules: list[str], *, use_dora: bool = False) -> Any:
    """The ``peft.LoraConfig`` for ``spec`` (rank, alpha, dropout, rsLoRA) on ``target_modules``."""
    from peft import LoraConfig

    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.effective_alpha,  # type: ignore[arg-type]
        lora_dropout=spec.dropout,
        target_modules=list(target_modules),
        use_rslora=spec.use_rslora,
        use_dora=use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
