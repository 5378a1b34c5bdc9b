"""SLERP of the base and one other model, as mergekit's ``slerp``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from neuromerge.methods.mergekit_inputs import copies_of_base, drop_listed_base, other_model
from neuromerge.registry import Mergekit, TensorContext, merge_method

#: mergekit's thresholds: |cos Ω| above DOT_THRESHOLD interpolates linearly; a norm at or below
#: EPS is taken as 1 (the tensor is not normalised).
DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, *,
                  dot_threshold: float = DOT_THRESHOLD, eps: float = EPS) -> torch.Tensor:
    """mergekit's ``slerp(t, v0, v1)`` on whole tensors (each flattened to one vector), in float32
    unless the inputs are float64; the result has v0's shape and the working dtype."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(-1).to(dtype)
    b = v1.reshape(-1).to(dtype)
    if a.numel() == 0:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    # ⟨a, b⟩ / (‖a‖‖b‖) rather than mergekit's sum of normalised products: no temporaries the
    # size of the tensor (an embedding is the largest), the same value to float32 rounding
    dot = (torch.dot(a, b) / (norm_a * norm_b)).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    tt = torch.tensor(t, dtype=dtype)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return torch.mul(b, coef_b).add_(a, alpha=float(coef_a)).reshape(v0.shape)


@merge_method(name="slerp", reference_url="https://en.wikipedia.org/wiki/Slerp",
              row_local=False, mergekit=Mergekit(inputs=drop_listed_base), n_models=(1, 2))
def slerp(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    t: Annotated[float, Field(description="interpolation factor: 0 gives the base, 1 the other "
                                          "model (mergekit's `t`, which it requires)")] = 0.5,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Spherical interpolation of the base θ0 and the one other model θ1, each tensor flattened
    to one vector (mergekit's ``slerp``): with cos Ω = ⟨θ0/‖θ0‖, θ1/‖θ1‖⟩ clamped to [−1, 1],
    θ = sin((1−t)Ω)/sin Ω · θ0 + sin(tΩ)/sin Ω · θ1, and θ = (1−t) θ0 + t θ1 where |cos Ω| >
    0.9995 (colinear or antipodal). A norm ≤ 1e-8 is taken as 1 in cos Ω (mergekit's epsilon).

    The models are the base and one other (a base listed under ``models`` too is dropped);
    computed in float32 unless the inputs are float64. Not row-local: the norms are the whole
    tensor's."""
    if copies_of_base(base, tensors):
        return base.clone()
    return slerp_tensors(t, base, other_model("slerp", base, tensors)).to(base.dtype)
