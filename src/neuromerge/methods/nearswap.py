"""NearSwap, as mergekit's ``nearswap``: take the other model's value where it is near the
base's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from neuromerge.methods.mergekit_inputs import copies_of_base, drop_listed_base, other_model
from neuromerge.registry import Mergekit, TensorContext, merge_method


@merge_method(name="nearswap",
              reference_url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
              mergekit=Mergekit(inputs=drop_listed_base), n_models=(1, 2))
def nearswap(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    t: Annotated[float, Field(description="distance scale: an entry whose |θ1 − θ0| ≤ t takes "
                                          "the other model's value (mergekit's `t`, which it "
                                          "requires)")] = 1e-4,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Interpolate each entry towards the other model θ1 by how close it is to the base θ0
    (mergekit's ``nearswap``): w = clamp(t / max(|θ0 − θ1|, 1e-6), 0, 1) element-wise,
    θ = w θ1 + (1 − w) θ0. Entries closer than t take θ1, far ones stay near θ0; t ≤ 0 gives
    the base. The models are the base and one other."""
    if copies_of_base(base, tensors):
        return base.clone()
    other = other_model("nearswap", base, tensors)
    weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base
