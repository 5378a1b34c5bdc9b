"""Merges made of several jobs (mergekit's ``slices``: each group of output layers merged from
its own models and parameters), run one after the other into one sink, with one plan to show
and one result to record."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from neuromerge.engine.execute import MergeJob
from neuromerge.engine.plan import MergePlan
from neuromerge.engine.result import MergeResult, TensorSink
from neuromerge.io.reader import TensorMeta
from neuromerge.method_api import MethodSpec


@dataclass
class PlanSequence:
    """The plans of a sliced merge, each with the parts of the output it writes."""

    parts: Sequence[tuple[str, MergePlan]]

    @property
    def tensors(self) -> list[Any]:
        return [t for _, p in self.parts for t in p.tensors]

    def table(self) -> str:
        return "\n\n".join(f"== {label}\n{plan.table()}" for label, plan in self.parts)

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [{"writes": label, **plan.to_dict()} for label, plan in self.parts]}


@dataclass
class JobSequence:
    """Jobs run in order into one sink; quacks like a :class:`MergeJob` for the pipeline."""

    parts: Sequence[tuple[str, MergeJob]]

    @property
    def method(self) -> MethodSpec:
        return self.parts[0][1].method

    @property
    def plan(self) -> PlanSequence:
        return PlanSequence([(label, job.plan) for label, job in self.parts])

    def output_metas(self) -> list[tuple[str, TensorMeta]]:
        return [m for _, job in self.parts for m in job.output_metas()]

    def execute(self, sink: TensorSink, *, progress: bool = True) -> MergeResult:
        results = [(label, job.execute(sink, progress=progress)) for label, job in self.parts]
        return combine(results)


def combine(results: Sequence[tuple[str, MergeResult]]) -> MergeResult:
    """One record of several jobs' results: counts, timings and bytes summed, per-tensor
    records merged; the first job's parameters, each job's under ``extra['groups']``."""
    first = results[0][1]
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    extra: dict[str, Any] = {"groups": []}
    for label, r in results:
        for k, v in r.seconds.items():
            seconds[k] = seconds.get(k, 0.0) + v
        for k, n in r.counts.items():
            counts[k] = counts.get(k, 0) + n
        for k, v in r.extra.items():
            if isinstance(v, dict):
                extra.setdefault(k, {}).update(v)
            else:
                extra.setdefault(k, v)
        extra["groups"].append({"writes": label, "models": r.model_names, "parameters": r.params,
                                "trim": None if r.trim is None else {"sigma": r.trim.sigma}})
    names = list(dict.fromkeys(n for _, r in results for n in r.model_names))
    return MergeResult(method=first.method, params=first.params,
                       trim=first.trim if len(results) == 1 else None, counts=counts,
                       seconds=seconds, model_names=names,
                       bytes_read=sum(r.bytes_read for _, r in results), extra=extra)
