"""SCE: select, calculate, erase (FuseChat-2.0, Wan et al., arXiv 2408.07990), as mergekit 0.1.5
defines it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from neuromerge.kernels import disjoint_mean, elect_sign, task_vectors, weigh
from neuromerge.registry import TensorContext, merge_method


def sce_select(tv: torch.Tensor, select_topk: float) -> torch.Tensor:
    """Select: the entries (a mask of one model's shape) of the k = ⌊select_topk · n⌋ largest
    variances across models, n the number of entries whose variance is not zero (mergekit's
    ``sce_mask``: population variance; ties broken by ``torch.topk``)."""
    if select_topk >= 1:
        return torch.ones(tv.shape[1:], dtype=torch.bool, device=tv.device)
    mask = torch.zeros(tv.shape[1:], dtype=torch.bool, device=tv.device)
    if select_topk <= 0:
        return mask
    var = torch.var(tv, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    if k > 0:
        mask.view(-1)[torch.topk(var.abs().reshape(-1), k=k, largest=True).indices] = True
    return mask


def sce_weights(tv: torch.Tensor) -> list[float]:
    """Calculate: w_t = mean(τ̂t²) / Σs mean(τ̂s²); 1/T each when that sum is below 1e-6."""
    energy = tv.square().reshape(tv.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    if abs(total) < 1e-6:
        return [1.0 / tv.shape[0]] * tv.shape[0]
    return [float(e) / total for e in energy]


@merge_method(name="sce", reference_url="https://arxiv.org/abs/2408.07990", row_local=False)
def sce(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    select_topk: Annotated[float, Field(
        ge=0, le=1, description="fraction of the entries of non-zero variance across the "
                                "models that are kept, the highest-variance ones (mergekit's "
                                "`select_topk`; 1 keeps all)")] = 1.0,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Select the entries the models disagree on most, weigh each model by its energy, erase
    minority signs: θ = θ0 + Σt w_t [sign τ̂t = s] τ̂t / Σt w_t [sign τ̂t = s].

    τ̂t = m ⊙ τt, m the top-k entries by variance across models (:func:`sce_select`);
    w_t = mean(τ̂t²) / Σs mean(τ̂s²) over the tensor (1/T when that sum is below 1e-6);
    s = sign(Σt τ̂t) (+ where the sum is 0, as mergekit; unweighted, as mergekit's mask);
    entries no model agrees on stay θ0. mergekit divides by max(Σ w_t [·], 1e-6); here the
    divisor is Σ w_t [·] itself (1 where 0): they differ only where the agreeing models' total
    weight is below 1e-6. Masks and weights are tensor-wide, so a tensor is merged whole."""
    tv = task_vectors(base, tensors, base.dtype)
    if select_topk < 1:
        tv.mul_(sce_select(tv, select_topk))
    sign = elect_sign(tv, tensor_fallback=False)
    weights = sce_weights(tv)
    merged = disjoint_mean(weigh(tv, weights), sign, weights=weights, inplace=True)
    return base + merged
