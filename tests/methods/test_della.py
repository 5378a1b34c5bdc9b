"""DELLA / DELLA-linear: the deterministic parts exactly (MAGPRUNE's probabilities against
mergekit's formula in numpy; the merge given the drawn mask against mergekit's generalized task
arithmetic in numpy), the random keep rate statistically, and properties (identical models give
the base, model order, row blocks)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from neuromerge import merge_state_dicts
from neuromerge.errors import ConfigError
from neuromerge.kernels import derive_seed, uniform_stream
from neuromerge.methods import della, della_linear
from neuromerge.methods.della import keep_probabilities
from neuromerge.registry import SumCollector, TensorContext
from tests.methods.gta_reference import della_probabilities, gta, l1_rescaled


def test_probabilities_by_hand() -> None:
    # one row of 5: ranks of |τ| ascending 0..4 -> p = 0.4 - 0.1 + 0.2 · r/4
    tv = torch.tensor([0.3, -5.0, 0.1, 2.0, -0.2])
    p = keep_probabilities(tv, 0.4, 0.1)
    assert_close(p, torch.tensor([0.40, 0.50, 0.30, 0.45, 0.35], dtype=torch.float64))


@pytest.mark.parametrize("shape", [(9,), (4, 7), (3, 4, 5)])
def test_probabilities_match_mergekit(shape: tuple[int, ...]) -> None:
    tv = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = della_probabilities(tv.numpy(), 0.6, 0.2)
    assert_close(keep_probabilities(tv, 0.6, 0.2), torch.from_numpy(want))


def _masks(tensors: list[torch.Tensor], base: torch.Tensor, density: float, eps: float,
           seeds: tuple[int, ...], name: str) -> list[np.ndarray]:
    out = []
    for t, m in enumerate(tensors):
        tv = m - base
        u = uniform_stream(derive_seed(seeds[t], name), 0, tv.numel()).double().numpy()
        p = della_probabilities(tv.numpy(), density, eps)
        out.append((u.reshape(tv.shape) < p).astype(np.float64))
    return out


@pytest.mark.parametrize("method,consensus", [(della, True), (della_linear, False)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("rescale", [True, False])
def test_merge_given_the_mask_matches_mergekit(method, consensus: bool, normalize: bool,
                                               rescale: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    models = [base + torch.randn(6, 8, generator=gen, dtype=torch.float64) for _ in range(3)]
    seeds, weights = (11, 22, 33), (0.5, 1.0, 0.8)
    ctx = TensorContext(name="w", model_seeds=seeds,
                        model_params={"weight": weights})
    out = method(base, models, density=0.5, epsilon=0.2, scale=0.7, normalize=normalize,
                 rescale=rescale, ctx=ctx)
    masks = _masks(models, base, 0.5, 0.2, seeds, "w")
    deltas = [l1_rescaled((m - base).numpy(), k) if rescale else (m - base).numpy() * k
              for m, k in zip(models, masks, strict=True)]
    want = gta(base.numpy(), deltas, weights, consensus=consensus, normalize=normalize,
               lam=0.7)
    assert_close(out, torch.from_numpy(want), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("block_entries", [1, 16, 1 << 21])
def test_mask_drawn_in_row_blocks_is_the_whole_tensors(monkeypatch, block_entries: int) -> None:
    # 1 entry -> one row per block; 16 -> two rows of 8; the default -> the whole tensor at once
    monkeypatch.setattr(sys.modules["neuromerge.methods.della"], "MASK_BLOCK_ENTRIES",
                        block_entries)
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(7, 8, generator=gen, dtype=torch.float64)
    models = [base + torch.randn(7, 8, generator=gen, dtype=torch.float64) for _ in range(2)]
    out = della_linear(base, models, density=0.5, epsilon=0.2, rescale=False, normalize=False,
                       ctx=TensorContext(name="w", model_seeds=(1, 2)))
    masks = _masks(models, base, 0.5, 0.2, (1, 2), "w")
    want = base.numpy() + sum((m - base).numpy() * k for m, k in zip(models, masks, strict=True))
    assert_close(out, torch.from_numpy(want), rtol=1e-12, atol=1e-12)


def test_keep_rate_is_mergekits_in_distribution() -> None:
    # 200 rows of 50: overall keep rate ≈ density; the lowest-ranked fifth of each row
    # ≈ density − 0.8ε, the highest fifth ≈ density + 0.8ε (p is linear in the rank)
    gen = torch.Generator().manual_seed(0)
    base = torch.zeros(200, 50)
    tv = torch.randn(200, 50, generator=gen)
    out = della_linear(base, [tv], density=0.4, epsilon=0.1, rescale=False,
                       ctx=TensorContext(name="w", model_seeds=(7,)))
    kept = out != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - 0.4) < 4 * (0.24 / n) ** 0.5
    ranks = tv.abs().argsort(dim=1).argsort(dim=1)
    low, high = kept[ranks < 10].float().mean(), kept[ranks >= 40].float().mean()
    sd = (0.25 / 2000) ** 0.5
    assert abs(low.item() - 0.32) < 4 * sd and abs(high.item() - 0.48) < 4 * sd
    assert torch.equal(out[kept], tv[kept])  # no rescale: survivors unchanged


def test_rescale_restores_the_l1_norm_and_density_one_keeps_all() -> None:
    gen = torch.Generator().manual_seed(2)
    tv = torch.randn(10, 30, generator=gen, dtype=torch.float64)
    out = della_linear(torch.zeros_like(tv), [tv], density=0.3, epsilon=0.1,
                       ctx=TensorContext(name="w", model_seeds=(1,)))
    assert_close(out.abs().sum(), tv.abs().sum())
    assert torch.equal(della_linear(torch.zeros_like(tv), [tv], ctx=TensorContext()), tv)


def test_epsilon_must_leave_probabilities_inside_0_1() -> None:
    with pytest.raises(ConfigError, match="epsilon"):
        della(torch.zeros(4), [torch.ones(4)], density=0.9, epsilon=0.15, ctx=TensorContext())


@pytest.mark.parametrize("method", [della, della_linear])
def test_row_blocks_give_the_whole_tensor_result(method) -> None:
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    models = [base + torch.randn(9, 6, generator=gen, dtype=torch.float64) for _ in range(2)]
    params = dict(density=0.5, epsilon=0.2, scale=1.0, seed=0, weight=1.0, rescale=True,
                  normalize=True)
    whole = method.fn(base, models, ctx=TensorContext(name="w", model_seeds=(3, 4)), **params)
    blocks = [(0, 4), (4, 9)]
    collect = SumCollector()
    for a, b in blocks:
        method.fn(base[a:b], [m[a:b] for m in models], **params,
                  ctx=TensorContext(name="w", model_seeds=(3, 4), row_offset=a,
                                    collect=collect))
    parts = [method.fn(base[a:b], [m[a:b] for m in models], **params,
                       ctx=TensorContext(name="w", model_seeds=(3, 4), row_offset=a,
                                         sums=collect.values)) for a, b in blocks]
    assert_close(torch.cat(parts), whole, rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4),
       method=st.sampled_from(["della", "della_linear"]), data=st.data())
def test_properties(seed: int, n: int, method: str, data: st.DataObject) -> None:
    gen = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(4, 5, generator=gen), "b": torch.randn(5, generator=gen)}
    params = {"density": 0.5, "epsilon": 0.2, "seed": 3}
    same = merge_state_dicts(base, [dict(base)] * n, method, params).state_dict
    assert all(torch.equal(same[k], base[k]) for k in base)
    named = {f"m{i}": {k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()}
             for i in range(n)}
    perm = data.draw(st.permutations(list(named)))
    a = merge_state_dicts(base, named, method, params).state_dict
    b = merge_state_dicts(base, {k: named[k] for k in perm}, method, params).state_dict
    for k in base:
        assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
