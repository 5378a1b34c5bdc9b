"""The experts of a benchmark run: one per task and seed, fine-tuned from the base unless cached
under a key of what shapes it (base, task, training data, training settings), and their data
statistics for fisher and regmean, computed through each expert's own head and cached next to it.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from neuromerge.bench.profiles import Profile
from neuromerge.bench.results import dataset_key, record_key
from neuromerge.bench.train import TextDataset, expert_classifier, finetune
from neuromerge.io.reader import fingerprint, open_checkpoint
from neuromerge.registry import get_method

log = logging.getLogger("neuromerge")


class ExpertCache:
    """The experts in ``<cache>/experts``, and their statistics; ``train`` holds the training
    splits of the seed being run (``Bench.prepare`` sets it), which the statistics read."""

    def __init__(self, profile: Profile, cache_dir: Path, base_dir: Path, base_id: str,
                 tokenizer: Any, timer: Callable[[str], AbstractContextManager[Any]],
                 progress: bool) -> None:
        self.profile, self.cache, self.base, self.base_id = profile, cache_dir, base_dir, base_id
        self.tokenizer, self.timer, self.progress = tokenizer, timer, progress
        self.train: dict[str, TextDataset] = {}

    def folder(self, task: str, seed: int, train: TextDataset) -> Path:
        """Where the expert for this task, seed and training data is (or will be) cached."""
        cfg = replace(self.profile.train, seed=seed)
        key = record_key("expert", self.base_id, task, dataset_key(train), asdict(cfg))
        return self.cache / "experts" / f"{task}-s{seed}-{key}"

    def get(self, task: str, seed: int, train: TextDataset) -> Path:
        """The expert's folder, fine-tuned into it first unless it is cached."""
        cfg = replace(self.profile.train, seed=seed)
        folder = self.folder(task, seed, train)
        if (folder / "train.json").exists():
            return folder
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with self.timer("fine-tuning"):
            rec = finetune(self.base, train, tmp, cfg, progress=self.progress,
                           desc=f"fine-tune {task} (seed {seed})")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        log.info("expert %s seed %d: %d examples, %.0f s, final loss %.3f", task, seed,
                 rec["n_train"], rec["seconds"], rec["final_loss"])
        return folder

    def statistics_inputs(self, task: str, expert: Path, n: int | None = None
                          ) -> tuple[torch.nn.Module, Iterator[dict[str, torch.Tensor]], str]:
        """What an expert's statistics are computed on: the expert with its own head, batches
        of the first ``n`` (default ``n_stats``) examples of its training split, and the prefix
        of its body's tensor names."""
        from neuromerge.statistics import text_batches

        texts, labels = self._stats_examples(task, n)
        model = expert_classifier(expert, len(self.train[task].label_names))
        batches = text_batches(self.tokenizer, texts, labels, batch_size=16,
                               max_length=self.profile.train.max_length)
        return model, batches, model.base_model_prefix + "."

    def _stats_examples(self, task: str, n: int | None = None) -> tuple[list[str], list[int]]:
        train = self.train[task]
        n = min(n or self.profile.n_stats, len(train.texts))
        return train.texts[:n], train.labels[:n]

    def statistics(self, kind: str, task: str, expert: Path) -> Path:
        """The expert's statistics on (the first ``n_stats`` of) its own training split,
        computed through its own head and cached next to it, keyed by model, data, settings."""
        from neuromerge.statistics import (
            cached_statistics,
            data_hash,
            fisher_diagonal,
            regmean_grams,
        )

        texts, labels = self._stats_examples(task)
        reader = open_checkpoint(expert / "body")
        try:
            names, fp = set(reader.names()), fingerprint(reader)
        finally:
            reader.close()

        def compute() -> Any:
            model, batches, prefix = self.statistics_inputs(task, expert)
            with self.timer("statistics"):
                stats = (fisher_diagonal(model, batches, prefix=prefix) if kind == "fisher"
                         else regmean_grams(model, batches, prefix=prefix))
            stats.tensors = {k: v for k, v in stats.tensors.items() if k in names}
            return stats

        return cached_statistics(expert / "statistics", kind, fp, data_hash(texts, labels),
                                 compute, {"max_length": self.profile.train.max_length,
                                           "fisher_type": "expected"})

    def statistics_for(self, method: str, experts: Mapping[str, Path],
                       tasks: Sequence[str] | None = None) -> list[Path] | None:
        kind = get_method(method).needs
        if kind is None:
            return None
        return [self.statistics(kind, t, experts[t]) for t in (tasks or self.profile.tasks)]
