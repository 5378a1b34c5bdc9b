"""Model Stock (Jang et al., ECCV 2024, arXiv 2403.19522) as mergekit 0.1.5 defines it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from neuromerge.errors import ConfigError
from neuromerge.kernels import task_vectors
from neuromerge.methods.mergekit_inputs import drop_listed_base
from neuromerge.registry import Mergekit, TensorContext, merge_method


def interpolation_ratio(cos: torch.Tensor, n: int) -> torch.Tensor:
    """t = N·cos θ / (1 + (N − 1)·cos θ), and t = 0 (keep the base) where the denominator is
    within 1e-6 of 0 (mergekit's guard against the singularity)."""
    den = 1 + (n - 1) * cos
    singular = den.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos),
                       (n * cos) / torch.where(singular, torch.ones_like(den), den))


def _pair_cosines(tv: torch.Tensor, ctx: TensorContext, rows: bool) -> torch.Tensor:
    """Mean over model pairs of cos(τa, τb) (clamped to [-1, 1], norms' product clamped to
    ≥ 1e-6): per row (over the last axis) with ``rows``, else over the whole tensor, from sums
    that :meth:`TensorContext.tensor_sum` totals over row blocks."""
    n = tv.shape[0]
    cos = []
    if rows:
        norms = tv.norm(dim=-1)
        for a in range(n):
            for b in range(a + 1, n):
                dot = (tv[a] * tv[b]).sum(dim=-1)
                cos.append((dot / (norms[a] * norms[b]).clamp(min=1e-6)).clamp(-1, 1))
        return torch.stack(cos).mean(dim=0).unsqueeze(-1)
    sq = [ctx.tensor_sum(f"sq{a}", lambda a=a: tv[a].square().sum()) for a in range(n)]
    for a in range(n):
        for b in range(a + 1, n):
            dot = ctx.tensor_sum(f"dot{a},{b}", lambda a=a, b=b: (tv[a] * tv[b]).sum())
            cos.append(max(-1.0, min(1.0, dot / max((sq[a] * sq[b]) ** 0.5, 1e-6))))
    return torch.tensor(sum(cos) / len(cos), dtype=tv.dtype, device=tv.device)


@merge_method(name="model_stock", reference_url="https://arxiv.org/abs/2403.19522",
              n_models=(2, None), mergekit=Mergekit(inputs=drop_listed_base))
def model_stock(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    filter_wise: Annotated[bool, Field(
        description="one ratio t per row (the angle over each row's last axis; mergekit's "
                    "`filter_wise`) instead of one per tensor")] = False,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Interpolate between the base and the models' average by their angle (N ≥ 2 models):
    θ = θ0 + t · (1/N) Σt τt, t = N·cos θ / (1 + (N − 1)·cos θ).

    cos θ is the mean over the N(N−1)/2 pairs of models of cos(τa, τb) = ⟨τa, τb⟩ /
    max(‖τa‖‖τb‖, 1e-6), clamped to [−1, 1], over the whole tensor, or per row with
    ``filter_wise`` (1-D tensors: the whole tensor either way); where 1 + (N − 1)·cos θ is within
    1e-6 of 0, t = 0 (the base is kept). mergekit computes t·θ̄ + (1 − t)·θ0, the same value;
    written around θ0, identical models give θ0 exactly."""
    n = len(tensors)
    if n < 2:
        raise ConfigError(f"model_stock needs a base and at least two models (got {n} "
                          f"model{'s' if n != 1 else ''} besides the base)")
    tv = task_vectors(base, tensors, base.dtype)
    t = interpolation_ratio(_pair_cosines(tv, ctx, rows=filter_wise and base.dim() >= 2), n)
    return base + (t * tv.mean(dim=0)).to(base.dtype)
