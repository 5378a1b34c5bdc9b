"""NuSLERP, as mergekit's ``nuslerp``: SLERP of two models (or of their task vectors) with
weights, row-wise, column-wise or over the flattened tensor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from neuromerge.errors import ConfigError
from neuromerge.methods.mergekit_inputs import copies_of_base, in_base_dtype, optional_base
from neuromerge.params import Weight
from neuromerge.registry import Mergekit, TensorContext, merge_method

UseBase = Annotated[bool, Field(
    description="true: interpolate the task vectors θt − θ0 and add them to the base; false: "
                "the models themselves (a mergekit config without base_model; the first model "
                "then only stands in for the shapes)")]


def nuslerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dim: int = -1,
                    eps: float = 1e-8, flatten: bool = False) -> torch.Tensor:
    """mergekit's ``nuslerp(t, v0, v1, dim, eps, flatten)``: SLERP of the vectors along ``dim``
    (or of the flattened tensors), unit vectors from norms clamped at 1e-7, linear where
    1 − cos² ≤ eps²."""
    out_shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    v0_u = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    v1_u = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos_theta = torch.sum(v0_u * v1_u, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


@merge_method(name="nuslerp",
              reference_url="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
              per_model_params=("weight",), row_local=False,
              mergekit=Mergekit(inputs=optional_base), n_models=(2, 2))
def nuslerp(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    weight: Weight = 1.0,
    nuslerp_row_wise: Annotated[bool, Field(
        description="SLERP the columns (vectors along the first axis) rather than the rows, "
                    "where not flattened (mergekit's name)")] = False,
    nuslerp_flatten: Annotated[bool, Field(
        description="SLERP the whole tensor as one vector (mergekit's default)")] = True,
    use_base: UseBase = True,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """SLERP of two models with t = w2 / (w1 + w2) (0.5 where |w1 + w2| < 1e-6), mergekit's
    ``nuslerp``: θ = θ0 + slerp(t, τ1, τ2), τi = θi − θ0, or, without a base
    (``use_base: false``), θ = slerp(t, θ1, θ2). slerp(t, a, b) = (sin((1−t)Ω) a +
    sin(tΩ) b) / sin Ω with cos Ω the cosine of a and b, and (1−t) a + t b where
    1 − cos² Ω ≤ 1e-16. The vectors are the flattened tensors (``nuslerp_flatten``, the
    default), else each row (vectors along the last axis) or, with ``nuslerp_row_wise``, each
    column. Exactly two models besides the base. Not row-local."""
    if len(tensors) != 2:
        raise ConfigError(f"nuslerp merges exactly two models besides the base "
                          f"(got {len(tensors)})")
    tensors = in_base_dtype(base, tensors)
    if copies_of_base(base, tensors):
        return base.clone()
    w = ctx.per_model("weight", weight, 2)
    total = w[0] + w[1]
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    dim = 0 if nuslerp_row_wise else -1
    if not use_base:
        return nuslerp_tensors(t, tensors[0], tensors[1], dim=dim, flatten=nuslerp_flatten)
    return base + nuslerp_tensors(t, tensors[0] - base, tensors[1] - base, dim=dim,
                                  flatten=nuslerp_flatten)
