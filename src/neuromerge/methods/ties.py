"""TIES-Merging (Yadav et al., NeurIPS 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from neuromerge.kernels import task_vectors, ties_merge, trim, weigh
from neuromerge.params import Density, Normalize, TrimCount, TrimScope, Weight
from neuromerge.registry import Mergekit, TensorContext, merge_method

#: mergekit's TIES: trimmed per tensor, its count, and no trim unless a density is given
MERGEKIT_TIES = {"density": 1.0, "trim_scope": "tensor", "trim_count": "floor"}


@merge_method(name="ties", reference_url="https://arxiv.org/abs/2306.01708", trims=True,
              per_model_params=("weight", "density"), linear_in=("scale",),
              mergekit=Mergekit(defaults=MERGEKIT_TIES))
def ties(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    density: Density = 0.2,
    trim_scope: TrimScope = "global",
    trim_count: TrimCount = "ceil",
    scale: Annotated[float, Field(description="λ, the scale of the merged task vector")] = 1.0,
    weight: Weight = 1.0,
    normalize: Normalize = True,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Trim, elect sign, disjoint mean: θ = θ0 + λ · τ̄.

    τ̂t = trim(τt) keeps the top-density magnitudes of each task; s = sign(Σt w_t τ̂t)
    element-wise (a zero sum takes the sign of the whole tensor's sum, then +); τ̄ is the
    weighted mean Σ w_t τ̂t / Σ w_t over the non-zero entries whose sign is s (without
    ``normalize``, their sum)."""
    n = len(tensors)
    weights = ctx.per_model("weight", weight, n)
    tv = trim(task_vectors(base, tensors, base.dtype), ctx.per_model("density", density, n),
              ctx.thresholds, inplace=True, count=trim_count)
    weigh(tv, weights)
    return base + scale * ties_merge(tv, whole_sum=ctx.tensor_sum("tv", tv.sum),
                                      aggregate="mean" if normalize else "sum",
                                      weights=weights, inplace=True)
