"""Text embeddings from a base model: the mean of one layer's hidden states over each text's tokens (the same
vectors the transformers engine's ``embed`` gives in the server; both use :func:`hidden_at`).

``layer`` counts decoder layers as transformers' ``hidden_states`` do: ``0`` is the token embeddings, ``k`` the
output of the k-th decoder layer, ``-1`` (or the number of layers) the last hidden states (after the final
norm). For a layer before the last, the forward pass stops there: the later layers are never computed."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidInput, PluginError

#: Texts are cut to this many tokens before embedding (a prompt's start says what it is about).
MAX_TOKENS = 128


def mean_pool(hidden: Any, mask: Any) -> list[list[float]]:
    """Mean of ``hidden`` (batch, tokens, dim) over the tokens where ``mask`` is 1."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    return [[float(x) for x in row] for row in pooled.float().cpu().tolist()]


def layer_count(model: Any) -> int:
    """Number of decoder layers of ``model`` (a transformers causal LM)."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return int(config.num_hidden_layers)


def resolve_layer(layer: int | None, count: int) -> int:
    """``layer`` as an index into transformers' ``hidden_states`` (0..count); ``None`` and negative values
    count from the end (``-1``: the last). Out of range: one line naming the valid ones."""
    if layer is None:
        return count
    index = layer + count + 1 if layer < 0 else layer
    if not 0 <= index <= count:
        raise InvalidInput(
            f"layer {layer}: the base has {count} decoder layers; use 0 (token embeddings) to {count}, or -1 "
            "for the last"
        )
    return index


def _decoder_layers(model: Any, count: int) -> Any:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise PluginError(
        f"cannot find the {count} decoder layers of {type(model).__name__}; embed with layer -1 (the last)"
    )


class _Reached(Exception):
    """Raised by the hook on the wanted layer: the rest of the forward pass is not needed."""


def hidden_at(model: Any, layer: int | None, forward: Callable[..., Any]) -> Any:
    """The hidden states (batch, tokens, dim) at ``layer`` of ``model``; ``forward(**extra)`` runs the model on
    the batch (the caller's inputs, plus ``extra``). Before the last layer, a forward hook on that layer takes
    its output and stops the pass, so only the first ``layer`` decoder layers run."""
    count = layer_count(model)
    index = resolve_layer(layer, count)
    if index == count:
        return forward(output_hidden_states=True).hidden_states[-1]
    target = model.get_input_embeddings() if index == 0 else _decoder_layers(model, count)[index - 1]
    taken: list[Any] = []

    def take(_module: Any, _args: Any, output: Any) -> None:
        taken.append(output[0] if isinstance(output, tuple) else output)
        raise _Reached

    handle = target.register_forward_hook(take)
    try:
        forward()
    except _Reached:
        pass
    finally:
        handle.remove()
    if not taken:
        raise PluginError(f"the forward pass of {type(model).__name__} never reached layer {index}")
    return taken[0]


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

    def __call__(self, texts: Sequence[str], *, layer: int | None = None) -> list[list[float]]:
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

                def forward(encoded: Any = encoded, **extra: Any) -> Any:
                    return self._model(**encoded, use_cache=False, **self._extra, **extra)

                hidden = hidden_at(self._model, layer, forward)
                out.extend(mean_pool(hidden, encoded["attention_mask"]))
        return out
