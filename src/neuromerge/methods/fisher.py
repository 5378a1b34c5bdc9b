"""Fisher merging (Matena & Raffel, NeurIPS 2022): each model's weights averaged with its
diagonal Fisher information as per-entry precision (a Laplace approximation of its posterior)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from neuromerge.errors import InputError
from neuromerge.kernels import task_vectors
from neuromerge.method_api import default_working_set
from neuromerge.registry import TensorContext, merge_method


def _working_set(n_models: int, compute_itemsize: int) -> int:
    """The default working copies plus each model's Fisher, as stored (float32) and in the
    compute dtype."""
    return default_working_set(n_models, compute_itemsize) + n_models * (4 + compute_itemsize)


@merge_method(name="fisher", reference_url="https://arxiv.org/abs/2111.09832", needs="fisher",
              linear_in=("scale",), working_set=_working_set)
def fisher(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    fisher_floor: Annotated[float, Field(
        ge=0, description="ε added to every Fisher value: entries no model's data informs "
                          "(F = 0 everywhere) get the plain average, and tiny values cannot "
                          "divide by zero (1e-6, as in MergeLM and FusionBench)")] = 1e-6,
    scale: Annotated[float, Field(
        description="λ, the scale of the merged task vector (1: the paper's merge)")] = 1.0,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Fisher-weighted average: θ = Σt (Ft + ε) θt / Σt (Ft + ε), computed as θ0 + λ · τ̄F with
    τ̄F = Σt (Ft + ε) τt / Σt (Ft + ε).

    Ft is model t's diagonal Fisher, Ft = E_x E_{y∼pθt(y|x)} (∇θ log pθt(y|x))², estimated on its
    own task's data (`neuromerge statistics fisher`); the base is not averaged in (the paper
    merges fine-tuned models) and the task-vector form gives θ0 back exactly when every θt
    equals it. Uniform model weights (the paper's λt = 1/T cancel out)."""
    if ctx.statistics is None:
        raise InputError(f"fisher: no Fisher statistic for tensor {ctx.name!r}")
    tv = task_vectors(base, tensors, base.dtype)
    weights = torch.stack([f.to(tv.dtype) for f in ctx.statistics]).add_(fisher_floor)
    total = weights.sum(dim=0)
    merged = (weights.mul_(tv)).sum(dim=0)
    # Σ(F+ε) = 0 only with ε = 0 and no information anywhere: the plain average there
    informed = total > 0
    merged = torch.where(informed, merged / torch.where(informed, total, 1.0), tv.mean(dim=0))
    return base + scale * merged
