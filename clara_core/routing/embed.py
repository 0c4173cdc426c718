"""Text embeddings from a base model: the mean of the last hidden states over each text's tokens (the same
vectors the transformers engine's ``embed`` gives in the server)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Texts are cut to this many tokens before embedding (a prompt's start says what it is about).
MAX_TOKENS = 128


def mean_pool(hidden: Any, mask: Any) -> list[list[float]]:
    """Mean of ``hidden`` (batch, tokens, dim) over the tokens where ``mask`` is 1."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    return [[float(x) for x in row] for row in pooled.float().cpu().tolist()]


class LocalEmbedder:
    """Loads tokenizer and model of ``path`` on first call (once), then embeds in batches."""

    def __init__(self, path: Path, batch_size: int = 16) -> None:
        self.path = path
        self.batch_size = batch_size
        self._model: Any = None
        self._tokenizer: Any = None
        self._extra: dict[str, Any] = {}

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a routing command prints its answer, not a loading bar

        self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).eval()
        # the hidden states are wanted, not logits for every position (the LM head is a large matrix)
        params = inspect.signature(type(self._model).forward).parameters
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def __call__(self, texts: Sequence[str]) -> list[list[float]]:
        import torch

        if self._model is None:
            self._load()
        out: list[list[float]] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = list(texts[start : start + self.batch_size])
                encoded = self._tokenizer(
                    batch, return_tensors="pt", padding=True, truncation=True, max_length=MAX_TOKENS
                )
                output = self._model(**encoded, output_hidden_states=True, use_cache=False, **self._extra)
                hidden = output.hidden_states[-1]
                out.extend(mean_pool(hidden, encoded["attention_mask"]))
        return out
