"""The vLLM LoRA resolver's decisions on a real tiny registry, and its vLLM-facing class with stand-ins."""

from __future__ import annotations

import abc
import asyncio
import importlib.util
import logging
import shutil
from pathlib import Path

import pytest
from clara_plugin_vllm import resolver as resolver_module
from clara_plugin_vllm.resolver import (
    RESOLVER_NAME,
    ClaraRegistryResolver,
    make_vllm_resolver,
    register,
    stable_lora_int_id,
)

from clara_core import hashing


@pytest.fixture
def core(populated) -> ClaraRegistryResolver:
    return ClaraRegistryResolver(populated["workspace"].registry_path)


def test_a_registered_adapter_resolves_to_a_snapshot_of_its_checked_bytes(populated, core):
    """vLLM gets a folder in the workspace's cache holding exactly the bytes whose checksum was checked, not the
    registered folder: a file swapped there later is not what vLLM reads. One snapshot per checksum, reused;
    a snapshot that no longer holds those bytes is written again."""
    adapter = populated["adapters"]["steuer"]
    decision = core.decide(str(populated["base"].path), adapter.id)
    assert decision.resolved, decision.reason
    snapshot = Path(decision.lora_path)
    cache = populated["workspace"].root / "models" / "cache" / "vllm-adapters" / "resolved"
    assert snapshot.parent == cache and snapshot != adapter.path
    assert hashing.adapter_checksum(snapshot) == adapter.adapter_checksum
    assert decision.lora_int_id == stable_lora_int_id(adapter.id, adapter.adapter_checksum) >= 1
    assert decision.lora_request_kwargs() == {
        "lora_name": adapter.id,
        "lora_int_id": decision.lora_int_id,
        "lora_path": str(snapshot),
    }
    again = core.decide(str(populated["base"].path), adapter.id)
    assert again.lora_path == decision.lora_path and len(list(cache.iterdir())) == 1
    (snapshot / "adapter_model.safetensors").write_bytes(b"tampered")
    fixed = core.decide(str(populated["base"].path), adapter.id)
    assert hashing.adapter_checksum(Path(fixed.lora_path)) == adapter.adapter_checksum


def test_the_served_model_may_be_named_by_the_registered_base_name(populated, core):
    assert core.decide("tiny", populated["adapters"]["sozial"].id).resolved


def test_an_unregistered_copy_of_the_base_is_recognised_by_its_hash(populated, core, tmp_path):
    copy = tmp_path / "elsewhere" / "tiny-copy"
    shutil.copytree(populated["base"].path, copy)
    decision = core.decide(str(copy), populated["adapters"]["steuer"].id)
    assert decision.resolved, decision.reason


def test_a_different_served_model_is_refused_naming_both_hashes(populated, core, other_base_dir):
    adapter = populated["adapters"]["steuer"]
    decision = core.decide(str(other_base_dir), adapter.id)
    assert not decision.resolved
    assert adapter.base_model_hash[:12] in decision.reason
    assert "made for base" in decision.reason


def test_a_changed_adapter_file_is_refused_with_both_checksums(populated, core):
    adapter = populated["adapters"]["steuer"]
    config = adapter.path / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 8', '"lora_alpha": 9'))
    decision = core.decide(str(populated["base"].path), adapter.id)
    assert not decision.resolved
    assert "files changed since registration" in decision.reason
    assert adapter.adapter_checksum[:12] in decision.reason


def test_adapters_vllm_cannot_load_are_refused(populated, core):
    base = str(populated["base"].path)
    dora = core.decide(base, populated["adapters"]["dora"].id)
    heads = core.decide(base, populated["adapters"]["heads"].id)
    assert not dora.resolved and "DoRA" in dora.reason
    assert not heads.resolved and "modules_to_save" in heads.reason


@pytest.mark.parametrize("name", ["../etc/passwd", "/abs/path", "Not-An-Id", "unknown-lora-r4-v1"])
def test_names_that_are_not_registered_adapter_ids_stay_unresolved(populated, core, name):
    decision = core.decide(str(populated["base"].path), name)
    assert not decision.resolved
    with pytest.raises(ValueError):
        decision.lora_request_kwargs()


def test_a_served_model_clara_cannot_identify_is_refused(populated, core):
    decision = core.decide("meta-llama/Llama-3.1-8B", populated["adapters"]["steuer"].id)
    assert not decision.resolved
    assert "cannot tell which base vLLM serves" in decision.reason


def test_decisions_are_logged_with_their_reason(populated, core, caplog):
    with caplog.at_level(logging.INFO, logger="clara_plugin_vllm.resolver"):
        core.decide_and_log(str(populated["base"].path), populated["adapters"]["steuer"].id)
        core.decide_and_log(str(populated["base"].path), populated["adapters"]["dora"].id)
    assert any("resolved" in r.message and r.levelno == logging.INFO for r in caplog.records)
    assert any("refused" in r.message and "DoRA" in r.message for r in caplog.records)


def test_the_workspace_comes_from_clara_home(populated, monkeypatch, tmp_path):
    monkeypatch.setenv("CLARA_HOME", str(populated["workspace"].root))
    found = ClaraRegistryResolver.from_environment()
    assert found is not None and found.registry_path == populated["workspace"].registry_path
    monkeypatch.setenv("CLARA_HOME", str(tmp_path / "nowhere"))
    assert ClaraRegistryResolver.from_environment() is None


class FakeLoRAResolver(abc.ABC):
    """Stands in for vllm.lora.resolver.LoRAResolver (an ABC with one abstract coroutine)."""

    @abc.abstractmethod
    async def resolve_lora(self, base_model_name: str, lora_name: str): ...


class FakeLoRARequest:
    """Stands in for vllm.lora.request.LoRARequest, taking the same keywords."""

    def __init__(self, lora_name: str, lora_int_id: int, lora_path: str) -> None:
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


def test_the_vllm_resolver_class_answers_with_lora_requests_or_none(populated, core):
    vllm_resolver = make_vllm_resolver(core, FakeLoRAResolver, FakeLoRARequest)
    assert isinstance(vllm_resolver, FakeLoRAResolver)
    base = str(populated["base"].path)
    adapter = populated["adapters"]["steuer"]
    found = asyncio.run(vllm_resolver.resolve_lora(base, adapter.id))
    assert isinstance(found, FakeLoRARequest)
    assert found.lora_name == adapter.id
    assert hashing.adapter_checksum(Path(found.lora_path)) == adapter.adapter_checksum
    assert asyncio.run(vllm_resolver.resolve_lora(base, populated["adapters"]["dora"].id)) is None
    assert asyncio.run(vllm_resolver.resolve_lora(base, "nope-lora-r4-v1")) is None


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here: register() would register"
)
def test_register_without_vllm_does_nothing_and_does_not_fail(caplog):
    with caplog.at_level(logging.WARNING, logger="clara_plugin_vllm.resolver"):
        assert register() is None
    assert any("not registered" in r.message for r in caplog.records)
    assert RESOLVER_NAME == "clara"
    assert resolver_module.WORKSPACE_ENV == "CLARA_HOME"
