"""Style coherence: how close an adapter's generations sit to a reference corpus in the base model's own space.

Each text is embedded as the mean of the base model's last hidden states over its tokens (padding excluded),
with every adapter switched off, so all models are measured with one ruler. Two numbers:

- ``style_centroid_cos``: cosine similarity of the mean embedding of the generations and that of the reference;
- ``style_mean_cos``: the mean over generations of each one's cosine similarity to the reference centroid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def embed(model: Any, tokenizer: Any, texts: Sequence[str], *, window: int, batch_size: int = 8) -> Any:
    """Mean-pooled last hidden states, one row per text (float32 on CPU); texts cut to ``window`` tokens."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    encoded = [list(tokenizer(t, add_special_tokens=True)["input_ids"])[:window] or [pad] for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    out: list[Any] = [None] * len(encoded)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = len(encoded[chunk[0]])
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, index in enumerate(chunk):
                ids[row, : len(encoded[index])] = torch.tensor(encoded[index])
                mask[row, : len(encoded[index])] = 1
            hidden = (
                model(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    output_hidden_states=True,
                    use_cache=False,
                )
                .hidden_states[-1]
                .float()
            )
            weights = mask.to(device).unsqueeze(-1).float()
            pooled = (hidden * weights).sum(1) / weights.sum(1)
            for row, index in enumerate(chunk):
                out[index] = pooled[row].cpu()
    return torch.stack(out)


def style_scores(generated: Any, reference: Any) -> dict[str, float]:
    import torch

    centroid = reference.mean(0)
    cos = torch.nn.functional.cosine_similarity
    return {
        "style_centroid_cos": float(cos(generated.mean(0), centroid, dim=0)),
        "style_mean_cos": float(cos(generated, centroid.unsqueeze(0), dim=1).mean()),
    }


__all__ = ["embed", "style_scores"]
