"""clara-plugin-lora: trains a tiny Llama on the CPU, the loss falls, plain PEFT loads the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clara_core.plugins import PluginManager
from clara_core.training import TrainConfig, train_adapter
from clara_core.workspace import Workspace

TEXTS = [
    "Das Finanzamt setzt die Einkommensteuer durch Steuerbescheid fest.",
    "Der Einspruch ist innerhalb eines Monats nach Bekanntgabe einzulegen.",
    "Die Umsatzsteuer beträgt im Regelfall neunzehn Prozent.",
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clara_core.tinymodels import build_llama

    return build_llama(tmp_path_factory.mktemp("lora-base") / "tiny", texts=TEXTS * 5)


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return Workspace.init(tmp_path / "ws")[0]


def _dataset(folder: Path) -> Path:
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS * 4))
    return path


def _logits(model, base_dir: Path):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    inputs = tokenizer(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


def test_lora_trains_loss_falls_and_plain_peft_loads_it(base_dir: Path, workspace: Workspace) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plugins = PluginManager()
    assert "lora" in plugins.trainer_methods()
    dataset = _dataset(workspace.root)
    config = TrainConfig(
        base=str(base_dir), domains=["steuerrecht"], method="lora", dataset=dataset, dev=dataset,
        rank=8, batch_size=4, max_steps=20, lr=1e-2, max_seq_len=64, use_rslora=True,
    )  # fmt: skip
    result = train_adapter(config, workspace, plugins, echo=lambda line: None, show_progress=False)
    record = result.record
    assert record is not None and record.id == "steuerrecht-lora-r8-v1"
    assert result.loop.first_loss is not None and result.loop.last_loss is not None
    assert result.loop.last_loss < result.loop.first_loss
    assert record.metrics["ppl_dev"] < 0.8 * record.metrics["ppl_dev_base"]
    assert record.use_rslora and record.peft_config["use_rslora"] is True
    assert len(record.target_modules) == 7

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    before = _logits(base, base_dir)
    adapted = PeftModel.from_pretrained(base, str(record.path))  # plain PEFT, nothing from clara
    after = _logits(adapted, base_dir)
    assert not torch.allclose(before, after, atol=1e-4)


def test_target_modules_option(base_dir: Path, workspace: Workspace) -> None:
    from clara_core.errors import InvalidInput

    dataset = _dataset(workspace.root)
    config = TrainConfig(
        base=str(base_dir), domains=["x"], method="lora", dataset=dataset, rank=2, batch_size=2,
        max_steps=2, max_seq_len=32, target_modules=["q_proj", "v_proj"],
    )  # fmt: skip
    result = train_adapter(config, workspace, PluginManager(), echo=lambda line: None, show_progress=False)
    assert result.record is not None and result.record.target_modules == ["q_proj", "v_proj"]
    config = TrainConfig(
        base=str(base_dir), domains=["x"], method="lora", dataset=dataset, rank=2, batch_size=2,
        max_steps=2, max_seq_len=32, target_modules=["query"],
    )  # fmt: skip
    with pytest.raises(InvalidInput, match="--target-modules: query not found in the base"):
        train_adapter(config, workspace, PluginManager(), echo=lambda line: None, show_progress=False)
