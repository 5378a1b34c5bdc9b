"""The Karcher mean (Riemannian barycentre on the hypersphere), as mergekit's ``karcher``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from neuromerge.errors import ConfigError
from neuromerge.methods.mergekit_inputs import copies_of_base, in_base_dtype, include_base
from neuromerge.registry import Mergekit, TensorContext, merge_method


def karcher_mean(tensors: Sequence[torch.Tensor], alphas: Sequence[float], *,
                 max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """mergekit's ``karcher_merge_tensors``: the weighted Karcher mean of the directions,
    scaled by the weighted mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(tensor.to(dtype))
        norms.append(norm)
        units.append(torch.zeros_like(tensor) if norm.item() == 0.0
                     else (tensor / norm).to(tensor.dtype))
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(tensor * 0 for tensor in tensors)  # type: ignore[return-value]
    alpha_sum = sum(alphas[i] for i in valid)
    weights = [alphas[i] / alpha_sum for i in valid]
    valid_units = [units[i] for i in valid]
    mean = torch.zeros_like(valid_units[0])
    for alpha, unit in zip(weights, valid_units, strict=True):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = (valid_units[0].clone() if mean_norm.item() < tol
            else (mean / mean_norm).to(mean.dtype))
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(weights, valid_units, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean
                + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True))
    return scale * mean


@merge_method(name="karcher", reference_url="https://arxiv.org/abs/2603.04972", row_local=False,
              mergekit=Mergekit(inputs=include_base, first_model_is_base=True))
def karcher(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    max_iter: Annotated[int, Field(ge=0, description="iterations of the fixed point at most "
                                                     "(mergekit's)")] = 10,
    tol: Annotated[float, Field(ge=0, description="stop when the tangent's norm is below it; "
                                                  "norms ≤ tol drop out (mergekit's)")] = 1e-5,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Karcher mean of the models, each tensor flattened (mergekit's ``karcher``): directions
    ut = θt / ‖θt‖ of the n models with ‖θt‖ > tol, equal weights; start from the normalised
    mean of the ut, then iterate m ← cos‖v‖ m + sin‖v‖ v/‖v‖, v = (1/n') Σt Ωt/sin Ωt ·
    (ut − cos Ωt m), cos Ωt = ⟨m, ut⟩ (terms with Ωt < tol skipped), renormalised, until
    ‖v‖ < tol or max_iter; θ = (Σt ‖θt‖ / n) m.

    The models are every model listed; mergekit adds the base to them where it is not listed
    (the config translation does the same), so a mergekit karcher is the mean of the base and
    the models. The base itself is otherwise unused. Not row-local."""
    if not tensors:
        raise ConfigError("karcher needs at least one model")
    tensors = in_base_dtype(base, tensors)
    if copies_of_base(base, tensors):
        return base.clone()
    n = len(tensors)
    return karcher_mean(list(tensors), [1.0 / n] * n, max_iter=max_iter, tol=tol)
