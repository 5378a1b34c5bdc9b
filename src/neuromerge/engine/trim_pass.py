"""The merge-wide quantities a pass computes before the merge: each task's trim thresholds and
L1 masses (a global trim, ``lambda2: auto``), and, for a tensor merged in row blocks, its own
trim thresholds and the tensor-wide sums its tie-breaks read."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from tqdm.auto import tqdm

from neuromerge.engine.inputs import Inputs
from neuromerge.engine.plan import TensorPlan, Unit
from neuromerge.engine.units import group_by_tensor
from neuromerge.kernels import keep_count, kth_largest, per_task
from neuromerge.method_api import MethodSpec, SumCollector, SumsCollected, TrimSummary
from neuromerge.thresholds import MagnitudeSelect, band_from

log = logging.getLogger("neuromerge")


def needs_trim_pass(method: MethodSpec, tensors: Sequence[TensorPlan]) -> bool:
    """Whether any merged tensor needs the merge-wide trim pass (a global trim, ``auto``)."""
    return any(method.needs_trim_pass(p.params, p.model_params.get("density"))
               for p in tensors if p.kind != "copy")


def trim_pass(units: Sequence[Unit], inputs: Inputs, *,
              density: float | Sequence[float] | None = None, scope: str,
              progress: bool = False,
              block_thresholds: dict[str, tuple[float, ...]] | None = None) -> TrimSummary:
    """Each task's trim threshold (global scope) and L1 mass before/after the trim, streamed
    (``density``: one for every task, or one per task where models set their own; None: each
    tensor's own, ``TensorPlan.density``, which a global trim needs to be the same for all).

    With the per-tensor scope, the thresholds of tensors merged in row blocks are stored in
    ``block_thresholds`` for the merge pass."""
    merged = [u for u in units if u.plan.kind != "copy"]
    n_tasks = len(inputs.experts)

    def densities_of(p: TensorPlan) -> list[float]:
        return per_task(p.density if density is None else density, n_tasks)

    # per task; a global trim has the same for every tensor (prepare refuses other plans)
    densities = densities_of(merged[0].plan) if merged else [1.0] * n_tasks
    every = {d for u in merged for d in densities_of(u.plan)} or {1.0}
    density = densities[0] if len(every) == 1 else min(every)
    n = sum(u.numel for u in merged)
    if scope == "global" and density < 1 and n > 0:
        # one select pass serves every distinct k; each task reads its own k's result
        task_ks = [keep_count(d, n, merged[0].plan.trim_count) for d in densities]
        ks = sorted(set(task_ks))
        l1, per_k = select_over(merged, inputs, ks, progress=progress,
                                desc=("trim pass 1/2", "trim pass 2/2"))
        results = [per_k[ks.index(k)][t] for t, k in enumerate(task_ks)]
        # a task kept whole (density 1) has threshold 0: every entry is kept
        results = [(0.0, l1[t]) if densities[t] >= 1 else r for t, r in enumerate(results)]
        return TrimSummary(density, scope, n, task_ks[0] if len(ks) == 1 else None,
                           tuple(r[0] for r in results), tuple(l1), tuple(r[1] for r in results))
    total, kept = _per_tensor_masses(merged, inputs, densities_of, progress, block_thresholds)
    return TrimSummary(density, scope, n, None, None, tuple(total), tuple(kept))


def _per_tensor_masses(merged: Sequence[Unit], inputs: Inputs,
                       densities_of: Callable[[TensorPlan], list[float]], progress: bool,
                       block_thresholds: dict[str, tuple[float, ...]] | None
                       ) -> tuple[list[float], list[float]]:
    """Per-tensor trim: a tensor's threshold needs all of it, so blocked tensors use the
    streaming select over their blocks (thresholds kept for the merge), the others a k-th
    value."""
    total = [0.0] * len(inputs.experts)
    kept = [0.0] * len(inputs.experts)
    whole = [u for u in merged if u.rows is None]
    for u, base, experts in bar(inputs.stream(whole), progress, "trim pass", whole):
        densities = densities_of(u.plan)
        for t, mags in inputs.task_magnitudes(base, experts):
            l1 = float(mags.sum(dtype=torch.float64))
            total[t] += l1
            if densities[t] >= 1 or mags.numel() == 0:
                kept[t] += l1
            else:
                h = kth_largest(mags, keep_count(densities[t], u.plan.meta.numel,
                                                 u.plan.trim_count))
                kept[t] += float(mags[mags >= h].sum(dtype=torch.float64))
    for name, group in group_by_tensor([u for u in merged if u.rows is not None]):
        hs, tot, kep = blocked_tensor_trim(group, inputs, densities_of(group[0].plan))
        if hs is not None and block_thresholds is not None:
            block_thresholds[name] = hs
        for t in range(len(inputs.experts)):
            total[t] += tot[t]
            kept[t] += kep[t]
    return total, kept


def select_over(units: Sequence[Unit], inputs: Inputs, ks: Sequence[int], *,
                progress: bool = False, desc: tuple[str, str] = ("", "")
                ) -> tuple[list[float], list[list[tuple[float, float]]]]:
    """Each task's ‖τt‖₁ over ``units`` and, for every k in ``ks``, its exact k-th largest |τt|
    and the L1 mass at or above it: one histogram pass, then one pass refining every k.

    A sample of about 1/32 of the rows, read first, tells which coarse bins the k-th values are
    likely in; the histogram pass keeps those at full resolution, so the refining pass (a second
    read of every input) only runs for a task whose k-th value fell outside them."""
    coarse = [MagnitudeSelect(inputs.device) for _ in inputs.experts]
    if ks:
        for select, band in zip(coarse, _sample_bands(units, inputs, ks), strict=True):
            if band is not None:
                select.set_band(*band)
    for _, base, experts in bar(inputs.stream(units), progress and bool(desc[0]), desc[0],
                                units):
        for t, mags in inputs.task_magnitudes(base, experts):
            coarse[t].add(mags)
    forks = [[s.fork(k) for s in coarse] for k in ks]
    pending = [t for t in range(len(coarse)) if any(per_k[t].needs_refine for per_k in forks)]
    if pending:
        log.debug("trim pass: a second read for tasks %s (k-th value outside the sampled band)",
                  pending)
        for _, base, experts in bar(inputs.stream(units), progress and bool(desc[1]), desc[1],
                                    units):
            for t, mags in inputs.task_magnitudes(base, experts):
                for per_k in forks:
                    per_k[t].refine(mags)
    return [s.total_l1 for s in coarse], [[f.result() for f in per_k] for per_k in forks]


#: Rows sampled to guess the trim thresholds' coarse bins: 1/_SAMPLE_EVERY of each tensor's rows,
#: in _SAMPLE_BLOCKS evenly spaced runs (whole tensors below _SAMPLE_MIN entries).
_SAMPLE_EVERY, _SAMPLE_BLOCKS, _SAMPLE_MIN = 32, 4, 1 << 16


def _sample_units(units: Sequence[Unit]) -> list[Unit]:
    out = []
    for u in units:
        if u.numel < _SAMPLE_MIN or len(u.plan.meta.shape) < 2:
            out.append(u)
            continue
        start, stop = u.rows if u.rows is not None else (0, u.plan.meta.shape[u.plan.neuron_axis])
        run = max(1, (stop - start) // (_SAMPLE_EVERY * _SAMPLE_BLOCKS))
        step = (stop - start) // _SAMPLE_BLOCKS
        out.extend(replace(u, rows=(start + i * step, start + i * step + run))
                   for i in range(_SAMPLE_BLOCKS))
    return out


def _sample_bands(units: Sequence[Unit], inputs: Inputs, ks: Sequence[int]
                  ) -> list[tuple[int, int] | None]:
    """Per task, the coarse bins (lo, hi) that likely hold every k-th largest |τt|."""
    samples = [MagnitudeSelect(inputs.device, track_l1=False) for _ in inputs.experts]
    # Over one held tensor (its own trim) the sample is sliced from the inputs in memory; over
    # the whole model it is read from the files, so held tensors are not read in full for it.
    one_tensor = len({u.plan.name for u in units}) == 1
    for _, base, experts in inputs.stream(_sample_units(units), hold=one_tensor):
        for t, mags in inputs.task_magnitudes(base, experts):
            samples[t].add(mags)
    n = sum(u.numel for u in units)
    bands: list[tuple[int, int] | None] = []
    for sample in samples:
        per_k = [band_from(sample, k, n, max_band=inputs.band) for k in ks]
        lo, hi = min(b[0] for b in per_k), max(b[1] for b in per_k)
        bands.append((lo, hi) if hi - lo < inputs.band else per_k[0])
    return bands


def blocked_tensor_trim(group: Sequence[Unit], inputs: Inputs,
                        density: float | Sequence[float]
                        ) -> tuple[tuple[float, ...] | None, list[float], list[float]]:
    """Per-task threshold and L1 masses of one tensor's own trim, over its row blocks."""
    densities = per_task(density, len(inputs.experts))
    if all(d >= 1 for d in densities):
        totals = select_over(group, inputs, [])[0]
        return None, totals, list(totals)
    task_ks = [keep_count(d, group[0].plan.meta.numel, group[0].plan.trim_count)
               for d in densities]
    ks = sorted(set(task_ks))
    totals, per_k = select_over(group, inputs, ks)
    results = [(0.0, totals[t]) if densities[t] >= 1 else per_k[ks.index(k)][t]
               for t, k in enumerate(task_ks)]
    return tuple(r[0] for r in results), totals, [r[1] for r in results]


def prepare_blocks(segment: Sequence[Unit], inputs: Inputs, method: MethodSpec,
                   density: float | Sequence[float], thresholds: tuple[float, ...] | None,
                   block_thresholds: dict[str, tuple[float, ...]],
                   merge_unit: Callable[..., torch.Tensor]) -> dict[str, Any]:
    """What a tensor merged in row blocks needs from all of it: its own trim thresholds (per-
    tensor trim) and the tensor-wide sums the method's tie-breaks read, collected by running the
    method over the blocks, each run stopped once it has given its sums (no pass at all when the
    first block asks for none)."""
    name = segment[0].plan.name
    if thresholds is None and method.trims and min(per_task(density, len(inputs.experts))) < 1:
        if name not in block_thresholds:
            hs = blocked_tensor_trim(segment, inputs, density)[0]
            if hs is not None:
                block_thresholds[name] = hs
        thresholds = block_thresholds.get(name)
    collector = SumCollector()
    for i, (u, b, exs) in enumerate(inputs.stream(segment)):
        collector.calls = 0
        try:
            merge_unit(u, b, exs, thresholds=thresholds, collect=collector)
        except SumsCollected:
            continue
        if i == 0:
            if collector.calls == 0:
                break
            collector.stop_after = collector.calls
    return {"thresholds": thresholds, "sums": collector.values or None}


def bar(items: Any, progress: bool, desc: str, sized: Sequence[Any] | None = None) -> Any:
    return tqdm(items, desc=desc, unit="tensor", disable=not progress, leave=False,
                dynamic_ncols=True, total=len(sized) if sized is not None else None)
