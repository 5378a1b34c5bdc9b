"""Helpers shared by several test modules."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from neuromerge.registry import get_method


def toy_statistics(method: str, experts: Sequence[Mapping[str, torch.Tensor]]
                   ) -> list[dict[str, torch.Tensor]] | None:
    """Statistics tied to each model's own values (so they follow it when models are
    reordered), for the methods that need them: a Fisher of θt² (zero where θt is), and for
    every 2-D float tensor a Gram θtᵀθt (singular when it has fewer rows than columns); other
    tensors get no Gram (RegMean averages them). None for the other methods."""
    needs = get_method(method).needs
    if needs == "fisher":
        return [{k: v.float() ** 2 for k, v in e.items() if v.is_floating_point()}
                for e in experts]
    if needs == "regmean":
        return [{k: v.float().T @ v.float() for k, v in e.items()
                 if v.is_floating_point() and v.dim() == 2} for e in experts]
    return None
