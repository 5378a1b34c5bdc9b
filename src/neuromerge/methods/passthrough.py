"""Passthrough, as mergekit's ``passthrough``: one model's tensors, optionally scaled; with
``slices`` it stacks layer ranges of different models (frankenmerges)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from neuromerge.registry import Mergekit, TensorContext, merge_method


@merge_method(name="passthrough",
              reference_url="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
              per_model_params=("scale",), mergekit=Mergekit(first_model_is_base=True),
              n_models=(1, 1))
def passthrough(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    scale: Annotated[float, Field(description="factor on the model's tensors (mergekit's "
                                              "per-input `scale`; filters set it per tensor, "
                                              "e.g. 0 for o_proj in a duplicated layer)")] = 1.0,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """The one model's tensor, scaled: θ = s · θ1 (θ1 itself where s = 1, bit for bit).

    The base gives shapes only (without ``base_model`` it is the model itself). Used with
    ``slices`` (each slice one source) it copies layer ranges into a deeper or shallower model."""
    (s,) = ctx.per_model("scale", scale, len(tensors))
    out = tensors[0].to(base.dtype)
    return out if s == 1 else out * s
