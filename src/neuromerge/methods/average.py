"""Weight averaging (model soups)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neuromerge.kernels import task_vectors
from neuromerge.registry import TensorContext, merge_method


@merge_method(name="average", reference_url="https://arxiv.org/abs/2203.05482")
def average(base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
            ctx: TensorContext = TensorContext()) -> torch.Tensor:
    """Uniform weight average of the fine-tuned models: θ = (1/T) Σt θt = θ0 + (1/T) Σt τt.

    The base is not averaged in; the task-vector form keeps precision and gives θ0 back exactly
    when every θt equals θ0."""
    return base + task_vectors(base, tensors, base.dtype).mean(dim=0)
