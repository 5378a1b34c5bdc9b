"""What a merge will do, as a plain value: every output tensor's source tensors, its kind
(neuronal, point, copy) and neuron axis, its parameters and its units of work, and the merge-wide
passes that must run first. Built by :func:`neuromerge.engine.prepare` from the checkpoints'
headers; shown by ``neuromerge merge --dry-run``; run by an executor (``engine.execute``)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from neuromerge.architectures import UNKNOWN, Architecture, neuron_axis
from neuromerge.engine.memory import MemoryPolicy, format_bytes
from neuromerge.errors import ConfigError, InputError
from neuromerge.io.dtypes import dtype_name
from neuromerge.io.reader import CheckpointReader, TensorMeta

Kind = Literal["neuronal", "point", "copy"]


@dataclass(frozen=True)
class Source:
    """An input tensor: ``name`` in the model ``model`` (``"base"`` or an expert's key)."""

    model: str
    name: str


@dataclass(frozen=True)
class TensorPlan:
    name: str
    meta: TensorMeta
    kind: Kind
    out_dtype: torch.dtype
    reason: str = ""  # why a tensor is copied from the base
    #: The axis indexing the neurons of a neuronal tensor (1: a Conv1D (in, out) weight); the
    #: engine hands methods every tensor with this axis first, and writes it back as stored.
    neuron_axis: int = 0
    axis_reason: str = ""  # why neuron_axis is not 0
    #: The inputs, the base's first, then one per expert in order (the base's alone for a copy).
    sources: tuple[Source, ...] = ()
    #: The method's parameters for this tensor (gradients and filters resolved); values a
    #: merge-wide pass resolves (``auto``) stay as given until the executor has run that pass.
    params: Mapping[str, Any] = field(default_factory=dict)
    #: The per-model values of the method's per-model parameters, for this tensor.
    model_params: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def density(self) -> float | tuple[float, ...]:
        """The trim density of each model for this tensor (one for all where models set none)."""
        return self.model_params.get("density", self.params.get("density", 1.0))

    @property
    def trim_count(self) -> str:
        """How a density counts the entries it keeps (``kernels.keep_count``; methods without a
        ``trim_count`` parameter, such as NeuroMerging, take the papers' ceil)."""
        return self.params.get("trim_count", "ceil")


Rows = tuple[int, int] | None  # a block [start, stop) of a tensor's neurons, or None: all of it


@dataclass(frozen=True)
class Unit:
    """One piece of work: a tensor, or a block of its neurons (rows in the (neurons, ...) view
    methods see; columns of a Conv1D weight as stored) when it is too large for the budget."""

    plan: TensorPlan
    rows: Rows = None

    @property
    def numel(self) -> int:
        meta = self.plan.meta
        if self.rows is None:
            return meta.numel
        return (self.rows[1] - self.rows[0]) * (meta.numel // meta.shape[self.plan.neuron_axis])


@dataclass(frozen=True)
class MergePlan:
    """Everything a merge will do, decided from headers and config alone: the executor only
    reads, computes and writes what this says.

    ``params`` are the method's merge-wide parameters (``auto`` values are resolved by the trim
    pass); ``model_params`` / ``model_seeds`` the per-expert values; ``held`` the tensors merged
    in row blocks from inputs read whole once; ``passes`` what must be computed over the inputs
    before the merge (each a short description)."""

    method: str
    params: Mapping[str, Any]
    models: tuple[str, ...]
    model_params: Mapping[str, tuple[Any, ...]]
    model_seeds: tuple[int, ...] | None
    tensors: tuple[TensorPlan, ...]
    units: tuple[Unit, ...]
    held: frozenset[str]
    passes: tuple[str, ...]
    memory: MemoryPolicy
    architecture: Architecture
    tied: Mapping[str, str]
    compute_dtype: torch.dtype
    device: torch.device
    #: Parameters given as gradients or filters: their value is each tensor's own.
    varying: tuple[str, ...] = ()

    def tensor_values(self, p: TensorPlan) -> dict[str, Any]:
        """The tensor's values of the :attr:`varying` parameters (per-model ones as lists)."""
        out: dict[str, Any] = {k: p.params[k] for k in self.varying if k in p.params}
        out.update({k: list(v) for k, v in p.model_params.items() if k in self.varying})
        return out

    def blocks(self) -> dict[str, int]:
        """{tensor: number of row blocks} of every tensor not merged whole."""
        out: dict[str, int] = {}
        for u in self.units:
            if u.rows is not None:
                out[u.plan.name] = out.get(u.plan.name, 0) + 1
        return out

    def budget_blocks(self) -> dict[str, int]:
        """The tensors split because they do not fit the memory budget (not just ``held``)."""
        return {n: k for n, k in self.blocks().items() if n not in self.held}

    def table(self) -> str:
        """The plan as ``neuromerge merge --dry-run`` prints it."""
        rows = [("tensor", "shape", "dtype", "kind", "neuron axis", "why")]
        for p in self.tensors:
            axis = str(p.neuron_axis) if p.kind == "neuronal" else "-"
            why = p.axis_reason if p.kind == "neuronal" else p.reason
            if self.varying and p.kind != "copy":
                values = ", ".join(f"{k}={_short(v)}" for k, v in self.tensor_values(p).items())
                why = f"{why}; {values}" if why else values
            rows.append((p.name, "x".join(map(str, p.meta.shape)) or "scalar",
                         dtype_name(p.meta.dtype), p.kind, axis, why))
        rows += [(copy, "", "", "tied", "-", f"= {kept}, left out") for copy, kept
                 in self.tied.items()]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [f"architecture: {self.architecture.describe()}"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[5]
                  for r in rows]
        lines += self._summary()
        return "\n".join(line.rstrip() for line in lines)

    def _summary(self) -> list[str]:
        shown = ", ".join(f"{k}={v}" for k, v in self.params.items())
        blocks = self.blocks()
        lines = [f"method: {self.method} ({shown})",
                 f"units: {len(self.units)} ({len(blocks)} tensor"
                 f"{'' if len(blocks) == 1 else 's'} in row blocks; memory budget "
                 f"{format_bytes(self.memory.budget)}"
                 f"{', under --memory-limit' if self.memory.limited else ''})"]
        lines += [f"pass before the merge: {p}" for p in self.passes]
        return lines

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (``neuromerge merge --dry-run --plan-json FILE``)."""
        units: dict[str, list[list[int]] | None] = {}
        for u in self.units:
            if u.rows is None:
                units[u.plan.name] = None
            else:
                units.setdefault(u.plan.name, []).append(list(u.rows))  # type: ignore[union-attr]
        return {
            "method": self.method, "params": dict(self.params), "models": list(self.models),
            "model_params": {k: list(v) for k, v in self.model_params.items()},
            "model_seeds": None if self.model_seeds is None else list(self.model_seeds),
            "architecture": self.architecture.record(), "tied": dict(self.tied),
            "compute_dtype": dtype_name(self.compute_dtype), "device": str(self.device),
            "memory": {"budget": self.memory.budget, "limited": self.memory.limited,
                       "band": self.memory.band},
            "passes": list(self.passes), "varying": list(self.varying),
            "tensors": [{
                "name": p.name, "shape": list(p.meta.shape), "dtype": dtype_name(p.meta.dtype),
                "out_dtype": dtype_name(p.out_dtype), "kind": p.kind,
                "neuron_axis": p.neuron_axis, "why": p.axis_reason or p.reason,
                "sources": [{"model": s.model, "name": s.name} for s in p.sources],
                "params": dict(p.params),
                "model_params": {k: list(v) for k, v in p.model_params.items()},
                "held": p.name in self.held,
                "units": units[p.name]} for p in self.tensors],
        }


def _short(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def to_neurons(t: torch.Tensor, axis: int) -> torch.Tensor:
    """A tensor as stored → (neurons, ...): the neuron axis first (contiguous)."""
    return t if axis == 0 else t.movedim(axis, 0).contiguous()


def from_neurons(t: torch.Tensor, axis: int) -> torch.Tensor:
    """The inverse of :func:`to_neurons`: back to the stored layout."""
    return t if axis == 0 else t.movedim(0, axis).contiguous()


def build_plan(base: CheckpointReader, experts: Sequence[CheckpointReader], *,
               tensor_class: Mapping[str, Kind] | None = None,
               missing_tensors: str = "error",
               out_dtype: torch.dtype | None = None,
               architecture: Architecture = UNKNOWN,
               neuron_axes: Mapping[str, int] | None = None,
               omit: Mapping[str, str] | None = None,
               model_keys: Sequence[str] | None = None,
               params: Mapping[str, Any] | None = None) -> list[TensorPlan]:
    """Check that the experts match the base (names, shapes, float-ness), classify tensors and
    resolve each neuronal tensor's neuron axis (``architecture``'s rules, ``neuron_axes`` glob
    overrides first).

    Only tensors that are merged must be in every expert: a ``copy`` tensor (non-float buffers
    such as ``position_ids``, or a ``tensor_class`` override) comes from the base whatever the
    experts hold, so an expert saved without it (newer transformers drop such buffers) is fine.
    ``omit`` ({tied copy: kept tensor}, ``architectures.tied_copies``) are left out of the plan.
    ``model_keys`` name the experts in the tensors' sources; ``params`` are every tensor's.
    """
    omit = omit or {}
    keys = list(model_keys) if model_keys is not None else [ex.source for ex in experts]
    params = dict(params or {})
    _refuse_foreign_tensors(base, experts)
    have = [set(ex.names()) for ex in experts]
    plan = []
    for name in base.names():
        if name in omit:
            continue
        meta = base.meta(name)
        kind, reason = _classify(name, meta, tensor_class or {})
        if kind != "copy" and (why := architecture.copy_reason(name, meta)) and not any(
                fnmatch.fnmatchcase(name, pat) for pat in (tensor_class or {})):
            kind, reason = "copy", why
        lacking = [ex.source for ex, names in zip(experts, have, strict=True)
                   if name not in names]
        if lacking and kind != "copy":
            if missing_tensors != "base":
                raise InputError(f"{lacking[0]}: lacks tensor {name!r} of the base model "
                                 f"(set missing_tensors: base to copy such tensors from the base)")
            kind, reason = "copy", f"missing in {lacking[0]}"
        _check_expert_tensors(name, meta, base, experts, have)
        out = out_dtype if (out_dtype is not None and meta.dtype.is_floating_point) else meta.dtype
        axis, why_axis = (neuron_axis(name, meta, architecture, neuron_axes or {})
                          if kind == "neuronal" else (0, ""))
        sources = (Source("base", name),) + (() if kind == "copy" else
                                             tuple(Source(k, name) for k in keys))
        plan.append(TensorPlan(name, meta, kind, out, reason, axis, why_axis, sources,
                               params if kind != "copy" else {}))
    return plan


def _refuse_foreign_tensors(base: CheckpointReader, experts: Sequence[CheckpointReader]) -> None:
    base_set = set(base.names())
    for ex in experts:
        extra = [n for n in ex.names() if n not in base_set]
        if extra:
            raise InputError(f"{ex.source}: tensor {extra[0]!r} is not in the base model "
                             f"{base.source} ({len(extra)} such tensors; different architecture?)")


def _check_expert_tensors(name: str, meta: TensorMeta, base: CheckpointReader,
                          experts: Sequence[CheckpointReader], have: Sequence[set[str]]) -> None:
    for ex, names in zip(experts, have, strict=True):
        if name not in names:
            continue
        em = ex.meta(name)
        if em.shape != meta.shape:
            raise InputError(
                f"tensor {name!r}: shape {list(em.shape)} in {ex.source} differs from "
                f"{list(meta.shape)} in the base {base.source}" + _shape_hint(name, meta, em))
        if meta.dtype.is_floating_point and not em.dtype.is_floating_point:
            raise InputError(f"tensor {name!r}: {dtype_name(em.dtype)} in {ex.source} but "
                             f"{dtype_name(meta.dtype)} in the base")


_VOCAB_NAMES = re.compile(r"embed|(^|\.)emb(\.|$)|wte|lm_head|word|shared|tok")


def _shape_hint(name: str, a: TensorMeta, b: TensorMeta) -> str:
    if len(a.shape) == len(b.shape) == 2 and a.shape[1:] == b.shape[1:]:
        if _VOCAB_NAMES.search(name):
            return (" (vocabulary sizes differ: set vocab: base to keep the base's tokens, or "
                    "vocab: union to merge the experts' added tokens too)")
        return " (row counts differ)"
    return " (different architecture?)"


def _classify(name: str, meta: TensorMeta, overrides: Mapping[str, Kind]) -> tuple[Kind, str]:
    is_float = meta.dtype.is_floating_point
    for pattern, kind in overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            if kind != "copy" and not is_float:
                raise ConfigError(f"tensor_class: {pattern!r} makes {name!r} {kind}, but it is "
                                  f"{dtype_name(meta.dtype)}; only float tensors are merged")
            if kind == "neuronal" and len(meta.shape) < 2:
                raise ConfigError(f"tensor_class: {pattern!r} makes {name!r} neuronal, but it is "
                                  f"{len(meta.shape)}-D; neurons are rows of a ≥2-D tensor")
            return kind, f"tensor_class {pattern!r}" if kind == "copy" else ""
    if not is_float:
        return "copy", "not a float tensor"
    return ("neuronal" if len(meta.shape) >= 2 else "point"), ""


def kind_counts(plan: Sequence[TensorPlan]) -> dict[str, int]:
    return {k: sum(1 for p in plan if p.kind == k) for k in ("neuronal", "point", "copy")}
