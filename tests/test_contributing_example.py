"""The plugin example in CONTRIBUTING.md is complete and works: its files are extracted, installed on sys.path
with an entry point, and its own test is run."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from clara_core.plugins import PluginManager

CONTRIBUTING = Path(__file__).resolve().parents[1] / "CONTRIBUTING.md"


def example_files() -> dict[str, str]:
    text = CONTRIBUTING.read_text(encoding="utf-8")
    pattern = re.compile(
        r"`(plugins/clara-plugin-pissa/[^`]+)`[^\n]*\n(?:[^\n]*\n)*?\n?```(?:toml|python)\n(.*?)```", re.S
    )
    return {name: body for name, body in pattern.findall(text)}


def test_contributing_plugin_example_runs(tmp_path, monkeypatch):
    files = example_files()
    assert set(files) == {
        "plugins/clara-plugin-pissa/pyproject.toml",
        "plugins/clara-plugin-pissa/clara_plugin_pissa.py",
        "plugins/clara-plugin-pissa/tests/test_pissa.py",
    }
    assert (
        '[project.entry-points.clara]\npissa = "clara_plugin_pissa"'
        in files["plugins/clara-plugin-pissa/pyproject.toml"]
    )
    site = tmp_path / "site"
    site.mkdir()
    (site / "clara_plugin_pissa.py").write_text(files["plugins/clara-plugin-pissa/clara_plugin_pissa.py"])
    info = site / "clara_plugin_pissa-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clara-plugin-pissa\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[clara]\npissa = clara_plugin_pissa\n")
    monkeypatch.syspath_prepend(str(site))

    # Installed, it loads through its entry point like any plugin.
    monkeypatch.setenv("CLARA_LOAD_PLUGINS", "pissa")
    manager = PluginManager.from_environment()
    assert list(manager.trainer_methods()) == ["pissa"]
    assert manager.plugins()[0].distribution == "clara-plugin-pissa"

    # Its own test passes.
    namespace: dict = {}
    exec(
        compile(
            textwrap.dedent(files["plugins/clara-plugin-pissa/tests/test_pissa.py"]), "test_pissa.py", "exec"
        ),
        namespace,
    )
    namespace["test_pissa_registers_and_builds_its_config"](tmp_path / "run")


def _load_example(tmp_path: Path) -> Any:
    """The example's module, imported from its extracted source."""
    import importlib.util

    source = tmp_path / "example_src" / "clara_plugin_pissa_example.py"
    source.parent.mkdir(parents=True)
    source.write_text(example_files()["plugins/clara-plugin-pissa/clara_plugin_pissa.py"])
    spec = importlib.util.spec_from_file_location("clara_plugin_pissa_example", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pissa_adapter_fits_the_original_base_and_an_unconverted_one_is_refused(
    tmp_path: Path, tiny_base_dir: Path, monkeypatch
) -> None:
    """PiSSA moves the principal part of each weight into the adapter (W_res = W - A0 B0). Trained through
    clara, the registered adapter on the unchanged base must give the logits of the model as trained (base
    W_res plus the trained A, B); saved without conversion it gives other logits and is refused."""
    import torch
    from click.testing import CliRunner
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from clara_core import hashing
    from clara_core.cli import ClaraContext, cli
    from clara_core.training import TrainConfig, train_adapter
    from clara_core.training import run as run_mod
    from clara_core.workspace import Workspace

    manager = PluginManager(load_entry_points=False)
    manager.register(_load_example(tmp_path), name="pissa")
    workspace, _ = Workspace.init(tmp_path / "ws")
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("".join(f'{{"text": "Das Finanzamt setzt die Steuer {i} fest."}}\n' for i in range(8)))
    ids = torch.tensor([[1, 10, 20, 30, 40, 50]])
    seen: dict[str, Any] = {}
    real_publish = run_mod.publish

    def publish(peft_model, plan, workspace, **kwargs):
        with torch.no_grad():
            seen["trained"] = peft_model(input_ids=ids).logits.clone()  # on the changed base W_res
        unconverted = tmp_path / "unconverted"
        peft_model.save_pretrained(str(unconverted))  # what clara saved before: fits only W_res
        seen["unconverted"] = unconverted
        return real_publish(peft_model, plan, workspace, **kwargs)

    monkeypatch.setattr(run_mod, "publish", publish)
    base_hash = hashing.base_model_hash(tiny_base_dir)
    config = TrainConfig(
        base=str(tiny_base_dir), domains=["steuer"], method="pissa", dataset=dataset, rank=4, dropout=0.0,
        batch_size=4, max_steps=4, lr=1e-2, max_seq_len=32, options={"niter": 2},
    )  # fmt: skip
    messages: list[str] = []
    result = train_adapter(config, workspace, manager, echo=messages.append, show_progress=False)
    record = result.record
    assert record is not None
    assert any("Saved as a plain LoRA of rank 8 (2 x 4)" in line for line in messages), messages
    assert record.id == "steuer-pissa-r8-v1" and record.rank == 8
    saved = json.loads((record.path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 8
    assert record.training_config["rank"] == 4  # what was trained, for --rebuild
    assert hashing.base_model_hash(tiny_base_dir) == base_hash

    original = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir), dtype=torch.float32)
    with torch.no_grad():
        plain = original(input_ids=ids).logits.clone()
        served = PeftModel.from_pretrained(original, str(record.path))(input_ids=ids).logits
    assert not torch.allclose(seen["trained"], plain, atol=1e-3), "training changed nothing"
    torch.testing.assert_close(served, seen["trained"], atol=1e-4, rtol=1e-4)

    # The unconverted folder on the original base gives other logits, and registering it is refused.
    raw = {
        k: v
        for k, v in json.loads((seen["unconverted"] / "adapter_config.json").read_text()).items()
        if k != "init_lora_weights"
    }
    plain_config = seen["unconverted"].parent / "as_plain_lora"
    plain_config.mkdir()
    (plain_config / "adapter_config.json").write_text(
        json.dumps(raw)
    )  # loaded as what it claims to be: a LoRA
    (plain_config / "adapter_model.safetensors").write_bytes(
        (seen["unconverted"] / "adapter_model.safetensors").read_bytes()
    )
    fresh = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir), dtype=torch.float32)
    with torch.no_grad():
        wrong = PeftModel.from_pretrained(fresh, str(plain_config))(input_ids=ids).logits
    assert not torch.allclose(wrong, seen["trained"], atol=1e-2)
    refused = CliRunner().invoke(
        cli,
        ["-w", str(workspace.root), "adapters", "register", str(seen["unconverted"]), "--domain", "steuer"],
        obj=ClaraContext(plugins=manager),
    )
    assert refused.exit_code == 1, refused.output
    last = refused.output.strip().splitlines()[-1]
    assert "init_lora_weights 'pissa_niter_2' changed the base's weights" in last
    assert "path_initial_model_for_weight_conversion" in last


def test_an_initialisation_clara_cannot_convert_is_refused_before_training() -> None:
    from peft import LoraConfig

    from clara_core.errors import InvalidInput
    from clara_core.training.publish import check_initialisation

    config = LoraConfig(r=4, target_modules=["q_proj"])
    assert check_initialisation(config, "lora") is None
    config.init_lora_weights = "pissa_niter_4"
    assert check_initialisation(config, "pissa") == "pissa_niter_4"
    config.init_lora_weights = "loftq"
    with pytest.raises(InvalidInput, match="init_lora_weights='loftq', which replaces the base's weights"):
        check_initialisation(config, "loftq-method")
