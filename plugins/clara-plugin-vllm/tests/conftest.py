"""Fixtures for the vLLM plugin's tests: a tiny Llama, real PEFT adapters for it, and a workspace registry.

Nothing here needs vLLM: the adapters are made with PEFT (clara_core.tinymodels) and registered the way
``clara adapters register`` does.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from clara_core import hashing
from clara_core.registry import AdapterDraft, AdapterRecord, BaseRecord, Registry
from clara_core.workspace import Workspace


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clara_core.tinymodels import build_llama

    return build_llama(tmp_path_factory.mktemp("vllm-tiny-base") / "tiny_llama", seed=0)


@pytest.fixture(scope="session")
def other_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, different tiny Llama (its base_model_hash differs from the first)."""
    from clara_core.tinymodels import build_llama

    return build_llama(tmp_path_factory.mktemp("vllm-other-base") / "other_llama", hidden_size=32, seed=1)


def _modules_to_save_adapter(base_dir: Path, out_dir: Path) -> Path:
    """A real PEFT LoRA that also trains a full copy of lm_head (``modules_to_save``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["lm_head"],
        task_type="CAUSAL_LM",
    )
    get_peft_model(model, config).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session")
def adapter_dirs(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapter folders for the tiny base: two plain LoRAs, a rank-32 LoRA, a DoRA and a modules_to_save one."""
    from clara_core.tinymodels import random_lora_adapter

    root = tmp_path_factory.mktemp("vllm-adapters")
    return {
        "steuer": random_lora_adapter(tiny_base_dir, root / "steuer", rank=4, seed=1),
        "sozial": random_lora_adapter(tiny_base_dir, root / "sozial", rank=8, seed=2),
        "wide": random_lora_adapter(tiny_base_dir, root / "wide", rank=32, seed=3, target_modules=["q_proj"]),
        "dora": random_lora_adapter(tiny_base_dir, root / "dora", rank=4, seed=4, use_dora=True),
        "heads": _modules_to_save_adapter(tiny_base_dir, root / "heads"),
    }


def register_adapter(
    registry: Registry,
    workspace: Workspace,
    base: BaseRecord,
    folder: Path,
    domain: str,
    method: str = "lora",
) -> AdapterRecord:
    """Register ``folder`` (copied into the workspace) as ``clara adapters register`` would."""
    config = hashing.read_adapter_config(folder)
    draft = AdapterDraft(
        domain=[domain],
        method=method,
        rank=int(config["r"]),
        base_model_hash=base.base_model_hash,
        adapter_checksum=hashing.adapter_checksum(folder),
        alpha=config.get("lora_alpha"),
        target_modules=sorted(config.get("target_modules") or []),
        tokenizer_hash=base.tokenizer_hash,
        peft_config=config,
    )
    return registry.register_adapter(draft, folder, workspace, place="copy")


@pytest.fixture(scope="session")
def adapter_registrar() -> Callable[..., AdapterRecord]:
    """:func:`register_adapter`, for tests and fixtures elsewhere (test modules do not import conftest)."""
    return register_adapter


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    ws, _ = Workspace.init(tmp_path / "ws")
    return ws


@pytest.fixture
def populated(workspace: Workspace, tiny_base_dir: Path, adapter_dirs: dict[str, Path]) -> dict:
    """A workspace whose base lies in models/base/tiny, with every adapter of ``adapter_dirs`` registered."""
    base_folder = workspace.base_dir / "tiny"
    shutil.copytree(tiny_base_dir, base_folder)
    with Registry.open(workspace.registry_path) as registry:
        base = registry.add_base(base_folder, name="tiny", workspace=workspace)
        adapters = {
            "steuer": register_adapter(registry, workspace, base, adapter_dirs["steuer"], "steuerrecht"),
            "sozial": register_adapter(registry, workspace, base, adapter_dirs["sozial"], "sozialrecht"),
            "wide": register_adapter(registry, workspace, base, adapter_dirs["wide"], "breit"),
            "dora": register_adapter(registry, workspace, base, adapter_dirs["dora"], "verwaltung", "dora"),
            "heads": register_adapter(registry, workspace, base, adapter_dirs["heads"], "koepfe"),
        }
    return {"workspace": workspace, "base": base, "adapters": adapters}


@pytest.fixture
def open_registry(populated: dict) -> Callable[[], Registry]:
    return lambda: Registry.open(populated["workspace"].registry_path)
