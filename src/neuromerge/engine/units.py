"""Units of work: each tensor of the plan whole, or in blocks of its neurons where its working
set exceeds the memory budget (or, for row-local methods, where the methods' working copies
would dwarf its inputs)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from neuromerge.engine.plan import Rows, TensorPlan, Unit
from neuromerge.io.reader import CheckpointReader, TensorMeta
from neuromerge.method_api import default_working_set

#: Entries of a tensor merged at a time when its inputs fit the budget but the methods' working
#: copies (task vectors, masks, per-neuron parts: tens of bytes per entry) would dwarf them: an
#: embedding or LM head is then merged in row blocks from inputs read once and held as stored.
COMPUTE_BLOCK_ENTRIES = 1 << 21


def bytes_per_entry(n_experts: int, in_itemsize: int, cdtype: torch.dtype,
                    working_set: Callable[[int, int], int] = default_working_set) -> int:
    """Peak bytes the engine holds per tensor entry in flight: the inputs as stored for the
    tensor being merged and the one being read ahead, plus the method's working copies
    (``working_set(n_experts, compute itemsize)``, ``MethodSpec.working_set``). Measured peaks
    stay below this (tests/test_memory.py)."""
    c = 8 if cdtype == torch.float64 else 4
    return 2 * (n_experts + 1) * in_itemsize + working_set(n_experts, c)


def split_rows(meta: TensorMeta, max_entries: int, axis: int = 0) -> list[Rows]:
    """Blocks along ``axis`` (the neuron axis) of at most ``max_entries`` entries (at least one
    neuron each); ``[None]`` when the tensor fits whole."""
    if meta.numel <= max_entries or len(meta.shape) == 0 or meta.shape[axis] <= 1:
        return [None]
    n = meta.shape[axis]
    row = max(1, meta.numel // n)
    step = max(1, max_entries // row)
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def plan_units(plan: Sequence[TensorPlan], base: CheckpointReader,
               experts: Sequence[CheckpointReader], budget: int, cdtype: torch.dtype, *,
               row_local: bool = False,
               working_set: Callable[[int, int], int] = default_working_set
               ) -> tuple[list[Unit], set[str]]:
    """Each tensor whole, or in row blocks where its working set exceeds ``budget``; for a
    ``row_local`` method, tensors of more than ``COMPUTE_BLOCK_ENTRIES`` entries are also merged
    in row blocks, read whole once (the returned names: held as stored while their blocks are
    merged)."""
    units: list[Unit] = []
    held: set[str] = set()
    compute_block = COMPUTE_BLOCK_ENTRIES if row_local else None
    for p in plan:
        if p.kind == "copy":
            itemsize, n_exp = p.meta.dtype.itemsize, 0
        else:
            itemsize = max([p.meta.dtype.itemsize] +
                           [ex.meta(src.name).dtype.itemsize
                            for ex, src in zip(experts, p.sources[1:], strict=True)])
            n_exp = len(experts)
        per_entry = bytes_per_entry(n_exp, itemsize, cdtype, working_set)
        rows = split_rows(p.meta, max(1, budget // per_entry), p.neuron_axis)
        # inputs as stored (this tensor's and the next one's) plus one block's working set
        stored = 2 * (n_exp + 1) * itemsize * p.meta.numel
        # a 1-D tensor stays whole: some row-local methods rank it as one row (della)
        if (rows == [None] and compute_block and p.kind != "copy" and len(p.meta.shape) > 1
                and stored + per_entry * compute_block <= budget):
            rows = split_rows(p.meta, compute_block, p.neuron_axis)
            if rows != [None]:
                held.add(p.name)
        units.extend(Unit(p, r) for r in rows)
    return units, held


def group_by_tensor(units: Sequence[Unit]) -> Iterator[tuple[str, list[Unit]]]:
    """Consecutive units of the same tensor, as (name, units)."""
    group: list[Unit] = []
    for u in units:
        if group and u.plan.name != group[0].plan.name:
            yield group[0].plan.name, group
            group = []
        group.append(u)
    if group:
        yield group[0].plan.name, group
