"""The built-in strategies on small tensors: exact factors for LoRA, the DoRA formula, registration."""

from __future__ import annotations

import clara_plugin_merge
import pytest
import torch

from clara_core.errors import InvalidInput
from clara_core.plugin_api import MergeCheckRequest, ModuleDelta, ModuleMergeRequest
from clara_core.plugins import PluginManager


def delta(name: str, seed: int, rank: int, weight: float = 1.0, magnitude: bool = False) -> ModuleDelta:
    g = torch.Generator().manual_seed(seed)
    return ModuleDelta(
        name,
        lora_A=torch.randn(rank, 5, generator=g),
        lora_B=torch.randn(6, rank, generator=g),
        scaling=0.5 + seed,
        magnitude=torch.rand(6, generator=g) + 0.5 if magnitude else None,
        weight=weight,
    )


def strategy(name: str):
    plugins = PluginManager(load_entry_points=False)
    plugins.register(clara_plugin_merge, name="merge", distribution="clara-plugin-merge")
    return plugins.merge_strategy(name).create()


def test_weighted_returns_exact_concatenated_factors_for_mixed_ranks():
    a, b = delta("a", 1, 2, 0.7), delta("b", 2, 3, -0.3)
    merged = strategy("weighted").merge_module(ModuleMergeRequest(module="m", deltas=[a, b]))
    assert merged.lora_A.shape == (5, 5) and merged.lora_B.shape == (6, 5)
    want = 0.7 * a.dense() + -0.3 * b.dense()
    assert torch.allclose(merged.lora_B @ merged.lora_A, want, atol=1e-5)


def test_additive_ignores_weights_and_weighted_needs_them():
    a, b = delta("a", 1, 2, 5.0), delta("b", 2, 3, 5.0)
    merged = strategy("additive").merge_module(ModuleMergeRequest(module="m", deltas=[a, b]))
    assert torch.allclose(merged.lora_B @ merged.lora_A, a.dense() + b.dense(), atol=1e-5)
    with pytest.raises(InvalidInput, match="needs --weights"):
        strategy("weighted").check(MergeCheckRequest(weights=None))


def test_dora_components_give_a_dense_delta_by_the_dora_formula():
    base = torch.randn(6, 5, generator=torch.Generator().manual_seed(9))
    a, b = delta("a", 1, 2, 0.5, magnitude=True), delta("b", 2, 3, 0.5)
    merged = strategy("weighted").merge_module(
        ModuleMergeRequest(module="m", deltas=[a, b], base_weight=base)
    )
    combined = base + a.scaling * a.lora_B @ a.lora_A
    dora = a.magnitude.reshape(-1, 1) * combined / combined.norm(dim=1, keepdim=True) - base
    assert torch.allclose(merged.dense_delta, 0.5 * dora + 0.5 * b.dense(), atol=1e-5)


def test_sequential_renormalises_dora_against_the_weight_it_is_applied_to():
    base = torch.randn(6, 5, generator=torch.Generator().manual_seed(9))
    a, b = delta("a", 1, 2, magnitude=True), delta("b", 2, 3)
    seq = strategy("sequential")
    ab = seq.merge_module(ModuleMergeRequest(module="m", deltas=[a, b], base_weight=base)).dense_delta
    ba = seq.merge_module(ModuleMergeRequest(module="m", deltas=[b, a], base_weight=base)).dense_delta
    after_b = base + b.dense()
    assert torch.allclose(ba, after_b + a.dense(after_b) - base, atol=1e-5)
    assert not torch.allclose(ab, ba, atol=1e-3)
