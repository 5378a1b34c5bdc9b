"""Arcee Fusion, as mergekit's ``arcee_fusion``: keep the other model's changes where they
matter most."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from neuromerge.methods.mergekit_inputs import copies_of_base, drop_listed_base, other_model
from neuromerge.registry import Mergekit, TensorContext, merge_method


def importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ1 − θ0| ⊙ KL(softmax(θ1) ‖ softmax(θ0)), the softmax and the KL along the last axis
    (one KL per row, broadcast over it), with 1e-8 added to both distributions (mergekit's)."""
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (other - base).abs() * kl


def _order_statistic(flat: torch.Tensor, q: float) -> torch.Tensor:
    # mergekit: sorted[int(q * (n - 1))] (the lower neighbour, no interpolation)
    index = int((torch.tensor(q, dtype=torch.float32) * (flat.numel() - 1)).long())
    return torch.kthvalue(flat, index + 1).values


@merge_method(name="arcee_fusion", reference_url="https://arcee.ai", row_local=False,
              mergekit=Mergekit(inputs=drop_listed_base), n_models=(1, 2))
def arcee_fusion(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Keep the other model's change where its importance is an upper outlier (mergekit's
    ``arcee_fusion``): s = |θ1 − θ0| ⊙ KL_row(softmax(θ1) ‖ softmax(θ0)) (softmax along the
    last axis), threshold T = Q2 + 1.5 (Q3 − Q1) over the whole tensor's s, and
    θ = θ0 + (θ1 − θ0) ⊙ [s ≥ T]. The quartiles are order statistics, sorted(s)[⌊q (n − 1)⌋].
    The models are the base and one other. Not row-local (the quartiles are the tensor's).

    mergekit estimates the quartiles of a tensor over 1,000,000 entries from 1,000,000 entries
    drawn at random; neuromerge uses every entry."""
    if copies_of_base(base, tensors):
        return base.clone()
    other = other_model("arcee_fusion", base, tensors)
    s = importance(other, base)
    flat = s.reshape(-1)
    q1, median, q3 = (_order_statistic(flat, q) for q in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    return base + (other - base) * (s >= threshold).to(base.dtype)
