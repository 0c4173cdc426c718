"""clara's built-in merge strategies for ``clara composite build``: ``additive``, ``weighted``, ``sequential``.

Each component's delta is ``scaling * B @ A`` (LoRA; clara has applied alpha/r, rsLoRA's alpha/sqrt(r) and the
adapter's rank/alpha patterns) or the DoRA delta ``m * (W + s B A) / ||W + s B A|| - W``. Where no component
is DoRA the weighted sum of LoRA deltas is itself low-rank, and these strategies return it exactly as
concatenated factors: ``A = [A_1; A_2; ...]``, ``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]`` (so ``B @ A`` is the
sum, rank = sum of ranks, scaling folded in). With a DoRA component they return the dense delta and clara
stores its truncated SVD with the error recorded.

Imports only ``clara_core.plugin_api``; torch is used through the tensors clara hands over.
"""

from __future__ import annotations

from clara_core.plugin_api import (
    InvalidInput,
    MergeCheckRequest,
    MergedModule,
    MergeStrategy,
    MergeStrategyImpl,
    ModuleDelta,
    ModuleMergeRequest,
    hookimpl,
)


def concatenated(deltas: list[ModuleDelta] | tuple[ModuleDelta, ...], weights: list[float]) -> MergedModule:
    """The exact factors of ``sum(w_i * s_i * B_i @ A_i)``: A stacked by rows, B by columns with the scale."""
    import torch

    lora_A = torch.cat([d.lora_A.float() for d in deltas], dim=0)
    lora_B = torch.cat(
        [(w * d.scaling) * d.lora_B.float() for d, w in zip(deltas, weights, strict=True)], dim=1
    )
    return MergedModule(lora_A=lora_A, lora_B=lora_B)


class Weighted(MergeStrategyImpl):
    """``sum(w_i * delta_i)``: exact factors for LoRA components, a dense delta once one is DoRA."""

    def check(self, request: MergeCheckRequest) -> None:
        if request.weights is None:
            raise InvalidInput(
                "strategy 'weighted' needs --weights, one number per adapter (e.g. --weights 0.7 0.3)"
            )

    def merge_module(self, request: ModuleMergeRequest) -> MergedModule:
        deltas = list(request.deltas)
        weights = [d.weight for d in deltas]
        if not any(d.is_dora for d in deltas):
            return concatenated(deltas, weights)
        dense = sum(w * d.dense(request.base_weight.float()) for d, w in zip(deltas, weights, strict=True))
        return MergedModule(dense_delta=dense)


class Additive(Weighted):
    """``sum(delta_i)``: every component at full strength."""

    takes_weights = False

    def check(self, request: MergeCheckRequest) -> None:
        pass

    def merge_module(self, request: ModuleMergeRequest) -> MergedModule:
        deltas = list(request.deltas)
        if not any(d.is_dora for d in deltas):
            return concatenated(deltas, [1.0] * len(deltas))
        return MergedModule(dense_delta=sum(d.dense(request.base_weight.float()) for d in deltas))


class Sequential(MergeStrategyImpl):
    """Components applied one after another onto the base, in the order given, each scaled by its weight
    (1.0 without --weights): ``W_k = W_{k-1} + w_k * delta_k(W_{k-1})``. Only DoRA is order-sensitive (its
    magnitude renormalises against the weight it is applied to); LoRA-only modules are the exact sum."""

    order_sensitive = True

    def merge_module(self, request: ModuleMergeRequest) -> MergedModule:
        deltas = list(request.deltas)
        weights = [d.weight for d in deltas]
        if not any(d.is_dora for d in deltas):
            return concatenated(deltas, weights)
        base = request.base_weight.float()
        current = base
        for delta, weight in zip(deltas, weights, strict=True):
            current = current + weight * delta.dense(current)
        return MergedModule(dense_delta=current - base)


@hookimpl
def register_merge_strategies(register):
    register(MergeStrategy("additive", Additive, "sum of the adapters' weight deltas (exact for LoRA)"))
    register(
        MergeStrategy("weighted", Weighted, "weighted sum of the deltas with --weights (exact for LoRA)")
    )
    register(
        MergeStrategy(
            "sequential",
            Sequential,
            "experimental: adapters applied one after another in the order given (differs only for DoRA)",
        )
    )
