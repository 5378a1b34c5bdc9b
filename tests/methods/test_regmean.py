"""Golden tests for RegMean: hand-solved 2 × 2 systems, the null-space rule, and a numpy
transcription of the reference merge (MergeLM / FusionBench ``merging_with_regmean_weights``:
reduce the off-diagonal, invert the summed Gram)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from neuromerge import merge_state_dicts
from neuromerge.errors import InputError
from neuromerge.methods import regmean
from neuromerge.registry import TensorContext, get_method

G1 = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
G2 = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
W1, W2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])


def test_exact_regmean_by_hand() -> None:
    # S = G1 + G2 = [[3, 1], [1, 4]], S⁻¹ = [[4, -1], [-1, 3]] / 11;
    # Σ Gt Wtᵀ = [2, 1] + [0, 3] = [2, 4] -> Wᵀ = [8 - 4, -2 + 12] / 11
    out = regmean(torch.zeros(1, 2), [W1, W2], offdiag_scale=1.0,
                  ctx=TensorContext(statistics=(G1, G2)))
    assert_close(out, torch.tensor([[4 / 11, 10 / 11]]))


def test_reduced_off_diagonal_by_hand() -> None:
    # α = 0.5: G̃1 = [[2, .5], [.5, 1]], S = [[3, .5], [.5, 4]] (det 11.75); rhs = [2, 3.5]
    out = regmean(torch.zeros(1, 2), [W1, W2], offdiag_scale=0.5,
                  ctx=TensorContext(statistics=(G1, G2)))
    assert_close(out, torch.tensor([[6.25 / 11.75, 9.5 / 11.75]]))
    # α = 0: diagonal Grams, an input-feature-wise weighted average: [2/3, 3/4]
    out0 = regmean(torch.zeros(1, 2), [W1, W2], offdiag_scale=0.0,
                   ctx=TensorContext(statistics=(G1, G2)))
    assert_close(out0, torch.tensor([[2 / 3, 3 / 4]]))


def test_directions_no_input_reaches_take_the_average() -> None:
    # input feature 2 is never active: its column is the plain average; feature 1 is weighted
    a, b = torch.tensor([[1.0, 2.0], [0.0, 4.0]]), torch.tensor([[5.0, -2.0], [4.0, 0.0]])
    stats = (torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([3.0, 0.0])))
    out = regmean(torch.zeros(2, 2), [a, b], ctx=TensorContext(statistics=stats))
    assert_close(out, torch.tensor([[(1 + 15) / 4, 0.0], [12 / 4, 2.0]]))
    zero = regmean(torch.zeros(2, 2), [a, b],
                   ctx=TensorContext(statistics=(torch.zeros(2, 2), torch.zeros(2, 2))))
    assert_close(zero, (a + b) / 2)


def test_tensors_without_a_gram_are_averaged_and_scale_applies() -> None:
    base, a, b = torch.tensor([1.0, 1.0]), torch.tensor([2.0, 3.0]), torch.tensor([4.0, 1.0])
    assert_close(regmean(base, [a, b], ctx=TensorContext()), torch.tensor([3.0, 2.0]))
    assert_close(regmean(base, [a, b], scale=0.5, ctx=TensorContext()),
                 torch.tensor([2.0, 1.5]))


def ref_regmean(params: list[np.ndarray], grams: list[np.ndarray], alpha: float) -> np.ndarray:
    """The reference: G̃ = G ∘ (α·1 + (1 − α)·I), W = (Σ G̃)⁻¹ Σ G̃ Wᵀ, transposed back."""
    mask = np.full(grams[0].shape, alpha) + np.eye(grams[0].shape[0]) * (1 - alpha)
    reduced = [g * mask for g in grams]
    rhs = sum(g @ p.T for g, p in zip(reduced, params, strict=True))
    return (np.linalg.inv(sum(reduced)) @ rhs).T


@pytest.mark.parametrize(("seed", "alpha"), [(0, 0.9), (1, 1.0), (2, 0.3), (3, 0.0)])
def test_matches_the_reference_transcription(seed: int, alpha: float) -> None:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(4, 6))
    params = [base + rng.normal(scale=0.1, size=base.shape) for _ in range(3)]
    xs = [rng.normal(size=(20, 6)) * rng.uniform(0.5, 2, size=6) for _ in range(3)]
    grams = [x.T @ x / len(x) for x in xs]
    out = merge_state_dicts(
        {"w": torch.tensor(base), "b": torch.tensor(base[0])},
        [{"w": torch.tensor(p), "b": torch.tensor(p[0])} for p in params], "regmean",
        {"offdiag_scale": alpha}, dtype="float64",
        statistics=[{"w": torch.tensor(g)} for g in grams])
    np.testing.assert_allclose(out.state_dict["w"].numpy(), ref_regmean(params, grams, alpha),
                               rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(out.state_dict["b"].numpy(), np.mean([p[0] for p in params], 0))


def test_identical_experts_give_that_expert_and_order_does_not_matter() -> None:
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(3, 4, generator=gen)}
    theta = {"w": base["w"] + 0.5}
    grams = [{"w": (x := torch.randn(5, 4, generator=gen)).T @ x} for _ in range(2)]
    out = merge_state_dicts(base, [theta, dict(theta)], "regmean", statistics=grams)
    assert_close(out.state_dict["w"], theta["w"], rtol=1e-5, atol=1e-5)
    experts = [{"w": base["w"] + torch.randn(3, 4, generator=gen)} for _ in range(2)]
    ab = merge_state_dicts(base, {"a": experts[0], "b": experts[1]}, "regmean",
                           statistics=grams).state_dict["w"]
    ba = merge_state_dicts(base, {"b": experts[1], "a": experts[0]}, "regmean",
                           statistics=grams[::-1]).state_dict["w"]
    assert_close(ab, ba, rtol=1e-6, atol=1e-6)


def test_gram_shape_and_partial_statistics_are_refused() -> None:
    base = {"w": torch.zeros(2, 3)}
    experts = [{"w": torch.ones(2, 3)}] * 2
    with pytest.raises(InputError, match=r"regmean statistic 'w' has shape \[2, 2\], expected "
                                         r"\[3, 3\] for the tensor of shape \[2, 3\]"):
        merge_state_dicts(base, experts, "regmean", statistics=[{"w": torch.eye(2)}] * 2)
    with pytest.raises(InputError, match=r"statistics of 1: no regmean statistic for tensor "
                                         r"'w', which other models' statistics have"):
        merge_state_dicts(base, experts, "regmean", statistics=[{"w": torch.eye(3)}, {}])
    one_d = {"b": torch.zeros(3)}
    with pytest.raises(InputError, match=r"'b', a 1-D tensor: Grams are for 2-D"):
        merge_state_dicts(one_d, [{"b": torch.ones(3)}] * 2, "regmean",
                          statistics=[{"b": torch.eye(3)}] * 2)
    assert get_method("regmean").row_local and get_method("regmean").needs == "regmean"
