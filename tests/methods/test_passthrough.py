"""passthrough: the one model's tensor, scaled per model; bit for bit at scale 1."""

from __future__ import annotations

import pytest
import torch

from neuromerge.errors import ConfigError
from neuromerge.registry import TensorContext, get_method

passthrough = get_method("passthrough")


def test_the_model_itself_bit_for_bit() -> None:
    base = torch.zeros(3, 4)
    model = torch.randn(3, 4, dtype=torch.float64).to(torch.bfloat16)
    out = passthrough(base, [model], ctx=TensorContext())
    assert torch.equal(out, model.to(torch.float32))


def test_a_per_model_scale_multiplies() -> None:
    base, model = torch.zeros(2, 2), torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    ctx = TensorContext(model_params={"scale": (0.25,)})
    torch.testing.assert_close(passthrough(base, [model], ctx=ctx),
                               torch.tensor([[0.25, -0.5], [0.125, 1.0]]))
    assert torch.equal(passthrough(base, [model], scale=0.0, ctx=TensorContext()),
                       torch.zeros(2, 2))


def test_one_model_only() -> None:
    with pytest.raises(ConfigError, match="passthrough"):
        passthrough(torch.zeros(2), [torch.ones(2), torch.ones(2)])
