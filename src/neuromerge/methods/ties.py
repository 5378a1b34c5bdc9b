"""TIES-Merging (Yadav et al., NeurIPS 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from neuromerge.kernels import task_vectors, ties_merge, trim
from neuromerge.params import Density, TrimScope
from neuromerge.registry import TensorContext, merge_method


@merge_method(name="ties", reference_url="https://arxiv.org/abs/2306.01708", trims=True)
def ties(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    density: Density = 0.2,
    trim_scope: TrimScope = "global",
    scale: Annotated[float, Field(description="λ, the scale of the merged task vector")] = 1.0,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Trim, elect sign, disjoint mean: θ = θ0 + λ · τ̄.

    τ̂t = trim(τt) keeps the top-density magnitudes of each task; s = sign(Σt τ̂t) element-wise
    (a zero sum takes the sign of the whole tensor's sum, then +); τ̄ is the mean of the non-zero
    τ̂t entries whose sign is s."""
    tv = trim(task_vectors(base, tensors, base.dtype), density, ctx.thresholds,
              inplace=True)
    return base + scale * ties_merge(tv, whole_sum=ctx.tensor_sum("tv", tv.sum),
                                      inplace=True)
