"""Perplexity, bits per byte, sliding windows and QA scoring against hand computations on the tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from clara_core.errors import InvalidInput
from clara_core.evaluation.perplexity import prepare_texts, score, sliding_windows
from clara_core.evaluation.qa import QAItem, exact_match, load_qa, normalise, qa_scores, token_f1
from clara_core.evaluation.runner import parse_sets
from clara_core.training.data import IGNORE_INDEX, Example

TEXT = "Die Gebührenordnung regelt Zuständigkeiten für Prüfungen öffentlicher Stellen."
LONG = " ".join(["Das Finanzamt prüft die Steuererklärung und setzt die Einkommensteuer fest."] * 4)


@pytest.fixture(scope="module")
def tiny(tiny_base_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir), dtype=torch.float32).eval()
    return model, tokenizer


def _nll(model, ids: list[int]) -> tuple[float, int]:
    """Sum of -log p(token | all before it) over ids[1:], by hand from one forward pass."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return -sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)), len(ids) - 1


def _texts(tokenizer, *texts: str):
    examples = [Example(line=i + 1, kind="text", text=t) for i, t in enumerate(texts)]
    return prepare_texts(examples, tokenizer, path=Path("dev.jsonl"))


def test_perplexity_and_bits_per_byte_equal_a_hand_computation(tiny) -> None:
    model, tokenizer = tiny
    (text,) = _texts(tokenizer, TEXT)
    ids = [
        tokenizer.bos_token_id,
        *tokenizer(TEXT, add_special_tokens=False)["input_ids"],
        tokenizer.eos_token_id,
    ]
    assert list(text.input_ids) == ids  # BOS first, EOS scored as in training
    nll, count = _nll(model, ids)
    result = score(model, [text], window=512, pad_token_id=tokenizer.pad_token_id or 0)
    assert result.tokens == count
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-6)
    nbytes = len(TEXT.encode("utf-8"))
    assert nbytes > len(TEXT)  # umlauts: bytes, not characters
    assert result.nbytes == nbytes
    assert result.bpb == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-6)


def test_token_weighted_over_the_set_and_independent_of_batching(tiny) -> None:
    model, tokenizer = tiny
    texts = _texts(tokenizer, TEXT, LONG, "Kurz.")
    totals = [_nll(model, list(t.input_ids)) for t in texts]
    hand = math.exp(sum(n for n, _ in totals) / sum(c for _, c in totals))
    for batch_size in (1, 2, 8):
        assert score(model, texts, window=512, batch_size=batch_size).ppl == pytest.approx(hand, rel=1e-5)


def test_sliding_windows_equal_one_window_for_short_texts(tiny) -> None:
    model, tokenizer = tiny
    texts = _texts(tokenizer, TEXT, "Kurz.")
    longest = max(len(t.input_ids) for t in texts)
    one = score(model, texts, window=512)
    assert one.windows == 2
    slid = score(model, texts, window=longest, stride=3)
    assert slid.ppl == pytest.approx(one.ppl, rel=1e-6)
    assert slid.tokens == one.tokens


def test_stride_equal_to_window_gives_the_disjoint_window_value(tiny) -> None:
    model, tokenizer = tiny
    (text,) = _texts(tokenizer, LONG)
    ids = list(text.input_ids)
    window = 16
    assert len(ids) > 3 * window
    chunks = [ids[i : i + window] for i in range(0, len(ids), window)]
    by_hand = [_nll(model, c) for c in chunks if len(c) > 1]
    nll = sum(n for n, _ in by_hand)
    count = sum(c for _, c in by_hand)
    result = score(model, [text], window=window, stride=window)
    assert result.windows == len(chunks)
    assert result.tokens == count
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    # with overlap every token is still scored once, now with more context
    overlapping = score(model, [text], window=window, stride=window // 2)
    assert overlapping.tokens == len(ids) - 1


def test_sliding_windows_score_every_new_token_once() -> None:
    ids = list(range(10))
    windows = sliding_windows(ids, ids, window=4, stride=2)
    assert [w for w, _ in windows] == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    scored = [label for _, labels in windows for label in labels[1:] if label != IGNORE_INDEX]
    assert scored == list(range(1, 10))
    with pytest.raises(InvalidInput, match="stride"):
        sliding_windows(ids, ids, window=4, stride=5)


def test_an_eval_set_without_tokens_is_refused(tiny) -> None:
    _model, tokenizer = tiny
    example = Example(line=1, kind="prompt_completion", prompt="Frage", completion="x")
    # a completion scores (its tokens and EOS); a set whose every record scores nothing is refused
    assert prepare_texts([example], tokenizer, path=Path("d.jsonl"))
    with pytest.raises(InvalidInput, match="no token to score"):
        prepare_texts([], tokenizer, path=Path("d.jsonl"))


@pytest.mark.parametrize(
    ("prediction", "answer", "em", "f1"),
    [
        ("Absetzung für Abnutzung", "Absetzung für Abnutzung", 1.0, 1.0),
        ("  absetzung FÜR abnutzung. ", "Absetzung für Abnutzung", 1.0, 1.0),
        ("Absetzung fur Abnutzung", "Absetzung für Abnutzung", 0.0, 2 / 3),  # umlauts are kept
        ("Steuerbegünstigte Zwecke und mehr", "Steuerbegünstigte Zwecke", 0.0, 2 * (2 / 4) * 1 / (2 / 4 + 1)),
        ("Zwecke, Steuerbegünstigte", "Steuerbegünstigte Zwecke", 0.0, 1.0),
        ("", "Steuerbegünstigte Zwecke", 0.0, 0.0),
        ("etwas anderes", "Steuerbegünstigte Zwecke", 0.0, 0.0),
    ],
)
def test_qa_exact_match_and_token_f1_on_hand_made_cases(
    prediction: str, answer: str, em: float, f1: float
) -> None:
    assert exact_match(prediction, answer) == em
    assert token_f1(prediction, answer) == pytest.approx(f1)


def test_normalise_keeps_umlauts_and_drops_punctuation() -> None:
    assert normalise("  Übergangs-Regelung:\tGRÖßE!  ") == "übergangs regelung größe"
    items = [QAItem(1, "p", "a b"), QAItem(2, "p", "c")]
    assert qa_scores(items, ["a b", "d"]) == {"qa_em": 0.5, "qa_f1": 0.5}


def test_qa_file_of_the_wrong_shape_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n{"text": "kein QA"}\n', encoding="utf-8")
    with pytest.raises(InvalidInput, match=r"qa.jsonl:2: a QA record needs string \"prompt\" and \"answer\""):
        load_qa(path)
    path.write_bytes(b'{"prompt": "a", "answer": "\xff"}\n')
    with pytest.raises(InvalidInput, match=r"qa.jsonl:1: not UTF-8"):
        load_qa(path)


@pytest.mark.parametrize("value", ["steuerrecht", "=dev.jsonl", "steuerrecht="])
def test_sets_of_an_unknown_form_are_refused(value: str) -> None:
    with pytest.raises(InvalidInput, match="must read DOMAIN=FILE"):
        parse_sets([value])
