"""Running a sliced config (``neuromerge.config.slices``): each merge group's models seen
through renamed readers (their source layers under the output's layer numbers), one job per
group, and the written config.json given the output's layer count."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from neuromerge.config import MergeConfig
from neuromerge.config.slices import LayerPart, SliceGroup, out_layers
from neuromerge.engine import prepare
from neuromerge.engine.sequence import JobSequence
from neuromerge.engine.trim_pass import needs_trim_pass
from neuromerge.errors import ConfigError
from neuromerge.io.layer_view import RenamedReader
from neuromerge.io.reader import CheckpointReader
from neuromerge.param_settings import layer_index, with_layer_index

#: Tensors outside the layers that come before them (embeddings); the others (final norm,
#: LM head) come after, as mergekit's architectures' ``pre_weights`` / ``post_weights``.
_PRE = re.compile(r"(^|\.)(embed_tokens|embed_in|embeddings?|wte|wpe|word_embeddings|"
                  r"position_embeddings|token_type_embeddings|embed_positions)(\.|$)")


def prepare_sliced(cfg: MergeConfig, readers: Sequence[CheckpointReader],
                   **options: Any) -> JobSequence:
    """One job per merge group of ``cfg`` (sliced); ``readers`` are the open models in
    ``cfg``'s order (base_model, then models), ``options`` go to :func:`prepare`."""
    by_model = {os.path.normpath(m): r for m, r in
                zip([cfg.base_model, *(e.model for e in cfg.models)], readers, strict=True)}
    parts = []
    for group, flat in cfg.groups:
        params = flat.validated_parameters()
        keys = [flat.base_model, *(e.model for e in flat.models)]
        views, positions = group_views(group, keys, by_model)
        job = prepare(views[0], views[1:], flat.method, params,
                      model_keys=keys[1:], per_model=[e.parameters for e in flat.models],
                      tensor_class=flat.tensor_class, missing_tensors=flat.missing_tensors,
                      dtype=flat.dtype, out_dtype=flat.out_dtype, neuron_axes=flat.neuron_axis,
                      positions=positions, **options)
        parts.append((group.label, job))
    if len(parts) > 1:
        for label, job in parts:
            if needs_trim_pass(job.method, job.plan.tensors):
                raise ConfigError(
                    f"slices: {job.method.name} needs a pass over the whole model (trim_scope: "
                    f"global, or an 'auto' value), but the slices merge different models or "
                    f"parameters ({len(parts)} groups; {label}): set trim_scope: tensor and "
                    f"numeric values")
    return JobSequence(parts)


def group_views(group: SliceGroup, keys: Sequence[str],
                by_model: Mapping[str, CheckpointReader]
                ) -> tuple[list[RenamedReader], dict[str, float]]:
    """Each model of a group (``keys``: its base, then its models) under the output's names,
    and each output tensor's layer position t."""
    views, positions = [], {}
    for key in keys:
        reader = by_model[os.path.normpath(key)]
        mapping: dict[str, str] = {}
        for part in group.parts:
            mapping.update(_part_names(part, group.start_of(key, part), reader, key, positions))
        views.append(RenamedReader(reader, mapping, f"{reader.source} ({group.label})"))
    return views, positions


def _part_names(part: LayerPart, start: int, reader: CheckpointReader, key: str,
                positions: dict[str, float]) -> dict[str, str]:
    names = reader.names()
    if part.part != "layers":
        out = {n: n for n in names if layer_index(n) is None
               and bool(_PRE.search(n)) == (part.part == "pre")}
        positions.update(dict.fromkeys(out, 0.0))
        return out
    have = {i for n in names if (i := layer_index(n)) is not None}
    stop = start + part.n
    if not set(range(start, stop)) <= have:
        count = max(have) + 1 if have else 0
        raise ConfigError(f"{part.label}: layer_range [{start}, {stop}) of {key} reaches beyond "
                          f"its {count} layers")
    out = {}
    for k in range(part.n):
        t = k / (part.n - 1) if part.n > 1 else 1.0  # mergekit's plan_slice
        for n in names:
            if layer_index(n) == start + k:
                name = with_layer_index(n, part.out_start + k)
                out[name] = n
                positions[name] = t
    return out


def write_layer_count(folder: Path, cfg: MergeConfig) -> None:
    """The written config.json's layer count set to the output's (``num_hidden_layers``,
    ``n_layer`` or ``num_layers``, also in a text sub-config), and a per-layer ``layer_types``
    list rebuilt from the source layers."""
    path = folder / "config.json"
    if not cfg.slices or not path.is_file():
        return
    data = json.loads(path.read_text())
    n = out_layers(cfg.slices)
    sources = [s.sources[0].layer_range[0] + k for s in cfg.slices
               for k in range(s.sources[0].layer_range[1] - s.sources[0].layer_range[0])]
    for sub in [data, *(v for v in data.values() if isinstance(v, dict))]:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(sub.get(key), int):
                sub[key] = n
                break
        types = sub.get("layer_types")
        if isinstance(types, list) and types and all(i < len(types) for i in sources):
            sub["layer_types"] = [types[i] for i in sources]
    path.write_text(json.dumps(data, indent=2) + "\n")
