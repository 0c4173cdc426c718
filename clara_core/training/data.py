"""Training data: JSONL validation, tokenisation with loss masks, and sequence packing.

Three record shapes, one per line:

- ``{"text": ...}``: plain text; the loss covers every token.
- ``{"prompt": ..., "completion": ...}``: the loss covers the completion only.
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat template; the
  loss covers the assistant turns only.

Other keys are allowed and ignored (the law corpora carry ``law``, ``section``, ...). The whole file is
validated before anything is tokenised, and every error names the file, the line and the problem.

Packing puts several examples into one row of at most ``max_seq_len`` tokens (best fit, longest first) with
``position_ids`` restarting at 0 for every example. With no attention mask, transformers derives a
block-diagonal causal mask from those positions, so packed examples never see each other and no compute is
spent on padding.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from ..errors import InvalidInput
from ..fileio import jsonl_records

IGNORE_INDEX = -100
_ROLES = ("system", "user", "assistant", "tool")


@attrs.frozen
class Example:
    """One validated record: its line in the file, its shape and its fields."""

    line: int
    kind: str  # "text" | "prompt_completion" | "messages"
    text: str = ""
    prompt: str = ""
    completion: str = ""
    messages: tuple[tuple[str, str], ...] = ()


def _int32(values: Any) -> array:
    """Token ids as a compact int32 array (a Python list costs up to 36 bytes per token, this 4)."""
    return values if isinstance(values, array) and values.typecode == "i" else array("i", values)


@attrs.frozen
class TokenizedExample:
    line: int
    input_ids: array = attrs.field(converter=_int32)
    labels: array = attrs.field(converter=_int32)
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@attrs.define
class PackedRow:
    """Several examples in one row; ``position_ids`` restart at 0 at every example's first token."""

    input_ids: array = attrs.field(factory=lambda: array("i"))
    labels: array = attrs.field(factory=lambda: array("i"))
    position_ids: array = attrs.field(factory=lambda: array("i"))

    def add(self, example: TokenizedExample) -> None:
        self.input_ids.extend(example.input_ids)
        self.labels.extend(example.labels)
        self.position_ids.extend(range(len(example.input_ids)))

    def __len__(self) -> int:
        return len(self.input_ids)


@attrs.define
class DatasetSummary:
    examples: int
    kinds: dict[str, int]
    tokens: int
    trained_tokens: int
    truncated: int
    dropped: int
    rows: int


def load_examples(path: Path) -> list[Example]:
    """Read and validate every line of ``path``; raise :class:`InvalidInput` naming the first bad line."""
    if not path.exists():
        raise InvalidInput(f"{path}: dataset not found; give a JSONL file with one record per line")
    if not path.is_file():
        raise InvalidInput(f"{path}: not a file; give a JSONL file with one record per line")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read the dataset ({exc.strerror or exc})") from exc
    examples: list[Example] = []
    for number, record in jsonl_records(path, raw):
        examples.append(parse_record(record, f"{path}:{number}", number))
    if not examples:
        raise InvalidInput(
            f"{path}: the dataset has no records; add JSON lines with text, prompt/completion or messages"
        )
    return examples


def parse_record(record: Any, where: str, line: int) -> Example:
    """One JSON value as an :class:`Example`, or a clear error saying what shape was expected."""
    if not isinstance(record, dict):
        raise InvalidInput(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return Example(line=line, kind="messages", messages=_parse_messages(record["messages"], where))
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if key not in record:
                other = "completion" if key == "prompt" else "prompt"
                raise InvalidInput(
                    f"{where}: has '{other}' but no '{key}'; prompt/completion records need both"
                )
            if not isinstance(record[key], str):
                raise InvalidInput(f"{where}: '{key}' must be a string, got {type(record[key]).__name__}")
        if not record["completion"].strip():
            raise InvalidInput(f"{where}: empty completion; every prompt needs an answer to learn")
        return Example(
            line=line, kind="prompt_completion", prompt=record["prompt"], completion=record["completion"]
        )
    if "text" in record:
        if not isinstance(record["text"], str):
            raise InvalidInput(f"{where}: 'text' must be a string, got {type(record['text']).__name__}")
        if not record["text"].strip():
            raise InvalidInput(f"{where}: empty text")
        return Example(line=line, kind="text", text=record["text"])
    keys = ", ".join(sorted(record)[:6]) or "none"
    raise InvalidInput(
        f'{where}: record of no known shape (keys: {keys}); use {{"text"}}, {{"prompt", "completion"}} '
        'or {"messages": [...]}'
    )


def _parse_messages(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise InvalidInput(f'{where}: \'messages\' must be a non-empty list of {{"role", "content"}} objects')
    messages: list[tuple[str, str]] = []
    for index, message in enumerate(value, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidInput(f"{where}: message {index} needs a 'role' and a 'content'")
        role = message["role"]
        if role not in _ROLES:
            raise InvalidInput(f"{where}: message {index} has role '{role}'; use one of {', '.join(_ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise InvalidInput(f"{where}: message {index} needs a string 'content'")
        messages.append((role, content))
    answers = [content for role, content in messages if role == "assistant"]
    if not answers:
        raise InvalidInput(f"{where}: no assistant message; the loss is on assistant turns, so one is needed")
    if not any(a.strip() for a in answers):
        raise InvalidInput(f"{where}: every assistant message is empty; give the answers to learn")
    return tuple(messages)


class Tokenize:
    """Turns examples into token ids and labels (``-100`` where no loss is taken) for one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, example: Example, where: str) -> tuple[list[int], list[int]]:
        if example.kind == "text":
            ids = self.bos + self._ids(example.text) + self.eos
            labels = [IGNORE_INDEX] * len(self.bos) + ids[len(self.bos) :]
        elif example.kind == "prompt_completion":
            prompt = self.bos + self._ids(example.prompt)
            completion = self._ids(example.completion) + self.eos
            ids = prompt + completion
            labels = [IGNORE_INDEX] * len(prompt) + completion
        else:
            ids, labels = self._chat(example, where)
        if labels:
            labels[0] = (
                IGNORE_INDEX  # never predict an example's first token from the previous packed example
            )
        return ids, labels

    def _chat(self, example: Example, where: str) -> tuple[list[int], list[int]]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidInput(
                f"{where}: 'messages' records need a chat template, and the base's tokenizer has none; "
                "use prompt/completion records instead"
            )
        messages = [{"role": r, "content": c} for r, c in example.messages]
        render: Callable[..., str] = self.tokenizer.apply_chat_template
        full = render(messages, tokenize=False)
        spans: list[tuple[int, int]] = []
        for index, (role, _content) in enumerate(example.messages):
            if role != "assistant":
                continue
            before = render(messages[:index], tokenize=False, add_generation_prompt=True) if index else ""
            through = render(messages[: index + 1], tokenize=False)
            if not full.startswith(through) or not through.startswith(before):
                raise InvalidInput(
                    f"{where}: the tokenizer's chat template does not render turns as prefixes of the whole "
                    "conversation, so assistant turns cannot be located; use prompt/completion records"
                )
            spans.append((len(before), len(through)))
        encoded = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        labels = [
            token if any(start >= a and start < b for a, b in spans) else IGNORE_INDEX
            for token, (start, _end) in zip(ids, encoded["offset_mapping"], strict=True)
        ]
        if not ids or ids[0] not in self.bos:
            ids, labels = self.bos + ids, [IGNORE_INDEX] * len(self.bos) + labels
        return ids, labels


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    path: Path,
    max_seq_len: int,
    truncate: bool,
) -> tuple[list[TokenizedExample], list[int]]:
    """Tokenise every example; returns the examples to train on and the lines dropped (nothing left to learn).

    Too-long examples are cut to ``max_seq_len`` tokens, or refused with ``truncate=False``.
    """
    tokenize = Tokenize(tokenizer)
    result: list[TokenizedExample] = []
    dropped: list[int] = []
    for example in examples:
        where = f"{path}:{example.line}"
        ids, labels = tokenize(example, where)
        truncated = len(ids) > max_seq_len
        if truncated:
            if not truncate:
                raise InvalidInput(
                    f"{where}: {len(ids)} tokens, longer than --max-seq-len {max_seq_len}; shorten the record, "
                    "raise --max-seq-len, or drop --no-truncate to cut it"
                )
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        item = TokenizedExample(line=example.line, input_ids=ids, labels=labels, truncated=truncated)
        if item.trained_tokens == 0:
            dropped.append(example.line)
            continue
        result.append(item)
    if not result:
        raise InvalidInput(
            f"{path}: no record has a token left to learn from within --max-seq-len {max_seq_len}; "
            "raise --max-seq-len"
        )
    return result, dropped


def pack(examples: Sequence[TokenizedExample], max_seq_len: int) -> list[PackedRow]:
    """Best-fit-decreasing packing into rows of at most ``max_seq_len`` tokens; deterministic.

    Examples are never split. Longest first, each goes to the fullest row it still fits in.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[PackedRow] = []
    # (free space, row index), kept sorted so the tightest fitting row is found by bisection.
    free: list[tuple[int, int]] = []
    for index in order:
        example = examples[index]
        size = len(example.input_ids)
        slot = bisect.bisect_left(free, (size, -1))
        if slot == len(free):
            rows.append(PackedRow())
            row_index = len(rows) - 1
        else:
            _space, row_index = free.pop(slot)
        rows[row_index].add(example)
        remaining = max_seq_len - len(rows[row_index])
        if remaining > 0:
            bisect.insort(free, (remaining, row_index))
    return rows


def unpacked(examples: Sequence[TokenizedExample]) -> list[PackedRow]:
    """One example per row (for baselines and for evaluating without packing)."""
    rows = []
    for example in examples:
        row = PackedRow()
        row.add(example)
        rows.append(row)
    return rows


class PackedDataset:
    """A map-style dataset of packed rows, as the Trainer's dataloader wants it."""

    def __init__(self, rows: Sequence[PackedRow]) -> None:
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, array]:
        row = self.rows[index]
        return {"input_ids": row.input_ids, "labels": row.labels, "position_ids": row.position_ids}


class TokenCounter:
    """Counts the real (non-padding) tokens handed to the model, for tokens/s."""

    def __init__(self) -> None:
        self.tokens = 0


class PackedCollator:
    """Stacks packed rows into a batch, padding short rows at the end with a block of their own.

    No attention mask is returned: the ``position_ids`` (restarting at 0 for every example and for the padding)
    let transformers build the block-diagonal causal mask, and padding carries no loss.
    """

    def __init__(self, pad_token_id: int, counter: TokenCounter | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.counter = counter

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.arange(width, dtype=torch.long).repeat(len(features), 1)
        real = 0
        for row, feature in enumerate(features):
            size = len(feature["input_ids"])
            real += size
            input_ids[row, :size] = _tensor(feature["input_ids"])
            labels[row, :size] = _tensor(feature["labels"])
            positions[row, :size] = _tensor(feature["position_ids"])
            positions[row, size:] -= size  # the padding is a block of its own, starting at position 0
        if self.counter is not None:
            self.counter.tokens += real
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


def _tensor(values: Any) -> Any:
    import torch

    if isinstance(values, array):
        return (
            torch.frombuffer(values, dtype=torch.int32) if len(values) else torch.zeros(0, dtype=torch.int32)
        )
    return torch.tensor(list(values), dtype=torch.int32)


def summarise(
    examples: Sequence[Example], tokenized: Sequence[TokenizedExample], dropped: Sequence[int], rows: int
) -> DatasetSummary:
    kinds: dict[str, int] = {}
    for example in examples:
        kinds[example.kind] = kinds.get(example.kind, 0) + 1
    return DatasetSummary(
        examples=len(examples),
        kinds=kinds,
        tokens=sum(len(t.input_ids) for t in tokenized),
        trained_tokens=sum(t.trained_tokens for t in tokenized),
        truncated=sum(1 for t in tokenized if t.truncated),
        dropped=len(dropped),
        rows=rows,
    )
