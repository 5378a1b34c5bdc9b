"""Golden tests for Model Stock: hand-computed ratios, mergekit's formula transcribed in numpy,
row blocks, and hypothesis properties (identical models give the base, model order)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from neuromerge.errors import ConfigError
from neuromerge.methods import model_stock
from neuromerge.registry import SumCollector, TensorContext


def ref_model_stock(base: np.ndarray, models: list[np.ndarray], filter_wise: bool) -> np.ndarray:
    """mergekit's model_stock_merge_method in numpy (float64)."""
    w0, ws = base, list(models)
    if filter_wise:
        if w0.ndim == 1:
            w0, ws = w0[None], [w[None] for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offs = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offs):
        for b in offs[i + 1:]:
            norm = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
            cos.append(np.clip((a * b).sum(axis=-1) / np.maximum(norm, 1e-6), -1, 1))
    c = np.mean(cos, axis=0)[..., None]
    n = len(ws)
    den = 1 + (n - 1) * c
    t = np.where(np.abs(den) < 1e-6, 0.0, n * c / np.where(np.abs(den) < 1e-6, 1.0, den))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(base.shape)


def test_ratio_by_hand() -> None:
    base = torch.zeros(2)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)  # N = 2
    assert_close(model_stock(base, [a, b], ctx=TensorContext()), t * (a + b) / 2)
    # orthogonal task vectors: cos 0, t = 0, the base
    out = model_stock(base + 3, [base + 3 + torch.tensor([1.0, 0]),
                                 base + 3 + torch.tensor([0, 2.0])], ctx=TensorContext())
    assert_close(out, base + 3)


def test_singular_denominator_keeps_the_base() -> None:
    # N = 2, opposite task vectors: cos = -1, 1 + (N-1) cos = 0
    base = torch.tensor([0.5, -1.0])
    out = model_stock(base, [base + torch.tensor([1.0, 2.0]), base - torch.tensor([1.0, 2.0])],
                      ctx=TensorContext())
    assert torch.equal(out, base)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(7,), (5, 6), (2, 3, 4)])
def test_matches_mergekit_formula(filter_wise: bool, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(len(shape) + filter_wise)
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    models = [base + torch.randn(shape, generator=gen, dtype=torch.float64) * s
              + 0.5 * torch.ones(shape, dtype=torch.float64) for s in (1.0, 0.5, 2.0)]
    out = model_stock(base, models, filter_wise=filter_wise, ctx=TensorContext())
    want = ref_model_stock(base.numpy(), [m.numpy() for m in models], filter_wise)
    assert_close(out, torch.from_numpy(want), rtol=1e-10, atol=1e-10)


def test_needs_two_models() -> None:
    with pytest.raises(ConfigError, match="at least two models"):
        model_stock(torch.zeros(3), [torch.ones(3)], ctx=TensorContext())


@pytest.mark.parametrize("filter_wise", [False, True])
def test_row_blocks_give_the_whole_tensor_result(filter_wise: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    models = [base + torch.randn(9, 4, generator=gen, dtype=torch.float64) + 0.3
              for _ in range(3)]
    whole = model_stock(base, models, filter_wise=filter_wise, ctx=TensorContext())
    blocks = [(0, 4), (4, 7), (7, 9)]
    collect = SumCollector()
    for a, b in blocks:
        model_stock.fn(base[a:b], [m[a:b] for m in models], filter_wise=filter_wise,
                       ctx=TensorContext(row_offset=a, collect=collect))
    parts = [model_stock.fn(base[a:b], [m[a:b] for m in models], filter_wise=filter_wise,
                            ctx=TensorContext(row_offset=a, sums=collect.values))
             for a, b in blocks]
    assert_close(torch.cat(parts), whole, rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 4), filter_wise=st.booleans(),
       data=st.data())
def test_properties(seed: int, n: int, filter_wise: bool, data: st.DataObject) -> None:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 5, generator=gen)
    assert torch.equal(model_stock(base, [base.clone()] * n, filter_wise=filter_wise,
                                   ctx=TensorContext()), base)
    models = [base + torch.randn(4, 5, generator=gen) for _ in range(n)]
    perm = data.draw(st.permutations(range(n)))
    a = model_stock(base, models, filter_wise=filter_wise, ctx=TensorContext())
    b = model_stock(base, [models[i] for i in perm], filter_wise=filter_wise,
                    ctx=TensorContext())
    assert_close(a, b, rtol=1e-5, atol=1e-5)
