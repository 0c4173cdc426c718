"""Datasets: validation names file, line and problem; loss masks; packing that changes no loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from clara_core.errors import InvalidInput
from clara_core.training import data as D
from clara_core.training.config import TrainConfig, micro_batch_plan


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records)
    )
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_base_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_base_dir))


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['{"text": "a"}', '{"text": "b"', '{"text": "c"}'], ":2: invalid JSON"),
        (['{"text": "a"}', "[1, 2]"], ":2: expected a JSON object"),
        (
            ['{"text": "a"}', '{"question": "x", "answer": "y"}'],
            ":2: record of no known shape (keys: answer, question)",
        ),
        (['{"prompt": "Frage", "completion": "   "}'], ":1: empty completion"),
        (['{"prompt": "Frage"}'], ":1: has 'prompt' but no 'completion'"),
        (['{"text": ""}'], ":1: empty text"),
        (['{"messages": [{"role": "user", "content": "x"}]}'], ":1: no assistant message"),
        (['{"messages": [{"role": "wizard", "content": "x"}]}'], ":1: message 1 has role 'wizard'"),
        (['{"text": 5}'], ":1: 'text' must be a string"),
    ],
)
def test_bad_records_name_file_line_and_problem(tmp_path: Path, lines: list[str], expected: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(InvalidInput) as info:
        D.load_examples(path)
    assert f"{path}{expected}" in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_empty_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="dataset not found"):
        D.load_examples(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InvalidInput, match="has no records"):
        D.load_examples(empty)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "Gr\xfc\xdfe"}\n')
    with pytest.raises(InvalidInput, match=r"latin.jsonl:2: not UTF-8"):
        D.load_examples(latin)


def test_loss_masks_per_shape(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "Das Finanzamt setzt die Steuer fest.", "law": "AO"},
            {"prompt": "Wer setzt fest? ", "completion": "Das Finanzamt."},
            {
                "messages": [
                    {"role": "system", "content": "Kurz antworten."},
                    {"role": "user", "content": "Wer entscheidet?"},
                    {"role": "assistant", "content": "Die Verwaltung."},
                    {"role": "user", "content": "Und dann?"},
                    {"role": "assistant", "content": "Der Bescheid."},
                ]
            },
        ],
    )
    examples = D.load_examples(path)
    assert [e.kind for e in examples] == ["text", "prompt_completion", "messages"]
    tokenized, dropped = D.tokenize_examples(examples, tokenizer, path=path, max_seq_len=512, truncate=True)
    assert dropped == []
    text, pc, chat = tokenized

    def learned(t: D.TokenizedExample) -> str:
        return tokenizer.decode([i for i, label in zip(t.input_ids, t.labels, strict=True) if label != -100])

    # text: every token but the first (bos) carries loss
    assert text.labels[0] == -100 and all(label != -100 for label in text.labels[1:])
    # prompt/completion: exactly the completion and the eos
    assert learned(pc).replace("</s>", "").strip() == "Das Finanzamt."
    # messages: the two assistant turns only (with their end-of-turn), never system or user text
    chat_learned = learned(chat)
    assert "Die Verwaltung." in chat_learned and "Der Bescheid." in chat_learned
    assert "Wer entscheidet" not in chat_learned and "Kurz antworten" not in chat_learned
    assert "Und dann" not in chat_learned


def test_too_long_is_cut_with_warning_or_refused(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "kurz"}, {"text": "Steuer " * 200}])
    examples = D.load_examples(path)
    tokenized, _ = D.tokenize_examples(examples, tokenizer, path=path, max_seq_len=32, truncate=True)
    assert [t.truncated for t in tokenized] == [False, True]
    assert len(tokenized[1].input_ids) == 32
    with pytest.raises(InvalidInput, match=rf"{path}:2: \d+ tokens, longer than --max-seq-len 32"):
        D.tokenize_examples(examples, tokenizer, path=path, max_seq_len=32, truncate=False)


def test_packing_fills_rows_and_keeps_every_example(tmp_path: Path, tokenizer) -> None:
    lengths = [30, 5, 17, 60, 2, 44, 9, 9, 21, 64, 3]
    examples = [
        D.TokenizedExample(line=i + 1, input_ids=list(range(1, n + 1)), labels=[-100, *range(2, n + 1)])
        for i, n in enumerate(lengths)
    ]
    rows = D.pack(examples, 64)
    assert all(len(row) <= 64 for row in rows)
    assert sum(len(row) for row in rows) == sum(lengths)
    assert len(rows) == math.ceil(sum(lengths) / 64)  # best fit reaches the lower bound here
    segments = []
    for row in rows:  # positions restart at 0 at every example's first token
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        assert starts[0] == 0
        segments += [b - a for a, b in zip(starts, [*starts[1:], len(row)], strict=True)]
    assert sorted(segments) == sorted(lengths)
    assert D.pack(examples, 64) == rows  # deterministic


def test_packed_loss_equals_unpacked_loss(tmp_path: Path, tiny_base_dir: Path, tokenizer) -> None:
    """Packed examples must not see each other: the loss of packed rows equals one-example-per-row loss."""
    import torch
    from transformers import AutoModelForCausalLM

    from clara_core.training.loop import perplexity

    texts = [
        "Das Finanzamt setzt die Steuer fest.",
        "Der Bescheid ist zu begründen.",
        "Widerspruch ist zulässig.",
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts * 3])
    tokenized, _ = D.tokenize_examples(
        D.load_examples(path), tokenizer, path=path, max_seq_len=128, truncate=True
    )
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir), dtype=torch.float32)
    packed_rows = D.pack(tokenized, 128)
    assert len(packed_rows) < len(tokenized)
    packed = perplexity(model, packed_rows, micro_batch=2, pad_token_id=tokenizer.pad_token_id)
    alone = perplexity(model, D.unpacked(tokenized), micro_batch=1, pad_token_id=tokenizer.pad_token_id)
    assert packed == pytest.approx(alone, rel=1e-4)


def test_micro_batch_plan() -> None:
    config = TrainConfig(
        base="b", domains=["x"], method="lora", dataset=Path("d"), batch_size=64, max_seq_len=512
    )
    assert micro_batch_plan(config, 1, on_gpu=False) == (16, 4)
    config.micro_batch_size = 8
    assert micro_batch_plan(config, 2, on_gpu=False) == (8, 4)
    config.batch_size, config.micro_batch_size = 20, 8
    with pytest.raises(
        InvalidInput, match="--batch-size 20 is not a multiple of --micro-batch-size 8; use 16 or 24"
    ):
        micro_batch_plan(config, 1, on_gpu=False)
    config.micro_batch_size = None
    config.batch_size = 40
    with pytest.raises(
        InvalidInput, match="not a multiple of the micro-batch of 16 that fits 512-token rows"
    ):
        micro_batch_plan(config, 1, on_gpu=False)


def test_train_config_record_round_trip() -> None:
    """to_record is what the registry keeps; from_record gives back every recorded field, and the inputs where
    they are now (the one place that maps between the two, used by train and by --rebuild)."""
    from clara_core.training.config import RECORDED_FIELDS, RecordedInputs, run_key

    config = TrainConfig(
        base="models/base/leo", domains=["steuerrecht", "sozialrecht"], method="qlora", dataset=Path("d.jsonl"),
        rank=8, alpha=12.0, dropout=0.1, target_modules=["v_proj", "q_proj"], use_rslora=True, batch_size=8,
        micro_batch_size=4, epochs=2.5, lr=1e-3, warmup_steps=3, weight_decay=0.01, seed=7, max_seq_len=128,
        truncate=False, packing=False, dtype="float32", license="mit", options={"bits": 8},
    )  # fmt: skip
    inputs = RecordedInputs("h" * 64, "data/d.jsonl", "s" * 64, None, None, 4, 2, 1, "float32")
    recorded = config.to_record(inputs)
    assert recorded["dataset"] == "data/d.jsonl" and recorded["gradient_accumulation_steps"] == 2
    assert recorded["options"] == {"bits": 8} and recorded["precision"] == "float32"
    assert "license" not in recorded and "out_dir" not in recorded  # they do not change what is trained
    back = TrainConfig.from_record(
        json.loads(json.dumps(recorded)), base="/abs/leo", dataset=Path("/abs/d.jsonl"), dev=None
    )
    for name in RECORDED_FIELDS:
        assert getattr(back, name) == getattr(config, name), name
    assert (back.base, back.dataset, back.micro_batch_size, back.dtype) == (
        "/abs/leo",
        Path("/abs/d.jsonl"),
        4,
        "float32",
    )
    assert run_key(back.to_record(inputs)) == run_key(recorded)
    # a record of an older clara without the newer fields takes the defaults
    old = {
        k: v for k, v in recorded.items() if k not in {"warmup_steps", "weight_decay", "truncate", "packing"}
    }
    aged = TrainConfig.from_record(old, base="b", dataset=Path("d"), dev=None)
    assert (aged.warmup_steps, aged.weight_decay, aged.truncate, aged.packing) == (0, 0.0, True, True)
