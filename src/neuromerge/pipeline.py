"""``neuromerge merge``: a config in, a ready-to-load HF model folder out."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from neuromerge import __version__
from neuromerge.architectures import Architecture, read_architecture, tied_copies
from neuromerge.config import MergeConfig, config_from_dict, load_config
from neuromerge.engine import MergeResult, TensorPlan, build_plan, log, run
from neuromerge.errors import ConfigError, InputError, OutputError
from neuromerge.io.card import input_record, model_card
from neuromerge.io.dtypes import NAME_TO_TORCH, dtype_name
from neuromerge.io.lora import is_adapter_folder, open_expert, write_lora
from neuromerge.io.model_folder import copy_support_files
from neuromerge.io.reader import CheckpointReader, TensorMeta, fingerprint, open_checkpoint
from neuromerge.io.writer import OutputFolder, ShardedSafetensorsWriter, parse_size
from neuromerge.statistics import open_statistics
from neuromerge.vocab import VocabAlignment, align_vocabularies


def merge(config: MergeConfig | Mapping[str, Any] | str | os.PathLike[str],
          out_dir: str | os.PathLike[str], *, force: bool = False, device: str = "cpu",
          progress: bool = True, max_shard_size: str | int | None = None,
          overrides: Mapping[str, Any] | None = None,
          memory_limit: str | int | None = None, read_ahead: bool = True,
          lora_rank: int | None = None) -> MergeResult:
    """Merge the models a config names and write an HF model folder to ``out_dir``.

    ``config`` is a :class:`MergeConfig`, a dict of the YAML's content, or a YAML path.
    The folder is written next to ``out_dir`` under a temporary name and renamed into place only
    when complete; an existing ``out_dir`` is replaced only with ``force``.
    ``memory_limit`` (``"8GB"`` or bytes) bounds the whole process's memory: tensors that do not
    fit are merged in row blocks.
    Experts may be PEFT LoRA adapter folders (formed over the base tensor by tensor).
    ``lora_rank`` (or the config's ``save_lora``) also writes the merged delta as a LoRA adapter
    of that rank to ``out_dir/lora`` (truncated SVD; errors in the merge record).
    """
    cfg = _as_config(config)
    if overrides:
        cfg = cfg.with_overrides(dict(overrides))
    method = cfg.method
    params = cfg.validated_parameters()
    shard_size = parse_size(max_shard_size if max_shard_size is not None else cfg.max_shard_size)
    limit = None if memory_limit is None else parse_size(memory_limit, what="--memory-limit")
    out = Path(out_dir)
    rank = lora_rank if lora_rank is not None else cfg.save_lora
    if rank is not None and rank < 1:
        raise ConfigError(f"--save-lora: the LoRA rank must be at least 1 (got {rank})")

    base_path = cfg.resolve_path(cfg.base_model)
    expert_paths = [cfg.resolve_path(e.model) for e in cfg.models]
    stat_paths = ([cfg.resolve_path(e.statistics) for e in cfg.models if e.statistics]
                  if method.needs else [])

    with contextlib.ExitStack() as stack:
        base = _open_base(base_path)  # headers only: cheap, and errors come early
        stack.callback(base.close)
        experts: list[CheckpointReader] = []
        for p in expert_paths:
            experts.append(open_expert(p, base_path))
            stack.callback(experts[-1].close)
        statistics = []
        for e, p in zip(cfg.models, stat_paths, strict=False):
            statistics.append(open_statistics(p, method.needs, model=e.model))
            stack.callback(statistics[-1].close)
        _refuse_overlap(out, [base_path, *expert_paths, *stat_paths])
        folder = OutputFolder(out, force=force)  # refuses an existing output before any work
        if base_path.is_file():
            log.warning("the base is a bare weights file: no config.json or tokenizer to copy, "
                        "so %s will hold weights only", out)
        log.info("merging %d models into %s with %s", len(experts), out, method.name)
        tmp = stack.enter_context(folder)
        writer: list[ShardedSafetensorsWriter] = []

        def sink_factory(plan: list[TensorPlan]) -> ShardedSafetensorsWriter:
            writer.append(ShardedSafetensorsWriter(
                tmp, [(p.name, _out_meta(p)) for p in plan], shard_size))
            return writer[0]

        prints = [fingerprint(r) for r in (base, *experts)]
        arch = read_architecture(base_path)
        vocab = _vocab(cfg, base_path, expert_paths, base, experts)
        aligned = [base, *experts] if vocab is None else vocab.wrap()
        merge_base, merge_experts = aligned[0], aligned[1:]
        if vocab is not None and arch.vocab_sizes:
            arch = dataclasses.replace(arch, vocab_sizes=(vocab.rows,))  # tied copies
        result = run(merge_base, merge_experts, method, params, sink_factory,
                     model_keys=[e.model for e in cfg.models],
                     per_model=[e.parameters for e in cfg.models],
                     tensor_class=cfg.tensor_class, missing_tensors=cfg.missing_tensors,
                     dtype=cfg.dtype, out_dtype=cfg.out_dtype, device=device,
                     progress=progress, memory_limit=limit, read_ahead=read_ahead,
                     architecture=arch, neuron_axes=cfg.neuron_axis,
                     statistics=statistics or None)
        writer[0].close()
        if rank is not None:
            result.extra["lora"] = _save_lora(base, tmp, rank, arch, cfg.base_model, out)
        copy_support_files(base_path, tmp, out_dtype=cfg.out_dtype)
        if vocab is not None:
            vocab.write(tmp, base_path)
        as_given = cfg.model_dump(exclude_defaults=False)
        roles = ["base"] + [f"expert {i + 1}" for i in range(len(experts))]
        paths = [cfg.base_model] + [e.model for e in cfg.models]
        inputs = [input_record(role, path, r, fp) for role, path, r, fp in
                  zip(roles, paths, (base, *experts), prints, strict=True)]
        (tmp / "README.md").write_text(model_card(
            version=__version__, method=method, config=as_given, inputs=inputs, result=result))
        _write_record(tmp, as_given, result, writer[0])
    result.output = out
    log.info("wrote %s (%d shard%s, %.2f GB) in %.1f s", out, len(writer[0].filenames),
             "" if len(writer[0].filenames) == 1 else "s", writer[0].total_size / 1e9,
             result.seconds["total"])
    return result


@dataclass
class MergePlan:
    """What ``neuromerge merge --dry-run`` shows: every tensor's kind and neuron axis, the
    architecture read from the base's config.json, the tied copies left out."""

    architecture: Architecture
    tensors: list[TensorPlan]
    tied: dict[str, str]

    def table(self) -> str:
        rows = [("tensor", "shape", "dtype", "kind", "neuron axis", "why")]
        for p in self.tensors:
            axis = str(p.neuron_axis) if p.kind == "neuronal" else "-"
            why = p.axis_reason if p.kind == "neuronal" else p.reason
            rows.append((p.name, "x".join(map(str, p.meta.shape)) or "scalar",
                         dtype_name(p.meta.dtype), p.kind, axis, why))
        rows += [(copy, "", "", "tied", "-", f"= {kept}, left out") for copy, kept
                 in self.tied.items()]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [f"architecture: {self.architecture.describe()}"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[5]
                  for r in rows]
        return "\n".join(line.rstrip() for line in lines)


def plan_merge(config: MergeConfig | Mapping[str, Any] | str | os.PathLike[str]) -> MergePlan:
    """The plan of a merge without merging: headers and config.json only (and, where a base
    stores tied embeddings twice, the reads that check the copies are equal)."""
    cfg = _as_config(config)
    base_path = cfg.resolve_path(cfg.base_model)
    with contextlib.ExitStack() as stack:
        base = _open_base(base_path)
        stack.callback(base.close)
        experts: list[CheckpointReader] = []
        for e in cfg.models:
            experts.append(open_expert(cfg.resolve_path(e.model), base_path))
            stack.callback(experts[-1].close)
        arch = read_architecture(base_path)
        vocab = _vocab(cfg, base_path, [cfg.resolve_path(e.model) for e in cfg.models], base,
                       experts)
        if vocab is not None:
            wrapped = vocab.wrap()
            base, experts = wrapped[0], wrapped[1:]
            if arch.vocab_sizes:
                arch = dataclasses.replace(arch, vocab_sizes=(vocab.rows,))
        tied = tied_copies(base, experts, arch)
        plan = build_plan(base, experts, tensor_class=cfg.tensor_class,
                          missing_tensors=cfg.missing_tensors, architecture=arch,
                          neuron_axes=cfg.neuron_axis, omit=tied,
                          out_dtype=NAME_TO_TORCH[cfg.out_dtype] if cfg.out_dtype else None)
    return MergePlan(arch, plan, tied)


def _vocab(cfg: MergeConfig, base_path: Path, expert_paths: list[Path],
           base: CheckpointReader, experts: list[CheckpointReader]) -> VocabAlignment | None:
    """The vocabulary alignment ``vocab`` / ``tokenizer_source`` ask for, or None."""
    mode = cfg.vocab_mode
    if mode == "error":
        return None
    model = (cfg.resolve_path(cfg.tokenizer_source[len("model:"):]) if mode == "model"
             else None)
    alignment = align_vocabularies(mode, base_path, expert_paths, base, experts, model)
    log.info("vocab: %s (%d rows; %d added tokens); vocabulary tensors: %s", mode,
             alignment.rows, len(alignment.added), ", ".join(sorted(alignment.names)) or "none")
    return alignment


def _open_base(path: Path) -> CheckpointReader:
    if is_adapter_folder(path):
        raise InputError(f"{path}: base_model is a LoRA adapter folder; the base must be the "
                         f"full pretrained model (adapters go under models)")
    return open_checkpoint(path)


def _save_lora(base: CheckpointReader, folder: Path, rank: int, arch: Architecture,
               base_name: str, out: Path) -> dict[str, Any]:
    """The merged model just written to ``folder``, as a LoRA adapter in ``folder/lora``."""
    merged = open_checkpoint(folder)
    try:
        conv1d = {n for n in merged.names() if arch.column_neurons(n, merged.meta(n))}
        report = write_lora(base, merged, folder / "lora", rank, conv1d=conv1d,
                            base_name=base_name)
    finally:
        merged.close()
    report.path = str(out / "lora")  # where it will be once the folder is renamed into place
    log.info("%s", report.summary())
    rec = report.record()
    rec["path"] = "lora"
    return rec


def _as_config(config: MergeConfig | Mapping[str, Any] | str | os.PathLike[str]
               ) -> MergeConfig:
    if isinstance(config, MergeConfig):
        return config
    if isinstance(config, Mapping):
        return config_from_dict(dict(config))
    return load_config(config)


def _out_meta(p: TensorPlan) -> TensorMeta:
    return TensorMeta(p.meta.shape, p.out_dtype)


def _refuse_overlap(out: Path, inputs: list[Path]) -> None:
    """With --force the output folder is replaced: it must not be, contain, or sit inside an
    input folder, nor contain an input file."""
    o = out.resolve()
    for p in inputs:
        r = p.resolve()
        inside_input_folder = r.is_dir() and r in o.parents
        if o == r or o in r.parents or inside_input_folder:
            raise OutputError(f"{out}: output would overlap the input {p}; choose another folder")


def _write_record(folder: Path, config: Mapping[str, Any], result: MergeResult,
                  writer: ShardedSafetensorsWriter) -> None:
    """Machine-readable twins of the card: the config with resolved parameters, and the stats."""
    resolved = dict(config)
    resolved["parameters"] = result.params
    (folder / "neuromerge_config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    stats = result.stats
    record = {
        "neuromerge_version": __version__,
        "method": result.method,
        "parameters": result.params,
        "models": result.model_names,
        "statistics": [e.get("statistics") for e in config.get("models", [])],
        "trim": None if stats is None else {
            "scope": stats.scope, "density": stats.density, "n_entries": stats.n_entries,
            "k": stats.k, "thresholds": stats.thresholds, "sigma": stats.sigma,
            "l1_total": stats.l1_total, "l1_kept": stats.l1_kept},
        "tensors": result.counts,
        "shards": writer.filenames,
        "seconds": result.seconds,
        "bytes_read": result.bytes_read,
        "memory_budget": result.extra.get("memory_budget"),
        "row_blocks": result.extra.get("row_blocks", {}),
        "architecture": result.extra.get("architecture"),
        "neuron_axes": result.extra.get("neuron_axes", {}),
        "tied": result.extra.get("tied", {}),
        "lora": result.extra.get("lora"),
    }
    (folder / "neuromerge_result.json").write_text(json.dumps(record, indent=2) + "\n")

