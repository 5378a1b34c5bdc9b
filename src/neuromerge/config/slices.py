"""mergekit's ``slices``: an output model built from layer ranges of its inputs, each output
slice a merge of its own (``sources`` with a ``layer_range`` each, an optional ``base_model`` and
``parameters``), and ``passthrough`` frankenmerges that stack ranges of different models.

A sliced config is expanded here into merge *groups*: flat configs (a base and models, as
``models:`` configs are) plus which source layers feed which output layers. mergekit 0.1.5's
planner (``MergePlanner.plan_module``) defines the parts:

- the tensors before the layers (embeddings) are merged from the first slice's sources, with
  its parameters, at t = 0;
- slice i's output layers follow the previous slices' (renumbered from 0), layer k of n taking
  source layer ``layer_range[0] + k`` of each source, at t = k / (n − 1) (t = 1 for one layer);
- the tensors after the layers (final norm, head) are merged from the last slice's sources,
  with its parameters, at t = 0.

Parameters: a source's own over its slice's over the global ones (mergekit's
``ConfigReader.parameter_sources``); a filter list that does not match falls through to the next
scope. Parts whose flat configs are equal (the same base, models and parameters: a single slice
over whole models, or a frankenmerge's consecutive ranges of one model) form one group, merged as
one job, so merge-wide passes (a global trim, ``lambda2: auto``) see all of its tensors.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from neuromerge.errors import ConfigError
from neuromerge.param_settings import fallback

log = logging.getLogger("neuromerge")

Part = Literal["pre", "layers", "post"]


class SliceSource(BaseModel):
    """One input of an output slice: a model and the layers [start, stop) taken from it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a local path or a Hugging Face Hub id (as models[i].model)")
    layer_range: tuple[int, int] = Field(description="[start, stop): the model's layers taken")
    parameters: dict[str, Any] | None = Field(None, description="this source's parameters "
                                                                "(per-model)")

    @field_validator("model", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("layer_range")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] < value[1]:
            raise ValueError(f"must be [start, stop) with 0 <= start < stop (got "
                             f"{list(value)})")
        return value


class OutputSlice(BaseModel):
    """One slice of the output model's layers."""

    model_config = ConfigDict(extra="forbid")

    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = Field(None, description="this slice's base (default: the "
                                                     "config's)")
    parameters: dict[str, Any] | None = Field(None, description="this slice's parameters")
    residual_weight: float | None = Field(None, description="accepted as mergekit does, and "
                                                            "unused, as there")

    @field_validator("base_model", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value


@dataclass(frozen=True)
class LayerPart:
    """Output tensors of one part of a group: ``part`` pre / post (the tensors outside the
    layers, by name), or ``layers``: output layers ``out_start`` .. ``out_start + n - 1`` from
    each model's source layers ``starts[model]`` ..."""

    part: Part
    label: str
    out_start: int = 0
    n: int = 0
    starts: Mapping[str, int] = field(default_factory=dict)


@dataclass
class SliceGroup:
    """One merge job of a sliced config: a flat mergekit-style config (``base_model``,
    ``models``, ``parameters``, as from the YAML) and the parts it writes."""

    flat: dict[str, Any]
    parts: list[LayerPart]

    @property
    def label(self) -> str:
        return ", ".join(p.label for p in self.parts)

    def start_of(self, model: str, part: LayerPart) -> int:
        """The first source layer of ``model`` in ``part``; a base that is not one of the part's
        sources is read at the first source's layers (it then gives shapes only, as
        for linear and passthrough)."""
        key = os.path.normpath(model)
        for m, s in part.starts.items():
            if os.path.normpath(m) == key:
                return s
        return next(iter(part.starts.values()))


#: Top-level keys a group's flat config does not take: what applies to the whole output.
_WHOLE_OUTPUT = ("slices", "tokenizer_source", "tokenizer", "chat_template", "vocab",
                 "save_lora", "max_shard_size")


def slice_groups(data: Mapping[str, Any], slices: list[OutputSlice]) -> list[SliceGroup]:
    """The merge groups of a sliced config (``data`` as loaded, ``slices`` validated)."""
    base = data.get("base_model")
    top = {k: v for k, v in data.items() if k not in _WHOLE_OUTPUT}
    flats, parts = [], []
    out = 0
    for i, s in enumerate(slices):
        lengths = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
        if len(lengths) != 1:
            raise ConfigError(f"slices[{i}]: every source of a slice takes the same number of "
                              f"layers (got layer_range "
                              f"{', '.join(str(list(x.layer_range)) for x in s.sources)})")
        seen = [os.path.normpath(src.model) for src in s.sources]
        if len(set(seen)) != len(seen):
            raise ConfigError(f"slices[{i}]: a model is listed twice among the sources; a slice "
                              f"takes each model once")
        if s.residual_weight is not None:
            log.info("slices[%d].residual_weight: unused, as in mergekit 0.1.5", i)
        n = lengths.pop()
        flats.append(_flat(top, s, base))
        parts.append(LayerPart("layers", f"slices[{i}] (layers {out}..{out + n - 1})", out, n,
                               {src.model: src.layer_range[0] for src in s.sources}))
        out += n
    pre = LayerPart("pre", "embeddings (from slices[0])",
                    starts={src.model: 0 for src in slices[0].sources})
    post = LayerPart("post", f"final norm and head (from slices[{len(slices) - 1}])",
                     starts={src.model: 0 for src in slices[-1].sources})
    ordered = [(flats[0], pre), *zip(flats, parts, strict=True), (flats[-1], post)]
    groups: dict[str, SliceGroup] = {}
    for flat, part in ordered:
        key = json.dumps(flat, sort_keys=True, default=str)
        groups.setdefault(key, SliceGroup(flat, [])).parts.append(part)
    return list(groups.values())


def out_layers(slices: list[OutputSlice]) -> int:
    """The output model's number of layers."""
    return sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in slices)


def donor(data: Mapping[str, Any], slices: list[OutputSlice]) -> str:
    """The model whose config.json and tokenizer the output takes: ``base_model``, else the
    first slice's first source (mergekit takes an arbitrary referenced model)."""
    return data.get("base_model") or slices[0].sources[0].model


def _flat(top: Mapping[str, Any], s: OutputSlice, base: str | None) -> dict[str, Any]:
    params = dict(top.get("parameters") or {})
    for key, setting in (s.parameters or {}).items():
        params[key] = fallback(setting, params.get(key))
    flat = {**top, "models": [{"model": src.model, "parameters": dict(src.parameters or {})}
                              for src in s.sources]}
    if params:
        flat["parameters"] = params
    if s.base_model or base:
        flat["base_model"] = s.base_model or base
    return flat
