"""TIES and DARE merging for ``clara composite build`` (not installed by default): ``ties``, ``dare_ties``,
``dare_linear``.

Applied to each component's dense weight delta (``scaling * B @ A``, or the DoRA delta against the base), not
to A and B separately, so the result is the merge of the deltas themselves:

- ``ties`` (Yadav et al. 2023): keep the ``--density`` fraction of each delta's entries of largest magnitude,
  elect a sign per entry (``--majority-sign total``: the sign of the sum; ``frequency``: the sign most deltas
  have), and average the weighted entries that agree with it.
- ``dare_linear`` (Yu et al. 2023): drop entries at random with probability ``1 - density``, rescale the kept
  ones by ``1 / density``, and take the weighted sum. ``--seed`` makes the drop reproducible.
- ``dare_ties``: DARE's random drop, then TIES' sign election and disjoint mean.

The result is dense; clara stores its truncated SVD and records the error. Imports only
``clara_core.plugin_api`` (torch through the tensors clara hands over).
"""

from __future__ import annotations

from typing import Any

from clara_core.plugin_api import (
    InvalidInput,
    MergeCheckRequest,
    MergedModule,
    MergeStrategy,
    MergeStrategyImpl,
    ModuleMergeRequest,
    Option,
    hookimpl,
)

DENSITY = Option("density", float, 0.5, "fraction of each delta's entries kept (0 < density <= 1)")
MAJORITY_SIGN = Option(
    "majority_sign", str, "total", "how the sign of an entry is elected", choices=("total", "frequency")
)


def magnitude_prune(tensor: Any, density: float) -> Any:
    """``tensor`` with all but its ``density`` fraction of largest-magnitude entries set to zero."""
    import torch

    k = int(density * tensor.numel())
    if k >= tensor.numel():
        return tensor
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    if k > 0:
        mask[torch.topk(tensor.abs().reshape(-1), k=k).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def random_prune(tensor: Any, density: float, generator: Any) -> Any:
    """DARE: each entry kept with probability ``density`` and rescaled by ``1 / density``."""
    import torch

    if density >= 1.0:
        return tensor
    mask = torch.bernoulli(torch.full(tensor.shape, density, dtype=torch.float64), generator=generator)
    return tensor * mask.to(tensor.dtype) / density


def majority_sign_mask(stacked: Any, method: str) -> Any:
    """Per entry, which of the stacked deltas agree with the elected sign (ties go to +)."""
    import torch

    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    return signs == elected


def disjoint_mean(weighted: Any, agree: Any) -> Any:
    """The mean over the deltas that agree with the elected sign, entry by entry (0 where none does)."""
    total = (weighted * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1)


def ties(deltas: list[Any], weights: list[float], density: float, method: str) -> Any:
    import torch

    pruned = torch.stack([magnitude_prune(d, density) for d in deltas])
    scale = torch.tensor(weights, dtype=pruned.dtype).reshape(-1, *([1] * (pruned.dim() - 1)))
    return disjoint_mean(pruned * scale, majority_sign_mask(pruned, method))


class _Strategy(MergeStrategyImpl):
    def check(self, request: MergeCheckRequest) -> None:
        density = request.options.get("density", DENSITY.default)
        if not 0.0 < density <= 1.0:
            raise InvalidInput(f"--density must be above 0 and at most 1, got {density}")

    def _deltas(self, request: ModuleMergeRequest) -> tuple[list[Any], list[float]]:
        base = request.base_weight.double() if request.base_weight is not None else None
        return [d.dense(base).double() for d in request.deltas], [d.weight for d in request.deltas]


class Ties(_Strategy):
    def merge_module(self, request: ModuleMergeRequest) -> MergedModule:
        deltas, weights = self._deltas(request)
        options = request.options
        return MergedModule(dense_delta=ties(deltas, weights, options["density"], options["majority_sign"]))


class DareLinear(_Strategy):
    def merge_module(self, request: ModuleMergeRequest) -> MergedModule:
        import torch

        generator = torch.Generator().manual_seed(request.seed)
        deltas, weights = self._deltas(request)
        density = request.options["density"]
        merged = sum(w * random_prune(d, density, generator) for d, w in zip(deltas, weights, strict=True))
        return MergedModule(dense_delta=merged)


class DareTies(_Strategy):
    def merge_module(self, request: ModuleMergeRequest) -> MergedModule:
        import torch

        generator = torch.Generator().manual_seed(request.seed)
        deltas, weights = self._deltas(request)
        density = request.options["density"]
        pruned = torch.stack([random_prune(d, density, generator) for d in deltas])
        scale = torch.tensor(weights, dtype=pruned.dtype).reshape(-1, *([1] * (pruned.dim() - 1)))
        agree = majority_sign_mask(pruned, request.options["majority_sign"])
        return MergedModule(dense_delta=disjoint_mean(pruned * scale, agree))


@hookimpl
def register_merge_strategies(register):
    register(MergeStrategy("ties", Ties, "TIES: trim, elect sign, disjoint mean", [DENSITY, MAJORITY_SIGN]))
    register(MergeStrategy("dare_ties", DareTies, "DARE random drop, then TIES", [DENSITY, MAJORITY_SIGN]))
    register(MergeStrategy("dare_linear", DareLinear, "DARE random drop, then the weighted sum", [DENSITY]))
