"""Golden tests for Model Breadcrumbs: hand-computed masks, and mergekit's `magnitude_outliers`
rule re-implemented in numpy (argsort) where no magnitudes tie."""

from __future__ import annotations

import numpy as np
import torch
from torch.testing import assert_close

from neuromerge import merge_state_dicts
from neuromerge.methods import breadcrumbs
from neuromerge.methods.breadcrumbs import breadcrumbs_mask
from neuromerge.registry import TensorContext, get_method

TAU1 = [0.1, -0.5, 0.3, 2.0, -0.05, 0.7, 0.2, -0.4, 0.9, 0.6]


def test_mask_drops_the_largest_then_the_smallest_by_hand() -> None:
    # N = 10, density 0.5 -> k = ceil(5.0) = 5 kept; gamma 0.1 -> n_top = floor(1.0) = 1.
    # |τ| descending: 2.0 | 0.9 0.7 0.6 0.5 0.4 | 0.3 0.2 0.1 0.05
    # drop 2.0 (outlier), keep the next five, drop the rest.
    mask = breadcrumbs_mask(torch.tensor(TAU1), density=0.5, gamma=0.1)
    assert mask.tolist() == [False, True, False, False, False, True, False, True, True, True]


def test_ties_at_a_bound_are_kept() -> None:
    # all |τ| equal: h_high = 2nd largest = 1 and h_low = 6th largest = 1, so all are kept
    assert bool(breadcrumbs_mask(torch.ones(10), density=0.5, gamma=0.1).all())
    # without outliers (gamma 0) only the lower bound applies: |τ| >= 3rd largest = 0.7
    mask = breadcrumbs_mask(torch.tensor(TAU1), density=0.3, gamma=0.0)
    assert mask.tolist() == [False, False, False, True, False, True, False, False, True, False]


def test_breadcrumbs_is_task_arithmetic_of_the_masked_task_vectors() -> None:
    base = torch.zeros(10)
    tau2 = torch.ones(10)  # every magnitude ties: kept whole
    out = breadcrumbs(base, [torch.tensor(TAU1), tau2], density=0.5, gamma=0.1, scale=0.5,
                      ctx=TensorContext())
    kept1 = [0.0, -0.5, 0.0, 0.0, 0.0, 0.7, 0.0, -0.4, 0.9, 0.6]
    # θ = θ0 + 0.5 · (m1 ⊙ τ1 + τ2)
    assert_close(out, 0.5 * (torch.tensor(kept1) + 1.0))


def ref_magnitude_outliers(x: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """mergekit's sparsify.magnitude_outliers: sort |x| ascending, keep
    indices[n_bot : n - n_top] with target = int(density·n), n_top = int(gamma·n)."""
    n = x.size
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    order = np.argsort(np.abs(x).ravel(), kind="stable")
    keep = np.zeros(n, dtype=bool)
    keep[order[n_bot:n - n_top]] = True
    return np.where(keep.reshape(x.shape), x, 0.0)


def test_matches_mergekit_rule_without_ties() -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(20, 10, generator=gen)  # N = 200: density 0.9 -> 180 kept, gamma -> 2
    experts = [base + torch.randn(20, 10, generator=gen) for _ in range(3)]
    out = breadcrumbs(base, experts, ctx=TensorContext())  # defaults: 0.9, 0.01, λ = 0.3
    want = base.double().numpy().copy()
    for e in experts:
        want += 0.3 * ref_magnitude_outliers((e - base).double().numpy(), 0.9, 0.01)
    assert_close(out, torch.from_numpy(want).float(), rtol=1e-6, atol=1e-6)


def test_density_one_without_outliers_is_task_arithmetic() -> None:
    gen = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    experts = [{k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()}
               for _ in range(2)]
    a = merge_state_dicts(base, experts, "breadcrumbs", {"density": 1.0, "gamma": 0.0})
    b = merge_state_dicts(base, experts, "task_arithmetic")
    for k in base:
        assert_close(a.state_dict[k], b.state_dict[k])


def test_point_tensors_are_masked_too_and_the_method_needs_whole_tensors() -> None:
    # a 1-D tensor of 10 entries: same rule as above (mergekit sparsifies every tensor)
    out = merge_state_dicts({"b": torch.zeros(10)}, [{"b": torch.tensor(TAU1)}],
                            "breadcrumbs", {"density": 0.5, "gamma": 0.1, "scale": 1.0})
    kept = [0.0, -0.5, 0.0, 0.0, 0.0, 0.7, 0.0, -0.4, 0.9, 0.6]
    assert_close(out.state_dict["b"], torch.tensor(kept))
    assert not get_method("breadcrumbs").row_local
