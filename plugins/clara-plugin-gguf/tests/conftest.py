"""Shared fixtures for the GGUF plugin's tests: tiny Llama and Qwen2 bases (built once per session, read-only),
their :class:`BaseRecord`, and next-token logits from transformers and from llama.cpp for comparing the two.

Fixtures (all session-scoped unless noted):

- ``tiny_llama_dir`` / ``tiny_qwen2_dir``: folders with a tiny random model (safetensors) and clara's byte-level
  BPE tokenizer trained on German text; Qwen2 has biases and tied embeddings.
- ``llama_base`` / ``qwen2_base``: :class:`BaseRecord` for those folders, as the registry would hold them
  (``make_base(path, name=None)`` builds one for any folder, e.g. a test's own variant).
- ``demo_base_dir``: clara's demo base (``clara_core.demo.build_demo_base``), whose tokenizer llama.cpp does
  not know by name.
- ``hf_logits(model_dir, ids, adapter_dir=None)``: transformers' logits (float32) for the last position of
  ``ids``, with a PEFT adapter when given.
- ``gguf_logits(gguf_path, ids, lora_path=None)``: llama.cpp's logits for the last position of ``ids``
  (f32 KV cache, so an f32 GGUF agrees with transformers to ~1e-6).
- ``prompts``: a few fixed German prompts (function scope, a tuple of str).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clara_core.records import BaseRecord

PROMPTS = (
    "Das Finanzamt setzt die Einkommensteuer fest.",
    "Der Einspruch ist innerhalb eines Monats",
    "Wer erhält Bürgergeld nach dem SGB II?",
)

_TEXTS = [
    "Das Finanzamt setzt die Einkommensteuer durch Steuerbescheid fest.",
    "Der Einspruch ist innerhalb eines Monats nach Bekanntgabe einzulegen.",
    "Bürgergeld erhalten erwerbsfähige Leistungsberechtigte nach dem SGB II.",
    "Die Steuererklärung ist bis zum 31. Juli des Folgejahres abzugeben (§ 149 AO).",
]


def make_base_record(path: Path, name: str | None = None) -> BaseRecord:
    """A :class:`BaseRecord` for the model folder ``path``, with the hashes clara's registry computes."""
    from clara_core import hashing

    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return BaseRecord(
        name=name or path.name,
        path=path,
        base_model_hash=hashing.base_model_hash(path),
        tokenizer_hash=hashing.tokenizer_hash(path),
        architecture=(config.get("architectures") or [None])[0],
        model_type=config.get("model_type"),
        config=config,
        size_bytes=hashing.folder_size(path),
        created="2026-01-01T00:00:00Z",
    )


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clara_core.tinymodels import build_llama

    return build_llama(tmp_path_factory.mktemp("gguf-llama") / "tiny_llama", texts=_TEXTS * 3, seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clara_core.tinymodels import build_qwen2

    return build_qwen2(tmp_path_factory.mktemp("gguf-qwen2") / "tiny_qwen2", texts=_TEXTS * 3, seed=1)


@pytest.fixture(scope="session")
def demo_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clara_core.demo import build_demo_base

    return build_demo_base(tmp_path_factory.mktemp("gguf-demo") / "demo_base")


@pytest.fixture(scope="session")
def make_base() -> Callable[..., BaseRecord]:
    """``make_base(path, name=None) -> BaseRecord`` (test files cannot import conftest under importlib mode)."""
    return make_base_record


@pytest.fixture(scope="session")
def llama_base(tiny_llama_dir: Path) -> BaseRecord:
    return make_base_record(tiny_llama_dir, "tiny_llama")


@pytest.fixture(scope="session")
def qwen2_base(tiny_qwen2_dir: Path) -> BaseRecord:
    return make_base_record(tiny_qwen2_dir, "tiny_qwen2")


@pytest.fixture
def prompts() -> tuple[str, ...]:
    return PROMPTS


@pytest.fixture(scope="session")
def hf_logits() -> Callable[..., Any]:
    """``hf_logits(model_dir, ids, adapter_dir=None) -> numpy [vocab]`` (models cached per folder)."""
    cache: dict[tuple[str, str | None], Any] = {}

    def logits(model_dir: Path, ids: list[int], adapter_dir: Path | None = None) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        key = (str(model_dir), str(adapter_dir) if adapter_dir else None)
        if key not in cache:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
            if adapter_dir is not None:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, str(adapter_dir))
            cache[key] = model.eval()
        with torch.no_grad():
            return cache[key](torch.tensor([ids])).logits[0, -1].numpy()

    return logits


@pytest.fixture(scope="session")
def gguf_logits() -> Callable[..., Any]:
    """``gguf_logits(gguf_path, ids, lora_path=None) -> numpy [vocab]`` through llama-cpp-python."""

    def logits(gguf_path: Path, ids: list[int], lora_path: Path | None = None) -> Any:
        import numpy as np
        from llama_cpp import Llama

        llm = Llama(
            str(gguf_path),
            n_ctx=256,
            n_threads=1,
            logits_all=True,
            verbose=False,
            type_k=0,  # GGML_TYPE_F32: the default f16 KV cache alone costs ~1e-4 in the logits
            type_v=0,
            lora_path=str(lora_path) if lora_path else None,
        )
        try:
            llm.eval(ids)
            return np.array(llm.scores[len(ids) - 1], dtype=np.float32)
        finally:
            llm.close()

    return logits


#: Every linear projection of a Llama layer (adapters made by ``make_adapter`` target these by default).
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _make_adapter(
    base_dir: Path, out_dir: Path, *, seed: int, rank: int = 4, scale: float = 0.1, **lora
) -> Path:
    """A PEFT adapter with random non-zero factors (and, for DoRA, a perturbed magnitude)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora.setdefault("target_modules", ALL_PROJECTIONS)
    config = LoraConfig(r=rank, lora_alpha=lora.pop("lora_alpha", 2 * rank), task_type="CAUSAL_LM", **lora)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name or "lora_embedding" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.05 * torch.rand(param.shape, generator=generator))
            elif "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.01)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session")
def make_adapter() -> Callable[..., Path]:
    """``make_adapter(base_dir, out_dir, *, seed, rank=4, scale=0.1, **lora) -> out_dir``: a PEFT adapter with random
    non-zero factors (DoRA: a perturbed magnitude; modules_to_save: perturbed copies)."""
    return _make_adapter
