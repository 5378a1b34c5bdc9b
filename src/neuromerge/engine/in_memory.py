"""Merging state dicts held in memory, with the same plan and executor as ``neuromerge merge``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from neuromerge.architectures import from_config
from neuromerge.engine.plan import Kind
from neuromerge.engine.prepare import prepare
from neuromerge.engine.result import DictSink, MergeResult
from neuromerge.errors import ConfigError
from neuromerge.io.reader import StateDictReader
from neuromerge.method_api import MethodSpec, get_method


def merge_state_dicts(
    base: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]] | Mapping[str, Mapping[str, torch.Tensor]],
    method: str | MethodSpec = "neuromerging",
    params: Mapping[str, Any] | None = None, *,
    tensor_class: Mapping[str, Kind] | None = None, missing_tensors: str = "error",
    dtype: str = "float32", out_dtype: str | None = None, device: str = "cpu",
    progress: bool = False, per_model: Sequence[Mapping[str, Any]] | None = None,
    memory_limit: int | None = None, config: Mapping[str, Any] | None = None,
    neuron_axis: Mapping[str, int] | None = None,
    statistics: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> MergeResult:
    """Merge in-memory state dicts with the same engine as ``neuromerge merge`` (global trim and
    ``lambda2: auto`` included). ``experts`` may be a list or a {name: state_dict} mapping (the
    names identify models for per-model seeds). The merged tensors are in ``.state_dict``.
    ``config`` (``model.config.to_dict()`` or a config.json's content) gives the architecture
    (GPT-2's Conv1D weights have their neurons as columns); ``neuron_axis`` maps name globs to
    axes, as the YAML key of that name. ``params`` and ``per_model`` values may be mergekit's
    gradients and filters (``neuromerge.param_settings``). ``statistics``: per expert (same
    order), the {tensor name: statistic} a method declared with ``needs`` reads (Fisher, RegMean
    Grams)."""
    m = method if isinstance(method, MethodSpec) else get_method(method)
    full = m.validate_settings(params)
    if isinstance(experts, Mapping):
        keys, sds = list(experts), list(experts.values())
    else:
        keys, sds = [str(i) for i in range(len(experts))], list(experts)
    if not sds:
        raise ConfigError("no expert models to merge")
    if statistics is not None and len(statistics) != len(sds):
        raise ConfigError(f"{len(statistics)} statistics for {len(sds)} models")
    job = prepare(StateDictReader(base, "base"),
                  [StateDictReader(sd, k) for k, sd in zip(keys, sds, strict=True)],
                  m, full, model_keys=keys, per_model=per_model, tensor_class=tensor_class,
                  missing_tensors=missing_tensors, dtype=dtype, out_dtype=out_dtype,
                  device=device, memory_limit=memory_limit, architecture=from_config(config),
                  neuron_axes=neuron_axis,
                  statistics=None if statistics is None else
                  [StateDictReader(sd, f"statistics of {k}") for k, sd in
                   zip(keys, statistics, strict=True)])
    sink = DictSink(job.plan.tensors)
    result = job.execute(sink, progress=progress)
    result.state_dict = sink.state_dict
    return result
