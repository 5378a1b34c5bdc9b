"""Golden tests for Fisher merging: hand-computed cases, the degenerate ones, and a numpy
transcription of the reference merge (MergeLM / FusionBench ``merging_with_fisher_weights`` with
uniform coefficients and no normalisation, i.e. the paper's formula)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from neuromerge import merge_state_dicts
from neuromerge.errors import ConfigError, InputError
from neuromerge.methods import fisher
from neuromerge.registry import TensorContext, get_method


def test_two_models_by_hand() -> None:
    # entry 0: (1·1 + 3·3) / (1 + 3) = 2.5; entry 1: only model 2 informs it -> -2
    out = fisher(torch.zeros(2), [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])],
                 fisher_floor=0.0,
                 ctx=TensorContext(statistics=(torch.tensor([1.0, 0.0]),
                                               torch.tensor([3.0, 1.0]))))
    assert_close(out, torch.tensor([2.5, -2.0]))


def test_the_base_is_not_averaged_in_and_scale_scales_the_task_vector() -> None:
    a, b = torch.tensor([1.0, 4.0]), torch.tensor([3.0, 0.0])
    stats = (torch.tensor([1.0, 2.0]), torch.tensor([1.0, 6.0]))
    want = (stats[0] * a + stats[1] * b) / (stats[0] + stats[1])  # [2, 1]
    for base in (torch.zeros(2), torch.tensor([10.0, -7.0])):
        out = fisher(base, [a, b], fisher_floor=0.0, ctx=TensorContext(statistics=stats))
        assert_close(out, want)
        half = fisher(base, [a, b], fisher_floor=0.0, scale=0.5,
                      ctx=TensorContext(statistics=stats))
        assert_close(half, base + 0.5 * (want - base))


def test_no_information_gives_the_plain_average() -> None:
    a, b = torch.tensor([1.0, -3.0]), torch.tensor([2.0, 5.0])
    zeros = (torch.zeros(2), torch.zeros(2))
    for floor in (0.0, 1e-6):
        out = fisher(torch.zeros(2), [a, b], fisher_floor=floor,
                     ctx=TensorContext(statistics=zeros))
        assert_close(out, (a + b) / 2)


def test_the_floor_pulls_tiny_fisher_values_towards_the_average() -> None:
    a, b = torch.tensor([0.0]), torch.tensor([1.0])
    stats = (torch.tensor([1e-9]), torch.tensor([0.0]))
    assert float(fisher(torch.zeros(1), [a, b], fisher_floor=0.0,
                        ctx=TensorContext(statistics=stats))) == 0.0
    assert float(fisher(torch.zeros(1), [a, b], ctx=TensorContext(statistics=stats))) == \
        pytest.approx((1e-6 * 1.0) / (1e-9 + 2e-6), rel=1e-5)


def ref_fisher(params: list[np.ndarray], fishers: list[np.ndarray], floor: float) -> np.ndarray:
    """FusionBench's merging_with_fisher_weights, normalize_fisher_weight=False, coefficients
    1/T: Σ c (F + ε) θ / Σ c (F + ε)."""
    coef = np.full(len(params), 1.0 / len(params))
    w = np.stack(fishers) + floor
    p = np.stack(params)
    c = coef.reshape(-1, *[1] * (p.ndim - 1))
    return (c * w * p).sum(0) / (c * w).sum(0)


@pytest.mark.parametrize("seed", range(4))
def test_matches_the_reference_transcription(seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(5, 3))
    params = [base + rng.normal(scale=0.1, size=base.shape) for _ in range(3)]
    fishers = [rng.exponential(size=base.shape) * (rng.random(base.shape) > 0.3)
               for _ in range(3)]
    want = ref_fisher(params, fishers, 1e-6)
    out = merge_state_dicts({"w": torch.tensor(base)}, [{"w": torch.tensor(p)} for p in params],
                            "fisher", dtype="float64",
                            statistics=[{"w": torch.tensor(f)} for f in fishers])
    np.testing.assert_allclose(out.state_dict["w"].numpy(), want, rtol=1e-10, atol=1e-12)


def test_identical_experts_give_that_expert() -> None:
    base = {"w": torch.randn(4, 3)}
    theta = {"w": base["w"] + 1.0}
    out = merge_state_dicts(base, [theta, dict(theta)], "fisher",
                            statistics=[{"w": torch.rand(4, 3)}, {"w": torch.rand(4, 3)}])
    assert_close(out.state_dict["w"], theta["w"])


def test_missing_wrong_or_invalid_statistics_are_refused() -> None:
    base = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    experts = [{"w": torch.ones(2, 2), "b": torch.ones(2)}] * 2
    good = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    with pytest.raises(ConfigError, match=r"fisher needs per-model fisher statistics"):
        merge_state_dicts(base, experts, "fisher")
    with pytest.raises(InputError, match=r"no Fisher statistic for tensor 'b' .*tensor_class"):
        merge_state_dicts(base, experts, "fisher", statistics=[{"w": torch.ones(2, 2)}] * 2)
    with pytest.raises(InputError, match=r"statistics of 1: no fisher statistic for tensor 'b'"):
        merge_state_dicts(base, experts, "fisher",
                          statistics=[good, {"w": torch.ones(2, 2)}])
    with pytest.raises(InputError, match=r"statistic 'w' has shape \[4\], expected \[2, 2\]"):
        merge_state_dicts(base, experts, "fisher",
                          statistics=[good, {**good, "w": torch.ones(4)}])
    with pytest.raises(InputError, match=r"'b' is not finite and non-negative"):
        merge_state_dicts(base, experts, "fisher",
                          statistics=[good, {**good, "b": torch.tensor([1.0, -1.0])}])
    with pytest.raises(ConfigError, match=r"1 statistics for 2 models"):
        merge_state_dicts(base, experts, "fisher", statistics=[good])
    # a tensor copied from the base needs none
    out = merge_state_dicts(base, experts, "fisher", tensor_class={"b": "copy"},
                            statistics=[{"w": torch.ones(2, 2)}] * 2)
    assert torch.equal(out.state_dict["b"], base["b"])
    assert get_method("fisher").row_local and get_method("fisher").needs == "fisher"
