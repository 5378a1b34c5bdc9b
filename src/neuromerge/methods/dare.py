"""DARE: drop and rescale (Yu et al., ICML 2024), followed by task arithmetic or TIES."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from neuromerge.kernels import dare_drop, derive_seed, task_vectors, ties_merge
from neuromerge.params import DropRate, Seed
from neuromerge.registry import TensorContext, merge_method

_REFERENCE = "https://arxiv.org/abs/2311.03099"


def dropped_task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor], drop_rate: float,
                         seed: int, ctx: TensorContext) -> torch.Tensor:
    """τ̃t = mask_t ⊙ τt / (1 − p), mask_t ~ Bernoulli(1 − p) from model t's own seeded stream."""
    tv = task_vectors(base, tensors, base.dtype)
    seeds = ctx.model_seeds or tuple(derive_seed(seed, i) for i in range(len(tensors)))
    offset = ctx.row_offset * (tv[0][0].numel() if tv.dim() > 1 else 1)
    for t in range(tv.shape[0]):
        tv[t] = dare_drop(tv[t], drop_rate, derive_seed(seeds[t], ctx.name), offset)
    return tv


@merge_method(name="dare_linear", reference_url=_REFERENCE, per_model_params=("seed",))
def dare_linear(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    drop_rate: DropRate = 0.5,
    scale: Annotated[float, Field(description="λ, the scale of the summed task vectors")] = 0.3,
    seed: Seed = 0,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """DARE then task arithmetic: θ = θ0 + λ · Σt τ̃t.

    τ̃t = τt ⊙ mt / (1 − p) with mt ~ Bernoulli(1 − p) drawn from model t's seeded stream."""
    return base + scale * dropped_task_vectors(base, tensors, drop_rate, seed, ctx).sum(dim=0)


@merge_method(name="dare_ties", reference_url=_REFERENCE, per_model_params=("seed",))
def dare_ties(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    drop_rate: DropRate = 0.5,
    scale: Annotated[float, Field(description="λ, the scale of the merged task vector")] = 1.0,
    seed: Seed = 0,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """DARE then TIES' elect + disjoint mean: θ = θ0 + λ · τ̄ over τ̃t = τt ⊙ mt / (1 − p).

    The random drop replaces TIES' magnitude trim."""
    tv = dropped_task_vectors(base, tensors, drop_rate, seed, ctx)
    return base + scale * ties_merge(tv, whole_sum=ctx.tensor_sum("tv", tv.sum),
                                      inplace=True)
