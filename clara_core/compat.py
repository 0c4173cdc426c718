"""Does an adapter fit a base? Answered from safetensors headers alone (no torch, no weights read).

A LoRA ``lora_A`` of shape [r, in] and ``lora_B`` of shape [out, r] must sit on a base module whose weight has
shape [out, in]. Reading only the JSON headers makes this cheap enough to run at registration and before
loading, even for a 15 GB base.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .errors import InvalidInput

_PEFT_PREFIXES = ("base_model.model.",)


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header."""
    try:
        with open(path, "rb") as handle:
            raw_len = handle.read(8)
            if len(raw_len) != 8:
                raise ValueError("file shorter than a safetensors header")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > 100_000_000:
                raise ValueError("implausible header length")
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{path}: not a readable safetensors file ({exc})") from exc
    return {name: info["shape"] for name, info in header.items() if name != "__metadata__"}


def base_shapes(base_path: Path) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for file in sorted(base_path.glob("*.safetensors")):
        shapes.update(safetensors_shapes(file))
    return shapes


def adapter_init(adapter_path: Path) -> object:
    """``init_lora_weights`` from the folder's adapter_config.json (``None`` when unreadable)."""
    try:
        config = json.loads((adapter_path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("init_lora_weights") if isinstance(config, dict) else None


def _module_of(key: str) -> tuple[str, str] | None:
    """``base_model.model.model.layers.0.q_proj.lora_A.weight`` -> (``model.layers.0.q_proj``, ``lora_A``)."""
    for marker in (".lora_A.", ".lora_B."):
        if marker in key:
            module = key.split(marker)[0]
            for prefix in _PEFT_PREFIXES:
                if module.startswith(prefix):
                    module = module[len(prefix) :]
            return module, marker.strip(".")
    return None


#: LoRA initialisations that move part of the base's weights into the adapter (PEFT rewrites the base as
#: W_res = W - A0 B0): their adapters fit only the changed base unless saved converted to a plain LoRA
#: (``save_pretrained(..., path_initial_model_for_weight_conversion=...)``), which PEFT can do for these.
CONVERTIBLE_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga")
#: ... and for these it cannot (LoftQ replaces the base weights by their quantised approximation).
UNCONVERTIBLE_BASE_CHANGING_INITS = ("loftq",)


def base_changing_init(init_lora_weights: object) -> str | None:
    """The name of a base-changing initialisation (``pissa``, ``olora``, ...) or ``None`` for one that leaves
    the base as it is (``True``, ``gaussian``, ``eva``, ...)."""
    text = str(init_lora_weights).strip().lower()
    for name in CONVERTIBLE_BASE_CHANGING_INITS + UNCONVERTIBLE_BASE_CHANGING_INITS:
        if text == name or text.startswith(name + "_"):
            return name
    return None


def adapter_base_mismatches(adapter_path: Path, base_path: Path, limit: int = 3) -> list[str]:
    """Human-readable reasons why the adapter does not fit the base; empty when it fits."""
    adapter = safetensors_shapes(adapter_path / "adapter_model.safetensors")
    base = base_shapes(base_path)
    problems: list[str] = []
    init = adapter_init(adapter_path)
    if base_changing_init(init) is not None:
        problems.append(
            f"its init_lora_weights {init!r} changed the base's weights while it was trained, so it fits only "
            "that changed base; save it converted to a plain LoRA (PEFT's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)) and register that"
        )
    for key, shape in sorted(adapter.items()):
        parsed = _module_of(key)
        if parsed is None:
            continue
        module, part = parsed
        base_shape = base.get(f"{module}.weight")
        if base_shape is None:
            problems.append(f"{module} does not exist in the base")
        elif len(base_shape) == 2 and len(shape) == 2:
            if part == "lora_A" and shape[1] != base_shape[1]:
                problems.append(f"{module}: adapter input size {shape[1]} != base {base_shape[1]}")
            if part == "lora_B" and shape[0] != base_shape[0]:
                problems.append(f"{module}: adapter output size {shape[0]} != base {base_shape[0]}")
        if len(problems) >= limit:
            break
    return problems
