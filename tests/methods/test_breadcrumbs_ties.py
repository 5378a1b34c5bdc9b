"""breadcrumbs_ties, and mergekit's parameters of breadcrumbs (weight, normalize, rescale,
per-model density and gamma): against mergekit's magnitude_outliers + generalized task
arithmetic in numpy, where density · N and gamma · N are integers and no magnitudes tie (there
the two count rules agree); hand-computed consensus; properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from neuromerge.config import from_mergekit
from neuromerge.methods import breadcrumbs, breadcrumbs_ties
from neuromerge.registry import TensorContext
from tests.methods.gta_reference import gta, l1_rescaled, magnitude_outliers_mask


def test_consensus_by_hand() -> None:
    base = torch.zeros(4)
    a = torch.tensor([1.0, -2.0, 3.0, 10.0])
    b = torch.tensor([-3.0, 1.0, 2.0, -10.0])
    # density 1: no masks. Σ = [-2, -1, 5, 0] -> s = [-, -, +, sign of Σ over tensor (+2) = +]
    # disjoint sum: [-3, -2, 5, 10]; normalize: [-3, -2, 2.5, 10]
    assert_close(breadcrumbs_ties(base, [a, b], density=1.0, ctx=TensorContext()),
                 torch.tensor([-3.0, -2.0, 5.0, 10.0]))
    assert_close(breadcrumbs_ties(base, [a, b], density=1.0, normalize=True, scale=2.0,
                                  ctx=TensorContext()),
                 2 * torch.tensor([-3.0, -2.0, 2.5, 10.0]))


def _case(seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(10, 10, generator=gen, dtype=torch.float64)  # N = 100
    return base, [base + torch.randn(10, 10, generator=gen, dtype=torch.float64)
                  for _ in range(3)]


@pytest.mark.parametrize("method,consensus", [(breadcrumbs, False), (breadcrumbs_ties, True)])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("rescale", [False, True])
def test_matches_mergekit_formula(method, consensus: bool, normalize: bool,
                                  rescale: bool) -> None:
    base, models = _case(1)
    weights, densities, gammas = (0.3, 1.0, 0.6), (0.5, 0.8, 0.6), (0.05, 0.0, 0.1)
    ctx = TensorContext(model_params={"weight": weights, "density": densities,
                                      "gamma": gammas})
    out = method(base, models, scale=0.9, normalize=normalize, rescale=rescale, ctx=ctx)
    deltas = []
    for m, d, g in zip(models, densities, gammas, strict=True):
        tv = (m - base).numpy()
        mask = magnitude_outliers_mask(tv, d, g)
        deltas.append(l1_rescaled(tv, mask) if rescale else tv * mask)
    want = gta(base.numpy(), deltas, weights, consensus=consensus, normalize=normalize,
               lam=0.9)
    assert_close(out, torch.from_numpy(want), rtol=1e-10, atol=1e-10)


def test_mergekit_breadcrumbs_config_gets_lambda_one_with_weights() -> None:
    cfg = from_mergekit({"merge_method": "breadcrumbs", "base_model": "b",
                         "models": [{"model": "x", "parameters": {"weight": 0.5,
                                                                  "density": 0.8}}],
                         "parameters": {"gamma": 0.02}})
    # mergekit's unset defaults (density 1, floor count) fill the global level; the
    # per-model density still wins for its model
    assert cfg["parameters"] == {"gamma": 0.02, "scale": 1.0, "density": 1.0,
                                 "trim_count": "floor"}
    cfg = from_mergekit({"merge_method": "breadcrumbs_ties", "base_model": "b",
                         "models": [{"model": "x", "parameters": {"weight": 0.5}}],
                         "parameters": {"lambda": 0.7}})
    assert cfg["parameters"] == {"scale": 0.7, "density": 1.0, "trim_count": "floor"}


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), normalize=st.booleans(),
       data=st.data())
def test_properties(seed: int, n: int, normalize: bool, data: st.DataObject) -> None:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(5, 6, generator=gen)
    same = breadcrumbs_ties(base, [base.clone()] * n, normalize=normalize, ctx=TensorContext())
    assert torch.equal(same, base)
    models = [base + torch.randn(5, 6, generator=gen) for _ in range(n)]
    perm = data.draw(st.permutations(range(n)))
    a = breadcrumbs_ties(base, models, density=0.5, gamma=0.1, normalize=normalize,
                         ctx=TensorContext())
    b = breadcrumbs_ties(base, [models[i] for i in perm], density=0.5, gamma=0.1,
                         normalize=normalize, ctx=TensorContext())
    assert_close(a, b, rtol=1e-5, atol=1e-5)
