"""What vLLM cannot serve is refused when the adapter is loaded, from the registry and its files."""

from __future__ import annotations

import asyncio

import pytest
from clara_plugin_vllm.engine import VllmEngine
from clara_plugin_vllm.errors import AdapterNotServable, VllmRequestFailed
from clara_plugin_vllm.translate import (
    adapter_peft_config,
    check_adapter_servable,
    effective_rank,
    vllm_feature_problems,
)

from clara_core.plugin_api import EngineOptions


def test_a_plain_lora_is_servable(populated):
    adapter = populated["adapters"]["steuer"]
    assert check_adapter_servable(adapter, max_lora_rank=16) == 4


def test_a_dora_adapter_is_refused_with_what_to_do(populated):
    with pytest.raises(AdapterNotServable) as caught:
        check_adapter_servable(populated["adapters"]["dora"], max_lora_rank=512)
    message = str(caught.value)
    assert "DoRA" in message and "--engine transformers" in message and "merge" in message
    assert caught.value.http_status == 409


def test_an_adapter_with_modules_to_save_is_refused(populated):
    adapter = populated["adapters"]["heads"]
    assert adapter_peft_config(adapter)["modules_to_save"]  # the real PEFT config says so
    with pytest.raises(AdapterNotServable, match=r"modules_to_save.*--engine transformers"):
        check_adapter_servable(adapter, max_lora_rank=512)


def test_a_rank_above_max_lora_rank_is_refused_with_the_flag_to_restart_with(populated):
    with pytest.raises(
        AdapterNotServable, match=r"rank 32 .*max_lora_rank 16: restart the server with -o max_lora_rank=32"
    ):
        check_adapter_servable(populated["adapters"]["wide"], max_lora_rank=16)
    assert check_adapter_servable(populated["adapters"]["wide"], max_lora_rank=32) == 32


def test_bias_and_non_lora_adapters_are_refused():
    assert "bias" in vllm_feature_problems("x", {"peft_type": "LORA", "bias": "all"})[0]
    tokens = vllm_feature_problems("x", {"peft_type": "LORA", "trainable_token_indices": [3, 4]})
    assert (
        len(tokens) == 1 and "trainable_token_indices" in tokens[0] and "--engine transformers" in tokens[0]
    )
    assert "LoRA adapters only" in vllm_feature_problems("x", {"peft_type": "IA3"})[0]
    assert vllm_feature_problems("x", {"peft_type": "LORA", "bias": "none", "modules_to_save": None}) == []


def test_rank_pattern_counts_towards_the_rank():
    assert effective_rank({"r": 8, "rank_pattern": {"q_proj": 64}}) == 64
    assert effective_rank({}, fallback=4) == 4


def test_the_engine_sizes_max_lora_rank_from_what_the_server_hands_over(populated):
    base = populated["base"]
    engine = VllmEngine(base, EngineOptions(max_loaded=3, extra={}, max_adapter_rank=32))
    assert engine.limits.max_lora_rank == 32
    assert "largest registered rank 32" in engine.limits.rank_source
    assert (engine.limits.max_loras, engine.limits.max_cpu_loras) == (3, 3)
    assert engine.engine_kwargs["enable_lora"] is True
    assert engine.engine_kwargs["model"] == str(base.path)
    assert engine.capabilities.mixed_adapter_batching is True
    # A rank vLLM does not accept is rounded up to the next one it does.
    assert VllmEngine(base, EngineOptions(max_adapter_rank=20)).limits.max_lora_rank == 32


def test_the_engine_does_not_look_for_a_registry_itself(populated, monkeypatch):
    """The base lies inside a workspace and CLARA_HOME points at it, yet without max_adapter_rank from the
    server the engine keeps vLLM's default: the server, not the engine, reads the registry."""
    monkeypatch.setenv("CLARA_HOME", str(populated["workspace"].root))
    engine = VllmEngine(populated["base"], EngineOptions())
    assert engine.limits.max_lora_rank == 16
    assert "no adapters registered" in engine.limits.rank_source


def test_the_engine_refuses_unservable_adapters_at_load_before_touching_vllm(populated):
    engine = VllmEngine(populated["base"], EngineOptions(extra={"max_lora_rank": 16}))
    with pytest.raises(AdapterNotServable, match="DoRA"):
        asyncio.run(engine.load_adapter(populated["adapters"]["dora"]))
    with pytest.raises(AdapterNotServable, match="max_lora_rank 16"):
        asyncio.run(engine.load_adapter(populated["adapters"]["wide"]))
    # A servable adapter gets past the checks and stops only at the engine not running (no vLLM here).
    with pytest.raises(VllmRequestFailed, match="not started"):
        asyncio.run(engine.load_adapter(populated["adapters"]["steuer"]))
    assert engine.loaded_adapters() == []


def test_the_engine_tokenises_and_renders_chat_with_the_base_tokenizer(populated):
    engine = VllmEngine(populated["base"], EngineOptions())
    assert engine.limits.max_lora_rank == 16
    prompt = engine.render_chat([{"role": "user", "content": "Wer setzt die Steuer fest?"}])
    assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>\n")
    assert engine.count_tokens("Das Finanzamt setzt die Steuer fest.") > 0
    assert engine.health()["running"] is False
