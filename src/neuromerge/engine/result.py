"""What a merge gives back: the merged tensors go to a sink (a sharded safetensors writer, or a
dict for in-memory merges), the record of what was done to a :class:`MergeResult`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from neuromerge.engine.plan import TensorPlan
from neuromerge.method_api import TrimSummary


@dataclass
class MergeResult:
    """What a merge did: resolved parameters (``lambda2`` as a number), the trim pass's summary
    (each task's σ), tensor counts, timings; the state dict for in-memory merges."""

    method: str
    params: dict[str, Any]
    trim: TrimSummary | None
    counts: dict[str, int]
    seconds: dict[str, float]
    model_names: list[str]
    output: Any = None
    state_dict: dict[str, torch.Tensor] | None = None
    bytes_read: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class TensorSink(Protocol):
    def write(self, name: str, tensor: torch.Tensor, row_start: int | None = None,
              axis: int = 0) -> None:
        """Take a merged tensor, or (``row_start`` given) the next block of one along ``axis``
        (in the stored layout)."""


class DictSink:
    """Collects the merged tensors in :attr:`state_dict` (blocks assembled in place)."""

    def __init__(self, plan: Sequence[TensorPlan] = ()) -> None:
        self.state_dict: dict[str, torch.Tensor] = {}
        self._shapes = {p.name: p.meta.shape for p in plan}

    def write(self, name: str, tensor: torch.Tensor, row_start: int | None = None,
              axis: int = 0) -> None:
        if row_start is None:
            self.state_dict[name] = tensor
            return
        if name not in self.state_dict:
            self.state_dict[name] = tensor.new_empty(self._shapes[name])
        self.state_dict[name].narrow(axis, row_start, tensor.shape[axis]).copy_(tensor)
