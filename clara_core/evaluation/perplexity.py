"""Perplexity and bits per byte: the one implementation behind ``clara eval`` and the ``ppl_dev`` of ``clara train``.

A dev set is read with the training data reader (``{"text"}``, ``{"prompt", "completion"}`` and ``{"messages"}``
records) and tokenised exactly as training tokenises it, so the tokens scored are the ones training takes a loss
on (for ``{"text"}``: every token after BOS, EOS included). Texts are never cut: a text longer than the window is
scored in sliding windows the way the transformers documentation ("Perplexity of fixed-length models") computes
it: windows of ``window`` tokens start every ``stride`` tokens, and only the tokens that are new in a window carry
a loss, so every token is scored exactly once with up to ``window - stride`` tokens of context. The first window
of a text starts with its BOS token.

Perplexity is token-weighted over the whole set: ``exp(total NLL / scored tokens)``. Bits per byte follows
lm-evaluation-harness: ``total NLL in nats / (ln 2 * UTF-8 bytes of the scored text)``, so bases with different
tokenizers compare.

Batches hold windows of similar length (longest first), right-padded with an attention mask; padding carries no
loss. The result does not depend on the batch size beyond float rounding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from ..errors import InvalidInput
from ..training.data import IGNORE_INDEX, Example, Tokenize

#: Longest window used when the caller gives none (the base's context, at most this).
MAX_DEFAULT_WINDOW = 2048


@attrs.frozen
class ScoredText:
    """One record as token ids with the labels that carry a loss, and the UTF-8 bytes of the scored text."""

    line: int
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    nbytes: int

    @property
    def scored_tokens(self) -> int:
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@attrs.frozen
class Score:
    """Totals over a set: NLL in nats, scored tokens, UTF-8 bytes; ``ppl`` and ``bpb`` derive from them."""

    nll: float
    tokens: int
    nbytes: int
    texts: int
    windows: int = 0
    seconds: float = 0.0
    input_tokens: int = 0  # tokens fed to the model (window overlap counted), for throughput

    @property
    def ppl(self) -> float:
        if not self.tokens:
            return float("nan")
        mean = self.nll / self.tokens
        return math.exp(mean) if mean < 700 else float("inf")

    @property
    def bpb(self) -> float:
        return self.nll / (math.log(2) * self.nbytes) if self.nbytes else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.input_tokens / self.seconds if self.seconds else 0.0


def scored_bytes(example: Example) -> int:
    """UTF-8 bytes of the part of a record that carries the loss."""
    if example.kind == "text":
        return len(example.text.encode("utf-8"))
    if example.kind == "prompt_completion":
        return len(example.completion.encode("utf-8"))
    return sum(len(content.encode("utf-8")) for role, content in example.messages if role == "assistant")


def prepare_texts(examples: Sequence[Example], tokenizer: Any, *, path: Path) -> list[ScoredText]:
    """Tokenise ``examples`` as training does (no cutting); refuse a set with no token to score."""
    tokenize = Tokenize(tokenizer)
    texts = []
    for example in examples:
        ids, labels = tokenize(example, f"{path}:{example.line}")
        texts.append(ScoredText(example.line, tuple(ids), tuple(labels), scored_bytes(example)))
    if not any(t.scored_tokens for t in texts):
        raise InvalidInput(
            f"{path}: the eval set has no token to score (every record tokenises to nothing); give records with text"
        )
    return [t for t in texts if t.scored_tokens]


def default_window(model_config: Any) -> int:
    """The base's context length, at most :data:`MAX_DEFAULT_WINDOW` tokens."""
    context = getattr(model_config, "max_position_embeddings", None) or MAX_DEFAULT_WINDOW
    return int(min(context, MAX_DEFAULT_WINDOW))


def sliding_windows(
    input_ids: Sequence[int], labels: Sequence[int], *, window: int, stride: int
) -> list[tuple[list[int], list[int]]]:
    """The windows of one text, each with the labels of its new tokens only (``-100`` elsewhere)."""
    if window < 2 or stride < 1 or stride > window:
        raise InvalidInput(f"window {window} / stride {stride}: need window >= 2 and 1 <= stride <= window")
    n = len(input_ids)
    out: list[tuple[list[int], list[int]]] = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        new = end - prev_end
        ids = list(input_ids[begin:end])
        window_labels = [IGNORE_INDEX] * (end - begin - new) + list(labels[end - new : end])
        out.append((ids, window_labels))
        prev_end = end
        if end == n:
            break
    return out


def score(
    model: Any,
    texts: Sequence[ScoredText],
    *,
    window: int,
    stride: int | None = None,
    batch_size: int = 8,
    max_batch_tokens: int = 8192,
    pad_token_id: int = 0,
    progress: str | None = None,
) -> Score:
    """Total NLL of ``model`` over ``texts`` in sliding windows (``stride`` default: half the window)."""
    import torch

    stride = stride or max(1, window // 2)
    items: list[tuple[int, list[int], list[int]]] = []  # (text index, ids, labels)
    for index, text in enumerate(texts):
        for ids, labels in sliding_windows(text.input_ids, text.labels, window=window, stride=stride):
            items.append((index, ids, labels))
    order = sorted(range(len(items)), key=lambda i: (-len(items[i][1]), i))
    remaining = [0] * len(texts)
    for index, _ids, _labels in items:
        remaining[index] += 1
    device = next(model.parameters()).device
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc=progress, unit="text", leave=False, dynamic_ncols=True)
    total = 0.0
    tokens = 0
    fed = 0
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        with torch.no_grad():
            position = 0
            while position < len(order):
                width = len(items[order[position]][1])
                count = max(1, min(batch_size, max_batch_tokens // max(width, 1)))
                batch = [items[i] for i in order[position : position + count]]
                position += count
                input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
                targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, (_index, ids, window_labels) in enumerate(batch):
                    input_ids[row, : len(ids)] = torch.tensor(ids)
                    targets[row, : len(ids)] = torch.tensor(window_labels)
                    mask[row, : len(ids)] = 1
                    fed += len(ids)
                logits = model(
                    input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False
                ).logits
                shift_labels = targets[:, 1:].to(device)
                losses = torch.nn.functional.cross_entropy(
                    logits[:, :-1, :].float().reshape(-1, logits.shape[-1]),
                    shift_labels.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="none",
                )
                total += float(losses.double().sum())
                tokens += int((shift_labels != IGNORE_INDEX).sum())
                if bar is not None:
                    done = 0
                    for index, _ids, _labels in batch:
                        remaining[index] -= 1
                        done += remaining[index] == 0
                    bar.update(done)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return Score(
        nll=total,
        tokens=tokens,
        nbytes=sum(t.nbytes for t in texts),
        texts=len(texts),
        windows=len(items),
        seconds=time.perf_counter() - started,
        input_tokens=fed,
    )


__all__ = [
    "MAX_DEFAULT_WINDOW",
    "Score",
    "ScoredText",
    "default_window",
    "prepare_texts",
    "score",
    "scored_bytes",
    "sliding_windows",
]
