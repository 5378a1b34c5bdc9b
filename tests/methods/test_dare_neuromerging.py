"""DARE + NeuroMerging: DARE's drop-and-rescale in place of the magnitude trim, then the
NeuroMerging subspace merge unchanged (one implementation, shared with `neuromerging`)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from neuromerge import merge_state_dicts
from neuromerge.kernels import dare_drop, derive_seed
from neuromerge.methods import dare_neuromerging, neuromerging
from neuromerge.registry import TensorContext, get_method


def family(seed: int = 0) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(6, 5, generator=gen), "b": torch.randn(5, generator=gen)}
    experts = {f"m{i}": {k: v + 0.1 * torch.randn(v.shape, generator=gen)
                         for k, v in base.items()} for i in range(3)}
    return base, experts


@pytest.mark.parametrize("params", [
    {"lambda1": 0.0, "lambda2": 1.0},
    {"lambda1": 0.7, "lambda2": 1.3, "lambda_point": 0.4},
    {"lambda1": 0.5, "lambda2": 2.0, "orthogonal_merge": "ties", "rank_threshold": 0.8},
    {"lambda1": 0.5, "lambda2": 1.2, "compat": "official"},
])
def test_is_neuromerging_of_the_dare_dropped_task_vectors(params: dict) -> None:
    gen = torch.Generator().manual_seed(1)
    for shape in [(6, 5), (5,), (3, 2, 2)]:
        base = torch.randn(shape, generator=gen)
        experts = [base + 0.1 * torch.randn(shape, generator=gen) for _ in range(3)]
        ctx = TensorContext(name="x", model_seeds=(11, 22, 33))
        out = dare_neuromerging(base, experts, drop_rate=0.4, **params, ctx=ctx)
        # the same drop, drawn as dare_linear / dare_ties draw it (tests/methods/test_dare.py)
        dropped = [base + dare_drop(e - base, 0.4, derive_seed(s, "x"))
                   for e, s in zip(experts, (11, 22, 33), strict=True)]
        want = neuromerging(base, dropped, density=1.0, trim_scope="tensor", **params, ctx=ctx)
        assert_close(out, want, rtol=1e-6, atol=1e-6)


def test_auto_lambda2_is_one_and_lambda_point_follows_it() -> None:
    base, experts = family()
    r = merge_state_dicts(base, experts, "dare_neuromerging", {"seed": 5})
    assert r.params["lambda2"] == 1.0 and r.params["lambda_point"] == 1.0
    assert r.trim is None  # no model-wide pass: nothing to measure
    r2 = merge_state_dicts(base, experts, "dare_neuromerging", {"seed": 5, "lambda2": 1.5})
    assert r2.params["lambda_point"] == 1.5


def test_no_drop_is_neuromerging_without_trim() -> None:
    base, experts = family(2)
    a = merge_state_dicts(base, experts, "dare_neuromerging", {"drop_rate": 0.0}).state_dict
    b = merge_state_dicts(base, experts, "neuromerging", {"density": 1.0}).state_dict
    for k in base:
        assert_close(a[k], b[k])  # density 1: σ = 0, so neuromerging's auto λ2 is 1 too


def test_seed_controls_the_drop_and_models_carry_their_own() -> None:
    base, experts = family(3)
    run = lambda seed: merge_state_dicts(  # noqa: E731
        base, experts, "dare_neuromerging", {"seed": seed}).state_dict["w"]
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    m = get_method("dare_neuromerging")
    assert m.per_model_params == ("seed", "weight", "drop_rate") and m.row_local and not m.trims
