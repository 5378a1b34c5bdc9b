"""PCB-Merging: Parameter Competition Balancing (Du et al., NeurIPS 2024)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Annotated

import torch
from pydantic import Field

from neuromerge.kernels import keep_count, task_vectors
from neuromerge.registry import TensorContext, merge_method


def _minmax_(x: torch.Tensor) -> torch.Tensor:
    """Each row of ``x`` (T, N) mapped in place to [0, 1] by (x − min) / (max − min); a constant
    row gives 1 (the released code divides 0 by 0 there)."""
    lo = x.min(dim=1, keepdim=True).values
    span = x.max(dim=1, keepdim=True).values - lo
    x.sub_(lo).div_(torch.where(span > 0, span, torch.ones_like(span)))
    x[(span <= 0).squeeze(1)] = 1.0
    return x


def _ascending(x: torch.Tensor, index: int) -> torch.Tensor:
    """Each row's value at ``index`` of its ascending sort, shape (T, 1)."""
    return torch.kthvalue(x, index + 1, dim=1, keepdim=True).values


def pcb_weights(tv: torch.Tensor, ratio: float, clip: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped task vectors τ̂ and their PCB weights w, both (T, N), from flat task vectors
    ``tv`` (T, N), which this overwrites.

    As the released ``pcb-merging.py``, per task t over its N entries:
    |τ̂t| = |τt| clipped to its values at ascending positions ⌊N·clip⌋ and ⌊N(1 − clip) − 1⌋;
    intra_t = exp(T · minmax(|τ̂t|)²); inter_t = tanh(τt ⊙ Σs τs); score_t = intra_t ⊙ inter_t;
    q_t = the k-th largest score, k = ceil(ratio · N) (the released code's position
    ⌊N(1 − ratio)⌋); w_t = (max(score_t, q_t) − q_t) / (max score_t − q_t). Where the top scores
    all tie (max = q_t) they get weight 1, and the task's zero entries weight 0 (an all-zero task
    vector, a frozen tensor: the released code divides 0 by 0 there)."""
    t_count, n = tv.shape
    # int(d * ratio) positions of the released code, in exact decimal arithmetic
    c = Fraction(repr(float(clip)))
    lo_at, hi_at = min(n - 1, math.floor(c * n)), min(n - 1, max(0, math.floor(n * (1 - c) - 1)))
    score = tv * tv.sum(dim=0)
    score.tanh_()  # inter-balancing
    clipped = tv.abs()
    clipped = torch.minimum(torch.maximum(clipped, _ascending(clipped, lo_at)),
                            _ascending(clipped, hi_at))
    # intra-balancing as exp(T·(x² − 1)) = exp(T·x²) / exp(T): the same scores up to a per-task
    # factor, which the per-task min-max normalisation of the weights cancels; never overflows
    intra = _minmax_(clipped.clone()).square_().sub_(1).mul_(t_count).exp_()
    score.mul_(intra)
    del intra
    signed = clipped.mul_(tv.sign_())  # sign(0) = 0: a zero entry stays 0
    q = _ascending(score, n - keep_count(ratio, n))
    top = score.max(dim=1, keepdim=True).values
    span = top - q
    ties = (span <= 0).squeeze(1)
    tied_top = (score[ties] == top[ties]) & (signed[ties] != 0)
    weights = torch.maximum(score, q, out=score)  # in place: the scores are not needed after
    weights.sub_(q).div_(torch.where(span > 0, span, torch.ones_like(span)))
    weights[ties] = tied_top.to(weights.dtype)
    return signed, weights


@merge_method(name="pcb", reference_url="https://arxiv.org/abs/2410.02396", row_local=False,
              linear_in=("scale",))
def pcb(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    ratio: Annotated[float, Field(
        gt=0, le=1, description="fraction of each task's entries with the highest balancing "
                                "scores that keep a weight (pcb_ratio; the rest are dropped)")]
    = 0.1,
    clip: Annotated[float, Field(
        ge=0, lt=0.5, description="share of each task's smallest and largest magnitudes "
                                  "clipped as outliers before scoring (min_ratio = max_ratio of "
                                  "the released code)")] = 0.0001,
    scale: Annotated[float, Field(description="λ, the scale of the merged task vector")] = 1.0,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Parameter competition balancing: θ = θ0 + λ · Σt wt ⊙ τ̂t / Σt wt.

    Per tensor and task t, the released code's rules: τ̂t is τt with its magnitudes clipped to
    their `clip` and 1 − `clip` quantiles; intra-balancing exp(T · Norm(|τ̂t|)²) (the code's form
    of the paper's Softmax(T · Norm(τt ⊙ τt)): a softmax denominator is a per-task factor, which
    the per-task weight normalisation cancels); inter-balancing tanh(τt ⊙ Σs τs) (the code's form
    of the paper's Σs Softmax(Norm(τt ⊙ τs))); score = intra ⊙ inter; entries below the task's
    k-th largest score (k = ceil(ratio · N)) are dropped and the rest get weights
    wt = (score − q) / (max − q) ∈ [0, 1]; the merged entry is the weighted mean of the τ̂t (0
    where every weight is 0). Norm is a min-max normalisation over the task's entries.

    The released code scores the whole flattened model at once; this engine streams tensor by
    tensor, so quantiles and normalisations are taken per tensor, and a tensor is merged whole
    (not row-local). Defaults: ratio 0.1 and clip 0.0001 are `pcb-merging.py`'s; λ = 1 because
    the result is a weighted mean (the released scripts search λ on validation data, from about
    0.8 to 2)."""
    tv = task_vectors(base, tensors, base.dtype).reshape(len(tensors), -1)
    if tv.shape[1] == 0:
        return base.clone()
    signed, weights = pcb_weights(tv, ratio, clip)
    del tv
    total = weights.sum(dim=0)
    merged = (signed * weights).sum(dim=0) / total.clamp(min=1e-12)
    return base + scale * merged.reshape(base.shape)
