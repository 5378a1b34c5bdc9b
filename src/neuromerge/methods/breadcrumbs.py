"""Model Breadcrumbs (Davari & Belilovsky, arXiv 2312.06795): drop each task vector's largest and
smallest magnitudes per layer, then task arithmetic (``breadcrumbs``) or TIES' sign consensus
(``breadcrumbs_ties``, mergekit's)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from neuromerge.kernels import (
    floor_count,
    keep_count,
    kth_largest,
    magnitudes,
    task_vectors,
    ties_merge,
    weigh,
)
from neuromerge.params import TrimCount, Weight
from neuromerge.registry import Mergekit, TensorContext, merge_method

BreadcrumbsDensity = Annotated[float, Field(
    gt=0, le=1, description="fraction of each task vector's entries kept per tensor, after "
                            "the largest (gamma) and the smallest magnitudes are dropped "
                            "(mergekit's density)")]
Gamma = Annotated[float, Field(
    ge=0, lt=1, description="fraction of each task vector's largest magnitudes dropped per "
                            "tensor as outliers (mergekit's gamma, the paper's β)")]
L1Rescale = Annotated[bool, Field(
    description="rescale each masked task vector to the L1 norm it had before masking, per "
                "tensor (mergekit's `rescale`, default false)")]
_PER_MODEL = ("weight", "density", "gamma")
#: mergekit's: nothing dropped unless a density is given, its counts
_MERGEKIT = {"density": 1.0, "trim_count": "floor"}


def breadcrumbs_mask(tv: torch.Tensor, density: float, gamma: float, count: str = "ceil"
                     ) -> torch.Tensor:
    """The entries of one task vector that Breadcrumbs keeps (bool, shape of ``tv``).

    With N entries, k = ceil(density · N) entries are kept after the n_top = min(⌊gamma · N⌋,
    N − k) largest magnitudes are dropped: keep h_low ≤ |τ| ≤ h_high, h_low the (n_top + k)-th
    largest |τ| and h_high the (n_top + 1)-th largest (no upper bound when n_top = 0). Ties at
    either bound are kept. ``count="floor"``: mergekit's k = int(density · N) and
    n_top = int(gamma · N) (float arithmetic; k may be 0, which keeps nothing), ties broken by
    its sort order."""
    n = tv.numel()
    if n == 0 or density >= 1:
        return torch.ones_like(tv, dtype=torch.bool)
    if count == "floor":
        # mergekit's exactly: the entries ranked n_bot .. n_bot + k - 1 by ascending |τ|, ties
        # in the order of its (unstable) sort, which bf16 task vectors need often
        k, n_top = int(float(density) * n), int(float(gamma) * n)
        n_bot = max(0, n - k - n_top)
        order = torch.sort(magnitudes(tv).reshape(-1).float()).indices
        keep = torch.zeros(n, dtype=torch.bool, device=tv.device)
        keep[order[n_bot:n_bot + k]] = True
        return keep.reshape(tv.shape)
    k = keep_count(density, n)
    n_top = min(floor_count(gamma, n), n - k)
    mags = magnitudes(tv)
    keep = mags >= kth_largest(mags, n_top + k) if n_top + k < n else torch.ones_like(
        mags, dtype=torch.bool)
    if n_top > 0:
        keep &= mags <= kth_largest(mags, n_top + 1)
    return keep


def masked_task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor], density: float,
                        gamma: float, rescale: bool, ctx: TensorContext, count: str = "ceil"
                        ) -> torch.Tensor:
    """mt ⊙ τt for each model (:func:`breadcrumbs_mask`, with the model's own density and gamma),
    with ``rescale`` times ‖τt‖₁ / ‖mt ⊙ τt‖₁ (1 where either is below 1e-7, as mergekit)."""
    n = len(tensors)
    densities = ctx.per_model("density", density, n)
    gammas = ctx.per_model("gamma", gamma, n)
    tv = task_vectors(base, tensors, base.dtype)
    for t in range(n):
        before = float(tv[t].abs().sum())
        tv[t].masked_fill_(~breadcrumbs_mask(tv[t], densities[t], gammas[t], count), 0)
        after = float(tv[t].abs().sum())
        if rescale and before >= 1e-7 and after >= 1e-7:
            tv[t].mul_(before / after)
    return tv


@merge_method(name="breadcrumbs", reference_url="https://arxiv.org/abs/2312.06795",
              row_local=False, linear_in=("scale",), per_model_params=_PER_MODEL,
              mergekit=Mergekit(weighted_scale=1.0, defaults=_MERGEKIT))
def breadcrumbs(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    density: BreadcrumbsDensity = 0.9,
    gamma: Gamma = 0.01,
    scale: Annotated[float, Field(description="λ, the scale of the summed masked task "
                                              "vectors (1 when models set a weight)")] = 0.3,
    weight: Weight = 1.0,
    normalize: Annotated[bool, Field(
        description="divide the sum by Σt w_t (mergekit's `normalize`, default false)")] = False,
    rescale: L1Rescale = False,
    trim_count: TrimCount = "ceil",
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Sparse "breadcrumbs" then task arithmetic: θ = θ0 + λ · Σt w_t mt ⊙ τt.

    Per tensor (the paper's layer) and task, mt drops the ⌊γN⌋ largest |τt| (outliers) and then
    the smallest, so that k = ceil(density · N) entries remain:
    mt = [h_low ≤ |τt| ≤ h_high], h_low the (⌊γN⌋ + k)-th largest |τt|, h_high the (⌊γN⌋ + 1)-th
    (ties at a bound are kept). Every tensor, 1-D ones included, is masked this way, as in
    mergekit's `breadcrumbs` (sparsification `magnitude_outliers`). ``normalize`` divides by
    Σt w_t (unless within 1e-8 of 0); ``rescale`` scales each mt ⊙ τt back to ‖τt‖₁.

    Defaults: density 0.9 and gamma 0.01 are mergekit's documented example (gamma 0.01 is also
    its default); λ = 0.3 is task arithmetic's usual value without validation (the paper tunes
    λ on validation data), 1 when models set a weight (mergekit's λ; it requires weights).
    The thresholds are per-tensor order statistics, so a tensor is merged whole (not
    row-local)."""
    weights = ctx.per_model("weight", weight, len(tensors))
    merged = weigh(masked_task_vectors(base, tensors, density, gamma, rescale, ctx, trim_count),
                   weights).sum(dim=0)
    total = float(sum(weights))
    if normalize and abs(total) >= 1e-8:  # mergekit leaves a zero sum unnormalised
        merged.div_(total)
    return base + scale * merged


@merge_method(name="breadcrumbs_ties", reference_url="https://arxiv.org/abs/2312.06795",
              row_local=False, linear_in=("scale",), per_model_params=_PER_MODEL,
              mergekit=Mergekit(defaults=_MERGEKIT))
def breadcrumbs_ties(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    density: BreadcrumbsDensity = 0.9,
    gamma: Gamma = 0.01,
    scale: Annotated[float, Field(description="λ, the scale of the merged task vector "
                                              "(mergekit's `lambda`)")] = 1.0,
    weight: Weight = 1.0,
    normalize: Annotated[bool, Field(
        description="divide by the sum of the weights of the models that agree with the "
                    "elected sign (mergekit's `normalize`, default false: the disjoint "
                    "sum)")] = False,
    rescale: L1Rescale = False,
    trim_count: TrimCount = "ceil",
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Breadcrumbs' masks then TIES' elect + disjoint sum: θ = θ0 + λ · τ̄ over w_t mt ⊙ τt.

    mt as in ``breadcrumbs``; s = sign(Σt w_t mt ⊙ τt) element-wise (a zero sum takes the sign
    of the whole tensor's sum, then +); τ̄ is the sum of the entries whose sign is s (with
    ``normalize``: divided by the sum of those models' weights). mergekit's
    `breadcrumbs_ties`; the paper itself only adds the masked task vectors."""
    weights = ctx.per_model("weight", weight, len(tensors))
    tv = weigh(masked_task_vectors(base, tensors, density, gamma, rescale, ctx, trim_count),
               weights)
    return base + scale * ties_merge(tv, whole_sum=float(tv.sum()),
                                      aggregate="mean" if normalize else "sum",
                                      weights=weights, inplace=True)
