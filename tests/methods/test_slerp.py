"""slerp: hand-computed values, properties, and mergekit 0.1.5 itself."""

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

slerp = get_method("slerp")
CTX = TensorContext()


def test_quarter_circle() -> None:
    out = slerp(torch.tensor([[1.0, 0.0]]), [torch.tensor([[0.0, 1.0]])], t=0.5, ctx=CTX)
    torch.testing.assert_close(out, torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]]))
    # t = 1/3 of a right angle: (cos 30°, sin 30°)
    out = slerp(torch.tensor([1.0, 0.0]), [torch.tensor([0.0, 1.0])], t=1 / 3, ctx=CTX)
    torch.testing.assert_close(out, torch.tensor([math.sqrt(3) / 2, 0.5]))


def test_norms_interpolate_with_the_angle() -> None:
    # θ0 = (2, 0), θ1 = (0, 4): Ω = 90°, θ = sin((1-t)Ω) θ0 + sin(tΩ) θ1
    out = slerp(torch.tensor([2.0, 0.0]), [torch.tensor([0.0, 4.0])], t=0.25, ctx=CTX)
    torch.testing.assert_close(out, torch.tensor([2 * math.cos(math.pi / 8),
                                                  4 * math.sin(math.pi / 8)]))


def test_colinear_and_antipodal_fall_back_to_lerp() -> None:
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    torch.testing.assert_close(slerp(v, [3 * v], t=0.25, ctx=CTX), 1.5 * v)
    torch.testing.assert_close(slerp(v, [-v], t=0.25, ctx=CTX), 0.5 * v)


def test_zero_base_norm_taken_as_one() -> None:
    # ‖θ0‖ ≤ 1e-8: cos Ω = 0, Ω = 90°, θ = sin(tπ/2) θ1
    out = slerp(torch.zeros(3), [torch.tensor([1.0, 2.0, 2.0])], t=0.5, ctx=CTX)
    torch.testing.assert_close(out, math.sin(math.pi / 4) * torch.tensor([1.0, 2.0, 2.0]))


def test_base_listed_among_models_is_dropped() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(slerp(a, [a.clone(), b], t=0.5, ctx=CTX),
                               slerp(a, [b], t=0.5, ctx=CTX))
    with pytest.raises(ConfigError, match="exactly one other"):
        slerp(a, [b, b + 1], t=0.5, ctx=CTX)


def test_float64_stays_float64() -> None:
    out = slerp(torch.ones(4, dtype=torch.float64), [torch.arange(4.0, dtype=torch.float64)],
                t=0.5, ctx=CTX)
    assert out.dtype == torch.float64


vectors = st.lists(st.floats(-10, 10, allow_nan=False), min_size=4, max_size=4).map(
    lambda v: torch.tensor(v, dtype=torch.float64))


@given(vectors, vectors)
def test_endpoints(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(slerp(a, [b], t=0.0, ctx=CTX), a, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(slerp(a, [b], t=1.0, ctx=CTX), b, atol=1e-7, rtol=1e-7)


@given(vectors, vectors, st.floats(0, 1))
def test_swapping_the_models_mirrors_t(a: torch.Tensor, b: torch.Tensor, t: float) -> None:
    torch.testing.assert_close(slerp(a, [b], t=t, ctx=CTX), slerp(b, [a], t=1 - t, ctx=CTX),
                               atol=1e-7, rtol=1e-7)


def test_matches_mergekit(mergekit, tmp_path: Path) -> None:
    base, models = family(tmp_path)
    check_parity(mergekit, tmp_path, {
        "merge_method": "slerp", "base_model": base,
        "models": [{"model": base}, {"model": models[0]}], "parameters": {"t": 0.3}})
