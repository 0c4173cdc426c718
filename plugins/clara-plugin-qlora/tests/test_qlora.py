"""clara-plugin-qlora: LoRA really trained on a 4-bit NF4 base (bitsandbytes Linear4bit layers), on the CPU."""

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

    return build_llama(tmp_path_factory.mktemp("qlora-base") / "tiny", texts=TEXTS * 5)


@pytest.mark.parametrize(("bits", "layer"), [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_qlora_trains_on_a_quantised_base(
    base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bits: int, layer: str
) -> None:
    import clara_plugin_qlora
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    seen: dict[str, int] = {}
    real_prepare = clara_plugin_qlora.QLoraMethod.prepare

    def spy(self, model, spec):
        seen["quantised"] = sum(type(m).__name__ == layer for m in model.modules())
        seen["linear"] = sum(type(m).__name__ == "Linear" for m in model.model.layers.modules())
        return real_prepare(self, model, spec)

    monkeypatch.setattr(clara_plugin_qlora.QLoraMethod, "prepare", spy)
    workspace = Workspace.init(tmp_path / "ws")[0]
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS * 4))
    config = TrainConfig(
        base=str(base_dir), domains=["steuerrecht"], method="qlora", dataset=dataset, dev=dataset,
        rank=8, batch_size=4, max_steps=15, lr=1e-2, max_seq_len=64, options={"bits": bits},
    )  # fmt: skip
    result = train_adapter(config, workspace, PluginManager(), echo=lambda line: None, show_progress=False)
    record = result.record
    assert record is not None and record.method == "qlora"
    # every projection in the transformer blocks was quantised while training
    assert seen["quantised"] == 2 * 7 and seen["linear"] == 0
    quantisation = record.training_config["base_quantization"]
    if bits == 4:
        assert quantisation["load_in_4bit"] and quantisation["bnb_4bit_quant_type"] == "nf4"
        assert quantisation["bnb_4bit_use_double_quant"] is True
    else:
        assert quantisation["load_in_8bit"]
    assert "bitsandbytes" in record.library_versions
    assert result.loop.last_loss < result.loop.first_loss
    assert record.metrics["ppl_dev"] < record.metrics["ppl_dev_base"]

    # The adapter is a plain LoRA folder: it loads on the full-precision base and changes its output.
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    ids = torch.tensor([[1, 10, 20, 30, 40]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, str(record.path))(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)


def test_bits_must_be_4_or_8(base_dir: Path, tmp_path: Path) -> None:
    from clara_core.errors import InvalidInput

    workspace = Workspace.init(tmp_path / "ws")[0]
    dataset = tmp_path / "train.jsonl"
    dataset.write_text('{"text": "a"}\n')
    config = TrainConfig(
        base=str(base_dir), domains=["x"], method="qlora", dataset=dataset, options={"bits": 3}
    )
    with pytest.raises(InvalidInput, match="--bits must be 4 or 8, got 3"):
        train_adapter(config, workspace, PluginManager(), echo=lambda line: None, show_progress=False)
