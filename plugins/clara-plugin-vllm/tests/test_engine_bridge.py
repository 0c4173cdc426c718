"""The engine's plumbing around vLLM, driven by a stand-in for vLLM's API where vLLM is not installed.

The stand-in (``fake_vllm``) has the shapes the engine uses from vLLM (``AsyncLLM.from_engine_args``,
``generate`` as an async generator of ``RequestOutput``-like objects that reacts to cancellation the way
vLLM's does, ``add_lora`` / ``remove_lora``, ``SamplingParams``, ``RequestOutputKind``, ``LoRARequest``,
``AsyncEngineArgs``). It checks clara's side: vLLM runs on the engine's own loop thread, every request carries
its adapter's LoRARequest, streams come back as deltas, a closed stream aborts the vLLM request, and errors
become ClaraErrors. That vLLM itself behaves so is the GPU integration test's job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import importlib.machinery
import sys
import threading
import types
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
from clara_plugin_vllm.engine import VllmEngine
from clara_plugin_vllm.errors import AdapterNotServable, VllmRequestFailed

from clara_core.errors import InvalidInput, NotFound
from clara_core.types import EngineOptions, GenerationRequest


class FakeAsyncLLM:
    instances: ClassVar[list[FakeAsyncLLM]] = []

    def __init__(self, engine_args) -> None:
        self.engine_args = engine_args
        self.thread = threading.current_thread()
        self.loop = asyncio.get_running_loop()  # vLLM binds its output handler to the building loop
        self.loras: dict[int, object] = {}
        self.seen_lora: dict[str, object] = {}
        self.aborted: list[str] = []
        self.down = False
        self.model_config = SimpleNamespace(max_model_len=engine_args.max_model_len or 128)
        FakeAsyncLLM.instances.append(self)

    @classmethod
    def from_engine_args(cls, engine_args):
        return cls(engine_args)

    def _on_own_loop(self) -> None:
        assert threading.current_thread() is self.thread and asyncio.get_running_loop() is self.loop

    async def add_lora(self, lora_request) -> bool:
        self._on_own_loop()
        added = lora_request.lora_int_id not in self.loras
        self.loras[lora_request.lora_int_id] = lora_request
        return added

    async def remove_lora(self, lora_id: int) -> bool:
        self._on_own_loop()
        return self.loras.pop(lora_id, None) is not None

    async def generate(self, prompt, sampling_params, request_id, *, lora_request=None):
        self._on_own_loop()
        ids = prompt["prompt_token_ids"]
        name = lora_request.lora_name if lora_request is not None else "base"
        self.seen_lora[request_id] = lora_request
        if sampling_params.stop == ["boom"]:
            raise ValueError("This model's maximum context length is 128 tokens")
        try:
            for i in range(sampling_params.max_tokens):
                await asyncio.sleep(0.001)
                last = i == sampling_params.max_tokens - 1
                completion = SimpleNamespace(
                    text=f"{name}:{i} ", token_ids=[i], finish_reason="length" if last else None
                )
                yield SimpleNamespace(prompt_token_ids=ids, outputs=[completion], finished=last)
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)  # vllm: AsyncLLM.generate aborts the request here
            raise

    def shutdown(self) -> None:
        self.down = True


@pytest.fixture
def fake_vllm(monkeypatch):
    """Install the stand-in modules under vLLM's names for one test."""

    class RequestOutputKind(enum.Enum):
        CUMULATIVE = 0
        DELTA = 1
        FINAL_ONLY = 2

    class SamplingParams:
        def __init__(
            self,
            max_tokens=16,
            temperature=1.0,
            top_p=1.0,
            stop=None,
            seed=None,
            ignore_eos=False,
            output_kind=RequestOutputKind.CUMULATIVE,
        ):
            self.max_tokens, self.temperature, self.top_p = max_tokens, temperature, top_p
            self.stop, self.seed, self.ignore_eos, self.output_kind = stop, seed, ignore_eos, output_kind

    @dataclasses.dataclass
    class LoRARequest:
        lora_name: str
        lora_int_id: int
        lora_path: str = ""

    @dataclasses.dataclass
    class AsyncEngineArgs:
        model: str = ""
        tokenizer: str | None = None
        served_model_name: str | None = None
        enable_lora: bool = False
        max_loras: int = 1
        max_lora_rank: int = 16
        max_cpu_loras: int | None = None
        max_model_len: int | None = None
        gpu_memory_utilization: float = 0.9
        enforce_eager: bool = False

    modules = {
        "vllm": {"__version__": "fake"},
        "vllm.sampling_params": {"SamplingParams": SamplingParams, "RequestOutputKind": RequestOutputKind},
        "vllm.lora": {},
        "vllm.lora.request": {"LoRARequest": LoRARequest},
        "vllm.engine": {},
        "vllm.engine.arg_utils": {"AsyncEngineArgs": AsyncEngineArgs},
        "vllm.v1": {},
        "vllm.v1.engine": {},
        "vllm.v1.engine.async_llm": {"AsyncLLM": FakeAsyncLLM},
    }
    for name, attributes in modules.items():
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)
    FakeAsyncLLM.instances.clear()
    return SimpleNamespace(LoRARequest=LoRARequest)


async def collect(engine: VllmEngine, **fields) -> tuple[str, list]:
    chunks = [c async for c in engine.generate(GenerationRequest(prompt="Das Finanzamt setzt", **fields))]
    return "".join(c.text for c in chunks), chunks


def test_the_engine_drives_vllm_on_its_own_loop_with_one_lora_request_per_request(populated, fake_vllm):
    adapters = populated["adapters"]
    engine = VllmEngine(
        populated["base"], EngineOptions(max_loaded=4, extra={"max_model_len": 64}, max_adapter_rank=32)
    )

    async def scenario() -> None:
        await engine.start()
        llm = FakeAsyncLLM.instances[-1]
        assert llm.thread is not threading.current_thread()
        assert llm.engine_args.enable_lora and llm.engine_args.max_lora_rank == 32
        assert engine.capabilities.max_model_len == 64
        await engine.load_adapter(adapters["steuer"])
        await engine.load_adapter(adapters["sozial"])
        assert sorted(llm.loras) == [1, 2]
        assert {r.lora_name for r in llm.loras.values()} == {adapters["steuer"].id, adapters["sozial"].id}
        with pytest.raises(AdapterNotServable):
            await engine.load_adapter(adapters["dora"])

        keys = [None, adapters["steuer"].id, adapters["sozial"].id] * 3
        results = await asyncio.gather(*(collect(engine, adapter_id=k, max_tokens=3) for k in keys))
        for key, (text, chunks) in zip(keys, results, strict=True):
            assert text == "".join(f"{key or 'base'}:{i} " for i in range(3))
            assert [c.finish_reason for c in chunks] == [None, None, "length"]
            assert chunks[-1].completion_tokens == 3 and chunks[-1].prompt_tokens == 4
        used = {getattr(r, "lora_int_id", None) for r in llm.seen_lora.values()}
        assert used == {None, 1, 2}

        await engine.unload_adapter(adapters["steuer"].id)
        assert sorted(llm.loras) == [2]
        with pytest.raises(NotFound):
            await collect(engine, adapter_id=adapters["steuer"].id)
        await engine.load_adapter(adapters["steuer"])
        assert sorted(llm.loras) == [1, 2]  # the same lora_int_id again
        await engine.shutdown()
        assert llm.down and engine.loaded_adapters() == []

    asyncio.run(scenario())


def test_closing_a_stream_aborts_the_vllm_request(populated, fake_vllm):
    engine = VllmEngine(populated["base"], EngineOptions(extra={"max_model_len": 20_000}))

    async def scenario() -> None:
        await engine.start()
        llm = FakeAsyncLLM.instances[-1]
        stream = engine.generate(GenerationRequest(prompt="Der Bescheid", max_tokens=10_000, request_id="r1"))
        first = await stream.__anext__()
        assert first.text == "base:0 "
        await stream.aclose()  # what the server does when the client goes away
        for _ in range(100):
            if llm.aborted:
                break
            await asyncio.sleep(0.01)
        assert len(llm.aborted) == 1 and llm.aborted[0].startswith("r1-")
        await engine.shutdown()

    asyncio.run(scenario())


def test_vllm_errors_become_clara_errors(populated, fake_vllm):
    engine = VllmEngine(populated["base"], EngineOptions(extra={"max_model_len": 16}))

    async def scenario() -> None:
        await engine.start()
        with pytest.raises(InvalidInput, match="maximum context length"):
            await collect(engine, stop=["boom"], max_tokens=4)
        with pytest.raises(InvalidInput, match="exceeds the model's context of 16 tokens"):
            await collect(engine, max_tokens=15)
        await engine.shutdown()
        with pytest.raises(VllmRequestFailed, match="not started"):
            await collect(engine)

    asyncio.run(scenario())


def test_vllm_loads_a_snapshot_of_the_verified_bytes_never_the_registered_folder(
    populated, fake_vllm, tmp_path
):
    """vLLM reads adapters from a path: the engine gives it a private copy of the bytes whose checksum it checked,
    so a file swapped in the registered folder after the check is never served; a folder that already changed
    is refused before vLLM is asked; the copy goes at the unload."""
    import shutil

    from clara_core import hashing
    from clara_core.errors import Conflict

    adapters = populated["adapters"]
    cache = tmp_path / "cache"
    engine = VllmEngine(populated["base"], EngineOptions(extra={"max_model_len": 64}, cache_dir=cache))

    async def scenario() -> None:
        await engine.start()
        llm = FakeAsyncLLM.instances[-1]
        steuer = adapters["steuer"]
        await engine.load_adapter(steuer)
        (request,) = llm.loras.values()
        folder = Path(request.lora_path)
        assert folder.parent == cache / "vllm-adapters" and folder != Path(steuer.path)
        assert hashing.adapter_checksum(folder) == steuer.adapter_checksum  # exactly the checked bytes
        # the registered folder changes after the load: what vLLM holds stays the checked copy
        weights = Path(steuer.path) / "adapter_model.safetensors"
        original = weights.read_bytes()
        shutil.copy(Path(adapters["sozial"].path) / "adapter_model.safetensors", weights)
        assert hashing.adapter_checksum(folder) == steuer.adapter_checksum
        await engine.unload_adapter(steuer.id)
        assert not folder.exists() and llm.loras == {}
        with pytest.raises(Conflict, match="files changed since registration"):
            await engine.load_adapter(steuer)  # now the folder itself is refused, vLLM never asked
        assert llm.loras == {} and list((cache / "vllm-adapters").iterdir()) == []
        weights.write_bytes(original)
        await engine.load_adapter(steuer)
        await engine.shutdown()
        assert list((cache / "vllm-adapters").iterdir()) == []  # the shutdown removes the copies

    asyncio.run(scenario())

    own = VllmEngine(populated["base"], EngineOptions(extra={"max_model_len": 64}))  # no workspace cache
    assert own.snapshot_root.is_dir()
    asyncio.run(own.start())
    asyncio.run(own.shutdown())
    assert not own.snapshot_root.exists()
