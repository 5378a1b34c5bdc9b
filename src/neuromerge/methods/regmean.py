"""RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language
Models"): each linear layer merged as the least-squares solution that matches every model's
outputs on its own inputs, from the Gram matrices of those inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from neuromerge.kernels import task_vectors
from neuromerge.registry import TensorContext, merge_method


@merge_method(name="regmean", reference_url="https://arxiv.org/abs/2212.09849",
              needs="regmean", linear_in=("scale",))
def regmean(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    offdiag_scale: Annotated[float, Field(
        ge=0, le=1, description="α: the Grams' off-diagonal entries are scaled by α "
                                "(1: exact RegMean, 0: a per-input-feature weighted average); "
                                "the paper tunes it in [0, 1]")] = 0.9,
    scale: Annotated[float, Field(
        description="λ, the scale of the merged task vector (1: the paper's merge)")] = 1.0,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Least squares over all models' inputs: W = W0 + λ · Δ, Δᵀ = (Σt G̃t)⁻¹ Σt G̃t τtᵀ.

    For a linear weight W (out × in) with inputs Xt of model t, Gt = XtᵀXt / nt (in × in, the
    mean over the inputs' tokens; `neuromerge statistics regmean`) and G̃t = α Gt + (1 − α)
    diag(Gt). With λ = 1, W = argmin_W Σt ‖Xt W'ᵀ − Xt Wtᵀ‖² on the α-regularised Grams,
    i.e. Wᵀ = (Σ G̃t)⁻¹ Σ G̃t Wtᵀ (the task-vector form is the same solution: it is linear in
    Wt). Each output row is solved on its own with the same matrix, so the method is row-local.
    Directions no model's inputs reach (the null space of Σ G̃t, e.g. all-zero Grams) take the
    plain average of the task vectors: Δᵀ = τ̄ᵀ + (Σ G̃t)⁺ (Σ G̃t τtᵀ − Σ G̃t τ̄ᵀ), solved in
    float64 with an eigendecomposition (eigenvalues below n · eps · the largest count as zero).
    Tensors without a Gram (embeddings, biases, LayerNorm) are averaged: θ0 + λ · τ̄, as in the
    paper."""
    tv = task_vectors(base, tensors, base.dtype)
    mean = tv.mean(dim=0)
    if ctx.statistics is None:
        return base + scale * mean
    grams = torch.stack([g.to(torch.float64) for g in ctx.statistics])
    if offdiag_scale != 1.0:
        diag = torch.diagonal(grams, dim1=-2, dim2=-1).clone()
        grams.mul_(offdiag_scale)
        torch.diagonal(grams, dim1=-2, dim2=-1).copy_(diag)
    total = grams.sum(dim=0)
    t64 = tv.to(torch.float64)
    # rhs = Σ G̃t τtᵀ − (Σ G̃t) τ̄ᵀ, as rows: Σ τt G̃t − τ̄ Σ G̃t (the Grams are symmetric)
    rhs = torch.einsum("tri,tij->rj", t64, grams) - mean.to(torch.float64) @ total
    evals, evecs = torch.linalg.eigh(total)
    tol = evals.abs().max().clamp(min=0) * total.shape[0] * torch.finfo(torch.float64).eps
    inv = torch.where(evals > tol, 1.0 / torch.where(evals > tol, evals, 1.0), 0.0)
    delta = mean.to(torch.float64) + ((rhs @ evecs) * inv) @ evecs.T
    return base + scale * delta.to(base.dtype)
