"""Planning a merge: from the open checkpoints (headers only), the method and its parameters to a
:class:`~neuromerge.engine.execute.MergeJob` whose plan says what every output tensor is made of,
how it is cut into units, and which merge-wide passes run first. Every check that needs no
tensor values happens here, before any work."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from neuromerge.architectures import UNKNOWN, Architecture, suspicious_without_config, tied_copies
from neuromerge.devices import compute_dtype, resolve_device
from neuromerge.engine.execute import MergeJob
from neuromerge.engine.inputs import DataStatistics
from neuromerge.engine.memory import MemoryPolicy, format_bytes
from neuromerge.engine.model_params import model_seeds, model_values, tensor_parameters
from neuromerge.engine.plan import Kind, MergePlan, TensorPlan, Unit, build_plan
from neuromerge.engine.trim_pass import needs_trim_pass
from neuromerge.engine.units import plan_units
from neuromerge.errors import ConfigError
from neuromerge.io.dtypes import NAME_TO_TORCH
from neuromerge.io.reader import CheckpointReader
from neuromerge.method_api import MethodSpec
from neuromerge.param_settings import varying_keys

log = logging.getLogger("neuromerge")


def prepare(base: CheckpointReader, experts: Sequence[CheckpointReader], method: MethodSpec,
            params: Mapping[str, Any], *, model_keys: Sequence[str],
            per_model: Sequence[Mapping[str, Any]] | None = None,
            tensor_class: Mapping[str, Kind] | None = None, missing_tensors: str = "error",
            dtype: str | torch.dtype = "float32", out_dtype: str | torch.dtype | None = None,
            device: str | torch.device = "cpu", memory_limit: int | None = None,
            read_ahead: bool = True, architecture: Architecture = UNKNOWN,
            neuron_axes: Mapping[str, int] | None = None,
            statistics: Sequence[CheckpointReader] | None = None,
            positions: Mapping[str, float] | None = None) -> MergeJob:
    """Plan the merge of ``experts`` into ``base`` with ``method`` (``params`` validated).

    ``model_keys`` name the experts in logs, results and the plan's sources, and identify them
    for per-model random streams (DARE), so the order of the experts does not matter.
    ``memory_limit`` (bytes, the whole process) bounds the tensors in flight: a tensor that does
    not fit is merged in row blocks, with the same result; without it, tensors are split only
    beyond half the memory available now. ``architecture`` (the base's config) and
    ``neuron_axes`` (glob → axis overrides) decide each tensor's neuron axis and which tensors
    are tied copies. ``statistics``: one reader per expert of the data statistics a method
    declared with ``needs`` reads, tensor names as in the checkpoints. ``positions``: each
    tensor's layer position t for gradients, where the layer numbers do not tell it (slices)."""
    t0 = time.perf_counter()
    method.check_models(len(experts))
    dev, cdtype = resolve_device(device), compute_dtype(dtype)
    odtype = NAME_TO_TORCH[out_dtype] if isinstance(out_dtype, str) else out_dtype
    tied = tied_copies(base, experts, architecture)
    tensors = build_plan(base, experts, tensor_class=tensor_class,
                         missing_tensors=missing_tensors, out_dtype=odtype,
                         architecture=architecture, neuron_axes=neuron_axes, omit=tied,
                         model_keys=model_keys, params=params)
    log_layout(tensors, architecture, tied, neuron_axes or {})
    if method.needs is not None and statistics is None:
        raise ConfigError(f"{method.name} needs per-model {method.needs} statistics "
                          f"(models[i].statistics; see `neuromerge statistics --help`)")
    if statistics is not None and len(statistics) != len(experts):
        raise ConfigError(f"{len(statistics)} statistics files for {len(experts)} models")
    # the units hold their tensor's plan: every tensor's parameters are resolved first
    varying = varying_keys([params, *(per_model or [])])
    tensors, values = _tensor_parameters(method, params, per_model, tensors, architecture,
                                         len(experts), varying, positions)
    memory = MemoryPolicy.decide(memory_limit, trims=method.trims, n_experts=len(experts))
    units, held = plan_units(tensors, base, experts, memory.budget, cdtype,
                             row_local=method.row_local, working_set=method.working_set)
    plan = MergePlan(
        method=method.name, params=dict(params), models=tuple(model_keys), model_params=values,
        model_seeds=model_seeds(params, model_keys, per_model), tensors=tuple(tensors),
        units=tuple(units), held=frozenset(held), passes=_passes(method, params, tensors, units),
        memory=memory, architecture=architecture, tied=tied, compute_dtype=cdtype, device=dev,
        varying=varying)
    _check_blocks(plan, method)
    data_stats = (None if method.needs is None or statistics is None else
                  DataStatistics(method.needs, statistics, tensors, method.name, dev, cdtype))
    return MergeJob(plan, method, base, experts, data_stats, read_ahead,
                    time.perf_counter() - t0)


def _tensor_parameters(method: MethodSpec, params: Mapping[str, Any],
                       per_model: Sequence[Mapping[str, Any]] | None,
                       tensors: Sequence[TensorPlan], architecture: Architecture,
                       n_models: int, varying: Sequence[str],
                       positions: Mapping[str, float] | None = None
                       ) -> tuple[list[TensorPlan], dict[str, tuple[Any, ...]]]:
    """Every merged tensor's parameters and per-model values, and the merge-wide per-model
    values (empty where gradients or filters make them vary per tensor)."""
    merged = [p for p in tensors if p.kind != "copy"]
    if not varying:
        values = model_values(method, params, n_models, per_model)
        return [replace(p, model_params=values) if p.kind != "copy" else p
                for p in tensors], values
    if method.trims and params.get("trim_scope") == "global" and "density" in varying:
        raise ConfigError("density varies per tensor (a gradient or filters), but a global trim "
                          "takes one density per model: set trim_scope: tensor")
    per = tensor_parameters(method, params, per_model, [p.name for p in merged],
                            architecture.num_layers, positions)
    return [replace(p, params=per[p.name][0], model_params=per[p.name][1])
            if p.kind != "copy" else p for p in tensors], {}


def _passes(method: MethodSpec, params: Mapping[str, Any], tensors: Sequence[TensorPlan],
            units: Sequence[Unit]) -> tuple[str, ...]:
    """What the executor computes over the inputs before it merges (for the plan's reader)."""
    out = []
    if needs_trim_pass(method, tensors):
        what = ("each task's trim threshold and σ" if params.get("trim_scope") == "global"
                else "each task's σ")
        auto = ", ".join(k for k, v in params.items() if v == "auto")
        out.append(f"trim over the whole model ({what}" + (f"; resolves {auto})" if auto else ")"))
    blocked = {u.plan.name for u in units if u.rows is not None and u.plan.kind != "copy"}
    if blocked:
        out.append(f"for each of the {len(blocked)} tensors merged in row blocks: its own trim "
                   f"thresholds (per-tensor trim) and the tensor-wide sums of its tie-breaks")
    return tuple(out)


def _check_blocks(plan: MergePlan, method: MethodSpec) -> None:
    blocked, memory = plan.budget_blocks(), plan.memory
    if blocked and not method.row_local:
        name = next(iter(blocked))
        raise ConfigError(f"tensor {name!r} does not fit the memory budget "
                          f"({format_bytes(memory.budget)} for tensors in flight) and "
                          f"{method.name} needs whole tensors (it is not row-local): raise "
                          f"--memory-limit")
    if blocked:
        log.info("%d tensor%s too large for the memory budget (%s) merged in row blocks: %s",
                 len(blocked), "" if len(blocked) == 1 else "s", format_bytes(memory.budget),
                 ", ".join(f"{n} ({k} blocks)" for n, k in list(blocked.items())[:3]))


def log_layout(plan: Sequence[TensorPlan], arch: Architecture, tied: Mapping[str, str],
               overrides: Mapping[str, int]) -> None:
    """The architecture, the tensors whose neurons are not rows, and the tied copies left out;
    a warning where a GPT-2-style Conv1D name is merged row-wise for lack of a config.json."""
    cols = [p for p in plan if p.neuron_axis != 0]
    log.info("architecture: %s; %d tensor%s with another neuron axis than rows%s",
             arch.describe(), len(cols), "" if len(cols) == 1 else "s",
             "".join(f"{', ' if i else ': '}{p.name} (axis {p.neuron_axis}, {p.axis_reason})"
                     for i, p in enumerate(cols[:2])) + (", ..." if len(cols) > 2 else ""))
    for copy, kept in tied.items():
        log.info("%s is tied to %s (equal in every model): merged once, left out of the output "
                 "as save_pretrained does", copy, kept)
    if not arch.source and not overrides:
        name = suspicious_without_config([p.name for p in plan if p.kind == "neuronal"])
        if name:
            log.warning("no config.json: %r is merged with its rows as neurons; if it is a "
                        "GPT-2-style Conv1D weight (in, out), its neurons are columns: set "
                        "neuron_axis: {'*.c_fc.weight': 1, ...} in the config", name)
