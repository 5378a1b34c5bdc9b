"""``neuromerge merge``: a config in, a ready-to-load HF model folder out."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from neuromerge import __version__
from neuromerge.architectures import Architecture, read_architecture
from neuromerge.config import MergeConfig, config_from_dict, load_config
from neuromerge.engine import MergeJob, MergePlan, MergeResult, prepare
from neuromerge.engine.sequence import JobSequence, PlanSequence
from neuromerge.errors import ConfigError
from neuromerge.io.card import input_record, model_card
from neuromerge.io.chat_templates import resolve_chat_template, write_chat_template
from neuromerge.io.hub import Hub
from neuromerge.io.lora import write_lora
from neuromerge.io.model_folder import copy_support_files
from neuromerge.io.reader import CheckpointReader, fingerprint, open_checkpoint
from neuromerge.io.sources import ModelOpener
from neuromerge.io.writer import (
    OutputFolder,
    ShardedSafetensorsWriter,
    parse_size,
    refuse_overlap,
)
from neuromerge.slicing import prepare_sliced, write_layer_count
from neuromerge.statistics import open_statistics
from neuromerge.vocab import VocabAlignment, align_vocabularies

log = logging.getLogger("neuromerge")


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
    Experts may be PEFT LoRA adapter folders (formed over the base tensor by tensor), and
    any model a Hugging Face Hub id (``org/name[@revision]``, ``MODEL+LORA``): the merge is
    planned and checked from config.json and the safetensors headers before any weight is
    downloaded.
    ``lora_rank`` (or the config's ``save_lora``) also writes the merged delta as a LoRA adapter
    of that rank to ``out_dir/lora`` (truncated SVD; errors in the merge record).
    """
    cfg = _with_overrides(config, overrides)
    params = cfg.validated_parameters()  # config errors before any file is opened
    shard_size = parse_size(max_shard_size if max_shard_size is not None else cfg.max_shard_size)
    limit = None if memory_limit is None else parse_size(memory_limit, what="--memory-limit")
    out = Path(out_dir)
    rank = lora_rank if lora_rank is not None else cfg.save_lora
    if rank is not None and rank < 1:
        raise ConfigError(f"--save-lora: the LoRA rank must be at least 1 (got {rank})")
    hub = Hub(progress=progress)
    with contextlib.ExitStack() as stack:
        heads = stack.enter_context(contextlib.ExitStack())
        inputs = heads.enter_context(open_inputs(cfg, headers_only=True, hub=hub))
        refuse_overlap(out, [inputs.base_path, *inputs.expert_paths, *inputs.stat_paths])
        folder = OutputFolder(out, force=force)  # refuses an existing output before any work
        if inputs.base_path.is_file():
            log.warning("the base is a bare weights file: no config.json or tokenizer to copy, "
                        "so %s will hold weights only", out)
        log.info("merging %d models into %s with %s", len(inputs.experts), out, cfg.merge_method)
        job = _prepare(cfg, params, inputs, device=device, memory_limit=limit,
                       read_ahead=read_ahead)  # every check, hub models from their headers
        if inputs.remote:  # planned and checked: now download the weights and plan again
            heads.close()
            inputs = stack.enter_context(open_inputs(cfg, hub=hub))
            job = _prepare(cfg, params, inputs, device=device, memory_limit=limit,
                           read_ahead=read_ahead)
        prints = [fingerprint(r) for r in (inputs.base, *inputs.experts)]
        tmp = stack.enter_context(folder)
        writer = ShardedSafetensorsWriter(tmp, job.output_metas(), shard_size)
        result = job.execute(writer, progress=progress)
        writer.close()
        if rank is not None:
            result.extra["lora"] = _save_lora(inputs.base, tmp, rank, inputs.architecture,
                                              cfg.base_model, out)
        copy_support_files(inputs.base_path, tmp, out_dtype=cfg.out_dtype)
        write_layer_count(tmp, cfg)
        if inputs.vocab is not None:
            inputs.vocab.write(tmp, inputs.base_path)
        if cfg.chat_template is not None:
            result.extra["chat_template"] = _chat_template(tmp, cfg.chat_template, inputs)
        _write_card_and_record(tmp, cfg, inputs, prints, job.method, result, writer, out.name)
    result.output = out
    log.info("wrote %s (%d shard%s, %.2f GB) in %.1f s", out, len(writer.filenames),
             "" if len(writer.filenames) == 1 else "s", writer.total_size / 1e9,
             result.seconds["total"])
    return result


def plan_merge(config: MergeConfig | Mapping[str, Any] | str | os.PathLike[str], *,
               overrides: Mapping[str, Any] | None = None, device: str = "cpu",
               memory_limit: str | int | None = None) -> MergePlan | PlanSequence:
    """The plan of a merge without merging: headers, config.json and the statistics files'
    headers only (and, where a base stores tied embeddings twice, the reads that check the
    copies are equal). What ``neuromerge merge --dry-run`` prints. Hub models are read from
    their config.json and safetensors headers: no weight is downloaded."""
    cfg = _with_overrides(config, overrides)
    params = cfg.validated_parameters()
    limit = None if memory_limit is None else parse_size(memory_limit, what="--memory-limit")
    with open_inputs(cfg, headers_only=True, dry_run=True) as inputs:
        return _prepare(cfg, params, inputs, device=device, memory_limit=limit).plan


@dataclass
class MergeInputs:
    """The open readers of a config's models (headers read, no tensor yet), the base's
    architecture and, where ``vocab`` / ``tokenizer_source`` ask for one, the vocabulary
    alignment; ``aligned`` are the readers the merge reads (wrapped by the alignment).
    ``remote``: some hub model is known from its headers only (weights not downloaded).
    ``commits``: per input (base, then experts), the commit each hub repo it names resolved to."""

    base_path: Path
    expert_paths: list[Path]
    stat_paths: list[Path]
    base: CheckpointReader
    experts: list[CheckpointReader]
    statistics: list[CheckpointReader]
    architecture: Architecture
    vocab: VocabAlignment | None
    remote: bool = False
    commits: list[dict[str, str]] = dataclasses.field(default_factory=list)

    @property
    def aligned(self) -> list[CheckpointReader]:
        return [self.base, *self.experts] if self.vocab is None else self.vocab.wrap()


@contextlib.contextmanager
def open_inputs(cfg: MergeConfig, *, headers_only: bool = False, hub: Hub | None = None,
                dry_run: bool = False) -> Iterator[MergeInputs]:
    """Open every input a config names, closing them on exit. Hub models are downloaded, or
    with ``headers_only`` read from their safetensors headers when not cached (``.bin`` only
    repos downloaded first, refused with ``dry_run``)."""
    method = cfg.method
    models = ModelOpener(hub, headers_only=headers_only, download_bin=not dry_run)
    base_ref = cfg.resolve_model(cfg.base_model)
    refs = [cfg.resolve_model(e.model) for e in cfg.models]
    stat_paths = ([cfg.resolve_path(e.statistics) for e in cfg.models if e.statistics]
                  if method.needs else [])
    with contextlib.ExitStack() as stack:
        base = models.base(base_ref)  # headers only: cheap, and errors come early
        stack.callback(base.close)
        experts: list[CheckpointReader] = []
        for ref in refs:
            experts.append(models.expert(ref, base_ref))
            stack.callback(experts[-1].close)
        base_path = models.path(base_ref)
        expert_paths = [models.path(r) for r in refs]
        statistics = []
        for e, p in zip(cfg.models, stat_paths, strict=False):
            statistics.append(open_statistics(p, method.needs, model=e.model))
            stack.callback(statistics[-1].close)
        arch = read_architecture(base_path)
        vocab = _vocab(cfg, base_path, expert_paths, base, experts, models)
        if vocab is not None and arch.vocab_sizes:
            arch = dataclasses.replace(arch, vocab_sizes=(vocab.rows,))  # tied copies
        if models.remote and _tie_candidates(base, arch):
            log.info("tied embeddings stored twice are found once the weights are downloaded "
                     "(their values are compared): the plan from headers merges both")
            arch = dataclasses.replace(arch, tie_word_embeddings=False)
        yield MergeInputs(base_path, expert_paths, stat_paths, base, experts, statistics, arch,
                          vocab, models.remote, [models.commits(r) for r in (base_ref, *refs)])


def _prepare(cfg: MergeConfig, params: dict[str, Any], inputs: MergeInputs, *, device: str,
             memory_limit: int | None, read_ahead: bool = True) -> MergeJob | JobSequence:
    if cfg.slices:
        return prepare_sliced(cfg, inputs.aligned, device=device, memory_limit=memory_limit,
                              read_ahead=read_ahead, architecture=inputs.architecture)
    merge_base, *merge_experts = inputs.aligned
    return prepare(merge_base, merge_experts, cfg.method, params,
                   model_keys=[e.model for e in cfg.models],
                   per_model=[e.parameters for e in cfg.models],
                   tensor_class=cfg.tensor_class, missing_tensors=cfg.missing_tensors,
                   dtype=cfg.dtype, out_dtype=cfg.out_dtype, device=device,
                   memory_limit=memory_limit, read_ahead=read_ahead,
                   architecture=inputs.architecture, neuron_axes=cfg.neuron_axis,
                   statistics=inputs.statistics or None)


def _with_overrides(config: MergeConfig | Mapping[str, Any] | str | os.PathLike[str],
                    overrides: Mapping[str, Any] | None) -> MergeConfig:
    cfg = _as_config(config)
    return cfg.with_overrides(dict(overrides)) if overrides else cfg


#: the methods of mergekit 0.1.5: a config for one of them also runs with mergekit, so its text is
#: written as mergekit_config.yml, as mergekit does
MERGEKIT_METHODS = frozenset({
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "slerp", "nuslerp", "multislerp", "karcher",
    "model_stock", "sce", "nearswap", "arcee_fusion", "passthrough"})


def _write_card_and_record(folder: Path, cfg: MergeConfig, inputs: MergeInputs,
                           prints: list[str], method: Any, result: MergeResult,
                           writer: ShardedSafetensorsWriter, out_name: str) -> None:
    as_given = cfg.model_dump(exclude_defaults=False)
    if as_given.get("slices") is None:
        del as_given["slices"]
    if cfg.slices:  # the slices as written: each group's parameters are in the record
        as_given = {**cfg.raw, **{k: v for k, v in as_given.items()
                                  if k not in cfg.raw and k not in ("models", "parameters")}}
    roles = ["base"] + [f"expert {i + 1}" for i in range(len(inputs.experts))]
    paths = [cfg.base_model] + [e.model for e in cfg.models]
    records = [input_record(role, path, r, fp, commits) for role, path, r, fp, commits in
               zip(roles, paths, (inputs.base, *inputs.experts), prints,
                   inputs.commits or [{}] * len(paths), strict=True)]
    (folder / "README.md").write_text(model_card(
        version=__version__, method=method, config=as_given, inputs=records, result=result,
        name=out_name, text=cfg.text, mergekit_defaults=cfg.mergekit_defaults))
    if cfg.text is not None and cfg.merge_method in MERGEKIT_METHODS:
        # mergekit's record of the merge, as it writes one: the YAML as given
        (folder / "mergekit_config.yml").write_text(cfg.text)
    _write_record(folder, as_given, result, writer,
                  {r["path"]: r["hub_commits"] for r in records if r.get("hub_commits")})


def _vocab(cfg: MergeConfig, base_path: Path, expert_paths: list[Path],
           base: CheckpointReader, experts: list[CheckpointReader], models: ModelOpener
           ) -> VocabAlignment | None:
    """The vocabulary alignment ``vocab`` / ``tokenizer_source`` ask for, or None."""
    mode = cfg.vocab_mode
    if mode == "error":
        return None
    model = (models.path(cfg.resolve_model(cfg.tokenizer_source[len("model:"):]))
             if mode == "model" and cfg.tokenizer_source else None)
    alignment = align_vocabularies(mode, base_path, expert_paths, base, experts, model)
    log.info("vocab: %s (%d rows; %d added tokens); vocabulary tensors: %s", mode,
             alignment.rows, len(alignment.added), ", ".join(sorted(alignment.names)) or "none")
    return alignment


def _chat_template(folder: Path, value: str, inputs: MergeInputs) -> str | None:
    template = resolve_chat_template(value, [inputs.base_path, *inputs.expert_paths])
    if template is None:
        log.warning("chat_template: auto: no input model has a chat template; the tokenizer's "
                    "is kept")
        return None
    write_chat_template(folder, template)
    log.info("chat_template: %s", value if value != template else "as given")
    return value


def _tie_candidates(base: CheckpointReader, arch: Architecture) -> bool:
    """Whether the tied-copy check would compare tensor values (two vocabulary-sized tensors
    of one shape): not possible from headers."""
    if not arch.tie_word_embeddings or not arch.vocab_sizes:
        return False
    shapes = [base.meta(n).shape for n in base.names()
              if base.meta(n).shape and base.meta(n).shape[0] in arch.vocab_sizes]
    return len(shapes) != len(set(shapes))


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


def _write_record(folder: Path, config: Mapping[str, Any], result: MergeResult,
                  writer: ShardedSafetensorsWriter,
                  hub_commits: Mapping[str, Mapping[str, str]] | None = None) -> None:
    """Machine-readable twins of the card: the config with resolved parameters, and the record
    of the merge (trim pass, timings, row blocks, architecture)."""
    resolved = dict(config)
    if not config.get("slices"):
        resolved["parameters"] = result.params
    (folder / "neuromerge_config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    trim = result.trim
    record = {
        "neuromerge_version": __version__,
        "method": result.method,
        "parameters": result.params,
        "models": result.model_names,
        "hub_commits": dict(hub_commits or {}),
        "statistics": [e.get("statistics") for e in config.get("models", [])],
        "trim": None if trim is None else {
            "scope": trim.scope, "density": trim.density, "n_entries": trim.n_entries,
            "k": trim.k, "thresholds": trim.thresholds, "sigma": trim.sigma,
            "l1_total": trim.l1_total, "l1_kept": trim.l1_kept},
        "tensors": result.counts,
        "shards": writer.filenames,
        "seconds": result.seconds,
        "bytes_read": result.bytes_read,
        "memory_budget": result.extra.get("memory_budget"),
        "row_blocks": result.extra.get("row_blocks", {}),
        "architecture": result.extra.get("architecture"),
        "neuron_axes": result.extra.get("neuron_axes", {}),
        "tied": result.extra.get("tied", {}),
        "tensor_params": result.extra.get("tensor_params", {}),
        "lora": result.extra.get("lora"),
        "groups": result.extra.get("groups"),
        "chat_template": result.extra.get("chat_template"),
    }
    (folder / "neuromerge_result.json").write_text(json.dumps(record, indent=2) + "\n")

