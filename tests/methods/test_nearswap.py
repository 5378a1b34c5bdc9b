"""nearswap: hand-computed values, properties, and mergekit 0.1.5 itself."""

from __future__ import annotations

from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st

from neuromerge.registry import TensorContext, get_method
from tests.methods.mergekit_cases import check_parity, family

nearswap = get_method("nearswap")
CTX = TensorContext()


def test_hand_computed() -> None:
    base = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    other = torch.tensor([[0.1, 1.0, 0.0, -1.0]])
    # w = clamp(0.5 / max(|d|, 1e-6), 0, 1) = (1, 0.5, 1, 0.25)
    out = nearswap(base, [other], t=0.5, ctx=CTX)
    torch.testing.assert_close(out, torch.tensor([[0.1, 0.5, 0.0, 0.5]]))


tensors = st.lists(st.floats(-10, 10, allow_nan=False), min_size=6, max_size=6).map(
    lambda v: torch.tensor(v, dtype=torch.float64).reshape(2, 3))


@given(tensors, tensors)
def test_t_zero_is_the_base_and_large_t_the_other(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(nearswap(a, [b], t=0.0, ctx=CTX), a)
    torch.testing.assert_close(nearswap(a, [b], t=100.0, ctx=CTX), b)


@given(tensors, tensors, st.floats(0, 5))
def test_between_the_models(a: torch.Tensor, b: torch.Tensor, t: float) -> None:
    out = nearswap(a, [b], t=t, ctx=CTX)
    assert bool(((out >= torch.minimum(a, b) - 1e-9) & (out <= torch.maximum(a, b) + 1e-9)).all())


def test_matches_mergekit(mergekit, tmp_path: Path) -> None:
    base, models = family(tmp_path)
    check_parity(mergekit, tmp_path, {
        "merge_method": "nearswap", "base_model": base, "models": [{"model": models[0]}],
        "parameters": {"t": 0.7}})
