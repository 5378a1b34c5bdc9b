"""karcher: hand-computed values, properties, and mergekit 0.1.5 itself."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st

from neuromerge.registry import TensorContext, get_method
from tests.methods.mergekit_cases import check_parity, family

karcher = get_method("karcher")
CTX = TensorContext()


def test_two_orthogonal_directions() -> None:
    # norms 1 and 3: the mean direction bisects them, the norm is the mean norm 2
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    out = karcher(torch.zeros(2), [a, b], ctx=CTX)
    torch.testing.assert_close(out, 2 * torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))


def test_three_directions_in_a_plane() -> None:
    # unit vectors at 0°, 60° and 120°: the Karcher mean is the one at 60°
    angles = [0.0, math.pi / 3, 2 * math.pi / 3]
    models = [torch.tensor([math.cos(x), math.sin(x)], dtype=torch.float64) for x in angles]
    out = karcher(torch.zeros(2, dtype=torch.float64), models, max_iter=50, tol=1e-12, ctx=CTX)
    torch.testing.assert_close(out, models[1], atol=1e-9, rtol=1e-9)


def test_one_model_and_zero_models() -> None:
    a = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(karcher(torch.zeros(2), [a], ctx=CTX), a)
    # a zero tensor drops out of the direction but counts in the mean norm
    out = karcher(torch.zeros(2), [a, torch.zeros(2)], ctx=CTX)
    torch.testing.assert_close(out, a / 2)
    torch.testing.assert_close(karcher(torch.zeros(2), [torch.zeros(2)] * 2, ctx=CTX),
                               torch.zeros(2))


tensors = st.lists(st.floats(-10, 10, allow_nan=False), min_size=4, max_size=4).filter(
    lambda v: sum(x * x for x in v) > 1e-2).map(lambda v: torch.tensor(v, dtype=torch.float64))


@given(tensors, tensors, tensors, st.permutations([0, 1, 2]))
def test_order_does_not_matter(a, b, c, order) -> None:
    base, models = torch.zeros(4, dtype=torch.float64), [a, b, c]
    expect = karcher(base, models, max_iter=200, tol=1e-12, ctx=CTX)
    got = karcher(base, [models[i] for i in order], max_iter=200, tol=1e-12, ctx=CTX)
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-6)


@given(tensors)
def test_copies_give_the_tensor(a) -> None:
    torch.testing.assert_close(karcher(torch.zeros(4, dtype=torch.float64), [a, a.clone()],
                                       ctx=CTX), a)


def test_matches_mergekit(mergekit, tmp_path: Path) -> None:
    # the base is not listed: mergekit (and the translation) add it as a third input
    base, models = family(tmp_path)
    check_parity(mergekit, tmp_path, {
        "merge_method": "karcher", "base_model": base,
        "models": [{"model": m} for m in models], "parameters": {"max_iter": 20, "tol": 1e-6}})
