"""Multi-SLERP, as mergekit's ``multislerp``: barycentric interpolation of any number of
models on a hypersphere."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from neuromerge.errors import ConfigError
from neuromerge.methods.mergekit_inputs import copies_of_base, in_base_dtype, optional_base
from neuromerge.methods.nuslerp import UseBase
from neuromerge.params import Weight
from neuromerge.registry import Mergekit, TensorContext, merge_method


@merge_method(name="multislerp",
              reference_url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
              per_model_params=("weight",), row_local=False,
              mergekit=Mergekit(inputs=optional_base))
def multislerp(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    weight: Weight = 1.0,
    normalize_weights: Annotated[bool, Field(
        description="divide the weights by their sum (mergekit's default)")] = True,
    eps: Annotated[float, Field(ge=0, description="ε of the norms (mergekit's)")] = 1e-8,
    use_base: UseBase = True,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Barycentric SLERP (mergekit's ``multislerp``) of the task vectors τt = θt − θ0, each
    flattened (without a base, ``use_base: false``, of the models θt): with weights w (divided
    by Σ w under ``normalize_weights``), unit vectors ut = τt / (‖τt‖ + ε), the mean direction
    m = Σ wt ut / ‖Σ wt ut‖, tangents vt = ut − ⟨ut, m⟩ m, v = Σ wt vt and r = ‖v‖ + ε,
    θ = θ0 + (Σ wt ‖τt‖) (m cos r + v sin r / r).

    One model: θ = θ1. Where ‖Σ wt ut‖ < ε: two models fall back to θ0 + w1 τ1 + w2 τ2, more
    are an error (mergekit's). Not row-local."""
    if not tensors:
        raise ConfigError("multislerp needs at least one model besides the base")
    tensors = in_base_dtype(base, tensors)
    if copies_of_base(base, tensors):
        return base.clone()
    if len(tensors) == 1:
        return tensors[0].clone()
    stacked = torch.stack(list(tensors), dim=0)
    if use_base:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    weights = torch.tensor(ctx.per_model("weight", weight, len(tensors)), dtype=stacked.dtype)
    if normalize_weights:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2:
            res = (stacked[0] * weights[0] + stacked[1] * weights[1]).view(stacked.shape[1:])
            return res + base if use_base else res
        raise ConfigError(
            f"multislerp: tensor {ctx.name!r}: the weighted sum of the unit task vectors is "
            f"zero (antipodal vectors whose weights balance out); try other weights")
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * weights).sum()).view(stacked.shape[1:])
    return result + base if use_base else result
