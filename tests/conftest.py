"""Shared fixtures for the core's tests: workspaces, a tiny base model, hand-made adapter folders, a CLI runner
with a fresh plugin manager per test."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from clara_core.cli import ClaraContext, cli
from clara_core.plugins import PluginManager
from clara_core.workspace import Workspace

REPO_ROOT = Path(__file__).resolve().parents[1]
GESETZE = REPO_ROOT.parent / "shared" / "data" / "gesetze"


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with its tokenizer, built once per test session (read-only for tests)."""
    from clara_core.tinymodels import build_llama

    return build_llama(tmp_path_factory.mktemp("tiny-base") / "tiny_llama", seed=0)


@pytest.fixture(scope="session")
def other_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny Llama with different sizes (adapters for one do not fit the other)."""
    from clara_core.tinymodels import build_llama

    return build_llama(tmp_path_factory.mktemp("other-base") / "other_llama", hidden_size=32, seed=1)


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    ws, _ = Workspace.init(tmp_path / "ws")
    return ws


@pytest.fixture
def plugin_manager() -> PluginManager:
    """A fresh manager with no installed plugins; tests register fakes into it."""
    return PluginManager(load_entry_points=False)


@pytest.fixture
def run_cli(workspace: Workspace, plugin_manager: PluginManager) -> Callable[..., Result]:
    """Invoke the CLI in-process against ``workspace`` with the test's own plugin manager."""

    def run(*args: str, input: str | None = None, workspace_dir: Path | None = None) -> Result:
        obj = ClaraContext(workspace=workspace_dir or workspace.root, plugins=plugin_manager)
        return CliRunner().invoke(cli, list(args), obj=obj, input=input, catch_exceptions=True)

    return run


def write_fake_adapter(
    path: Path,
    base_dir: Path,
    *,
    rank: int = 4,
    seed: int = 0,
    modules: tuple[str, ...] = ("q_proj", "v_proj"),
    use_dora: bool = False,
) -> Path:
    """A PEFT-format LoRA folder whose tensor shapes fit ``base_dir`` (written without peft, for speed)."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((base_dir / "config.json").read_text())
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = hidden // heads
    out_features = {
        "q_proj": hidden,
        "o_proj": hidden,
        "k_proj": kv_heads * head_dim,
        "v_proj": kv_heads * head_dim,
    }
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in modules:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features[module], rank, generator=generator)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(modules),
        "use_dora": use_dora,
        "use_rslora": False,
        "base_model_name_or_path": str(base_dir),
    }
    (path / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return path


@pytest.fixture
def fake_adapter(tmp_path: Path, tiny_base_dir: Path) -> Callable[..., Path]:
    counter = {"n": 0}

    def make(name: str | None = None, base_dir: Path | None = None, **kwargs) -> Path:
        counter["n"] += 1
        folder = tmp_path / "made-elsewhere" / (name or f"adapter{counter['n']}")
        return write_fake_adapter(folder, base_dir or tiny_base_dir, **kwargs)

    return make


@pytest.fixture
def workspace_with_base(workspace: Workspace, tiny_base_dir: Path) -> Workspace:
    from clara_core.registry import Registry

    with Registry.open(workspace.registry_path) as registry:
        registry.add_base(tiny_base_dir, name="tiny", workspace=workspace)
    return workspace
