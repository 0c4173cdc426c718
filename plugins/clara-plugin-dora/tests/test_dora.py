"""clara-plugin-dora: DoRA adapters carry magnitude vectors, train, and load in plain PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clara_core.plugins import PluginManager
from clara_core.training import TrainConfig, train_adapter
from clara_core.workspace import Workspace

TEXTS = [
    "Der Widerspruch ist innerhalb eines Monats nach Bekanntgabe zu erheben.",
    "Bürgergeld erhalten erwerbsfähige Leistungsberechtigte.",
    "Der Verwaltungsakt ist schriftlich zu begründen.",
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clara_core.tinymodels import build_llama

    return build_llama(tmp_path_factory.mktemp("dora-base") / "tiny", texts=TEXTS * 5)


def test_dora_has_magnitude_vectors_trains_and_loads(base_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    plugins = PluginManager()
    assert "dora" in plugins.trainer_methods()
    workspace = Workspace.init(tmp_path / "ws")[0]
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS * 4))
    config = TrainConfig(
        base=str(base_dir), domains=["verfahren"], method="dora", dataset=dataset, dev=dataset,
        rank=8, batch_size=4, max_steps=20, lr=1e-2, max_seq_len=64,
    )  # fmt: skip
    result = train_adapter(config, workspace, plugins, echo=lambda line: None, show_progress=False)
    record = result.record
    assert record is not None and record.id == "verfahren-dora-r8-v1"
    assert record.peft_config["use_dora"] is True
    with safe_open(str(record.path / "adapter_model.safetensors"), "pt") as handle:
        names = handle.keys()
        magnitudes = [k for k in names if "lora_magnitude_vector" in k]
        assert len(magnitudes) == 2 * 7  # one per adapted module of the two layers
        hidden = json.loads((base_dir / "config.json").read_text())["hidden_size"]
        q_proj = next(k for k in magnitudes if "q_proj" in k)
        assert list(handle.get_tensor(q_proj).shape) == [hidden]
    assert result.loop.last_loss < result.loop.first_loss
    assert record.metrics["ppl_dev"] < record.metrics["ppl_dev_base"]

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    ids = torch.tensor([[1, 10, 20, 30, 40]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, str(record.path))(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)
