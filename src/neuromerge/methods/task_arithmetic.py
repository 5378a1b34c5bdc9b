"""Task arithmetic (Ilharco et al., 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from neuromerge.kernels import task_vectors
from neuromerge.registry import TensorContext, merge_method


@merge_method(name="task_arithmetic", reference_url="https://arxiv.org/abs/2212.04089")
def task_arithmetic(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    scale: Annotated[float, Field(description="λ, the scale of the summed task vectors "
                                              "(0.3 is the usual choice without validation)")]
    = 0.3,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Add the scaled sum of task vectors to the base: θ = θ0 + λ · Σt τt, with τt = θt − θ0."""
    return base + scale * task_vectors(base, tensors, base.dtype).sum(dim=0)
