"""Consensus merging with TALL masks (Wang et al., ICML 2024, "Localizing Task Information for
Improved Model Merging and Compression"): keep only the weights that at least k tasks need."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Annotated, Literal

import torch
from pydantic import Field

from neuromerge.kernels import each_task_vector, task_vectors, ties_merge, trim
from neuromerge.params import ConsensusK, Density, TallLambda, TrimScope
from neuromerge.registry import TensorContext, merge_method

_REFERENCE = "https://arxiv.org/abs/2405.07813"


def tall_mask_counts(taus: Iterable[torch.Tensor], multi: torch.Tensor, lam: float
                     ) -> torch.Tensor:
    """How many tasks' TALL masks keep each entry: Σt [|τt| > λ · |τ_MTL − τt|], with
    ``multi`` = τ_MTL the unscaled multi-task vector and ``taus`` the untrimmed task vectors (the
    reference code builds the masks from the checkpoints), one at a time."""
    count = torch.zeros(multi.shape, dtype=torch.int32, device=multi.device)
    for tau in taus:
        count += tau.abs() > lam * (multi - tau).abs()
    return count


@merge_method(name="consensus_ta", reference_url=_REFERENCE, linear_in=("scale",))
def consensus_ta(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    k: ConsensusK = 2,
    tall_lambda: TallLambda = 0.4,
    scale: Annotated[float, Field(description="λ, the scale of the masked summed task "
                                              "vectors")] = 0.3,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Consensus Task Arithmetic: θ = θ0 + λ · m ⊙ τ_MTL, τ_MTL = Σt τt, m = [Σt mt ≥ k].

    TALL mask of task t: mt = [|τt| > λ_TALL · |τ_MTL − τt|] (the task's own update outweighs
    what the other tasks add at that entry). The consensus mask keeps the entries at least k
    tasks need, removing "selfish" (one task) and "catastrophic" (no task) weights.

    Defaults: k = 2 (the reference code's `prun_thre_k`); λ_TALL = 0.4, the middle of the grid
    {0.2, ..., 0.6} from which the paper picks each task's λ on validation data (one λ for all
    tasks here); λ = 0.3 as task arithmetic without validation. Element-wise, so row-local."""
    tv = task_vectors(base, tensors, base.dtype)
    multi = tv.sum(dim=0)
    keep = tall_mask_counts(tv, multi, tall_lambda) >= k
    return base + scale * torch.where(keep, multi, torch.zeros((), dtype=multi.dtype,
                                                               device=multi.device))


@merge_method(name="consensus_ties", reference_url=_REFERENCE, trims=True, linear_in=("scale",))
def consensus_ties(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    density: Density = 0.2,
    trim_scope: TrimScope = "global",
    k: ConsensusK = 2,
    tall_lambda: TallLambda = 0.4,
    aggregate: Annotated[Literal["sum", "mean"], Field(
        description="disjoint aggregation of the agreeing entries: sum (the reference code's "
                    "'dis-sum') or mean (TIES' disjoint mean)")] = "sum",
    scale: Annotated[float, Field(description="λ, the scale of the masked merged task "
                                              "vector")] = 0.3,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Consensus TIES: θ = θ0 + λ · m ⊙ τ_MTL, τ_MTL = TIES(τ1..τT), m = [Σt mt ≥ k].

    τ_MTL is TIES on the trimmed task vectors (shared trim, elect, disjoint sum or mean, unscaled);
    TALL masks mt = [|τt| > λ_TALL · |τ_MTL − τt|] compare the untrimmed τt with it, and the
    consensus mask keeps the entries at least k tasks need.

    Defaults: density 0.2 (top-20%) and the disjoint sum, as the reference code runs TIES for
    consensus merging; k = 2; λ_TALL = 0.4 (the middle of the paper's per-task grid 0.2-0.6);
    λ = 0.3, as for summed task vectors without validation (with `aggregate: mean` the TIES
    convention λ = 1 applies). Row-local (the trim thresholds and tie-break sums come from the
    engine)."""
    tv = trim(task_vectors(base, tensors, base.dtype), density, ctx.thresholds, inplace=True)
    multi = ties_merge(tv, whole_sum=ctx.tensor_sum("tv", tv.sum), aggregate=aggregate)
    del tv  # trimmed in place: the masks need the untrimmed task vectors, rebuilt one by one
    keep = tall_mask_counts(each_task_vector(base, tensors, multi.dtype), multi, tall_lambda) >= k
    return base + scale * torch.where(keep, multi, torch.zeros((), dtype=multi.dtype,
                                                               device=multi.device))
