"""The real vLLM engine on a tiny model: two adapters, mixed in one batch, each answered with its own weights.

Runs wherever vLLM and a CUDA GPU are present; everywhere else it skips, and pytest's ``-rs`` summary (on by
default in this repository) shows why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import shutil
from pathlib import Path

import pytest

from clara_core import hashing
from clara_core.errors import NotFound
from clara_core.registry import Registry
from clara_core.types import EngineOptions, GenerationRequest
from clara_core.workspace import Workspace


def _skip_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (it needs a CUDA machine: pip install vllm)"
    try:
        import torch
    except ImportError:
        return "torch is not importable"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


SKIP_REASON = _skip_reason()
VLLM_REASON = "vLLM is not installed" if importlib.util.find_spec("vllm") is None else None

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gpu_workspace(tmp_path_factory: pytest.TempPathFactory, adapter_registrar) -> dict:
    """A workspace with a tiny Llama whose head size vLLM's attention kernels support (64), two LoRAs and a
    DoRA adapter, all registered."""
    from clara_core.tinymodels import build_llama, random_lora_adapter

    root = tmp_path_factory.mktemp("vllm-gpu")
    workspace, _ = Workspace.init(root / "ws")
    base_dir = build_llama(
        workspace.base_dir / "tiny",
        hidden_size=256,
        intermediate_size=512,
        num_heads=4,
        num_kv_heads=2,
        max_positions=512,
        seed=0,
    )
    made = root / "made"
    folders = {
        "a": random_lora_adapter(base_dir, made / "a", rank=8, seed=1, scale=0.2),
        "b": random_lora_adapter(base_dir, made / "b", rank=8, seed=2, scale=0.2),
        "dora": random_lora_adapter(base_dir, made / "dora", rank=8, seed=3, use_dora=True),
    }
    with Registry.open(workspace.registry_path) as registry:
        base = registry.add_base(base_dir, name="tiny", workspace=workspace)
        adapters = {
            "a": adapter_registrar(registry, workspace, base, folders["a"], "steuerrecht"),
            "b": adapter_registrar(registry, workspace, base, folders["b"], "sozialrecht"),
            "dora": adapter_registrar(registry, workspace, base, folders["dora"], "verwaltung", "dora"),
        }
    yield {"workspace": workspace, "base": base, "adapters": adapters}
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(VLLM_REASON is not None, reason=VLLM_REASON or "")
def test_every_option_clara_passes_is_an_engine_argument_of_the_installed_vllm():
    from clara_plugin_vllm.translate import PASS_THROUGH_OPTIONS
    from vllm.engine.arg_utils import AsyncEngineArgs

    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    wanted = {"model", "tokenizer", "served_model_name", "enable_lora", "max_loras", "max_lora_rank"}
    assert wanted | {"max_cpu_loras", *PASS_THROUGH_OPTIONS} <= fields


@pytest.mark.skipif(VLLM_REASON is not None, reason=VLLM_REASON or "")
def test_the_resolver_registers_with_vllm_and_resolves_a_registered_adapter(gpu_workspace, monkeypatch):
    from clara_plugin_vllm.resolver import RESOLVER_NAME, register
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolverRegistry

    monkeypatch.setenv("CLARA_HOME", str(gpu_workspace["workspace"].root))
    register()
    resolver = LoRAResolverRegistry.get_resolver(RESOLVER_NAME)
    adapter = gpu_workspace["adapters"]["a"]
    found = asyncio.run(resolver.resolve_lora(str(gpu_workspace["base"].path), adapter.id))
    assert isinstance(found, LoRARequest)
    assert found.lora_name == adapter.id  # from a snapshot of the checked bytes, not the registered folder
    assert hashing.adapter_checksum(Path(found.lora_path)) == adapter.adapter_checksum != ""
    dora = gpu_workspace["adapters"]["dora"].id
    assert asyncio.run(resolver.resolve_lora(str(gpu_workspace["base"].path), dora)) is None


@pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
def test_the_vllm_engine_serves_two_adapters_in_one_batch_each_with_its_own_output(gpu_workspace):
    from clara_plugin_vllm import make_engine
    from clara_plugin_vllm.errors import AdapterNotServable

    from clara_core.serving.runner import max_rank

    base, adapters = gpu_workspace["base"], gpu_workspace["adapters"]
    options = EngineOptions(
        max_loaded=4,
        max_adapter_rank=max(max_rank(a) for a in adapters.values()),  # as clara serve computes it
        extra={
            "gpu_memory_utilization": 0.3,
            "enforce_eager": True,
            "max_model_len": 256,
            "max_num_seqs": 16,
        },
    )
    engine = make_engine(base, options)
    assert engine.limits.max_lora_rank == 8  # from the registry's ranks, handed over by the server

    async def answer(
        adapter_id: str | None, prompt: str = "Das Finanzamt setzt"
    ) -> tuple[str, str | None, int]:
        text, reason, used = "", None, 0
        request = GenerationRequest(prompt=prompt, adapter_id=adapter_id, max_tokens=12, temperature=0.0)
        async for chunk in engine.generate(request):
            text += chunk.text
            reason, used = chunk.finish_reason or reason, chunk.completion_tokens
        return text, reason, used

    async def scenario() -> None:
        await engine.start()
        try:
            assert engine.capabilities.max_model_len == 256
            await engine.load_adapter(adapters["a"])
            await engine.load_adapter(adapters["b"])
            assert sorted(engine.loaded_adapters()) == sorted([adapters["a"].id, adapters["b"].id])
            alone = {key: await answer(key) for key in (None, adapters["a"].id, adapters["b"].id)}
            for _text, reason, used in alone.values():
                assert reason in ("stop", "length") and used >= 1
            assert alone[adapters["a"].id][0] != alone[adapters["b"].id][0]  # the adapters change the output
            # Mixed in one batch: base, a and b, several times each, all at once.
            keys = [None, adapters["a"].id, adapters["b"].id] * 4
            mixed = await asyncio.gather(*(answer(key) for key in keys))
            for key, result in zip(keys, mixed, strict=True):
                assert result[0] == alone[key][0], f"{key}: {result[0]!r} != {alone[key][0]!r}"
            with pytest.raises(AdapterNotServable, match="DoRA"):
                await engine.load_adapter(adapters["dora"])
            await engine.unload_adapter(adapters["a"].id)
            with pytest.raises(NotFound):
                await answer(adapters["a"].id)
            await engine.load_adapter(adapters["a"])  # back again, same LoRA id, no base reload
            assert (await answer(adapters["a"].id))[0] == alone[adapters["a"].id][0]
            assert engine.health()["lora_int_ids"][adapters["a"].id] == 1
        finally:
            await engine.shutdown()

    asyncio.run(scenario())
