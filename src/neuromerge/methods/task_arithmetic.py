"""Task arithmetic (Ilharco et al., 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from neuromerge.kernels import task_vectors, weigh
from neuromerge.params import Normalize, Weight
from neuromerge.registry import Mergekit, TensorContext, merge_method


@merge_method(name="task_arithmetic", reference_url="https://arxiv.org/abs/2212.04089",
              per_model_params=("weight",), linear_in=("scale",),
              mergekit=Mergekit(weighted_scale=1.0))
def task_arithmetic(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    scale: Annotated[float, Field(description="λ, the scale of the summed task vectors "
                                              "(0.3 is the usual choice without validation; "
                                              "1 when models set a weight)")]
    = 0.3,
    weight: Weight = 1.0,
    normalize: Normalize = False,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Add the scaled sum of task vectors to the base: θ = θ0 + λ · Σt w_t τt, with τt = θt − θ0.

    ``normalize`` divides the sum by Σt w_t."""
    weights = ctx.per_model("weight", weight, len(tensors))
    merged = weigh(task_vectors(base, tensors, base.dtype), weights).sum(dim=0)
    return base + (scale / _divisor(weights) if normalize else scale) * merged


def _divisor(weights: Sequence[float]) -> float:
    # mergekit leaves the sum unnormalised where the weights sum to (almost) zero
    total = float(sum(weights))
    return 1.0 if abs(total) < 1e-8 else total


@merge_method(name="linear", reference_url="https://arxiv.org/abs/2203.05482",
              per_model_params=("weight",), mergekit=Mergekit(first_model_is_base=True))
def linear(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    weight: Weight = 1.0,
    normalize: Annotated[bool, Field(description="divide by the sum of the weights (mergekit's "
                                                 "`normalize`, default true)")] = True,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Weighted average of the fine-tuned models (mergekit's `linear`): θ = Σt w_t θt / Σt w_t.

    Computed as θ0 + Σt w_t τt / Σt w_t, which is the same and gives θ0 back exactly when every
    θt equals θ0; without ``normalize``, θ = Σt w_t θt. The base is not one of the averaged
    models (list it under ``models`` to include it)."""
    weights = ctx.per_model("weight", weight, len(tensors))
    merged = weigh(task_vectors(base, tensors, base.dtype), weights).sum(dim=0)
    if normalize:
        return base + merged.div_(_divisor(weights))
    return base * float(sum(weights)) + merged
