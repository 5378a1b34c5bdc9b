"""Golden tests for SCE: a hand-computed case and mergekit's sce_merge transcribed in numpy;
hypothesis properties (identical models give the base, model order)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from neuromerge.methods import sce
from neuromerge.registry import TensorContext


def ref_sce(base: np.ndarray, models: list[np.ndarray], topk: float) -> np.ndarray:
    """mergekit's sce_merge (select by variance, energy weights, sign erase) in numpy."""
    tv = np.stack([m - base for m in models])
    if topk < 1:
        var = tv.var(axis=0)
        k = int(np.count_nonzero(var) * topk)
        mask = np.zeros(var.size)
        if k > 0:
            mask[np.argsort(-np.abs(var).ravel(), kind="stable")[:k]] = 1
        tv = tv * mask.reshape(var.shape)
    majority = np.where(tv.sum(axis=0) >= 0, 1.0, -1.0)
    erase = (np.sign(tv) == majority).astype(np.float64)
    w = (tv ** 2).reshape(len(models), -1).mean(axis=1)
    w = np.full(len(models), 1 / len(models)) if abs(w.sum()) < 1e-6 else w / w.sum()
    ew = w.reshape((-1,) + (1,) * base.ndim) * erase
    return base + (tv * ew).sum(axis=0) / np.maximum(ew.sum(axis=0), 1e-6)


def test_by_hand() -> None:
    base = torch.zeros(4)
    a = torch.tensor([2.0, -1.0, 0.0, 1.0])
    b = torch.tensor([0.0, 1.0, 0.0, 3.0])
    # select_topk 1: no selection
    # energies: mean(a²) = 6/4, mean(b²) = 10/4 -> w = (0.375, 0.625)
    # signs: Σ = [2, 0, 0, 4] -> majority + everywhere (0 counts as +)
    # entry 0: only a agrees: 2·0.375/0.375 = 2; entry 1: only b (+1): 1; entry 2: none: 0;
    # entry 3: both: (0.375·1 + 0.625·3) / 1 = 2.25
    out = sce(base, [a, b], ctx=TensorContext())
    assert_close(out, torch.tensor([2.0, 1.0, 0.0, 2.25]))


def test_selection_keeps_the_highest_variance_entries() -> None:
    base = torch.zeros(5)
    a = torch.tensor([1.0, 4.0, 0.5, 3.0, 2.0])
    b = torch.tensor([1.0, -4.0, -0.5, 0.0, 1.0])
    # variances [0, 16, .25, 2.25, .25]: 4 non-zero, topk 0.5 -> k = 2: entries 1 and 3
    out = sce(base, [a, b], select_topk=0.5, ctx=TensorContext())
    # masked: a = [0, 4, 0, 3, 0], b = [0, -4, 0, 0, 0]; Σ = [0, 0, 0, 3, 0] -> + everywhere
    # w ∝ (25/5, 16/5) -> (25/41, 16/41); entry 1: a alone -> 4; entry 3: a alone -> 3
    assert_close(out, torch.tensor([0.0, 4.0, 0.0, 3.0, 0.0]))


@pytest.mark.parametrize("topk", [1.0, 0.7, 0.3, 0.0])
@pytest.mark.parametrize("shape", [(11,), (6, 5)])
def test_matches_mergekit_formula(topk: float, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(int(topk * 10) + len(shape))
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    models = [base + s * torch.randn(shape, generator=gen, dtype=torch.float64)
              for s in (1.0, 0.3, 2.0)]
    out = sce(base, models, select_topk=topk, ctx=TensorContext())
    want = ref_sce(base.numpy(), [m.numpy() for m in models], topk)
    assert_close(out, torch.from_numpy(want), rtol=1e-10, atol=1e-10)


def test_tiny_task_vectors_get_equal_weights() -> None:
    # Σ mean(τ²) < 1e-6: mergekit's uniform weights (1/T), so this is the disjoint mean
    base = torch.zeros(3, dtype=torch.float64)
    models = [torch.tensor([1e-4, -2e-4, 0.0], dtype=torch.float64),
              torch.tensor([3e-4, 1e-4, 0.0], dtype=torch.float64)]
    out = sce(base, models, ctx=TensorContext())
    # entry 1: Σ = -1e-4, only the first model agrees
    assert_close(out, torch.tensor([2e-4, -2e-4, 0.0], dtype=torch.float64))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4),
       topk=st.sampled_from([1.0, 0.5, 0.2]), data=st.data())
def test_properties(seed: int, n: int, topk: float, data: st.DataObject) -> None:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 5, generator=gen)
    assert torch.equal(sce(base, [base.clone()] * n, select_topk=topk, ctx=TensorContext()),
                       base)
    models = [base + torch.randn(4, 5, generator=gen) for _ in range(n)]
    perm = data.draw(st.permutations(range(n)))
    a = sce(base, models, select_topk=topk, ctx=TensorContext())
    b = sce(base, [models[i] for i in perm], select_topk=topk, ctx=TensorContext())
    assert_close(a, b, rtol=1e-5, atol=1e-5)
