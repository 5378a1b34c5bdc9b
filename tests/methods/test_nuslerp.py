"""nuslerp: hand-computed values, properties, and mergekit 0.1.5 itself (with and without a
base, flattened and row-wise)."""

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

nuslerp = get_method("nuslerp")


def ctx(*weights: float) -> TensorContext:
    return TensorContext(model_params={"weight": weights})


def test_equal_weights_orthogonal_task_vectors() -> None:
    base = torch.tensor([[1.0, 1.0]])
    a, b = base + torch.tensor([[2.0, 0.0]]), base + torch.tensor([[0.0, 2.0]])
    out = nuslerp(base, [a, b], ctx=ctx(1.0, 1.0))
    torch.testing.assert_close(out, base + math.sqrt(2) * torch.ones(1, 2))


def test_t_is_the_second_weight_share() -> None:
    # weights 1, 3: t = 3/4 of the right angle from τ1 to τ2
    base = torch.zeros(2)
    out = nuslerp(base, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], ctx=ctx(1.0, 3.0))
    torch.testing.assert_close(out, torch.tensor([math.cos(3 * math.pi / 8),
                                                  math.sin(3 * math.pi / 8)]))
    # weights summing to 0: t = 0.5
    torch.testing.assert_close(
        nuslerp(base, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], ctx=ctx(1.0, -1.0)),
        torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))


def test_rows_and_columns() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    base = torch.zeros(2, 2)
    h = math.sqrt(0.5)
    rows = nuslerp(base, [a, b], nuslerp_flatten=False, ctx=ctx(1.0, 1.0))
    # row 0: a right angle → (h, h); row 1: the same vector → itself
    torch.testing.assert_close(rows, torch.tensor([[h, h], [0.0, 1.0]]))
    cols = nuslerp(base, [a, b], nuslerp_flatten=False, nuslerp_row_wise=True, ctx=ctx(1.0, 1.0))
    # column 0: (1,0) vs (0,0): the zero vector's unit is 0, Ω = 90°: h·(1, 0);
    # column 1: (0,1) vs (1,1): Ω = 45°
    s = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    torch.testing.assert_close(cols, torch.tensor([[h, s], [0.0, 2 * s]]))


def test_without_base_merges_the_models() -> None:
    base = torch.full((2,), 5.0)  # stands in for the shapes only
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    torch.testing.assert_close(nuslerp(base, [a, b], use_base=False, ctx=ctx(1.0, 1.0)),
                               torch.tensor([math.sqrt(2), math.sqrt(2)]))


def test_needs_two_models() -> None:
    with pytest.raises(ConfigError, match="exactly two"):
        nuslerp(torch.zeros(2), [torch.ones(2)], ctx=ctx(1.0))


vectors = st.lists(st.floats(-10, 10, allow_nan=False), min_size=4, max_size=4).map(
    lambda v: torch.tensor(v, dtype=torch.float64).reshape(2, 2))
weights = st.floats(0.1, 5)


@given(vectors, vectors, vectors, weights, weights, st.booleans())
def test_swapping_models_with_their_weights(base, a, b, wa, wb, flatten) -> None:
    torch.testing.assert_close(
        nuslerp(base, [a, b], nuslerp_flatten=flatten, ctx=ctx(wa, wb)),
        nuslerp(base, [b, a], nuslerp_flatten=flatten, ctx=ctx(wb, wa)), atol=1e-7, rtol=1e-7)


@given(vectors, vectors, vectors)
def test_zero_weight_endpoints(base, a, b) -> None:
    torch.testing.assert_close(nuslerp(base, [a, b], ctx=ctx(1.0, 0.0)), a, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(nuslerp(base, [a, b], ctx=ctx(0.0, 1.0)), b, atol=1e-7, rtol=1e-7)


def _config(base, models, **params):
    return {"merge_method": "nuslerp", "base_model": base,
            "models": [{"model": m, "parameters": {"weight": w}}
                       for m, w in zip(models, (0.3, 0.5), strict=True)],
            "parameters": params}


def test_matches_mergekit_with_base(mergekit, tmp_path: Path) -> None:
    base, models = family(tmp_path)
    check_parity(mergekit, tmp_path, _config(base, models))


def test_matches_mergekit_without_base_row_wise(mergekit, tmp_path: Path) -> None:
    _, models = family(tmp_path)
    config = _config(None, models, nuslerp_flatten=False, nuslerp_row_wise=True)
    del config["base_model"]
    check_parity(mergekit, tmp_path, config)
