"""TIES/DARE against hand-computed values on small tensors, and registration with declared options."""

from __future__ import annotations

import clara_plugin_merge_ties as plugin
import pytest
import torch

from clara_core.errors import InvalidInput
from clara_core.plugin_api import MergeCheckRequest, ModuleDelta, ModuleMergeRequest
from clara_core.plugins import PluginManager


def row(values: list[float], weight: float = 1.0) -> ModuleDelta:
    """A rank-1 delta equal to the 1 x n row ``values`` (B = [[1]], A = values, scaling 1)."""
    return ModuleDelta(
        "x",
        lora_A=torch.tensor([values], dtype=torch.float32),
        lora_B=torch.ones(1, 1),
        scaling=1.0,
        weight=weight,
    )


def strategy(name: str):
    plugins = PluginManager(load_entry_points=False)
    plugins.register(plugin, name="merge_ties", distribution="clara-plugin-merge-ties")
    registration = plugins.merge_strategy(name)
    return registration, registration.create()


def merge(name: str, deltas: list[ModuleDelta], seed: int = 0, **options) -> torch.Tensor:
    registration, impl = strategy(name)
    values = {o.name: options.get(o.name, o.default) for o in registration.options}
    impl.check(MergeCheckRequest(weights=None, options=values))
    request = ModuleMergeRequest(module="m", deltas=deltas, options=values, seed=seed)
    return impl.merge_module(request).dense_delta


def test_ties_matches_the_hand_computed_result():
    # density 0.5 keeps 2 of 4 entries: [3, 0, 0, -4] and [-2, 2, 0, 0]; weights 1 and 0.5.
    # total sign: [1, 2, 0, -4] -> +, +, + (0 counts as +), -. Agreeing: entry 0 only the first (3),
    # entry 1 only the second (0.5 * 2), entry 2 nobody, entry 3 the first (-4).
    got = merge("ties", [row([3, -1, 2, -4]), row([-2, 2, 1, 1], weight=0.5)], density=0.5)
    assert torch.allclose(got, torch.tensor([[3.0, 1.0, 0.0, -4.0]], dtype=got.dtype))


def test_majority_sign_total_and_frequency_differ_where_the_hand_count_says():
    deltas = [row([5.0, 1.0]), row([-1.0, 1.0]), row([-1.0, -3.0])]
    # entry 0: total 3 -> +, only 5 agrees -> 5; frequency: two minus -> -, mean of -1 and -1 -> -1
    # entry 1: total -1 -> -, only -3 agrees -> -3; frequency: two plus -> +, mean of 1 and 1 -> 1
    total = merge("ties", deltas, density=1.0, majority_sign="total")
    frequency = merge("ties", deltas, density=1.0, majority_sign="frequency")
    assert torch.allclose(total, torch.tensor([[5.0, -3.0]], dtype=total.dtype))
    assert torch.allclose(frequency, torch.tensor([[-1.0, 1.0]], dtype=frequency.dtype))


def test_dare_linear_drops_with_the_seed_and_rescales_the_rest():
    deltas = [row([1.0] * 1000), row([2.0] * 1000, weight=0.5)]
    one = merge("dare_linear", deltas, seed=3, density=0.25)
    assert torch.equal(one, merge("dare_linear", deltas, seed=3, density=0.25))
    assert not torch.equal(one, merge("dare_linear", deltas, seed=4, density=0.25))
    # each kept entry is 1/0.25 = 4 (first) or 0.5 * 2/0.25 = 4 (second): values in {0, 4, 8}
    assert set(one.unique().tolist()) <= {0.0, 4.0, 8.0}
    assert one.mean().item() == pytest.approx(2.0, rel=0.15)  # the expectation: 1 + 0.5 * 2


def test_dare_ties_with_density_one_is_ties():
    deltas = [row([5.0, 1.0]), row([-1.0, 1.0]), row([-1.0, -3.0])]
    assert torch.allclose(merge("dare_ties", deltas, density=1.0), merge("ties", deltas, density=1.0))


def test_declared_options_and_density_refusal():
    registration, impl = strategy("ties")
    assert [o.flag for o in registration.options] == ["--density", "--majority-sign"]
    with pytest.raises(InvalidInput, match="--density must be above 0"):
        impl.check(MergeCheckRequest(weights=None, options={"density": 0.0, "majority_sign": "total"}))
