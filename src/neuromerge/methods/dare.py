"""DARE: drop and rescale (Yu et al., ICML 2024), followed by task arithmetic or TIES."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch
from pydantic import Field

from neuromerge.errors import ConfigError
from neuromerge.kernels import dare_drop, derive_seed, per_task, task_vectors, ties_merge, weigh
from neuromerge.param_settings import map_leaves
from neuromerge.params import DropRate, Normalize, Rescale, Seed, Weight
from neuromerge.registry import Mergekit, TensorContext, merge_method

_REFERENCE = "https://arxiv.org/abs/2311.03099"


def dropped_task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor],
                         drop_rate: float | Sequence[float], seed: int, ctx: TensorContext, *,
                         rescale: bool = True) -> torch.Tensor:
    """τ̃t = mask_t ⊙ τt / (1 − p_t), mask_t ~ Bernoulli(1 − p_t) from model t's own seeded
    stream (``drop_rate``: one p for all, or one per model; ``rescale=False``: no 1/(1 − p_t))."""
    tv = task_vectors(base, tensors, base.dtype)
    seeds = ctx.model_seeds or tuple(derive_seed(seed, i) for i in range(len(tensors)))
    rates = per_task(drop_rate, len(tensors))
    offset = ctx.row_offset * (tv[0][0].numel() if tv.dim() > 1 else 1)
    for t in range(tv.shape[0]):
        tv[t] = dare_drop(tv[t], rates[t], derive_seed(seeds[t], ctx.name), offset,
                          rescale=rescale)
    return tv


def _dropped(base: torch.Tensor, tensors: Sequence[torch.Tensor], drop_rate: float, seed: int,
             rescale: bool, ctx: TensorContext) -> torch.Tensor:
    n = len(tensors)
    return dropped_task_vectors(base, tensors, ctx.per_model("drop_rate", drop_rate, n), seed,
                                ctx, rescale=rescale)


_PER_MODEL = ("seed", "weight", "drop_rate")


def mergekit_keep_rate(block: dict[str, Any], where: str) -> None:
    """mergekit's DARE ``density`` is the keep probability: drop_rate = 1 − density."""
    if "density" not in block:
        return
    if "drop_rate" in block:
        raise ConfigError(f"{where}: give density (mergekit's keep probability) or drop_rate, "
                          f"not both")

    def drop_rate(density: Any) -> float:
        if not isinstance(density, int | float) or not 0 < density <= 1:
            raise ConfigError(f"{where}.density: DARE's keep probability must be in (0, 1] "
                              f"(got {density!r})")
        return 1.0 - float(density)

    block["drop_rate"] = map_leaves(block.pop("density"), drop_rate)  # gradients: each point


@merge_method(name="dare_linear", reference_url=_REFERENCE, per_model_params=_PER_MODEL,
              linear_in=("scale",),
              mergekit=Mergekit(rewrite=mergekit_keep_rate, weighted_scale=1.0,
                                defaults={"drop_rate": 0.0}))
def dare_linear(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    drop_rate: DropRate = 0.5,
    scale: Annotated[float, Field(description="λ, the scale of the summed task vectors "
                                              "(1 when models set a weight)")] = 0.3,
    seed: Seed = 0,
    weight: Weight = 1.0,
    rescale: Rescale = True,
    normalize: Normalize = False,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """DARE then task arithmetic: θ = θ0 + λ · Σt w_t τ̃t (``normalize``: divided by Σt w_t).

    τ̃t = τt ⊙ mt / (1 − p) with mt ~ Bernoulli(1 − p) drawn from model t's seeded stream."""
    weights = ctx.per_model("weight", weight, len(tensors))
    merged = weigh(_dropped(base, tensors, drop_rate, seed, rescale, ctx), weights).sum(dim=0)
    total = float(sum(weights))
    if normalize and abs(total) >= 1e-8:  # mergekit leaves a zero-sum unnormalised
        merged.div_(total)
    return base + scale * merged


@merge_method(name="dare_ties", reference_url=_REFERENCE, per_model_params=_PER_MODEL,
              linear_in=("scale",), mergekit=Mergekit(
                  rewrite=mergekit_keep_rate, defaults={"drop_rate": 0.0, "normalize": False}))
def dare_ties(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    drop_rate: DropRate = 0.5,
    scale: Annotated[float, Field(description="λ, the scale of the merged task vector")] = 1.0,
    seed: Seed = 0,
    weight: Weight = 1.0,
    rescale: Rescale = True,
    normalize: Normalize = True,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """DARE then TIES' elect + disjoint mean: θ = θ0 + λ · τ̄ over w_t τ̃t, τ̃t = τt ⊙ mt / (1 − p).

    The random drop replaces TIES' magnitude trim; τ̄ divides by the sum of the agreeing models'
    weights (without ``normalize``: the disjoint sum)."""
    weights = ctx.per_model("weight", weight, len(tensors))
    tv = weigh(_dropped(base, tensors, drop_rate, seed, rescale, ctx), weights)
    return base + scale * ties_merge(tv, whole_sum=ctx.tensor_sum("tv", tv.sum),
                                      aggregate="mean" if normalize else "sum",
                                      weights=weights, inplace=True)
