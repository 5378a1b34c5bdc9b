"""Model Breadcrumbs (Davari & Belilovsky, arXiv 2312.06795): drop each task vector's largest and
smallest magnitudes per layer, then task arithmetic."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from neuromerge.kernels import floor_count, keep_count, kth_largest, magnitudes, task_vectors
from neuromerge.registry import TensorContext, merge_method


def breadcrumbs_mask(tv: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """The entries of one task vector that Breadcrumbs keeps (bool, shape of ``tv``).

    With N entries, k = ceil(density · N) entries are kept after the n_top = min(⌊gamma · N⌋,
    N − k) largest magnitudes are dropped: keep h_low ≤ |τ| ≤ h_high, h_low the (n_top + k)-th
    largest |τ| and h_high the (n_top + 1)-th largest (no upper bound when n_top = 0). Ties at
    either bound are kept (mergekit breaks them by sort order instead)."""
    n = tv.numel()
    if n == 0:
        return torch.ones_like(tv, dtype=torch.bool)
    k = keep_count(density, n)
    n_top = min(floor_count(gamma, n), n - k)
    mags = magnitudes(tv)
    keep = mags >= kth_largest(mags, n_top + k) if n_top + k < n else torch.ones_like(
        mags, dtype=torch.bool)
    if n_top > 0:
        keep &= mags <= kth_largest(mags, n_top + 1)
    return keep


@merge_method(name="breadcrumbs", reference_url="https://arxiv.org/abs/2312.06795",
              row_local=False, linear_in=("scale",))
def breadcrumbs(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    density: Annotated[float, Field(
        gt=0, le=1, description="fraction of each task vector's entries kept per tensor, after "
                                "the largest (gamma) and the smallest magnitudes are dropped "
                                "(mergekit's density)")] = 0.9,
    gamma: Annotated[float, Field(
        ge=0, lt=1, description="fraction of each task vector's largest magnitudes dropped per "
                                "tensor as outliers (mergekit's gamma, the paper's β)")] = 0.01,
    scale: Annotated[float, Field(description="λ, the scale of the summed masked task "
                                              "vectors")] = 0.3,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Sparse "breadcrumbs" then task arithmetic: θ = θ0 + λ · Σt mt ⊙ τt.

    Per tensor (the paper's layer) and task, mt drops the ⌊γN⌋ largest |τt| (outliers) and then
    the smallest, so that k = ceil(density · N) entries remain:
    mt = [h_low ≤ |τt| ≤ h_high], h_low the (⌊γN⌋ + k)-th largest |τt|, h_high the (⌊γN⌋ + 1)-th
    (ties at a bound are kept). Every tensor, 1-D ones included, is masked this way, as in
    mergekit's `breadcrumbs` (sparsification `magnitude_outliers`, no rescaling).

    Defaults: density 0.9 and gamma 0.01 are mergekit's documented example (gamma 0.01 is also
    its default); λ = 0.3 is task arithmetic's usual value without validation (the paper tunes
    λ on validation data). The thresholds are per-tensor order statistics, so a tensor is merged
    whole (not row-local)."""
    tv = task_vectors(base, tensors, base.dtype)
    for t in range(tv.shape[0]):
        tv[t].masked_fill_(~breadcrumbs_mask(tv[t], density, gamma), 0)
    return base + scale * tv.sum(dim=0)
