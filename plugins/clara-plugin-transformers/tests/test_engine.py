"""The transformers engine on its own: a tiny Llama, real PEFT LoRA and DoRA adapters, no server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import attrs
import pytest

from clara_core import hashing
from clara_core.errors import ClaraError, Conflict, InvalidInput
from clara_core.plugins import PluginManager
from clara_core.types import EngineOptions, GenerationRequest

PROMPTS = ["Das Finanzamt setzt", "Der Bescheid", "Die Verwaltung entscheidet über", "Leistungen"]


@attrs.define
class Base:
    name: str
    path: Path


@attrs.define
class Adapter:
    """What the engine reads of a registry record: id, folder and the checksum registered for it."""

    id: str
    path: Path
    adapter_checksum: str = attrs.field(
        default=attrs.Factory(lambda self: hashing.adapter_checksum(self.path), takes_self=True)
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from clara_core.tinymodels import build_llama, random_lora_adapter

    root = tmp_path_factory.mktemp("engine")
    base = build_llama(root / "base", seed=3)
    made = {"base": base}
    for i in range(3):
        made[f"lora{i}"] = random_lora_adapter(base, root / f"lora{i}", seed=10 + i)
    made["dora"] = random_lora_adapter(base, root / "dora", seed=20, use_dora=True)
    made["attn_only"] = random_lora_adapter(base, root / "attn", seed=30, target_modules=["q_proj", "v_proj"])
    made["with_head"] = adapter_with_modules_to_save(base, root / "head")
    made["patterns"] = adapter_with_patterns(base, root / "patterns")
    made["tokens"] = adapter_with_trainable_tokens(base, root / "tokens")
    return made


def adapter_with_trainable_tokens(base: Path, out: Path) -> Path:
    """A LoRA adapter that also trains the embeddings of a few tokens (PEFT trainable_token_indices), here the
    tokens of the prompt the comparison with PEFT uses."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokens = sorted(set(AutoTokenizer.from_pretrained(base)(PROMPTS[2])["input_ids"]))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], trainable_token_indices=tokens
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(70)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return out


def adapter_with_patterns(base: Path, out: Path) -> Path:
    """A plain LoRA adapter with rsLoRA and per-module rank and alpha (what composites of mixed ranks write)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 3},
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(50)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return out


def adapter_with_modules_to_save(base: Path, out: Path) -> Path:
    """A LoRA adapter that also trains a full copy of lm_head (PEFT modules_to_save)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    with torch.random.fork_rng():
        torch.manual_seed(40)  # PEFT's own initialisation, reproducible
        peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(40)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return out


def make_engine(models: dict[str, Path], **extra: Any) -> Any:
    registration = PluginManager().engine("transformers")  # through the installed entry point
    return registration.create(Base("tiny", models["base"]), EngineOptions(extra={"device": "cpu", **extra}))


async def run(engine: Any, prompt: str, adapter: str | None, **kwargs: Any) -> tuple[str, Any]:
    text, last = "", None
    async for chunk in engine.generate(GenerationRequest(prompt=prompt, adapter_id=adapter, **kwargs)):
        text += chunk.text
        last = chunk
    return text, last


ADAPTERS = ["lora0", "lora1", "lora2", "dora", "attn_only", "with_head", "tokens"]


def test_registered_lazily_without_heavy_imports() -> None:
    import subprocess
    import sys

    code = (
        "import sys\nfrom clara_core.plugins import PluginManager\n"
        "PluginManager().engine('transformers')\n"
        "print([m for m in ('torch', 'transformers', 'peft') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.strip().endswith("[]"), out


def test_mixed_batches_match_each_adapter_alone_and_never_reload_the_base(models: dict[str, Path]) -> None:
    async def main() -> None:
        engine = make_engine(models)
        await engine.start()
        for name in ADAPTERS:
            await engine.load_adapter(Adapter(name, models[name]))
        assert engine.base_loads == 1 and sorted(engine.loaded_adapters()) == sorted(ADAPTERS)
        choices: list[str | None] = [*ADAPTERS, None]
        alone = {(a, p): await run(engine, p, a, max_tokens=10) for a in choices for p in PROMPTS}
        assert len({alone[(a, PROMPTS[0])][0] for a in choices}) == len(choices)  # all differ
        jobs = [(choices[i % len(choices)], PROMPTS[i % len(PROMPTS)]) for i in range(42)]
        results = await asyncio.gather(*(run(engine, p, a, max_tokens=10) for a, p in jobs))
        for (adapter, prompt), (text, last) in zip(jobs, results, strict=True):
            alone_text, alone_last = alone[(adapter, prompt)]
            assert text == alone_text, (adapter, prompt)
            assert (last.finish_reason, last.completion_tokens) == (
                alone_last.finish_reason,
                alone_last.completion_tokens,
            )
        assert engine.peak_batch > 8
        assert engine.base_loads == 1
        own_groups = engine.health()["own_group_adapters"]
        assert own_groups == ["dora", "tokens", "with_head"]
        await engine.shutdown()

    asyncio.run(main())


def test_requests_joining_a_running_batch_get_the_same_answers(models: dict[str, Path]) -> None:
    async def main() -> None:
        engine = make_engine(models)
        await engine.start()
        for name in ("lora0", "lora1"):
            await engine.load_adapter(Adapter(name, models[name]))
        alone = {
            (a, p): (await run(engine, p, a, max_tokens=24))[0] for a in ("lora0", "lora1") for p in PROMPTS
        }
        tasks = []
        for i, prompt in enumerate(PROMPTS * 2):
            adapter = ("lora0", "lora1")[i % 2]
            tasks.append((adapter, prompt, asyncio.create_task(run(engine, prompt, adapter, max_tokens=24))))
            await asyncio.sleep(0.01)  # arrive while the others decode (continuous batching)
        for adapter, prompt, task in tasks:
            assert (await task)[0] == alone[(adapter, prompt)]
        await engine.shutdown()

    asyncio.run(main())


def test_stop_strings_sampling_seed_eos_and_limits(models: dict[str, Path]) -> None:
    async def main() -> None:
        engine = make_engine(models)
        await engine.start()
        full, _ = await run(engine, PROMPTS[0], None, max_tokens=16)
        visible = [c for c in full[3:] if c.strip() and c != "\ufffd"]
        if visible:
            stop = visible[0]
            text, last = await run(engine, PROMPTS[0], None, max_tokens=16, stop=[stop])
            assert text == full[: full.index(stop)] and last.finish_reason == "stop"
        a, _ = await run(engine, PROMPTS[1], None, max_tokens=12, temperature=1.0, seed=1)
        b, _ = await run(engine, PROMPTS[1], None, max_tokens=12, temperature=1.0, seed=1)
        assert a == b
        _, last = await run(engine, PROMPTS[1], None, max_tokens=30, ignore_eos=True)
        assert last.completion_tokens == 30
        with pytest.raises(InvalidInput, match="context"):
            await run(engine, PROMPTS[1], None, max_tokens=10_000)
        with pytest.raises(InvalidInput, match="empty"):
            await run(engine, "", None, max_tokens=3)
        with pytest.raises(ClaraError, match="not loaded"):
            await run(engine, PROMPTS[1], "lora0", max_tokens=3)
        assert "<|assistant|>" in engine.render_chat([{"role": "user", "content": "Hallo"}])
        await engine.shutdown()

    asyncio.run(main())


def test_cancelled_request_leaves_the_batch_and_unload_frees_the_adapter(models: dict[str, Path]) -> None:
    async def main() -> None:
        engine = make_engine(models)
        await engine.start()
        await engine.load_adapter(Adapter("lora0", models["lora0"]))
        stream = engine.generate(
            GenerationRequest(prompt=PROMPTS[0], adapter_id="lora0", max_tokens=400, ignore_eos=True)
        )
        await stream.__anext__()
        await stream.aclose()
        for _ in range(500):
            if engine.health()["running"] == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.health()["running"] == 0 and engine.health()["waiting"] == 0
        await engine.unload_adapter("lora0")
        assert engine.loaded_adapters() == []
        text, _ = await run(engine, PROMPTS[0], None, max_tokens=4)
        assert text is not None
        await engine.load_adapter(Adapter("lora0", models["lora0"]))
        assert engine.base_loads == 1 and engine.adapter_loads == 2
        await engine.shutdown()

    asyncio.run(main())


def test_the_engine_loads_the_bytes_it_checked_and_refuses_changed_files(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """The checksum is taken of the bytes that are loaded: a folder whose weights are another adapter's is
    refused (409) instead of serving those weights under the checked id, and the engine goes on serving."""
    import shutil

    async def main() -> None:
        engine = make_engine(models)
        await engine.start()
        expected, _ = await run_loaded(engine, "lora0", models["lora0"])
        swapped = tmp_path / "swapped"
        shutil.copytree(models["lora0"], swapped)
        registered = hashing.adapter_checksum(swapped)
        shutil.copy(models["lora1"] / "adapter_model.safetensors", swapped / "adapter_model.safetensors")
        with pytest.raises(Conflict, match="files changed since registration"):
            await engine.load_adapter(Adapter("victim", swapped, registered))
        assert "victim" not in engine.loaded_adapters()
        with pytest.raises(Conflict, match="no registered checksum"):
            await engine.load_adapter(Adapter("unchecked", models["lora2"], ""))
        text, _ = await run(engine, PROMPTS[0], "lora0", max_tokens=10)
        assert text == expected
        await engine.shutdown()

    asyncio.run(main())


def test_adapters_loaded_from_bytes_match_peft_loading_the_folder(models: dict[str, Path]) -> None:
    """Loading from the verified buffer computes what PEFT's own from_pretrained computes from the folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # plain LoRA (applied without PEFT) before and after PEFT wrapped the base's layers for the DoRA adapter
    names = ("lora0", "dora", "with_head", "attn_only", "patterns", "tokens")

    async def served() -> dict[str, str]:
        engine = make_engine(models)
        await engine.start()
        for name in names:
            await engine.load_adapter(Adapter(name, models[name]))
        out = {
            name: (await run(engine, PROMPTS[2], name, max_tokens=8, ignore_eos=True))[0] for name in names
        }
        await engine.shutdown()
        return out

    texts = asyncio.run(served())
    tokenizer = AutoTokenizer.from_pretrained(models["base"])
    ids = tokenizer(PROMPTS[2], return_tensors="pt")
    for name in names:
        model = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(model, str(models[name])).eval()
        with torch.no_grad():
            generated = peft_model.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        expected = tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert texts[name] == expected, name


def test_plain_lora_adapters_load_without_peft_and_unload_completely(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """Plain LoRA adapters are applied from their factors (no PEFT modules injected: a load is reading
    tensors); after unloading every one the base answers exactly as before any was loaded. An adapter whose
    factors do not fit the base is refused in one line and the engine serves on."""
    import json
    import shutil

    async def main() -> None:
        engine = make_engine(models)
        await engine.start()
        before, _ = await run(engine, PROMPTS[0], None, max_tokens=10, ignore_eos=True)
        for name in ("lora0", "lora1", "attn_only", "patterns"):
            await engine.load_adapter(Adapter(name, models[name]))
        assert engine.peft is None  # nothing went through PEFT
        assert engine.adapter_loads == 4 and engine.health()["own_group_adapters"] == []
        with_lora, _ = await run(engine, PROMPTS[0], "lora0", max_tokens=10, ignore_eos=True)
        assert with_lora != before
        for name in ("lora0", "lora1", "attn_only", "patterns"):
            await engine.unload_adapter(name)
        assert engine.loaded_adapters() == [] and engine._direct == {} and engine._direct_hooks == {}
        after, _ = await run(engine, PROMPTS[0], None, max_tokens=10, ignore_eos=True)
        assert after == before

        # factors of another shape (the config claims rank 4, the tensors are cut to rank 2 in B only)
        from safetensors.torch import load_file, save_file

        bad = tmp_path / "bad"
        shutil.copytree(models["lora0"], bad)
        tensors = load_file(bad / "adapter_model.safetensors")
        key = next(k for k in sorted(tensors) if k.endswith("q_proj.lora_B.weight"))
        tensors[key] = tensors[key][:, :2].contiguous()
        save_file(tensors, bad / "adapter_model.safetensors")
        with pytest.raises(ClaraError, match=r"does not fit the base: '.*q_proj' is \d+x\d+"):
            await engine.load_adapter(Adapter("bad", bad))
        foreign = tmp_path / "foreign"
        shutil.copytree(models["lora0"], foreign)
        tensors = load_file(foreign / "adapter_model.safetensors")
        extra = "base_model.model.model.layers.99.self_attn.q_proj"
        tensors[f"{extra}.lora_A.weight"] = tensors[key.replace("lora_B", "lora_A")].clone()
        tensors[f"{extra}.lora_B.weight"] = tensors[key].clone()
        save_file(tensors, foreign / "adapter_model.safetensors")
        with pytest.raises(ClaraError, match="which the base lacks"):
            await engine.load_adapter(Adapter("foreign", foreign))
        assert engine.loaded_adapters() == [] and engine._direct == {}
        config = json.loads((models["lora0"] / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA"
        text, _ = await run_loaded(engine, "lora0", models["lora0"])
        assert text  # the engine serves on
        await engine.shutdown()

    asyncio.run(main())


async def run_loaded(engine: Any, name: str, path: Path) -> tuple[str, Any]:
    await engine.load_adapter(Adapter(name, path))
    return await run(engine, PROMPTS[0], name, max_tokens=10)


def test_a_request_whose_parameters_break_sampling_fails_alone(models: dict[str, Path]) -> None:
    """Rows with a seed beyond 64 bits or a temperature of 1e-45, admitted in the same step as innocent
    requests, fail on their own; every other request gets the answer it gets alone. A top_p of 1e-300 (0 in
    float32) keeps the most likely token instead of leaving none."""
    import threading

    bad = [{"seed": 2**64, "temperature": 1.0}, {"temperature": 1e-45}, {"temperature": 1.0, "top_p": 1e-300}]

    async def main() -> None:
        engine = make_engine(models)
        await engine.start()
        await engine.load_adapter(Adapter("lora0", models["lora0"]))
        innocent = [(PROMPTS[i % 4], ("lora0", None)[i % 2]) for i in range(6)]
        alone = [(await run(engine, p, a, max_tokens=12, ignore_eos=True))[0] for p, a in innocent]
        entered, gate = threading.Event(), threading.Event()

        def block_worker() -> None:
            entered.set()
            gate.wait()

        hold = asyncio.ensure_future(engine._call(block_worker))  # the worker waits: all arrive in one step
        await asyncio.to_thread(entered.wait, 60)
        jobs = [run(engine, p, a, max_tokens=12, ignore_eos=True) for p, a in innocent]
        jobs += [run(engine, PROMPTS[0], None, max_tokens=12, **params) for params in bad]
        tasks = [asyncio.ensure_future(job) for job in jobs]
        for _ in range(500):
            if engine.health()["waiting"] == len(tasks):
                break
            await asyncio.sleep(0.01)
        assert engine.health()["waiting"] == len(tasks)
        gate.set()
        await hold
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert [r[0] if isinstance(r, tuple) else r for r in results[: len(innocent)]] == alone
        seed_row, temperature_row, top_p_row = results[len(innocent) :]
        assert isinstance(seed_row, ClaraError) and "Overflow" in str(seed_row), seed_row
        assert isinstance(temperature_row, InvalidInput) and "no token to sample" in str(temperature_row)
        greedy, _ = await run(engine, PROMPTS[0], None, max_tokens=12, ignore_eos=True)
        assert isinstance(top_p_row, tuple) and top_p_row[0] == greedy  # keeps the most likely token only
        text, _ = await run(engine, PROMPTS[1], "lora0", max_tokens=4)  # the engine serves on
        assert text
        await engine.shutdown()

    asyncio.run(main())


def test_ids_with_dots_and_underscores_load_and_answer_like_a_plain_id(models: dict[str, Path]) -> None:
    # Multi-domain adapters and composites have ids like 'steuer.verfahren-lora-r4-v1'; PEFT adapter names may
    # not hold '.', so the engine encodes them. The encoding must be one-to-one: 'a_d' and 'a.' stay apart.
    from clara_plugin_transformers.engine import peft_name

    assert peft_name("a_d-lora-r4-v1") != peft_name("a.-lora-r4-v1")

    async def main() -> None:
        engine = make_engine(models)
        await engine.start()
        try:
            dotted = "steuer.verfahren-lora-r4-v1"
            underscored = "steuer_verfahren-lora-r4-v1"
            await engine.load_adapter(Adapter(dotted, models["lora0"]))
            await engine.load_adapter(Adapter(underscored, models["dora"]))
            await engine.load_adapter(Adapter("plain-lora-r4-v1", models["lora0"]))
            assert sorted(engine.loaded_adapters()) == sorted([dotted, underscored, "plain-lora-r4-v1"])
            assert engine.health()["own_group_adapters"] == [underscored]
            got = await asyncio.gather(
                run(engine, PROMPTS[0], dotted, max_tokens=6),
                run(engine, PROMPTS[0], "plain-lora-r4-v1", max_tokens=6),
                run(engine, PROMPTS[0], underscored, max_tokens=6),
            )
            assert got[0][0] == got[1][0]  # same weights, same answer, whatever the id looks like
            await engine.unload_adapter(dotted)
            assert dotted not in engine.loaded_adapters()
            with pytest.raises(ClaraError, match=r"adapter 'steuer\.verfahren-lora-r4-v1' is not loaded"):
                await run(engine, PROMPTS[0], dotted, max_tokens=2)
        finally:
            await engine.shutdown()

    asyncio.run(main())


def adapter_with_biases(base: Path, out: Path, *, bias: str, use_dora: bool = False) -> Path:
    """A LoRA adapter that also trains the base's bias terms (PEFT bias='all' or 'lora_only')."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias=bias, use_dora=use_dora)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(60)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or name.endswith(".bias"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_apply_to_the_adapters_rows_only(tmp_path: Path, bias: str) -> None:
    """PEFT would write an adapter's trained biases into the base's layers: every request (the base's, other
    adapters') would get them, even after the unload. The engine adds their difference to the adapter's rows
    only: the base answers as before, during and after, and the adapter answers as PEFT's own loading does."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clara_core.tinymodels import build_qwen2

    base = build_qwen2(tmp_path / "qwen2", seed=5)  # q/k/v projections with biases
    folder = adapter_with_biases(base, tmp_path / "biased", bias=bias)
    dora = adapter_with_biases(base, tmp_path / "dora", bias=bias, use_dora=True)
    models = {"base": base}

    async def main() -> tuple[str, str]:
        engine = make_engine(models)
        await engine.start()
        before, _ = await run(engine, PROMPTS[2], None, max_tokens=8, ignore_eos=True)
        await engine.load_adapter(Adapter("biased", folder))
        assert engine.peft is None
        alone, _ = await run(engine, PROMPTS[2], "biased", max_tokens=8, ignore_eos=True)
        together = await asyncio.gather(
            *(run(engine, PROMPTS[2], a, max_tokens=8, ignore_eos=True) for a in [None, "biased"] * 3)
        )
        assert [t for t, _ in together] == [before, alone] * 3
        with pytest.raises(Conflict, match="trains bias terms") as refused:
            await engine.load_adapter(Adapter("dora", dora))
        assert refused.value.code == "adapter_not_servable"
        await engine.unload_adapter("biased")
        after, _ = await run(engine, PROMPTS[2], None, max_tokens=8, ignore_eos=True)
        assert after == before and alone != before
        await engine.shutdown()
        return alone, before

    alone, _ = asyncio.run(main())
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer(PROMPTS[2], return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(folder)).eval()
    with torch.no_grad():
        generated = peft_model.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert alone == tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
