"""multislerp: hand-computed values, properties, and mergekit 0.1.5 itself."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from neuromerge.errors import ConfigError
from neuromerge.registry import TensorContext, get_method
from tests.methods.mergekit_cases import check_parity, family

multislerp = get_method("multislerp")


def ctx(*weights: float) -> TensorContext:
    return TensorContext(model_params={"weight": weights})


def test_two_orthogonal_unit_task_vectors() -> None:
    # m = (u1 + u2)/√2, the tangents cancel: θ = θ0 + 1 · m (mean norm 1)
    base = torch.tensor([1.0, 2.0, 3.0])
    a, b = base + torch.tensor([1.0, 0.0, 0.0]), base + torch.tensor([0.0, 1.0, 0.0])
    out = multislerp(base, [a, b], ctx=ctx(1.0, 1.0))
    h = math.sqrt(0.5)
    torch.testing.assert_close(out, base + torch.tensor([h, h, 0.0]))


def test_against_a_numpy_transcription_of_the_tangent_step() -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 4, generator=g, dtype=torch.float64)
    models = [base + torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    tv = torch.stack([m - base for m in models]).reshape(3, -1)
    norms = tv.norm(dim=1, keepdim=True)
    u = tv / (norms + 1e-8)
    m = (w[:, None] * u).sum(0)
    m = m / m.norm()
    v = (w[:, None] * (u - (u @ m)[:, None] * m)).sum(0)
    r = v.norm() + 1e-8
    expect = base + ((m * torch.cos(r) + v * torch.sin(r) / r) * (w * norms[:, 0]).sum()
                     ).reshape(3, 4)
    torch.testing.assert_close(multislerp(base, models, ctx=ctx(2.0, 3.0, 5.0)), expect)


def test_one_model_is_itself_and_antipodes() -> None:
    base = torch.zeros(2)
    torch.testing.assert_close(multislerp(base, [torch.ones(2)], ctx=ctx(1.0)), torch.ones(2))
    a = torch.tensor([1.0, 2.0])
    # two antipodal task vectors of equal weight: linear fallback w1 τ1 + w2 τ2 = 0
    torch.testing.assert_close(multislerp(base, [a, -a], ctx=ctx(1.0, 1.0)), torch.zeros(2))
    with pytest.raises(ConfigError, match="zero"):
        multislerp(base, [a, -a, a, -a], ctx=ctx(1.0, 1.0, 1.0, 1.0))


tensors = st.lists(st.floats(-10, 10, allow_nan=False), min_size=4, max_size=4).filter(
    lambda v: sum(x * x for x in v) > 1e-2).map(lambda v: torch.tensor(v, dtype=torch.float64))


@given(tensors, tensors, tensors, st.permutations([0, 1, 2]))
def test_order_does_not_matter(a, b, c, order) -> None:
    base = torch.zeros(4, dtype=torch.float64)
    models, w = [a, b, c], (0.2, 0.3, 0.5)
    try:
        expect = multislerp(base, models, ctx=ctx(*w))
    except ConfigError:
        return
    got = multislerp(base, [models[i] for i in order], ctx=ctx(*(w[i] for i in order)))
    torch.testing.assert_close(got, expect, atol=1e-7, rtol=1e-7)


def test_matches_mergekit(mergekit, tmp_path: Path) -> None:
    base, models = family(tmp_path, 3, equal=False)
    check_parity(mergekit, tmp_path, {
        "merge_method": "multislerp", "base_model": base,
        "models": [{"model": m, "parameters": {"weight": w}}
                   for m, w in zip(models, (0.5, 0.3, 0.4), strict=True)]})
