"""DELLA-Merging (Deep et al., arXiv 2406.11617) as mergekit 0.1.5 defines it: MAGPRUNE, a random
drop whose keep probability grows with an entry's magnitude rank, then TIES' sign consensus
(``della``) or a plain sum (``della_linear``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from neuromerge.errors import ConfigError
from neuromerge.kernels import (
    derive_seed,
    magnitudes,
    task_vectors,
    ties_merge,
    uniform_stream,
    weigh,
)
from neuromerge.params import Normalize, Seed, Weight
from neuromerge.registry import TensorContext, merge_method

_REFERENCE = "https://arxiv.org/abs/2406.11617"

KeepDensity = Annotated[float, Field(
    gt=0, le=1, description="mean keep probability of each task-vector entry (mergekit's "
                            "`density`; 1 keeps everything, and then epsilon is not used)")]
Epsilon = Annotated[float, Field(
    ge=0, lt=0.5, description="ε: keep probabilities run from density − ε (smallest magnitude "
                              "of a row) to density + ε (largest); density ± ε must lie in "
                              "(0, 1)")]
L1Rescale = Annotated[bool, Field(
    description="rescale each pruned task vector to the L1 norm it had before the drop, over "
                "the whole tensor (mergekit's `rescale`)")]


def keep_probabilities(tv: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MAGPRUNE's keep probability of each entry of one task vector (float64, shape of ``tv``).

    Within each row (axis 1; a 1-D tensor is one row) entries are ranked by |τ| ascending,
    r = 0 … n − 1 (ties by position), and p = density − ε + 2ε · r / (n − 1) (a row of one
    entry: p = density). mergekit ranks with an unstable argsort, so tied magnitudes may swap
    ranks there."""
    x = tv.unsqueeze(0) if tv.dim() < 2 else tv
    n = x.shape[1]
    order = torch.argsort(magnitudes(x), dim=1, stable=True)
    # the inverse permutation by a scatter (a second argsort costs as much as the first)
    ranks = torch.empty(x.shape, dtype=torch.float64, device=x.device).scatter_(
        1, order, torch.arange(n, dtype=torch.float64, device=x.device)
        .reshape(1, n, *([1] * (x.dim() - 2))).expand(x.shape))
    rank_norm = ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    return ((density - epsilon) + rank_norm * (2 * epsilon)).reshape(tv.shape)


#: Entries of a task vector whose mask is drawn at once (whole rows): the ranks and
#: probabilities are float64 and int64 per entry, several times the size of the tensor itself.
MASK_BLOCK_ENTRIES = 1 << 21


def magprune_(tv: torch.Tensor, density: float, epsilon: float, seed: int, offset: int) -> None:
    """Zero, in place, the entries of one task vector that MAGPRUNE drops: entry i is kept where
    u_i < p_i, u the seeded stream at the entry's position ``offset + i`` in the whole tensor and
    p from :func:`keep_probabilities`. Ranks are per row (a 1-D tensor is one row), so the mask
    is drawn a block of rows at a time: the same mask, bounded temporaries."""
    x = tv.unsqueeze(0) if tv.dim() < 2 else tv
    row = x[0].numel()
    step = max(1, MASK_BLOCK_ENTRIES // max(1, row))
    for r in range(0, x.shape[0], step):
        block = x[r:r + step]
        u = uniform_stream(seed, offset + r * row, block.numel())
        keep = u.to(torch.float64).reshape(block.shape).to(block.device) < keep_probabilities(
            block, density, epsilon)
        block.masked_fill_(~keep, 0)


def check_epsilon(density: float, epsilon: float, where: str = "della") -> None:
    if density < 1 and not (density + epsilon < 1 and density - epsilon > 0):
        raise ConfigError(f"{where}: epsilon must leave density ± epsilon inside (0, 1) "
                          f"(density {density}, epsilon {epsilon})")


def magprune_task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
                          density: float, epsilon: float, rescale: bool, seed: int,
                          ctx: TensorContext) -> tuple[torch.Tensor, list[float]]:
    """τ̃t = mask_t ⊙ τt · c_t, mask_t ~ Bernoulli(p_t) (:func:`keep_probabilities`) drawn from
    model t's own seeded stream, c_t = ‖τt‖₁ / ‖mask_t ⊙ τt‖₁ over the whole tensor with
    ``rescale`` (1 where either norm is below 1e-7, as mergekit), else 1. Also returns each
    model's Σ mask_t ⊙ τt · c_t over the whole tensor (the sign election's tie-break).

    Row blocks of a 2-D tensor give the same result (ranks are per row, the stream is indexed by
    the entry's position in the whole tensor, the norms are whole-tensor sums); a 1-D tensor is
    ranked whole, and the engine never splits one for compute (only a memory budget smaller
    than the tensor would, and that is refused)."""
    n = len(tensors)
    densities = ctx.per_model("density", density, n)
    epsilons = ctx.per_model("epsilon", epsilon, n)
    tv = task_vectors(base, tensors, base.dtype)
    seeds = ctx.model_seeds or tuple(derive_seed(seed, i) for i in range(n))
    blocked = ctx.sums is not None or ctx.collect is not None
    offset = ctx.row_offset * (tv[0][0].numel() if tv.dim() > 1 else 1)
    sums = []
    for t in range(n):
        d, eps = float(densities[t]), float(epsilons[t])
        check_epsilon(d, eps)
        if d < 1:
            if blocked and base.dim() < 2:
                raise ConfigError(f"{ctx.name}: della ranks a 1-D tensor whole; it cannot be "
                                  f"merged in row blocks (raise the memory limit)")
            before = ctx.tensor_sum(f"l1_{t}", tv[t].abs().sum) if rescale else 0.0
            magprune_(tv[t], d, eps, derive_seed(seeds[t], ctx.name), offset)
            total = ctx.tensor_sum(f"sum_{t}", tv[t].sum)
            if rescale:
                after = ctx.tensor_sum(f"kept_{t}", tv[t].abs().sum)
                if before >= 1e-7 and after >= 1e-7:
                    tv[t].mul_(before / after)
                    total *= before / after
            sums.append(total)
        else:
            sums.append(ctx.tensor_sum(f"sum_{t}", tv[t].sum))
    return tv, sums


@merge_method(name="della", reference_url=_REFERENCE, linear_in=("scale",),
              per_model_params=("seed", "weight", "density", "epsilon"))
def della(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    density: KeepDensity = 1.0,
    epsilon: Epsilon = 0.15,
    scale: Annotated[float, Field(description="λ, the scale of the merged task vector "
                                              "(mergekit's `lambda`)")] = 1.0,
    seed: Seed = 0,
    weight: Weight = 1.0,
    rescale: L1Rescale = True,
    normalize: Normalize = True,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """MAGPRUNE then TIES' elect + disjoint mean: θ = θ0 + λ · τ̄ over w_t τ̃t.

    τ̃t keeps each entry with probability p = density − ε + 2ε · r/(n − 1), r its |τt| rank
    within its row (:func:`keep_probabilities`), and is rescaled to ‖τt‖₁ (``rescale``, over
    the tensor); s = sign(Σt w_t τ̃t) (a zero sum: the whole tensor's sign, then +); τ̄ divides
    by the sum of the agreeing models' weights (without ``normalize``: the disjoint sum).
    The paper rescales each survivor by 1/p instead; this is mergekit's definition."""
    weights = ctx.per_model("weight", weight, len(tensors))
    tv, sums = magprune_task_vectors(base, tensors, density=density, epsilon=epsilon,
                                     rescale=rescale, seed=seed, ctx=ctx)
    weigh(tv, weights)
    whole = sum(w * s for w, s in zip(weights, sums, strict=True))
    return base + scale * ties_merge(tv, whole_sum=whole,
                                      aggregate="mean" if normalize else "sum",
                                      weights=weights, inplace=True)


@merge_method(name="della_linear", reference_url=_REFERENCE, linear_in=("scale",),
              per_model_params=("seed", "weight", "density", "epsilon"))
def della_linear(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    density: KeepDensity = 1.0,
    epsilon: Epsilon = 0.15,
    scale: Annotated[float, Field(description="λ, the scale of the summed task vectors "
                                              "(mergekit's `lambda`)")] = 1.0,
    seed: Seed = 0,
    weight: Weight = 1.0,
    rescale: L1Rescale = True,
    normalize: Normalize = False,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """MAGPRUNE then task arithmetic: θ = θ0 + λ · Σt w_t τ̃t (``normalize``: divided by Σt w_t,
    unless that is within 1e-8 of 0), τ̃t as in ``della``."""
    weights = ctx.per_model("weight", weight, len(tensors))
    tv, _ = magprune_task_vectors(base, tensors, density=density, epsilon=epsilon,
                                  rescale=rescale, seed=seed, ctx=ctx)
    merged = weigh(tv, weights).sum(dim=0)
    total = float(sum(weights))
    if normalize and abs(total) >= 1e-8:
        merged.div_(total)
    return base + scale * merged
