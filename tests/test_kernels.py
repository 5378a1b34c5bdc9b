"""The shared TIES building blocks, on hand-computed tensors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.testing import assert_close

from neuromerge.kernels import (
    dare_drop,
    derive_seed,
    disjoint_mean,
    elect_sign,
    keep_count,
    kth_largest,
    task_vectors,
    ties_merge,
    trim,
)


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize(("density", "n", "k"), [
    (0.2, 10, 2),   # 0.2 * 10 is 2.0000000000000004 in floats: must not become 3
    (0.1, 30, 3), (0.3, 10, 3), (0.7, 10, 7),
    (0.25, 3, 1),   # ceil(0.75)
    (0.5, 3, 2),    # ceil(1.5)
    (1.0, 7, 7), (1e-9, 5, 1),  # at least one entry survives
])
def test_keep_count_is_exact_ceil(density: float, n: int, k: int) -> None:
    assert keep_count(density, n) == k


def test_kth_largest() -> None:
    x = torch.tensor([0.5, 3.0, 1.0, 3.0, 2.0])
    assert kth_largest(x, 1) == 3.0
    assert kth_largest(x, 2) == 3.0
    assert kth_largest(x, 3) == 2.0
    assert kth_largest(x, 5) == 0.5


def test_task_vectors_are_differences_in_float32() -> None:
    base = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    a = torch.tensor([1.5, 1.0], dtype=torch.bfloat16)
    tv = task_vectors(base, [a, base])
    assert tv.dtype == torch.float32
    assert_close(tv, t([0.5, -1.0], [0.0, 0.0]))


def test_trim_per_tensor_keeps_top_k_per_task() -> None:
    tv = t([1.0, -4.0, 2.0, 0.5], [-3.0, 0.1, 0.2, 3.5])
    # density 0.5 of 4 entries: k = 2 per task
    assert_close(trim(tv, 0.5), t([0.0, -4.0, 2.0, 0.0], [-3.0, 0.0, 0.0, 3.5]))


def test_trim_keeps_ties_at_the_threshold() -> None:
    tv = t([1.0, -2.0, 2.0, 0.5])
    # k = ceil(0.25 * 4) = 1; the 1st largest |τ| is 2, and both ±2 entries are kept
    assert_close(trim(tv, 0.25), t([0.0, -2.0, 2.0, 0.0]))


def test_trim_with_given_thresholds() -> None:
    tv = t([1.0, -4.0, 2.0], [-3.0, 0.1, 0.2])
    out = trim(tv, 0.5, thresholds=[2.0, 0.15])
    assert_close(out, t([0.0, -4.0, 2.0], [-3.0, 0.0, 0.2]))
    with pytest.raises(ValueError):
        trim(tv, 0.5, thresholds=[1.0])


def test_trim_density_one_is_identity() -> None:
    tv = t([1.0, 0.0, -2.0])
    assert trim(tv, 1.0) is tv


def test_elect_sign_by_sum_with_tensor_fallback() -> None:
    v = t([1.0, -2.0, 3.0], [-1.0, 1.0, 1.0])
    # sums: 0, -1, 4; the zero sum takes the sign of the whole sum (+2)
    assert_close(elect_sign(v), t([1.0, -1.0, 1.0])[0])
    neg = t([1.0, -5.0], [-1.0, 1.0])  # sums 0, -4; whole -4 → -
    assert_close(elect_sign(neg), torch.tensor([-1.0, -1.0]))
    zero = t([1.0, -1.0], [-1.0, 1.0])  # whole sum 0 → +
    assert_close(elect_sign(zero), torch.tensor([1.0, 1.0]))
    assert_close(elect_sign(neg, tensor_fallback=False), torch.tensor([1.0, -1.0]))
    assert_close(elect_sign(neg, whole_sum=3.0), torch.tensor([1.0, -1.0]))


def test_disjoint_mean() -> None:
    v = t([2.0, -1.0, 0.0, 5.0], [4.0, 3.0, 0.0, -1.0], [0.0, 1.0, 0.0, -3.0])
    sign = torch.tensor([1.0, 1.0, 1.0, -1.0])
    # column 0: mean(2, 4); column 1: mean(3, 1); column 2: none → 0; column 3: mean(-1, -3)
    assert_close(disjoint_mean(v, sign), torch.tensor([3.0, 2.0, 0.0, -2.0]))


def test_ties_merge_hand_computed() -> None:
    v = t([0.5, -1.0, 0.0], [-0.2, -0.5, 0.0], [0.4, 2.0, 0.0])
    # sums 0.7 (+), 0.5 (+), 0 → whole sum 1.2 (+); means: (0.5+0.4)/2, 2.0, 0
    assert_close(ties_merge(v), torch.tensor([0.45, 2.0, 0.0]))


def test_dare_drop_is_seeded_and_unbiased() -> None:
    tv = torch.ones(20000)
    a, b = dare_drop(tv, 0.9, seed=7), dare_drop(tv, 0.9, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, dare_drop(tv, 0.9, seed=8))
    kept = a != 0
    assert_close(a[kept], torch.full_like(a[kept], 10.0))
    assert abs(kept.float().mean().item() - 0.1) < 0.01
    assert abs(a.mean().item() - 1.0) < 0.1  # rescaling keeps the expectation
    assert dare_drop(tv, 0.0, seed=1) is tv


def test_derive_seed_is_stable_and_distinct() -> None:
    assert derive_seed(0, "a") == derive_seed(0, "a")
    assert derive_seed(0, "a") != derive_seed(0, "b")
    assert derive_seed(0, "a") != derive_seed(1, "a")
    assert 0 <= derive_seed("x") < 2**63


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rounded", [False, True])
def test_kth_largest_radix_path_matches_a_sort(seed: int, rounded: bool) -> None:
    from neuromerge.kernels import _RADIX_MIN, kth_largest

    gen = torch.Generator().manual_seed(seed)
    mags = torch.randn(_RADIX_MIN + 4099, generator=gen).abs()
    if rounded:  # many exact ties and zeros
        mags = torch.round(mags * 8) / 8
    ordered = torch.sort(mags.reshape(-1), descending=True).values
    for k in (1, 2, 100, mags.numel() // 5, mags.numel() - 1, mags.numel()):
        assert kth_largest(mags.reshape(-1, 7) if mags.numel() % 7 == 0 else mags, k) == float(
            ordered[k - 1])


@given(st.integers(1, 4), st.integers(0, 40), st.integers(0, 2**31 - 1), st.booleans())
def test_disjoint_mean_in_place_equals_the_per_task_loop(t: int, n: int, seed: int,
                                                         ints: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(t, n, generator=gen)
    if ints:  # exact zeros and cancellations
        v = torch.round(v * 2)
    sign = elect_sign(v)
    expected = disjoint_mean(v, sign)
    got = disjoint_mean(v.clone(), sign, inplace=True)
    assert_close(got, expected, rtol=1e-6, atol=1e-7)
