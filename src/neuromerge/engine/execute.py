"""The local executor: runs a :class:`~neuromerge.engine.plan.MergePlan` on this machine. The
merge-wide passes first (trim thresholds and σ; a blocked tensor's own thresholds and tie-break
sums), then every unit in plan order, the next one read while this one is merged, each result
handed to the sink."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from neuromerge.engine import trim_pass
from neuromerge.engine.inputs import DataStatistics, Inputs, all_finite
from neuromerge.engine.plan import MergePlan, TensorPlan, Unit, from_neurons, kind_counts
from neuromerge.engine.result import MergeResult, TensorSink
from neuromerge.engine.units import group_by_tensor
from neuromerge.errors import InputError
from neuromerge.io.dtypes import dtype_name
from neuromerge.io.reader import CheckpointReader, TensorMeta
from neuromerge.method_api import MethodSpec, TensorContext, TrimSummary

log = logging.getLogger("neuromerge")


@dataclass
class MergeJob:
    """A prepared merge (:func:`neuromerge.engine.prepare`): the plan, the method, and the open
    readers the plan's sources name (the base, the experts in order, their statistics)."""

    plan: MergePlan
    method: MethodSpec
    base: CheckpointReader
    experts: Sequence[CheckpointReader]
    statistics: DataStatistics | None = None
    read_ahead: bool = True
    prepare_seconds: float = 0.0

    def output_metas(self) -> list[tuple[str, TensorMeta]]:
        """Name, shape and written dtype of every output tensor, in plan order (for a writer)."""
        return [(p.name, TensorMeta(p.meta.shape, p.out_dtype)) for p in self.plan.tensors]

    def execute(self, sink: TensorSink, *, progress: bool = True) -> MergeResult:
        """Run the plan on this machine, handing every merged tensor (or row block) to ``sink``."""
        return _Execution(self, progress).run(sink)


class _Execution:
    """One run of a job: its inputs, the trim pass's results and the resolved parameters."""

    def __init__(self, job: MergeJob, progress: bool) -> None:
        self.job, self.plan, self.method, self.progress = job, job.plan, job.method, progress
        self.inputs = Inputs(job.base, job.experts, self.plan.device, self.plan.compute_dtype,
                             read_ahead=job.read_ahead, held=self.plan.held,
                             band=self.plan.memory.band)
        self.seconds: dict[str, float] = {}
        self.block_thresholds: dict[str, tuple[float, ...]] = {}
        self.trim: TrimSummary | None = None
        self.params: dict[str, Any] = {}

    def run(self, sink: TensorSink) -> MergeResult:
        t0 = time.perf_counter()
        self.plan.memory.tune_heap()
        if trim_pass.needs_trim_pass(self.method, self.plan.tensors):
            t1 = time.perf_counter()
            self.trim = trim_pass.trim_pass(
                self.plan.units, self.inputs, scope=self.plan.params["trim_scope"],
                progress=self.progress, block_thresholds=self.block_thresholds)
            self.seconds["trim_pass"] = time.perf_counter() - t1
            self.plan.memory.trim_heap()  # the selects' histograms
        self.params = self.method.resolved(dict(self.plan.params), self.trim)
        log_resolved(self.method.name, self.params, self.trim, self.plan.tensors)
        t2 = time.perf_counter()
        self.merge_units(sink)
        self.seconds["merge"] = time.perf_counter() - t2
        self.seconds["total"] = time.perf_counter() - t0 + self.job.prepare_seconds
        return self.result()

    def merge_units(self, sink: TensorSink) -> None:
        plan = self.plan
        bar = tqdm(total=sum(p.meta.nbytes for p in plan.tensors), desc=f"merge ({plan.method})",
                   unit="B", unit_scale=True, disable=not self.progress, dynamic_ncols=True)
        groups = {name: g for name, g in group_by_tensor(plan.units) if g[0].rows is not None}
        block_fields: dict[str, dict[str, Any]] = {}
        self.inputs.release()  # what the trim pass held
        with bar:
            # one stream over every unit, so the next tensor is read while this one is merged
            # even across tensors merged in row blocks
            for u, b, exs in self.inputs.stream(plan.units):
                p = u.plan
                bar.set_postfix_str(p.name[-40:], refresh=False)
                group = groups.get(p.name)
                if group is not None and u is group[0] and p.kind != "copy":
                    block_fields[p.name] = self.prepare_blocks(group)
                out = b if p.kind == "copy" else self.merged(u, b, exs, block_fields.get(p.name))
                if p.meta.dtype.is_floating_point and out.dtype != p.out_dtype:
                    out = out.to(p.out_dtype)
                out = from_neurons(out.cpu(), p.neuron_axis)
                if u.rows is None:
                    sink.write(p.name, out)
                else:
                    sink.write(p.name, out, u.rows[0], axis=p.neuron_axis)
                bar.update(u.numel * p.meta.dtype.itemsize)
                last_block = group is not None and u is group[-1]
                if last_block:
                    self.inputs.release(p.name)
                    block_fields.pop(p.name, None)
                del out, b, exs
                if u.rows is None or last_block:
                    plan.memory.trim_heap()

    def prepare_blocks(self, group: Sequence[Unit]) -> dict[str, Any]:
        fields = trim_pass.prepare_blocks(group, self.inputs, self.method, group[0].plan.density,
                                          self.global_thresholds, self.block_thresholds,
                                          self.merge_unit)
        self.plan.memory.trim_heap()
        return fields

    @property
    def global_thresholds(self) -> tuple[float, ...] | None:
        if self.trim is not None and self.plan.params.get("trim_scope") == "global":
            return self.trim.thresholds
        return None

    def merged(self, u: Unit, b: torch.Tensor, exs: list[torch.Tensor],
               fields: Mapping[str, Any] | None) -> torch.Tensor:
        p = u.plan
        fields = fields if fields is not None else {"thresholds": self.global_thresholds}
        out = self.merge_unit(u, b, exs, **fields).to(p.out_dtype)
        if not all_finite(out):
            raise InputError(f"tensor {p.name!r}: the merged values are not finite in "
                             f"{dtype_name(p.out_dtype)} (overflow? lower the scale or use a "
                             f"wider out_dtype)")
        return out

    def merge_unit(self, u: Unit, b: torch.Tensor, exs: list[torch.Tensor],
                   **ctx_fields: Any) -> torch.Tensor:
        stats = self.job.statistics
        ctx = TensorContext(name=u.plan.name, kind=u.plan.kind,  # type: ignore[arg-type]
                            model_seeds=self.plan.model_seeds,
                            row_offset=u.rows[0] if u.rows else 0,
                            model_params=u.plan.model_params or None,
                            statistics=stats.read(u) if stats else None, **ctx_fields)
        dev = self.plan.device
        return self.method.merge_tensor(self.inputs.to_compute(b), [e.to(dev) for e in exs],
                                        ctx, self.tensor_params(u.plan))

    def tensor_params(self, p: TensorPlan) -> dict[str, Any]:
        """The tensor's parameters, resolved (the merge-wide ones unless the plan set its own)."""
        if p.params == self.plan.params:
            return self.params
        return self.method.resolved(dict(p.params), self.trim)

    def result(self) -> MergeResult:
        plan = self.plan
        return MergeResult(
            method=plan.method, params=self.params, trim=self.trim,
            counts=kind_counts(plan.tensors), seconds=self.seconds,
            model_names=list(plan.models), bytes_read=self.inputs.bytes_read,
            extra={"copied": {p.name: p.reason for p in plan.tensors if p.kind == "copy"},
                   "row_blocks": plan.budget_blocks(), "memory_budget": plan.memory.budget,
                   "compute_blocks": {n: k for n, k in plan.blocks().items() if n in plan.held},
                   "architecture": plan.architecture.record(),
                   "neuron_axes": {p.name: p.neuron_axis for p in plan.tensors
                                   if p.neuron_axis != 0},
                   "tied": dict(plan.tied),
                   "tensor_params": {p.name: plan.tensor_values(p) for p in plan.tensors
                                     if p.kind != "copy"} if plan.varying else {}})


def log_resolved(method: str, params: Mapping[str, Any], trim: TrimSummary | None,
                 plan: Sequence[TensorPlan]) -> None:
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())
    counts = kind_counts(plan)
    log.info("method %s: %s", method, shown)
    log.info("tensors: %d neuronal, %d point, %d copied from the base",
             counts["neuronal"], counts["point"], counts["copy"])
    if trim is not None:
        sig = ", ".join(f"{s:.4f}" for s in trim.sigma)
        log.info("trim (%s, density %s): σ per task = [%s]", trim.scope, trim.density, sig)
        if "lambda2" in params:
            log.info("lambda2 resolved to %.6g (= 1/(1 - max σ))", params["lambda2"])


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)
