"""Base conversion to GGUF: llama.cpp computes what transformers computes, names and row order agree with what
adapters will use, the tokenizer tokenizes identically, bad bases get one clear line, nothing half-written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from clara_plugin_gguf.base import (
    convert_base,
    row_transform,
    tensor_name,
)

from clara_core.plugin_api import BaseRecord, InvalidInput

pytest.importorskip("gguf", reason="the GGUF plugin's tests need the gguf library (pip install gguf)")
pytest.importorskip(
    "llama_cpp", reason="the GGUF plugin's tests need llama-cpp-python (pip install llama-cpp-python)"
)


def _quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[BaseRecord, str], Path]:
    """``converted(base, outtype)``: the base as GGUF, converted once per module."""
    folder = tmp_path_factory.mktemp("converted")
    done: dict[tuple[str, str], Path] = {}

    def get(base: BaseRecord, outtype: str) -> Path:
        key = (base.base_model_hash, outtype)
        if key not in done:
            done[key] = convert_base(base, outtype, folder / f"{base.name}-{outtype}.gguf", echo=_quiet)
        return done[key]

    return get


def _ids(base: BaseRecord, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(str(base.path))(text, add_special_tokens=False)["input_ids"])


@pytest.fixture
def compare(prompts: tuple[str, ...], hf_logits: Callable, gguf_logits: Callable) -> Callable:
    """``compare(base, gguf_path)``: [(transformers logits, llama.cpp logits)] per prompt, last position."""

    def run(base: BaseRecord, path: Path) -> list[tuple[Any, Any]]:
        return [
            (hf_logits(base.path, ids), gguf_logits(path, ids)) for ids in (_ids(base, p) for p in prompts)
        ]

    return run


# -- logits ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["llama_base", "qwen2_base"])
def test_f32_gguf_computes_what_transformers_computes(
    which: str, request: pytest.FixtureRequest, converted: Callable, compare: Callable
) -> None:
    base = request.getfixturevalue(which)
    for expected, got in compare(base, converted(base, "f32")):
        assert abs(expected - got).max() < 1e-4
        assert expected.argmax() == got.argmax()


# -- names and row order (what adapters rely on) ---------------------------------------------------------------


def test_tensor_names_follow_llama_cpp(llama_base: BaseRecord) -> None:
    config = llama_base.config
    assert tensor_name(config, "model.layers.0.self_attn.q_proj") == "blk.0.attn_q"
    assert tensor_name(config, "base_model.model.model.layers.1.mlp.down_proj") == "blk.1.ffn_down"
    assert tensor_name(config, "model.layers.1.self_attn.o_proj.weight") == "blk.1.attn_output"
    assert tensor_name(config, "lm_head") == "output"
    assert tensor_name(config, "model.embed_tokens") == "token_embd"
    with pytest.raises(InvalidInput, match="model.layers.7.self_attn.q_proj"):
        tensor_name(config, "model.layers.7.self_attn.q_proj")  # the tiny base has 2 layers
    with pytest.raises(InvalidInput, match="vision_tower"):
        tensor_name(config, "vision_tower.proj")


def _written(path: Path) -> dict[str, Any]:
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    # GGUFReader gives ggml's shape order; reshape to PyTorch's [out, in]
    return {t.name: np.array(t.data).reshape([int(n) for n in reversed(t.shape)]) for t in reader.tensors}


@pytest.mark.parametrize("which", ["llama_base", "qwen2_base"])
def test_row_transform_is_what_the_conversion_wrote(
    which: str, request: pytest.FixtureRequest, converted: Callable
) -> None:
    import torch
    from safetensors.torch import load_file

    base = request.getfixturevalue(which)
    hf = load_file(str(base.path / "model.safetensors"))
    written = _written(converted(base, "f32"))
    permuted = []
    for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj"):
        hf_module = f"model.layers.1.{module}"
        weight = hf[f"{hf_module}.weight"]
        transform = row_transform(base.config, hf_module)
        expected = transform(weight) if transform else weight
        gguf_weight = torch.from_numpy(written[f"{tensor_name(base.config, hf_module)}.weight"].copy())
        assert torch.equal(gguf_weight, expected)
        if transform is not None:
            permuted.append(module)
            assert not torch.equal(expected, weight)
            lora_b = torch.randn(weight.shape[0], 4)
            assert torch.equal(transform(lora_b) @ torch.ones(4, 3), transform(lora_b @ torch.ones(4, 3)))
    if base.model_type == "llama":
        assert permuted == ["self_attn.q_proj", "self_attn.k_proj"]
    else:
        assert permuted == []
        assert "blk.1.attn_q.bias" in written  # qwen2's biases are carried
        assert "output.weight" not in written  # tied embeddings: llama.cpp reuses token_embd
